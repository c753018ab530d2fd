"""Token sampling: temperature, top-k, top-p, with the log-probs the trainer needs.

Two log-probs per drawn token (:func:`sample_with_behaviour`):

* the **policy** log-prob ``log_softmax(logits / T)[token]`` over the full vocabulary — the
  quantity the trainer recomputes with ``r4b_kernels.token_logprobs(..., temperature=T)``;
* the **behaviour** log-prob: the token's log-probability under the distribution it was
  actually drawn from, the truncated and renormalised one, ``policy - log S`` with ``S`` the
  probability mass the filters kept (top-k, top-p, vocabulary limit, banned ids).

The importance weight that corrects sampling from the truncated distribution is
``exp(policy_trainer - behaviour) = S * pi_trainer / pi_engine``: with top-p 0.9 it is about
``S`` (the kept mass), not 1; computing it against the policy log-prob would silently drop
the correction.  Forced tokens were not drawn: their behaviour log-prob is their policy one.

**Random streams** (:func:`row_uniforms`): the engine draws with one uniform per row and step,
a counter-based hash of the row's seed and the step, by inverse CDF.  A row's draws therefore
do not depend on which other rows share its batch, so splitting a batch into waves (a KV-cache
budget) gives the same samples as one big batch.

Order of the filters (as in vLLM and transformers): vocabulary limit and banned ids, then
top-k on the tempered logits, then top-p on the distribution that remains.  Ties at the k-th
logit are all kept, so top-k may keep more than k tokens when logits are exactly equal.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import require_range

#: Modes that have their own response budget.
BUDGET_MODES: tuple[str, ...] = ("think", "no_think", "auto")


@dataclass(kw_only=True)
class SamplingParams:
    """How the rollout engine draws tokens, and how many it may draw per mode."""

    temperature: float = 1.0
    """Softmax temperature (> 0). 1.0 samples from the model's distribution."""
    top_p: float = 1.0
    """Nucleus sampling mass in (0, 1]; 1.0 disables it."""
    top_k: int = 0
    """Keep only the k most likely tokens; 0 disables it."""
    max_new_tokens_think: int = 96
    """Response budget of rollouts forced into thinking mode (tokens, forced tokens excluded)."""
    max_new_tokens_no_think: int = 24
    """Response budget of rollouts forced into non-thinking mode (tokens, forced tokens
    excluded)."""
    max_new_tokens_auto: int = 96
    """Response budget of auto-mode rollouts (tokens, forced tokens excluded)."""
    greedy: bool = False
    """Take the most likely token instead of sampling (evaluation); log-probs as above."""

    def __post_init__(self):
        _require_number("temperature", self.temperature)
        _require_number("top_p", self.top_p)
        require_range("temperature", self.temperature, 0.0, lo_open=True)
        require_range("top_p", self.top_p, 0.0, 1.0, lo_open=True)
        _require_int("top_k", self.top_k)
        require_range("top_k", self.top_k, 0)
        for m in BUDGET_MODES:
            name = f"max_new_tokens_{m}"
            _require_int(name, getattr(self, name))
            require_range(name, getattr(self, name), 1)
        if not isinstance(self.greedy, bool):
            raise TypeError(f"greedy must be a bool, got {type(self.greedy).__name__} "
                            f"{self.greedy!r}")

    def max_new_tokens(self, mode: str) -> int:
        """Response budget of ``mode`` ('think' / 'no_think' / 'auto'), forced tokens excluded."""
        if mode not in BUDGET_MODES:
            raise ValueError(f"mode must be one of {BUDGET_MODES}, got {mode!r}")
        return getattr(self, f"max_new_tokens_{mode}")


def _require_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")


