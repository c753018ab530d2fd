"""Embedded rollout engine: batched KV-cache sampling on r4b's own (TP-aware) model.

One call generates completions for a batch of requests, each with its own forced mode
prefix (already in ``prompt_ids`` under prompt routing) and optional forced response tokens
(under token routing: scored by the model, never sampled).  It returns token ids and the
sampling log-probs, stops each row on end-of-turn or its mode's token budget, and reports
which mode the completion is in (for auto requests: the mode the model chose).

How a batch runs:

1. **Prefill.** Rows with the same prompt (the same ``prompt_ids`` and images of the same
   content) are one *distinct prompt* (:func:`prompt_groups`); the distinct prompts' shared
   prefixes form a radix tree (:func:`prompt_tree`) whose *nodes* — each distinct prefix
   segment — are prefilled once, parents first, into a
   :class:`~r4b.models.attention.SharedKVCache` that holds each node once; every row then
   continues the node its prompt ends with, holding only its own response tokens.  Under
   token routing the 2g requests of a BPO group have one prompt: one root, one prefill, one
   image encoding instead of 2g.  Under prompt routing the think and no-think prompts of a
   group differ in their last tokens: their longest common prefix (with the images) is one
   node and each mode's remainder a child node prefilled against it.  Prompts with images
   share only with prompts of equal image content whose tokens agree through the last image
   placeholder, so every placeholder lies in the root; text prompts of different groups also
   share their common template prefix.  Nodes of equal depth and length run as one cached
   forward (images concatenated in node order), at most ``prefill_tokens`` tokens per
   forward; only the last position of each distinct prompt goes through the LM head (its
   logits seed decoding).  ``share_prompts=False`` prefills every row on its own into a dense
   per-row :class:`~r4b.models.attention.KVCache` (the same results; for comparison).
2. **Decode.** All live rows advance in lock step, so response position ``t`` is decoding step
   ``t`` for every row: one sampler call and one device→host copy (tokens and log-probs
   together) per step.  Forced tokens replace the draw at their positions; every row is drawn
   either way, so the random stream does not depend on forcing.  Finished rows drop out of the
   batch (their cache rows are simply no longer addressed).  On the shared cache a step's
   attention reads each prompt node once for all the rows continuing it, then each row's own
   tokens, and merges the parts exactly (:func:`~r4b.models.attention.shared_cached_attention`).

Log-probs are ``log_softmax(logits / T)[token]`` over the full vocabulary (see
:mod:`r4b.rollout.sampling`), for sampled and forced tokens alike.  Some ids are never drawn:
padding rows of the LM head (``vocab_limit``) and the image placeholder (``banned_ids``).

Random stream: one draw of ``generator`` (any device) gives every request its own seed, and
each row draws its tokens from a counter-based hash of (seed, step)
(:func:`r4b.rollout.sampling.row_uniforms`).  A row's samples therefore depend only on the
generator's state and its position in the request list — not on which other rows share its
batch, on the device, or on how a KV budget splits the batch into waves.

KV budget: with ``kv_budget_tokens`` the engine never holds more than that many cached tokens
per layer: requests run in *waves*, each filled up to the budget.  With shared prompts a wave
holds each distinct prompt prefix once (its prompt tree's tokens) plus each row's response
budget, so a group's prompt counts once, not 2g times; requests are taken in prompt-tree
order, so a group's rows fill one wave together.  Per-row prompts (``share_prompts=False``):
rows x the largest prompt + budget, largest first.  Without a budget, all requests form one
wave.  ``last_stats['kv_tokens_peak']`` is the largest cache held, read from its buffers.

TP: the model returns full-vocabulary logits on every TP rank; every rank of a TP group must
pass a generator with the same seed and state, so all ranks draw the same tokens and feed the
same ids to the next step.
"""

from __future__ import annotations

import hashlib
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


_WAVE_STATS = ("prefill_seconds", "decode_seconds", "decode_steps", "prompt_tokens",
               "prefill_tokens", "distinct_prompts", "prefix_nodes", "prefill_forwards",
               "prefill_images")
"""Statistics each wave reports and :meth:`EmbeddedEngine.generate` sums over waves."""


