"""Embedded rollout engine: batched KV-cache sampling on r4b's own (TP-aware) model.

One call generates completions for a batch of requests, each with its own forced mode
prefix (already in ``prompt_ids`` under prompt routing) and optional forced response tokens
(under token routing: scored by the model, never sampled).  It returns token ids and the
sampling log-probs, stops each row on end-of-turn or its mode's token budget, and reports
which mode the completion is in (for auto requests: the mode the model chose).

How a batch runs:

1. **Prefill.** Rows with equal prompt length run as one cached forward (images of the group
   concatenated in row order), at most ``prefill_tokens`` prompt tokens per forward, filling
   their KV-cache rows; only the last position of each row goes through the LM head (its
   logits seed decoding).  The cache holds ``max(prompt + budget)`` tokens per row, never
   more than ``max_seqlen``.
2. **Decode.** All live rows advance in lock step, so response position ``t`` is decoding step
   ``t`` for every row: one sampler call and one device→host copy (tokens and log-probs
   together) per step.  Forced tokens replace the draw at their positions; every row is drawn
   either way, so the random stream does not depend on forcing.  Finished rows drop out of the
   batch (their cache rows are simply no longer addressed).

Log-probs are ``log_softmax(logits / T)[token]`` over the full vocabulary (see
:mod:`r4b.rollout.sampling`), for sampled and forced tokens alike.  Some ids are never drawn:
padding rows of the LM head (``vocab_limit``) and the image placeholder (``banned_ids``).

Random stream: one draw of ``generator`` (any device) gives every request its own seed, and
each row draws its tokens from a counter-based hash of (seed, step)
(:func:`r4b.rollout.sampling.row_uniforms`).  A row's samples therefore depend only on the
generator's state and its position in the request list — not on which other rows share its
batch, on the device, or on how a KV budget splits the batch into waves.

KV budget: with ``kv_budget_tokens`` the engine never holds more than that many cached tokens
(rows x capacity, each row reserving its prompt plus response budget): requests run in
*waves*, largest capacity first, each wave filled up to the budget.  Without it, all requests
form one wave.

TP: the model returns full-vocabulary logits on every TP rank; every rank of a TP group must
pass a generator with the same seed and state, so all ranks draw the same tokens and feed the
same ids to the next step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch

from ..log import get_logger
from ..training import full_params
from .sampling import SamplingParams, row_uniforms, sample_with_behaviour

log = get_logger(__name__)

Mode = Literal["think", "no_think", "auto"]
MODES: tuple[str, ...] = ("think", "no_think", "auto")


@dataclass
class RolloutRequest:
    """One completion to generate."""

    prompt_ids: list[int]
    """Prompt tokens, including the assistant opening and (prompt routing) the mode prefix."""
    mode: Mode
    """Requested mode: 'think' / 'no_think' (forced) or 'auto' (the model chooses)."""
    forced_ids: list[int] = field(default_factory=list)
    """Tokens forced at the start of the response (token routing); scored, not sampled."""
    images: Any = None
    """This request's images: the prompt's raw ``[C, H, W]`` images (the engine processes them
    for the model's image layout), processed images, or fixed-layout tiles
    ``[n_tiles, C, H, W]``; None: no image."""
    group_id: int = 0
    """Prompt group (rollouts of one prompt share it)."""
    uid: Any = None
    """Caller's identifier, passed through."""


@dataclass
class Rollout:
    """A finished completion."""

    request: RolloutRequest
    """The request this completion answers."""
    response_ids: list[int]
    """Response tokens (forced tokens first), ending with the stop token when finished."""
    logprobs: list[float]
    """Per response token: policy log-prob, under the tempered full-vocabulary distribution."""
    finished: bool
    """True when the row emitted a stop token; False when it hit its token budget."""
    mode_chosen: str | None = None
    """'think' / 'no_think' as read from the response by the engine's ``mode_classifier``;
    None when malformed or when the engine has no classifier."""
    behaviour_logprobs: list[float] | None = None
    """Per response token: log-prob under the distribution it was drawn from (top-k / top-p /
    vocabulary limit applied and renormalised); equal to ``logprobs`` for forced tokens and
    when nothing is truncated.  The trainer's truncated importance sampling divides by it.
    None: the same as ``logprobs``."""


def validate_requests(requests: Sequence[RolloutRequest], params: SamplingParams, *,
                      max_seqlen: int, vocab_size: int | None = None) -> list[int]:
    """Check every request; errors name ``requests[i]``.  Returns each row's token budget
    (its mode's ``max_new_tokens`` plus its forced tokens).  Shared by the rollout engines."""
    if not isinstance(params, SamplingParams):
        raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
    budgets = []
    for i, r in enumerate(requests):
        if not isinstance(r, RolloutRequest):
            raise TypeError(f"requests[{i}] must be a RolloutRequest, got {type(r).__name__}")
        if r.mode not in MODES:
            raise ValueError(f"requests[{i}].mode must be one of {MODES}, got {r.mode!r}")
        if len(r.prompt_ids) == 0:
            raise ValueError(f"requests[{i}].prompt_ids is empty; a prompt needs at least one "
                             "token")
        for name in ("prompt_ids", "forced_ids"):
            ids = getattr(r, name)
            if len(ids) and vocab_size is not None:
                lo, hi = min(int(t) for t in ids), max(int(t) for t in ids)
                if lo < 0 or hi >= vocab_size:
                    raise ValueError(f"requests[{i}].{name} must lie in [0, {vocab_size}), got "
                                     f"values in [{lo}, {hi}]")
        budget = params.max_new_tokens(r.mode) + len(r.forced_ids)
        need = len(r.prompt_ids) + budget
        if need > max_seqlen:
            raise ValueError(f"requests[{i}]: prompt ({len(r.prompt_ids)} tokens) + response "
                             f"budget "
                             f"({budget} = max_new_tokens_{r.mode} {params.max_new_tokens(r.mode)} "
                             f"+ {len(r.forced_ids)} forced) = {need} exceeds the engine's "
                             f"max_seqlen {max_seqlen}")
        budgets.append(budget)
    return budgets


def _as_images(images, i: int, cfg=None):
    """A request's images as an :class:`~r4b.models.ImageBatch` (None: no image).

    ``images``: a list of raw ``[C, H, W]`` images of one prompt, processed here for the
    model's image layout (``cfg``: its ``ModelConfig``; r4b.data.images), or what
    ``ImageBatch.collate`` takes (processed images, fixed-layout tiles ``[n, C, H, W]``)."""
    from ..models.multimodal import ImageBatch

    if images is None or (isinstance(images, (list, tuple)) and not images):
        return None
    raw = isinstance(images, (list, tuple)) and all(
        isinstance(x, (np.ndarray, torch.Tensor)) and x.ndim == 3 for x in images)
    try:
        if raw and cfg is not None and getattr(cfg, "vision", None) is not None:
            from ..data.images import process_prompt_images

            images = process_prompt_images(list(images), cfg)
        elif raw:
            images = [torch.as_tensor(x, dtype=torch.float32, device="cpu")[None] for x in images]
        batch = ImageBatch.collate(images)
    except (TypeError, ValueError) as e:
        raise ValueError(f"requests[{i}].images: {e}") from e
    if batch is not None and batch.pixel_values.shape[0] == 0:
        raise ValueError(f"requests[{i}].images holds no tiles")
    return batch


def row_seeds(generator: torch.Generator | None, n: int) -> torch.Tensor:
    """One int64 seed per request from one draw of ``generator`` (any device; None: torch's
    default CPU stream), on the host."""
    dev = generator.device if generator is not None else torch.device("cpu")
    return torch.randint(0, 2**62, (n,), generator=generator, device=dev).cpu()


class EmbeddedEngine:
    """KV-cache sampler over an r4b model.

    Args:
        model: an ``r4b.models`` model exposing ``new_kv_cache`` and the cached forward
            (one pipeline stage holding the whole network: PP = 1; any TP size).
        stop_ids: token ids that end a response (end of turn, end of text).
        mode_classifier: ``f(prompt_ids, response_ids) -> 'think' | 'no_think' | None``
            (``ChatTemplate.classify_mode``).
        max_seqlen: KV-cache capacity per row (prompt + response).
        vocab_limit: number of real token ids (the tokenizer's ``vocab_size``); ids at or above
            it — padding rows of an LM head padded for TP — are never drawn (their mass stays
            in the log-prob normaliser, like top-k / top-p truncation).  None: the
            tokenizer's ``vocab_size`` when ``mode_classifier`` is a ``ChatTemplate`` method
            (its ``tok``), else the model's full vocabulary.
        banned_ids: token ids that are never drawn (forced tokens may still be any id).
            None: the image placeholder id (the model's ``cfg.image_token_id`` and the
            template tokenizer's ``image_token_id``) — a response cannot contain an image.
        prefill_tokens: prompt tokens per prefill forward (rows of one prompt length are
            split into forwards of at most this many tokens; one row always fits).
        kv_budget_tokens: most KV-cache tokens held at once (None: no bound); see above.
    """

    def __init__(self, model: torch.nn.Module, *, stop_ids: Sequence[int],
                 mode_classifier: Callable[[list[int], list[int]], str | None] | None = None,
                 max_seqlen: int = 512, vocab_limit: int | None = None,
                 banned_ids: Sequence[int] | None = None, prefill_tokens: int = 65536,
                 kv_budget_tokens: int | None = None):
        if isinstance(prefill_tokens, bool) or not isinstance(prefill_tokens, int) \
                or prefill_tokens < 1:
            raise ValueError(f"prefill_tokens must be an int >= 1, got {prefill_tokens!r}")
        if kv_budget_tokens is not None and (isinstance(kv_budget_tokens, bool)
                                             or not isinstance(kv_budget_tokens, int)
                                             or kv_budget_tokens < 2):
            raise ValueError(f"kv_budget_tokens must be an int >= 2 or None, got "
                             f"{kv_budget_tokens!r}")
        self.prefill_tokens = prefill_tokens
        self.kv_budget_tokens = kv_budget_tokens
        self.model = model
        self.stop_ids = set(int(i) for i in stop_ids)
        if not self.stop_ids:
            raise ValueError("stop_ids must name at least one token id, got none")
        if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 2:
            raise ValueError(f"max_seqlen must be an int >= 2, got {max_seqlen!r}")
        V = getattr(model, "vocab_size", None)
        max_pos = getattr(getattr(getattr(model, "cfg", None), "lm", None),
                          "max_position_embeddings", None)
        if max_pos is not None and max_seqlen > max_pos:
            raise ValueError(f"max_seqlen {max_seqlen} exceeds the model's "
                             f"lm.max_position_embeddings {max_pos}")
        if V is not None:
            bad = sorted(t for t in self.stop_ids if not 0 <= t < V)
            if bad:
                raise ValueError(f"stop_ids must lie in [0, {V}), got {bad}")
        # ChatTemplate.classify_mode decodes responses with the template's tokenizer, which
        # rejects the LM head's padding ids: never draw them.
        tok = getattr(getattr(mode_classifier, "__self__", None), "tok", None)
        if vocab_limit is None:
            vocab_limit = getattr(tok, "vocab_size", None)
            if vocab_limit is not None and V is not None:
                vocab_limit = min(int(vocab_limit), V)
        if vocab_limit is not None:
            hi = V if V is not None else vocab_limit
            if isinstance(vocab_limit, bool) or not isinstance(vocab_limit, int) \
                    or not 1 <= vocab_limit <= hi:
                raise ValueError(f"vocab_limit must be an int in [1, {hi}] (the model's "
                                 f"vocabulary), got {vocab_limit!r}")
        if banned_ids is None:
            found = (getattr(getattr(model, "cfg", None), "image_token_id", None),
                     getattr(tok, "image_token_id", None))
            banned_ids = [int(t) for t in found if t is not None]
        self.banned_ids = sorted(set(int(t) for t in banned_ids))
        if V is not None and any(not 0 <= t < V for t in self.banned_ids):
            raise ValueError(f"banned_ids must lie in [0, {V}), got {self.banned_ids}")
        self.mode_classifier = mode_classifier
        self.max_seqlen = max_seqlen
        self.vocab_limit = vocab_limit
        self.vocab_size = V
        self.last_stats: dict[str, float] = {}

    def sync_weights(self, policy: torch.nn.Module | None = None) -> float:
        """Make the engine sample from ``policy``'s current weights; returns seconds spent.

        The embedded engine usually runs on the policy module itself (``policy is None`` or
        ``policy is self.model``): nothing to do.  A different module of the same structure
        is copied parameter by parameter (names and shapes must match).
        """
        t0 = time.perf_counter()
        if policy is not None and policy is not self.model:
            dst = dict(self.model.named_parameters())
            src = dict(policy.named_parameters())
            if dst.keys() != src.keys():
                missing, extra = sorted(dst.keys() - src.keys()), sorted(src.keys() - dst.keys())
                raise ValueError(f"policy parameters do not match the engine's model: missing "
                                 f"{missing[:5]}, unexpected {extra[:5]}")
            with torch.no_grad():
                for name, p in dst.items():
                    s = src[name]
                    if s.shape != p.shape:
                        raise ValueError(f"policy parameter {name} has shape {tuple(s.shape)}, the "
                                         f"engine's model expects {tuple(p.shape)}")
                    p.copy_(s)
        return time.perf_counter() - t0

    def sleep(self) -> None:
        """Free the engine's memory for the trainer's update (the rollout-engine interface;
        :class:`~r4b.rollout.vllm_engine.VLLMEngine` releases vLLM's weights and KV cache).
        No-op: the embedded engine holds no memory between :meth:`generate` calls."""

    def wake_up(self) -> None:
        """Undo :meth:`sleep` after the update and weight sync.  No-op here."""

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def generate(self, requests: Sequence[RolloutRequest], params: SamplingParams,
                 generator: torch.Generator | None = None) -> list[Rollout]:
        """Generate one completion per request, in request order (deterministic for a fixed
        ``generator`` state).  Sets ``last_stats`` (seconds, tokens, throughput)."""
        requests = list(requests)
        budgets = validate_requests(requests, params, max_seqlen=self.max_seqlen,
                                    vocab_size=self.vocab_size)
        if not requests:
            with full_params(self.model):  # a sharded model's gathers are collective
                pass
            self.last_stats = {"seconds": 0.0, "prefill_seconds": 0.0, "decode_seconds": 0.0,
                               "decode_steps": 0, "rows": 0, "response_tokens": 0,
                               "tokens_per_s": 0.0}
            return []
        cfg = getattr(self.model, "cfg", None)
        images = [_as_images(r.images, i, cfg) for i, r in enumerate(requests)]
        self._check_images(requests, images)
        seeds = row_seeds(generator, len(requests))
        waves = self._waves(requests, budgets)
        t0 = time.perf_counter()
        was_training = self.model.training
        self.model.eval()
        out: list[Rollout | None] = [None] * len(requests)
        stats = {"prefill_seconds": 0.0, "decode_seconds": 0.0, "decode_steps": 0}
        try:
            # A sharded policy gathers its weights once for the whole rollout, not per step.
            with full_params(self.model):
                for wave in waves:
                    got, st = self._generate([requests[i] for i in wave], [budgets[i] for i in wave],
                                             [images[i] for i in wave], params, seeds[wave])
                    for i, r in zip(wave, got):
                        out[i] = r
                    for k in stats:
                        stats[k] += st[k]
        finally:
            self.model.train(was_training)
        n_tok = sum(len(r.response_ids) for r in out)
        dt = time.perf_counter() - t0
        kv = max(len(wave) * max(len(requests[i].prompt_ids) + budgets[i] for i in wave)
                 for wave in waves)
        self.last_stats = {"seconds": dt, **stats, "rows": len(out), "response_tokens": n_tok,
                           "tokens_per_s": n_tok / max(dt, 1e-9), "waves": len(waves),
                           "kv_tokens_peak": kv}
        return out

    def _waves(self, reqs: list[RolloutRequest], budgets: list[int]) -> list[list[int]]:
        """Request indices per wave: largest capacity first, each wave's rows x capacity within
        ``kv_budget_tokens`` (one wave of everything without a budget)."""
        cap = [len(r.prompt_ids) + b for r, b in zip(reqs, budgets)]
        if self.kv_budget_tokens is None:
            return [list(range(len(reqs)))]
        order = sorted(range(len(reqs)), key=lambda i: (-cap[i], i))
        waves: list[list[int]] = []
        for i in order:
            if cap[i] > self.kv_budget_tokens:
                raise ValueError(f"requests[{i}] needs {cap[i]} KV-cache tokens (prompt "
                                 f"{len(reqs[i].prompt_ids)} + budget {budgets[i]}), more than "
                                 f"the engine's kv_budget_tokens {self.kv_budget_tokens}")
            if waves and (len(waves[-1]) + 1) * cap[waves[-1][0]] <= self.kv_budget_tokens:
                waves[-1].append(i)
            else:
                waves.append([i])
        return [sorted(w) for w in waves]

    def _check_images(self, reqs: list[RolloutRequest], images: list) -> None:
        """Per-request placeholder count check, so a mismatch names its request."""
        cfg = getattr(self.model, "cfg", None)
        img_id = getattr(cfg, "image_token_id", None)
        counter = getattr(self.model, "image_token_counts", None)
        if counter is None and getattr(cfg, "tokens_per_image", 0):
            counter = lambda batch: [n * cfg.tokens_per_image for n in batch.tile_counts()]  # noqa: E731
        for i, (r, im) in enumerate(zip(reqs, images)):
            if im is not None and (cfg is None or getattr(cfg, "vision", None) is None):
                raise ValueError(f"requests[{i}] has images but the model is text-only")
            if img_id is None or counter is None:
                continue
            n_ph = sum(1 for t in r.prompt_ids if int(t) == img_id)
            try:
                need = [] if im is None else counter(im)
            except ValueError as e:
                raise ValueError(f"requests[{i}].images: {e}") from e
            if n_ph != sum(need):
                raise ValueError(f"requests[{i}]: prompt_ids hold {n_ph} image placeholders (id "
                                 f"{img_id}) but its {len(need)} images need {need} = {sum(need)}")

    def _generate(self, reqs: list[RolloutRequest], budgets: list[int], images: list,
                  params: SamplingParams, seeds: torch.Tensor):
        from ..models.multimodal import ImageBatch

        dev = self._device()
        seeds = seeds.to(dev)
        banned = (torch.tensor(self.banned_ids, dtype=torch.long, device=dev)
                  if self.banned_ids else None)
        B = len(reqs)
        capacity = max(len(r.prompt_ids) + b for r, b in zip(reqs, budgets))
        cache = self.model.new_kv_cache(B, capacity)

        # 1. Prefill, one forward per distinct prompt length.
        t0 = time.perf_counter()
        by_len: dict[int, list[int]] = {}
        for i, r in enumerate(reqs):
            by_len.setdefault(len(r.prompt_ids), []).append(i)
        last_hidden = None
        for length, group in sorted(by_len.items()):
            per = max(1, self.prefill_tokens // length)
            for s in range(0, len(group), per):
                rows = group[s:s + per]
                ids = torch.tensor([[int(t) for t in reqs[i].prompt_ids] for i in rows],
                                   dtype=torch.long, device="cpu").to(dev, non_blocking=True)
                batch = ImageBatch.collate([images[i] for i in rows if images[i] is not None])
                pix = None if batch is None else batch.to(dev)
                # Hidden states, not logits: only each row's last position needs the LM head.
                h = self.model(input_ids=ids, kv_cache=cache, images=pix, return_hidden=True,
                               cache_rows=torch.tensor(rows, dtype=torch.long, device="cpu"))[:, -1]
                if last_hidden is None:
                    last_hidden = h.new_empty((B, h.shape[-1]))
                last_hidden[torch.tensor(rows, device=dev)] = h
        logits = self.model.logits_of_hidden(last_hidden)
        t_prefill = time.perf_counter() - t0

        # 2. Decode in lock step: response position t == step t for every live row.
        n_forced_max = max(len(r.forced_ids) for r in reqs)
        forced_mat = None
        if n_forced_max:
            forced_mat = torch.full((B, n_forced_max), -1, dtype=torch.long, device="cpu")
            for i, r in enumerate(reqs):
                if r.forced_ids:
                    forced_mat[i, :len(r.forced_ids)] = torch.tensor(
                        [int(t) for t in r.forced_ids], dtype=torch.long, device="cpu")
        n_forced = [len(r.forced_ids) for r in reqs]
        stop = self.stop_ids
        resp: list[list[int]] = [[] for _ in range(B)]
        lps: list[list[float]] = [[] for _ in range(B)]
        blps: list[list[float]] = [[] for _ in range(B)]
        finished = [False] * B
        active = list(range(B))
        active_d = torch.arange(B, device=dev)
        step = 0
        while True:
            forced = None
            if forced_mat is not None and step < n_forced_max:
                forced = forced_mat[active, step].to(dev, non_blocking=True)
            u = row_uniforms(seeds[active_d], step)
            tok, lp, blp = sample_with_behaviour(logits, params, uniforms=u, forced=forced,
                                                 vocab_limit=self.vocab_limit, banned=banned)
            # One device->host copy per step (ids < 2**53 are exact in float64).
            host = torch.stack([tok.double(), lp.double(), blp.double()]).tolist()
            keep_pos, keep_rows = [], []
            for j, i in enumerate(active):
                t = int(host[0][j])
                resp[i].append(t)
                lps[i].append(host[1][j])
                blps[i].append(host[2][j])
                if t in stop and step >= n_forced[i]:
                    finished[i] = True
                elif step + 1 < budgets[i]:
                    keep_pos.append(j)
                    keep_rows.append(i)
            step += 1
            if not keep_rows:
                break
            if len(keep_rows) == len(active):
                ids = tok[:, None]
            else:
                keep = torch.tensor(keep_pos, device=dev)
                ids = tok[keep][:, None]
                active_d = active_d[keep]
            active = keep_rows
            logits = self.model(input_ids=ids, kv_cache=cache,
                                cache_rows=torch.tensor(active, dtype=torch.long, device="cpu"))[:, -1]
        t_decode = time.perf_counter() - t0 - t_prefill

        out = []
        for i, r in enumerate(reqs):
            chosen = None
            if self.mode_classifier is not None:
                chosen = self.mode_classifier(list(r.prompt_ids), resp[i])
            out.append(Rollout(request=r, response_ids=resp[i], logprobs=lps[i],
                               finished=finished[i], mode_chosen=chosen,
                               behaviour_logprobs=blps[i]))
        stats = {"prefill_seconds": t_prefill, "decode_seconds": t_decode, "decode_steps": step}
        return out, stats
