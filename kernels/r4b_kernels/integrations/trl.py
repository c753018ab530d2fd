"""r4b_kernels behind TRL's GRPO seams (tested with TRL 1.16.0 and liger-kernel 0.8.5).

TRL's fused GRPO path moved between releases (read from each release's ``grpo_trainer.py``):

* TRL <= 1.12: ``use_liger_kernel=True`` builds liger-kernel's ``LigerFusedLinearGRPOLoss`` as
  ``trainer.liger_loss`` and calls it on the last hidden state and ``lm_head.weight``; TRL 1.13
  builds its own port of that module under the same name and call.
  :class:`R4BFusedLinearGRPOLoss` takes the same constructor arguments and call and returns the
  same ``(loss, metrics)``, computed by :func:`r4b_kernels.policy_loss`; :func:`use_r4b` swaps it
  in for ``trainer.liger_loss``.
* TRL 1.14 - 1.16: the loss is computed in Python from per-token log-probs, which a fused LM
  head (``trl.trainer.utils.add_fused_lm_head``, 1.15+) computes from the hidden states without
  materialising the logits; ``use_liger_kernel`` only applies Liger's layer kernels.
  :func:`patch_fused_lm_head` replaces that head's kernel with
  :func:`r4b_kernels.integrations.logprobs_entropy` (:func:`use_r4b` does so when the trainer has
  no ``liger_loss``).

This module imports TRL only inside :func:`patch_fused_lm_head` (and never liger-kernel).
"""

from __future__ import annotations

import math

import torch

from ..policy_loss import policy_loss, token_logprobs
from . import logprobs_entropy

__all__ = ["TESTED_TRL", "TESTED_LIGER", "SUPPORTED_LOSS_TYPES", "R4BFusedLinearGRPOLoss",
           "patch_fused_lm_head", "use_r4b"]

#: TRL releases whose fused LM head :func:`patch_fused_lm_head` was tested with.
TESTED_TRL = ">=1.15,<1.17"
#: liger-kernel release whose ``LigerFusedLinearGRPOLoss`` :class:`R4BFusedLinearGRPOLoss` was
#: checked against (the module TRL <= 1.12 builds).
TESTED_LIGER = "0.8.5"
SUPPORTED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")


def _unsupported(option, value, supported):
    return ValueError(f"R4BFusedLinearGRPOLoss: {option}={value!r} is not supported by r4b_kernels' "
                      f"clipped-ratio loss; supported: {supported}")