def _image_digest(batch) -> tuple | None:
    """A content key of a request's processed images: dtype, shape, tile counts, sizes and a
    hash of the pixel bytes (None: no image).  Equal keys are confirmed by
    :func:`_same_images` before two requests share a prefill."""
    if batch is None:
        return None
    pv = batch.pixel_values.detach().cpu().contiguous()
    h = hashlib.blake2b(pv.reshape(-1).view(torch.uint8).numpy(), digest_size=16)
    sizes = None if batch.image_sizes is None else tuple(map(tuple, batch.image_sizes.tolist()))
    return (str(pv.dtype), tuple(pv.shape), tuple(batch.tile_counts()), sizes, h.digest())


def _same_images(a, b) -> bool:
    """Whether two processed image batches (or None) hold exactly the same tiles and layout."""
    if a is b:
        return True
    if a is None or b is None:
        return a is None and b is None
    if a.tile_counts() != b.tile_counts():
        return False
    if (a.image_sizes is None) != (b.image_sizes is None):
        return False
    if a.image_sizes is not None and not torch.equal(a.image_sizes, b.image_sizes):
        return False
    pa, pb = a.pixel_values, b.pixel_values
    return pa.dtype == pb.dtype and pa.shape == pb.shape and torch.equal(pa.cpu(), pb.cpu())


def image_classes(images: Sequence) -> list[int | None]:
    """Per request, the index of its images' content class (None: no image): two requests get
    the same class exactly when their processed images (``images[i]``: an
    :class:`~r4b.models.ImageBatch` or None) hold the same tiles, layout and pixels.

    Images are compared by a hash of their bytes, shape, tile counts and sizes, then exactly;
    one object is hashed once (identity only shortcuts the comparison)."""
    digests: dict[int, tuple | None] = {}
    reps: dict[tuple, list[int]] = {}  # digest -> a request index per class
    cls_of_rep: dict[int, int] = {}
    out: list[int | None] = []
    for i, im in enumerate(images):
        if im is None:
            out.append(None)
            continue
        if id(im) not in digests:
            digests[id(im)] = _image_digest(im)
        for r in reps.setdefault(digests[id(im)], []):
            if _same_images(images[r], im):
                out.append(cls_of_rep[r])
                break
        else:
            cls_of_rep[i] = len(cls_of_rep)
            reps[digests[id(im)]].append(i)
            out.append(cls_of_rep[i])
    return out


def _groups_of(reqs: Sequence[RolloutRequest], classes: Sequence[int | None]) -> list[list[int]]:
    """Rows grouped by (prompt ids, image class), groups in order of their first row."""
    by_key: dict[tuple, list[int]] = {}
    groups: list[list[int]] = []
    for i, r in enumerate(reqs):
        key = (tuple(int(t) for t in r.prompt_ids), classes[i])
        if key not in by_key:
            by_key[key] = []
            groups.append(by_key[key])
        by_key[key].append(i)
    return groups


def prompt_groups(reqs: Sequence[RolloutRequest], images: Sequence, *,
                  share: bool = True) -> list[list[int]]:
    """Row indices grouped by identical prompt: equal ``prompt_ids`` and images of equal content
    (``images[i]``: request ``i``'s processed :class:`~r4b.models.ImageBatch` or None; see
    :func:`image_classes`).

    Groups are in order of their first row, rows ascending within a group; the first row is
    the group's representative.  Equal images in different objects share, and two requests
    whose images differ in any pixel never do.  These are the engine's *distinct prompts*;
    :func:`prompt_tree` then shares their common prefixes.  ``share=False``: every row is its
    own group."""
    if len(images) != len(reqs):
        raise ValueError(f"images must hold one entry per request ({len(reqs)}), got "
                         f"{len(images)}")
    if not share:
        return [[i] for i in range(len(reqs))]
    return _groups_of(reqs, image_classes(images))


def _share_bucket(prompt: tuple[int, ...], cls: int | None, image_token_id: int | None) -> tuple:
    """Prompts may share prefixes only within one bucket: all text prompts are one bucket; a
    prompt with images shares only with prompts of the same image class and the same tokens up
    to and including its last image placeholder (so every placeholder lies in the shared root
    and is prefilled with the images; the rule of :func:`r4b.packing.groups.group_units`).
    Without a known placeholder id, image prompts share only exact duplicates."""
    if cls is None:
        return ("text",)
    if image_token_id is None:
        return ("images", cls, prompt)
    last = max((k for k, t in enumerate(prompt) if t == image_token_id), default=-1)
    return ("images", cls, prompt[:last + 1])