def _require_number(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")


def truncated_logits(logits: torch.Tensor, params: SamplingParams,
                     vocab_limit: int | None = None,
                     banned: torch.Tensor | None = None) -> torch.Tensor:
    """Tempered fp32 logits ``[B, V]`` with every token outside the sampling support set to
    ``-inf`` (vocabulary limit, banned ids, top-k, top-p); ``softmax`` of the result is the
    distribution :func:`sample` draws from."""
    return _truncate(logits.float() / params.temperature, params, vocab_limit, banned)


def _truncate(z: torch.Tensor, params: SamplingParams, vocab_limit: int | None,
              banned: torch.Tensor | None) -> torch.Tensor:
    V = z.shape[-1]
    if (vocab_limit is not None and vocab_limit < V) or banned is not None:
        z = z.clone()
        if vocab_limit is not None:
            z[:, vocab_limit:] = float("-inf")
        if banned is not None:
            z[:, banned.to(z.device)] = float("-inf")
    if params.top_k and params.top_k < V:
        kth = torch.topk(z, params.top_k, dim=-1).values[:, -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_z, idx = torch.sort(z, dim=-1, descending=True)
        probs = torch.softmax(sorted_z, dim=-1)
        # Keep the smallest prefix whose mass reaches top_p: drop a token when the mass
        # strictly before it already reaches top_p (so the top token is always kept).
        drop = (probs.cumsum(-1) - probs) >= params.top_p
        sorted_z = sorted_z.masked_fill(drop, float("-inf"))
        z = torch.empty_like(z).scatter_(-1, idx, sorted_z)
    return z


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None,
           *, forced: torch.Tensor | None = None, vocab_limit: int | None = None,
           banned: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row of ``logits [B, V]``; returns ``(tokens [B] int64, logprobs [B]
    fp32)`` with ``logprobs = log_softmax(logits / T)[token]`` (full vocabulary).

    Args:
        logits: ``[B, V]`` floating-point logits (any device).
        params: temperature / top-k / top-p / greedy.
        generator: random stream on ``logits.device`` (None: torch's default stream).
        forced: optional LongTensor ``[B]``; rows with a value ``>= 0`` take that token instead
            of a sampled one (its log-prob is still the model's).  Every row is drawn either
            way, so the generator's stream does not depend on which rows are forced.
        vocab_limit: tokens ``>= vocab_limit`` (padding rows of the LM head) are never drawn.
        banned: LongTensor of token ids that are never drawn (e.g. the image placeholder).
    """
    _check_logits(params, logits, vocab_limit, banned)
    zt = logits.float() / params.temperature
    z = _truncate(zt, params, vocab_limit, banned)
    if params.greedy:
        tokens = z.argmax(dim=-1)
    else:
        tokens = torch.multinomial(torch.softmax(z, dim=-1), 1, generator=generator)[:, 0]
    tokens = _apply_forced(tokens, forced, logits.shape[0])
    logp = torch.log_softmax(zt, dim=-1)
    return tokens, logp.gather(-1, tokens[:, None])[:, 0]


# ---------------------------------------------------------------- counter-based uniforms
_MASK64 = (1 << 64) - 1


def _i64(c: int) -> int:
    """A uint64 constant as the int64 with the same bits."""
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN = 0x9E3779B97F4A7C15
_MIX1, _MIX2 = _i64(0xBF58476D1CE4E5B9), _i64(0x94D049BB133111EB)


def _shr(z: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's ``>>`` is arithmetic)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def row_uniforms(seeds: torch.Tensor, step: int) -> torch.Tensor:
    """One uniform in [0, 1) per row: splitmix64 of ``(seed, step)``, computed with int64
    tensor ops on ``seeds``' device (wrapping multiplication), 53 bits of mantissa."""
    z = seeds.long() + _i64(((int(step) + 1) * _GOLDEN) & _MASK64)
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    z = z ^ _shr(z, 31)
    return _shr(z, 11).double() * (1.0 / (1 << 53))


def sample_with_behaviour(logits: torch.Tensor, params: SamplingParams, *,
                          uniforms: torch.Tensor | None = None,
                          generator: torch.Generator | None = None,
                          forced: torch.Tensor | None = None, vocab_limit: int | None = None,
                          banned: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(tokens [B], policy log-probs [B], behaviour log-probs [B])`` (see the module
    docstring).  ``uniforms [B]`` in [0, 1) draw by inverse CDF (one per row, e.g. from
    :func:`row_uniforms`); without them tokens are drawn with ``generator`` as in
    :func:`sample`.  Greedy decoding ignores both."""
    if uniforms is None:
        tokens, logp = sample(logits, params, generator, forced=forced, vocab_limit=vocab_limit,
                              banned=banned)
        z = truncated_logits(logits, params, vocab_limit, banned)
    else:
        _check_logits(params, logits, vocab_limit, banned)
        z = truncated_logits(logits, params, vocab_limit, banned)
        if params.greedy:
            tokens = z.argmax(dim=-1)
        else:
            probs = torch.softmax(z, dim=-1)
            cdf = probs.cumsum(-1)
            u = (uniforms.to(cdf.device, torch.float64) * cdf[:, -1].double())[:, None]
            # first index whose cumulative mass exceeds u (zero-mass tokens are never picked)
            tokens = torch.searchsorted(cdf.double(), u, right=True)[:, 0].clamp_(max=z.shape[-1] - 1)
        tokens = _apply_forced(tokens, forced, logits.shape[0])
        logp = torch.log_softmax(logits.float() / params.temperature, dim=-1) \
            .gather(-1, tokens[:, None])[:, 0]
    behaviour = torch.log_softmax(z, dim=-1).gather(-1, tokens[:, None])[:, 0]
    if forced is not None:
        behaviour = torch.where(forced.to(behaviour.device) >= 0, logp, behaviour)
    return tokens, logp, behaviour


def _apply_forced(tokens: torch.Tensor, forced: torch.Tensor | None, B: int) -> torch.Tensor:
    if forced is None:
        return tokens
    if forced.shape != (B,):
        raise ValueError(f"forced must be a LongTensor [{B}], got shape {tuple(forced.shape)}")
    forced = forced.to(device=tokens.device, dtype=torch.long)
    return torch.where(forced >= 0, forced, tokens)


def _check_logits(params, logits, vocab_limit, banned) -> None:
    if not isinstance(params, SamplingParams):
        raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or not logits.is_floating_point():
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"logits must be a floating-point tensor [B, V], got {shape}")
    B, V = logits.shape
    if B == 0 or V == 0:
        raise ValueError(f"logits must have at least one row and one column, got {(B, V)}")
    if vocab_limit is not None and not (1 <= vocab_limit <= V):
        raise ValueError(f"vocab_limit must be in [1, {V}], got {vocab_limit}")
    if banned is not None and banned.device.type == "cpu" and banned.numel():
        if int(banned.min()) < 0 or int(banned.max()) >= V:  # (device tensors: no sync)
            raise ValueError(f"banned ids must lie in [0, {V}), got {banned.tolist()}")