class R4BFusedLinearGRPOLoss(torch.nn.Module):
    """``LigerFusedLinearGRPOLoss``-compatible GRPO loss on r4b's fused kernel.

    Constructor arguments are liger-kernel 0.8.5's.  What r4b's loss expresses (per token,
    ``r = exp(logp - old)``): ``-min(r A, clip(r, 1 - epsilon_low, 1 + epsilon_high) A)``, times
    ``vllm_is_ratio``, plus ``beta`` times the k3 KL to the reference; ``delta`` (INTELLECT-2's
    upper clamp of ``r``) when ``delta >= 1 + epsilon_high``, where it equals r4b's dual clip at
    ``delta``; ``loss_type`` in :data:`SUPPORTED_LOSS_TYPES`, each a choice of token weights
    (``grpo``: mask / len / B; ``bnpo``: mask / sum(mask); ``dr_grpo``: mask / (B
    max_completion_length); ``dapo``: mask / (num_items_in_batch / world size), else the
    all-reduced sum of masks / world size; ``luspo``: len / (B S) on every position, as Liger).
    Anything else (``cispo``, ``sapo``, ``vespo``, ``importance_sampling_level="sequence"``,
    ``use_bias_correction_kl``, an LM-head bias, ``delta < 1 + epsilon_high``) raises an error
    naming the option.  ``compiled`` and ``chunk_size`` are accepted and unused: the fused path
    picks its own row chunks (``chunk_rows``; see :func:`r4b_kernels.policy_loss`).

    ``forward`` takes Liger's arguments and returns Liger's ``(loss, metrics)``: ``loss`` a 0-d
    fp32 tensor, ``metrics`` a tuple ``(mean_kl, clip_ratio)`` when ``beta != 0`` else
    ``(clip_ratio,)``, with Liger's formulas (masked sums over the mask's sum).
    """

    def __init__(self, beta: float = 0.04, compiled: bool = True, use_ref_model: bool = True,
                 chunk_size: int = 1, epsilon_low: float = 0.2, epsilon_high: float = 0.2,
                 loss_type: str = "dapo", max_completion_length: int | None = None,
                 importance_sampling_level: str = "token", sapo_temperature_pos: float = 1.0,
                 sapo_temperature_neg: float = 1.05, temperature: float = 1.0,
                 delta: float | None = None, use_bias_correction_kl: bool = False,
                 vespo_k_pos: float = 2.0, vespo_lambda_pos: float = 3.0, vespo_k_neg: float = 3.0,
                 vespo_lambda_neg: float = 2.0, *, impl: str = "auto", chunk_rows: int | None = None):
        super().__init__()
        if loss_type not in SUPPORTED_LOSS_TYPES:
            raise _unsupported("loss_type", loss_type, SUPPORTED_LOSS_TYPES)
        if importance_sampling_level != "token":
            raise _unsupported("importance_sampling_level", importance_sampling_level, "'token'")
        if use_bias_correction_kl:
            raise _unsupported("use_bias_correction_kl", use_bias_correction_kl, "False")
        if loss_type == "dr_grpo" and not (isinstance(max_completion_length, int) and max_completion_length > 0):
            raise ValueError(f"loss_type='dr_grpo' needs max_completion_length, a positive int, got "
                             f"{max_completion_length!r}")
        for name, v in (("beta", beta), ("epsilon_low", epsilon_low), ("epsilon_high", epsilon_high),
                        ("temperature", temperature)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
        if delta is not None and not (isinstance(delta, (int, float)) and delta >= 1 + epsilon_high and delta > 1):
            raise _unsupported("delta", delta, f"None or a number >= 1 + epsilon_high = {1 + epsilon_high} "
                               "(then it is r4b's dual clip)")
        self.beta = float(beta)
        self.compiled = compiled
        self.use_ref_model = bool(use_ref_model)
        self.chunk_size = chunk_size
        self.epsilon_low = float(epsilon_low)
        self.epsilon_high = float(epsilon_high)
        self.loss_type = loss_type
        self.max_completion_length = max_completion_length
        self.importance_sampling_level = importance_sampling_level
        self.temperature = float(temperature)
        self.delta = None if delta is None else float(delta)
        self.use_bias_correction_kl = use_bias_correction_kl
        self.impl = impl
        self.chunk_rows = chunk_rows

    @classmethod
    def from_liger(cls, module, **kwargs) -> "R4BFusedLinearGRPOLoss":
        """The r4b equivalent of a built ``LigerFusedLinearGRPOLoss`` (or TRL 1.13's port): its
        options, read from its attributes; ``kwargs`` (``impl``, ``chunk_rows``) pass through."""
        names = ("beta", "compiled", "use_ref_model", "chunk_size", "epsilon_low", "epsilon_high",
                 "loss_type", "max_completion_length", "importance_sampling_level", "temperature",
                 "delta", "use_bias_correction_kl")
        return cls(**{n: getattr(module, n) for n in names if hasattr(module, n)}, **kwargs)

    def _token_weights(self, mask, num_items_in_batch):
        B, S = mask.shape
        n = mask.sum(-1, keepdim=True)
        if self.loss_type == "grpo":
            return mask / n.clamp(min=1.0) / B
        if self.loss_type == "bnpo":
            return mask / mask.sum().clamp(min=1.0)
        if self.loss_type == "dr_grpo":
            return mask / (B * self.max_completion_length)
        if self.loss_type == "luspo":
            return n.expand(B, S) / (B * S)
        # dapo: liger-kernel 0.8.5's _compute_dapo_normalizer
        import torch.distributed as dist

        distributed = dist.is_available() and dist.is_initialized()
        world = dist.get_world_size() if distributed else 1
        if num_items_in_batch is not None:
            norm = torch.as_tensor(num_items_in_batch, dtype=torch.float32, device=mask.device) / world
        else:
            norm = mask.sum()
            if distributed:
                norm = norm.clone()
                dist.all_reduce(norm)
            norm = norm / world
        return mask / norm.clamp(min=1.0)

    def forward(self, _input, lin_weight, selected_token_ids, attention_mask, advantages, bias=None,
                ref_per_token_logps=None, old_per_token_logps=None, ref_input=None, ref_weight=None,
                ref_bias=None, vllm_is_ratio=None, num_items_in_batch=None):
        """Liger's call: ``_input`` ``[B, S, H]`` last hidden states, ``lin_weight`` ``[V, H]``,
        ``selected_token_ids`` / ``attention_mask`` (the loss mask) ``[B, S]``, ``advantages``
        ``[B]``; optional ``[B, S]`` ``old_per_token_logps`` (default: the current log-probs,
        ratio 1) and ``ref_per_token_logps`` (or ``ref_input`` + ``ref_weight`` to compute them),
        ``vllm_is_ratio`` ``[B]``, ``[B, 1]`` or ``[B, S]``, ``num_items_in_batch`` (dapo)."""
        if bias is not None:
            raise _unsupported("bias", "a tensor", "None (an LM head without bias)")
        if _input.dim() != 3:
            raise ValueError(f"_input must be [batch, seq_len, hidden], got shape {tuple(_input.shape)}")
        B, S, H = _input.shape
        for name, t in (("selected_token_ids", selected_token_ids), ("attention_mask", attention_mask)):
            if tuple(t.shape) != (B, S):
                raise ValueError(f"{name} must have shape {(B, S)} to match _input, got {tuple(t.shape)}")
        if tuple(advantages.shape) != (B,):
            raise ValueError(f"advantages must have shape ({B},) (one per sequence), got {tuple(advantages.shape)}")
        mask = attention_mask.to(torch.float32)
        targets = selected_token_ids.reshape(-1).long()
        hidden = _input.reshape(-1, H)
        kw = dict(temperature=self.temperature, impl=self.impl, chunk_rows=self.chunk_rows)
        ref = None
        if self.use_ref_model:
            if ref_per_token_logps is not None:
                ref = ref_per_token_logps.reshape(-1).float()
            elif ref_input is not None:
                if ref_bias is not None:
                    raise _unsupported("ref_bias", "a tensor", "None")
                ref = token_logprobs(ref_input.reshape(-1, H).detach(), ref_weight.detach(), targets, **kw)
            else:
                raise ValueError("use_ref_model=True needs ref_per_token_logps or ref_input, got neither")
        # Liger without a reference scores the policy against itself: KL 0, no gradient.
        use_kl = self.beta != 0.0 and ref is not None
        if old_per_token_logps is None:
            old = token_logprobs(hidden.detach(), lin_weight.detach(), targets, **kw)
        else:
            old = old_per_token_logps.reshape(-1).float()
        w = self._token_weights(mask, num_items_in_batch)
        adv = advantages.float()[:, None].expand(B, S).reshape(-1)
        is_ratio = None
        if vllm_is_ratio is not None:
            r = vllm_is_ratio.float()
            if r.dim() == 1:
                r = r[:, None]
            if r.dim() != 2 or r.shape[0] != B or r.shape[1] not in (1, S):
                raise ValueError(f"vllm_is_ratio must have shape ({B},), ({B}, 1) or ({B}, {S}), got "
                                 f"{tuple(vllm_is_ratio.shape)}")
            is_ratio = r.expand(B, S)
        common = dict(eps_low=self.epsilon_low, eps_high=self.epsilon_high, dual_clip=self.delta, **kw)
        w_pg = (w if is_ratio is None else w * is_ratio).reshape(-1)
        if is_ratio is None or not use_kl:
            out = policy_loss(hidden, lin_weight, targets, old, adv, token_weights=w_pg,
                              ref_logprobs=ref if use_kl else None, kl_coef=self.beta if use_kl else 0.0,
                              **common)
            loss, kl = out.loss, out.kl
        else:
            # The importance ratio multiplies the policy term only: one call for it, one with
            # zero advantages for the KL term.
            out = policy_loss(hidden, lin_weight, targets, old, adv, token_weights=w_pg, **common)
            out_kl = policy_loss(hidden, lin_weight, targets, old, torch.zeros_like(adv),
                                 token_weights=w.reshape(-1), ref_logprobs=ref, kl_coef=self.beta, **common)
            loss, kl = out.loss + out_kl.loss, out_kl.kl
        with torch.no_grad():
            denom = mask.sum().clamp(min=1.0)
            metrics = []
            if self.beta != 0.0:
                metrics.append((kl.view(B, S) * mask).sum() / denom if use_kl else torch.zeros((), device=mask.device))
            r = out.ratio.view(B, S)
            a = adv.view(B, S)
            clipped = ((r < 1 - self.epsilon_low) & (a < 0)) | ((r > 1 + self.epsilon_high) & (a > 0))
            metrics.append((clipped * mask).sum() / denom)
        return loss, tuple(metrics)


class _R4BChunkedLogProb:
    """Stands in for TRL 1.15 - 1.16's ``trl.kernels.ChunkedLogProbFunction`` (same ``apply``
    arguments and 5-tuple), computing ``log_probs`` and ``entropy`` with r4b's kernels."""

    impl = "auto"

    @classmethod
    def apply(cls, hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None,
              logit_scale=1.0, outputs=("entropy",)):
        if bias is not None:
            raise ValueError("patch_fused_lm_head: an LM head with a bias is not supported by r4b_kernels")
        if final_logit_softcapping is not None:
            raise ValueError(f"patch_fused_lm_head: final_logit_softcapping={final_logit_softcapping!r} is not "
                             "supported by r4b_kernels (needs None)")
        if logit_scale != 1.0:
            raise ValueError(f"patch_fused_lm_head: logit_scale={logit_scale!r} is not supported by "
                             "r4b_kernels (needs 1.0)")
        extra = sorted(set(outputs) - {"log_probs", "entropy"})
        if extra:
            raise ValueError(f"patch_fused_lm_head: outputs {extra} are not computed by r4b_kernels; "
                             "supported: 'log_probs', 'entropy'")
        dev = hidden.device
        dtype = torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else hidden.dtype
        with torch.autocast(dev.type, enabled=False):
            logp, ent = logprobs_entropy(hidden.to(dtype), weight.to(dtype), targets.long(),
                                         temperature=temperature, impl=cls.impl)
        return logp, (ent if "entropy" in outputs else None), None, None, None


def patch_fused_lm_head(impl: str = "auto"):
    """Make TRL 1.15 - 1.16's fused LM head (``add_fused_lm_head``, which ``GRPOTrainer`` applies
    to the policy and the reference model) compute its log-probs and entropies with r4b's
    kernels.  Process-wide (it replaces ``trl.trainer.utils._ChunkedLogProbFunction``); returns a
    function that undoes it.  Heads with a bias, logit soft-capping or a logit scale raise."""
    import trl
    import trl.trainer.utils as tu

    if not hasattr(tu, "_ChunkedLogProbFunction") or not hasattr(tu, "add_fused_lm_head"):
        raise RuntimeError(f"TRL {trl.__version__} has no fused LM head to patch "
                           f"(trl.trainer.utils._ChunkedLogProbFunction); tested with TRL {TESTED_TRL}; "
                           "for TRL <= 1.13 use use_r4b(trainer), which swaps trainer.liger_loss")
    original = tu._ChunkedLogProbFunction
    head = type("R4BChunkedLogProb", (_R4BChunkedLogProb,), {"impl": impl})
    tu._ChunkedLogProbFunction = head

    def undo():
        tu._ChunkedLogProbFunction = original

    return undo


def use_r4b(trainer, impl: str = "auto"):
    """Run a built ``GRPOTrainer``'s fused loss path on r4b's kernels.

    TRL <= 1.13 with ``use_liger_kernel=True``: replaces ``trainer.liger_loss`` by the equivalent
    :class:`R4BFusedLinearGRPOLoss`.  TRL 1.15 - 1.16: :func:`patch_fused_lm_head`.  Returns a
    function that undoes the change.
    """
    old = getattr(trainer, "liger_loss", None)
    if old is not None:
        trainer.liger_loss = R4BFusedLinearGRPOLoss.from_liger(old, impl=impl)

        def undo():
            trainer.liger_loss = old

        return undo
    return patch_fused_lm_head(impl)