def _lcp(a: Sequence[int], b: Sequence[int], start: int = 0) -> int:
    """Length of the common prefix of ``a`` and ``b`` (known equal below ``start``)."""
    n = min(len(a), len(b))
    k = start
    while k < n and a[k] == b[k]:
        k += 1
    return k


@dataclass
class PromptNode:
    """One shared prompt segment of :func:`prompt_tree`: tokens ``[start, end)`` of request
    ``row``'s prompt, continuing node ``parent`` (-1: a root, from position 0)."""

    parent: int
    """Index of the node this one continues, or -1."""
    row: int
    """A request whose prompt holds the segment (its images, for a root with images)."""
    start: int
    """First position of the segment (the parent's end)."""
    end: int
    """One past the segment's last position."""
    depth: int
    """0 for a root, else the parent's depth + 1."""
    ends: list[int] = field(default_factory=list)
    """Distinct prompts (indices into the groups) that end with this node."""


def prompt_tree(reqs: Sequence[RolloutRequest], groups: Sequence[Sequence[int]],
                classes: Sequence[int | None], image_token_id: int | None = None
                ) -> tuple[list[PromptNode], list[int]]:
    """The radix tree of the distinct prompts ``groups`` (rows of equal prompt and images, see
    :func:`prompt_groups`; ``classes``: each row's image class): every distinct prefix of the
    prompts within one sharing bucket (see :func:`_share_bucket`) is one node, held and
    prefilled once; a prompt is the chain of nodes from a root to the node it ends with.

    Under token routing a group's 2g prompts are one distinct prompt (one root).  Under prompt
    routing the think and no-think prompts of a group end differently: their longest common
    prefix is one node (with the images) and each mode's remainder a child node.  Text prompts
    of different groups share their common template prefix too.

    Returns the nodes (parents before children) and, per group, the node it ends with."""
    nodes: list[PromptNode] = []
    group_node = [-1] * len(groups)
    prompts = [tuple(int(t) for t in reqs[g[0]].prompt_ids) for g in groups]
    buckets: dict[tuple, list[int]] = {}
    for gi, g in enumerate(groups):
        buckets.setdefault(_share_bucket(prompts[gi], classes[g[0]], image_token_id),
                           []).append(gi)
    for members in buckets.values():
        members = sorted(members, key=lambda gi: prompts[gi])
        stack: list[tuple[list[int], int, int]] = [(members, 0, -1)]
        while stack:
            mem, d, parent = stack.pop()
            # sorted prompts: the set's common prefix is that of its first and last
            end = _lcp(prompts[mem[0]], prompts[mem[-1]], d)
            if end > d:
                depth = 0 if parent < 0 else nodes[parent].depth + 1
                ends = [gi for gi in mem if len(prompts[gi]) == end]
                nodes.append(PromptNode(parent=parent, row=groups[mem[0]][0], start=d, end=end,
                                        depth=depth, ends=ends))
                parent = len(nodes) - 1
                for gi in ends:
                    group_node[gi] = parent
                mem = [gi for gi in mem if len(prompts[gi]) > end]
            runs: list[list[int]] = []
            for gi in mem:  # children: runs of equal next token
                if runs and prompts[runs[-1][0]][end] == prompts[gi][end]:
                    runs[-1].append(gi)
                else:
                    runs.append([gi])
            stack.extend((run, end, parent) for run in reversed(runs))
    return nodes, group_node


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
        kv_budget_tokens: most KV-cache tokens held at once, per layer (None: no bound).  With
            shared prompts a wave counts every distinct prompt prefix once (a group's common
            prompt once, each mode's remainder once) plus each row's response budget
            (``max_new_tokens`` of its mode + its forced tokens); per-row prompts count rows x
            the largest prompt + budget.  A request that alone needs more is an error.
        share_prompts: hold and prefill each distinct prompt prefix once (the prompt tree of
            the batch: exact duplicates and common prefixes, with equal image content) in a
            shared KV cache (default); False prefills every request on its own into a dense
            per-row cache, the same computation row by row (to measure the saving).

    ``last_stats`` after :meth:`generate`: ``seconds``, ``prefill_seconds``,
    ``decode_seconds``, ``decode_steps``, ``rows``, ``response_tokens``, ``tokens_per_s``,
    ``waves``, ``kv_tokens_peak`` (the largest KV cache held: token slots per layer of its
    buffers, prompt prefixes and response budgets), and for the prefill ``prompt_tokens`` (all
    requests' prompt tokens), ``prefill_tokens`` (prompt tokens that went through the model),
    ``distinct_prompts`` (distinct prompts, summed over waves), ``prefix_nodes`` (prompt-tree
    nodes prefilled; 0 per-row), ``prefill_forwards`` and ``prefill_images`` (images
    encoded).
    """

    def __init__(self, model: torch.nn.Module, *, stop_ids: Sequence[int],
                 mode_classifier: Callable[[list[int], list[int]], str | None] | None = None,
                 max_seqlen: int = 512, vocab_limit: int | None = None,
                 banned_ids: Sequence[int] | None = None, prefill_tokens: int = 65536,
                 kv_budget_tokens: int | None = None, share_prompts: bool = True):
        if not isinstance(share_prompts, bool):
            raise ValueError(f"share_prompts must be a bool, got {share_prompts!r}")
        self.share_prompts = share_prompts
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
        ``generator`` state).  Sets ``last_stats`` (seconds, tokens, throughput, KV tokens)."""
        requests = list(requests)
        budgets = validate_requests(requests, params, max_seqlen=self.max_seqlen,
                                    vocab_size=self.vocab_size)
        if not requests:
            with full_params(self.model):  # a sharded model's gathers are collective
                pass
            self.last_stats = {"seconds": 0.0, **dict.fromkeys(_WAVE_STATS, 0), "rows": 0,
                               "response_tokens": 0, "tokens_per_s": 0.0, "waves": 0,
                               "kv_tokens_peak": 0}
            return []
        cfg = getattr(self.model, "cfg", None)
        # Requests that pass the same images object (a BPO group's 2g rollouts) share one
        # processed batch; equal images in different objects are matched by content later.
        processed: dict[int, Any] = {}
        images = []
        for i, r in enumerate(requests):
            if id(r.images) not in processed:
                processed[id(r.images)] = _as_images(r.images, i, cfg)
            images.append(processed[id(r.images)])
        self._check_images(requests, images)
        classes = image_classes(images) if self.share_prompts else [None] * len(requests)
        seeds = row_seeds(generator, len(requests))
        waves = self._waves(requests, budgets, classes)
        t0 = time.perf_counter()
        was_training = self.model.training
        self.model.eval()
        out: list[Rollout | None] = [None] * len(requests)
        stats = dict.fromkeys(_WAVE_STATS, 0)
        kv_peak = 0
        try:
            # A sharded policy gathers its weights once for the whole rollout, not per step.
            with full_params(self.model):
                for wave in waves:
                    got, st = self._generate([requests[i] for i in wave],
                                             [budgets[i] for i in wave], [images[i] for i in wave],
                                             [classes[i] for i in wave], params, seeds[wave])
                    for i, r in zip(wave, got):
                        out[i] = r
                    for k in stats:
                        stats[k] += st[k]
                    kv_peak = max(kv_peak, st["kv_tokens"])
        finally:
            self.model.train(was_training)
        n_tok = sum(len(r.response_ids) for r in out)
        dt = time.perf_counter() - t0
        self.last_stats = {"seconds": dt, **stats, "rows": len(out), "response_tokens": n_tok,
                           "tokens_per_s": n_tok / max(dt, 1e-9), "waves": len(waves),
                           "kv_tokens_peak": kv_peak}
        return out

    def _image_token_id(self) -> int | None:
        return getattr(getattr(self.model, "cfg", None), "image_token_id", None)

    def _waves(self, reqs: list[RolloutRequest], budgets: list[int],
               classes: list[int | None]) -> list[list[int]]:
        """Request indices per wave, each wave's KV cache within ``kv_budget_tokens`` (one wave
        of everything without a budget).

        Shared prompts: requests in prompt-tree order (bucket, then prompt ids), each wave
        filled while its distinct prompt-prefix tokens plus its rows' response budgets fit —
        exactly the tokens its :class:`~r4b.models.attention.SharedKVCache` holds (in sorted
        order a prompt's new prefix tokens are those past its common prefix with the previous
        prompt of its bucket).  Per-row prompts: largest capacity (prompt + budget) first, rows
        x largest capacity."""
        if self.kv_budget_tokens is None:
            return [list(range(len(reqs)))]
        budget = self.kv_budget_tokens

        def too_big(i, need):
            return ValueError(f"requests[{i}] needs {need} KV-cache tokens (prompt "
                              f"{len(reqs[i].prompt_ids)} + budget {budgets[i]}), more than "
                              f"the engine's kv_budget_tokens {budget}")

        waves: list[list[int]] = []
        if not self.share_prompts:
            cap = [len(r.prompt_ids) + b for r, b in zip(reqs, budgets)]
            for i in sorted(range(len(reqs)), key=lambda i: (-cap[i], i)):
                if cap[i] > budget:
                    raise too_big(i, cap[i])
                if waves and (len(waves[-1]) + 1) * cap[waves[-1][0]] <= budget:
                    waves[-1].append(i)
                else:
                    waves.append([i])
            return [sorted(w) for w in waves]
        ph = self._image_token_id()
        prompts = [tuple(int(t) for t in r.prompt_ids) for r in reqs]
        keys = [_share_bucket(p, c, ph) for p, c in zip(prompts, classes)]
        first: dict[tuple, int] = {}
        for i, k in enumerate(keys):
            first.setdefault(k, i)
        order = sorted(range(len(reqs)), key=lambda i: (first[keys[i]], prompts[i], i))
        held, prev = 0, None
        for i in order:
            need = len(prompts[i]) + budgets[i]
            if need > budget:
                raise too_big(i, need)
            if waves and prev is not None and keys[prev] == keys[i]:
                need -= _lcp(prompts[prev], prompts[i])
            if waves and held + need <= budget:
                waves[-1].append(i)
                held += need
            else:
                waves.append([i])
                held = len(prompts[i]) + budgets[i]
            prev = i
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

    def _prefill_rows(self, reqs, budgets, images, dev):
        """Every row prefilled on its own into a dense :class:`~r4b.models.attention.KVCache`
        (``share_prompts=False``); returns the cache, the first-token logits ``[B, V]`` and
        the prefill statistics."""
        from ..models.multimodal import ImageBatch

        B = len(reqs)
        capacity = max(len(r.prompt_ids) + b for r, b in zip(reqs, budgets))
        cache = self.model.new_kv_cache(B, capacity)
        by_len: dict[int, list[int]] = {}
        for i, r in enumerate(reqs):
            by_len.setdefault(len(r.prompt_ids), []).append(i)
        hidden = None
        n_fwd = n_img = n_tok = 0
        for length, rows_all in sorted(by_len.items()):
            per = max(1, self.prefill_tokens // length)
            for s in range(0, len(rows_all), per):
                rows = rows_all[s:s + per]
                ids = torch.tensor([[int(t) for t in reqs[i].prompt_ids] for i in rows],
                                   dtype=torch.long, device="cpu").to(dev, non_blocking=True)
                batch = ImageBatch.collate([images[i] for i in rows if images[i] is not None])
                h = self.model(input_ids=ids, kv_cache=cache, return_hidden=True,
                               images=None if batch is None else batch.to(dev),
                               cache_rows=torch.tensor(rows, dtype=torch.long, device="cpu"))[:, -1]
                if hidden is None:
                    hidden = h.new_empty((B, h.shape[-1]))
                hidden[torch.tensor(rows, device=dev)] = h
                n_fwd += 1
                n_tok += length * len(rows)
                n_img += 0 if batch is None else batch.num_images
        stats = {"prefill_tokens": n_tok, "distinct_prompts": B, "prefix_nodes": 0,
                 "prefill_forwards": n_fwd, "prefill_images": n_img}
        return cache, self.model.logits_of_hidden(hidden), stats

    def _prefill_shared(self, reqs, budgets, images, classes, dev):
        """Each node of the batch's :func:`prompt_tree` prefilled once into a
        :class:`~r4b.models.attention.SharedKVCache` (parents first; nodes of one depth and
        length in one forward, within ``prefill_tokens``; a root takes its prompt's images);
        every row then continues the node its prompt ends with.  Returns the cache, the
        first-token logits ``[B, V]`` (each row its prompt's) and the prefill statistics."""
        from ..models.attention import PrefixTree
        from ..models.multimodal import ImageBatch

        B = len(reqs)
        groups = _groups_of(reqs, classes)
        nodes, group_node = prompt_tree(reqs, groups, classes, self._image_token_id())
        row_node = [0] * B
        for gi, g in enumerate(groups):
            for i in g:
                row_node[i] = group_node[gi]
        tree = PrefixTree(node_lengths=[n.end - n.start for n in nodes],
                          node_parents=[n.parent for n in nodes], row_nodes=row_node,
                          row_tokens=budgets)
        capacity = max(len(r.prompt_ids) + b for r, b in zip(reqs, budgets))
        cache = self.model.new_kv_cache(B, capacity, prefix_tree=tree)
        by_shape: dict[tuple[int, int], list[int]] = {}
        for j, n in enumerate(nodes):
            by_shape.setdefault((n.depth, n.end - n.start), []).append(j)
        hidden = None  # [n_groups, H]: last-position hidden state of each distinct prompt
        n_fwd = n_img = n_tok = 0
        for (_, length), js in sorted(by_shape.items()):  # depth first: parents before children
            per = max(1, self.prefill_tokens // length)
            for s in range(0, len(js), per):
                part = js[s:s + per]
                segs = [nodes[j] for j in part]
                ids = torch.tensor([[int(t) for t in reqs[n.row].prompt_ids[n.start:n.end]]
                                    for n in segs], dtype=torch.long, device="cpu")
                # every placeholder of a prompt with images lies in its root (_share_bucket)
                batch = ImageBatch.collate([images[n.row] for n in segs
                                            if n.parent < 0 and images[n.row] is not None])
                h = self.model(input_ids=ids.to(dev, non_blocking=True), kv_cache=cache.nodes,
                               images=None if batch is None else batch.to(dev), return_hidden=True,
                               cache_rows=torch.tensor(part, dtype=torch.long, device="cpu"))[:, -1]
                if hidden is None:
                    hidden = h.new_empty((len(groups), h.shape[-1]))
                at = [(gi, k) for k, j in enumerate(part) for gi in nodes[j].ends]
                if at:
                    hidden[torch.tensor([gi for gi, _ in at], device=dev)] = \
                        h[torch.tensor([k for _, k in at], device=dev)]
                n_fwd += 1
                n_tok += length * len(part)
                n_img += 0 if batch is None else batch.num_images
        of_row = torch.empty(B, dtype=torch.long, device="cpu")
        for gi, g in enumerate(groups):
            of_row[g] = gi
        logits = self.model.logits_of_hidden(hidden)
        logits = logits.index_select(0, of_row.to(logits.device))
        stats = {"prefill_tokens": n_tok, "distinct_prompts": len(groups),
                 "prefix_nodes": len(nodes), "prefill_forwards": n_fwd, "prefill_images": n_img}
        return cache, logits, stats

    def _generate(self, reqs: list[RolloutRequest], budgets: list[int], images: list,
                  classes: list, params: SamplingParams, seeds: torch.Tensor):
        dev = self._device()
        seeds = seeds.to(dev)
        banned = (torch.tensor(self.banned_ids, dtype=torch.long, device=dev)
                  if self.banned_ids else None)
        B = len(reqs)

        # 1. Prefill: the prompt tree's nodes once each (shared), or every row on its own.
        t0 = time.perf_counter()
        if self.share_prompts:
            cache, logits, pstats = self._prefill_shared(reqs, budgets, images, classes, dev)
        else:
            cache, logits, pstats = self._prefill_rows(reqs, budgets, images, dev)
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
        stats = {"prefill_seconds": t_prefill, "decode_seconds": t_decode, "decode_steps": step,
                 "prompt_tokens": sum(len(r.prompt_ids) for r in reqs), **pstats,
                 "kv_tokens": cache.held_tokens}
        return out, stats
