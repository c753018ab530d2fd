"""The prefix-shared layout: a BPO group's prompt (and its images) once, then each response.

BPO sends each prompt out ``2g`` times; packed one rollout per sequence, every pass of the
trainer (old log-probs, reference log-probs, the update) runs the vision tower and every LM
layer over the same prompt ``2g`` times.  Here a packed **unit** is one group (or a part of a
large one): the shared prefix ``S`` — the longest common prefix of the group's prompts, which
is the whole prompt under token routing — once, then each rollout's suffix (the rest of its
prompt and its response) one after another::

    [ S (shared) | suffix_1 | suffix_2 | ... | suffix_n ]

A suffix token attends to all of ``S`` and causally to its own suffix, never to another suffix
(:func:`r4b_kernels.prefix_shared_attention`); its positions continue from ``|S|``, so every
token sees exactly the keys and rotary positions it has in the one-rollout-per-sequence layout
and the log-probs are the same.  Gradients of all suffixes accumulate into ``S``'s activations
and the vision tower in one graph.

Scored rows keep the label-shift convention of :mod:`r4b.packing.microbatch`: the token at
position ``v + 1`` of rollout ``j`` is predicted by the row holding position ``v`` of rollout
``j``.  When the prompt is all shared, the first response token of *every* rollout is predicted
by the last row of ``S``: that row appears once per rollout in ``rows`` (with each rollout's
own target), and ``index_select`` sums its gradient over them.

A group larger than the micro-batch budget is split over several units, each with its own copy
of ``S`` (:func:`group_units`); a group whose images would not sit inside ``S`` (a placeholder
in a suffix) is not shared: each rollout is its own unit with its whole prompt as prefix.

Both functions take ``impl="auto" | "cpp" | "numpy" | "python"`` as :mod:`r4b.packing.thd`
does, with identical results: the C++ core (``r4b._C.group_units`` / ``pack_groups``), the
vectorised NumPy reference (:mod:`r4b.packing.reference`) and the pure-Python specification
(:mod:`r4b.packing.python_ref`) all work on one flat token buffer with offsets; ``"auto"`` is
C++ when the extension has these functions (``thd.HAS_R4B_C_GROUPS``), else NumPy.  Images
never leave Python: which rollouts have the same images is decided here, by content
(:func:`image_classes`), and handed down as one integer class per rollout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from . import thd
from .microbatch import PackedMicroBatch, empty_microbatch, plan
from .thd import IGNORE_INDEX, flatten_sequences


@dataclass(frozen=True)
class GroupUnit:
    """One packed unit: the shared prefix of ``seqs`` once, then each one's suffix in order."""

    seqs: tuple[int, ...]
    """Sequence indices (into the batch's per-sequence lists) whose suffixes the unit holds."""
    shared: int
    """Tokens of the shared prefix (``token_ids[seqs[0]][:shared]``)."""
    length: int
    """Tokens of the unit: ``shared + sum(len(token_ids[j]) - shared for j in seqs)``."""


@dataclass(frozen=True)
class FlatTokens:
    """A batch's token ids flattened once: sequence ``j`` is ``flat[offsets[j]:offsets[j + 1]]``.

    :func:`group_units` and :func:`pack_groups` take it in place of per-sequence token lists, so
    that one flattening (the largest host cost of the two on long rollouts) serves both.
    """

    flat: np.ndarray
    """int64 [total] token ids back to back."""
    offsets: np.ndarray
    """int64 [n + 1] start of each sequence in ``flat``."""

    @classmethod
    def of(cls, token_ids: Sequence[Sequence[int]]) -> "FlatTokens":
        """Flatten per-sequence token lists (or 1-D arrays / tensors)."""
        return cls(*flatten_sequences(token_ids))

    def __post_init__(self):
        for name in ("flat", "offsets"):
            a = getattr(self, name)
            if not isinstance(a, np.ndarray) or a.ndim != 1 or a.dtype != np.int64:
                raise TypeError(f"FlatTokens.{name} must be a 1-D int64 NumPy array, got "
                                f"{getattr(a, 'dtype', type(a).__name__)} "
                                f"{getattr(a, 'shape', '')}")
        if self.offsets.shape[0] < 1:
            raise ValueError("FlatTokens.offsets must have n + 1 >= 1 entries, got 0")

    def __len__(self) -> int:
        return self.offsets.shape[0] - 1


def _flat(token_ids) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(token_ids, FlatTokens):
        return token_ids.flat, token_ids.offsets
    return flatten_sequences(token_ids)


def _same_images(a: list, b: list) -> bool:
    """Whether two image lists hold the same images, by content (not by object)."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if x is y:
            continue
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            if x.shape != y.shape or not torch.equal(x, y):
                return False
        elif isinstance(x, np.ndarray) and isinstance(y, np.ndarray):
            if x.shape != y.shape or not np.array_equal(x, y):
                return False
        else:
            try:
                if not bool(x == y):
                    return False
            except Exception:  # objects without a usable equality: not provably the same
                return False
    return True


def image_classes(images: Sequence[list], group_ids: Sequence[int]) -> np.ndarray:
    """int64 [n] image class per sequence: the form in which the unit builders see images.

    0 means "no images"; a sequence has its group's first sequence's class iff their images are
    the same by content, else a class of its own.  So a group can share its prefix only if all
    its members have one class, and a non-zero class tells the builders to look for image
    placeholders after the shared prefix.
    """
    cls = np.zeros(len(images), dtype=np.int64)
    head: dict[int, int] = {}
    fresh = 0
    for j, g in enumerate(group_ids):
        h = head.setdefault(int(g), j)
        if h != j and _same_images(images[h], images[j]):
            cls[j] = cls[h]
        elif len(images[j]):
            fresh += 1
            cls[j] = fresh
    return cls


def _check_lengths(n: int, **per_seq) -> None:
    for name, seq in per_seq.items():
        if len(seq) != n:
            raise ValueError(f"{name} has {len(seq)} entries, expected one per sequence ({n})")


def group_units(token_ids: Sequence[Sequence[int]] | FlatTokens,
                prompt_lens: Sequence[int], group_ids: Sequence[int], images: Sequence[list], *,
                budget: int, image_token_id: int | None = None, impl: str = "auto"
                ) -> tuple[list[GroupUnit], dict]:
    """Split the batch into prefix-shared units, in order of each group's first sequence.

    A group's shared prefix is the longest common prefix of its members' prompts (their whole
    prompt when they are equal).  Sharing needs identical images across the group and no image
    placeholder (``image_token_id``) after the shared prefix; otherwise every member is its own
    unit (prefix = its prompt, one suffix), which is exactly the one-rollout-per-sequence layout.
    A group whose unit would exceed ``budget`` tokens is split first-fit-decreasing over the
    fewest units that fit (each unit repeats the prefix); a single member longer than the budget
    gets a unit of its own.  ``token_ids``: per-sequence token lists, or the batch flattened
    once (:class:`FlatTokens`, which :func:`pack_groups` takes too).  ``impl``: "auto" | "cpp"
    | "numpy" | "python" (identical results).

    Returns the units and statistics: ``dense_tokens`` (the one-rollout-per-sequence count),
    ``shared_tokens`` (tokens of all units), ``prefix_copies_lost`` (extra prefix copies from
    splitting, in tokens) and ``unshared_groups``.
    """
    n = len(token_ids)
    _check_lengths(n, prompt_lens=prompt_lens, group_ids=group_ids, images=images)
    if budget < 1:
        raise ValueError(f"budget must be >= 1 token, got {budget}")
    impl = thd.resolve_impl(impl, groups=True)
    flat, offsets = _flat(token_ids)
    out = thd._host_impl(impl).group_units(
        flat, offsets, thd._ints("prompt_lens", prompt_lens), thd._ints("group_ids", group_ids),
        image_classes(images, group_ids), int(budget),
        None if image_token_id is None else int(image_token_id))
    seqs, bounds = out["unit_seqs"].tolist(), out["unit_offsets"].tolist()
    units = [GroupUnit(tuple(seqs[a:b]), c, L) for a, b, c, L in
             zip(bounds[:-1], bounds[1:], out["unit_shared"].tolist(), out["unit_length"].tolist())]
    stats = {k: int(out[k]) for k in ("dense_tokens", "shared_tokens", "prefix_copies_lost",
                                      "unshared_groups")}
    return units, stats


def pack_groups(token_ids: Sequence[Sequence[int]] | FlatTokens,
                prompt_lens: Sequence[int], images: Sequence[list], units: Sequence[GroupUnit],
                microbatches: Sequence[Sequence[int]], *,
                process: Callable[[list], list] | None = None,
                impl: str = "auto") -> list[PackedMicroBatch]:
    """Pack this rank's micro-batches (lists of indices into ``units``) in the shared layout.

    Each :class:`~r4b.packing.microbatch.PackedMicroBatch` has ``cu_seqlens`` over its units,
    ``prefix_layout`` (:class:`r4b_kernels.PrefixLayout`) for the attention, ``rows`` (scored
    rows, a shared prefix row repeated once per rollout it predicts for), ``row_targets`` (the
    token each scored row predicts), ``seqs`` (the rollouts in packed order) and each unit's
    images once.  ``labels`` is -100 everywhere: with shared rows one label per row cannot hold
    the targets; use ``targets`` (``row_targets``).  An empty micro-batch is the one-token batch
    of :func:`~r4b.packing.microbatch.empty_microbatch`.

    No unit may be in two micro-batches and no sequence in two packed units, and each unit's
    ``shared`` tokens must be a common prefix of its sequences' prompts; errors name the place.
    ``token_ids`` as in :func:`group_units`.  ``impl``: "auto" | "cpp" | "numpy" | "python"
    (identical results; the images of every implementation are gathered here, in Python).
    """
    from r4b_kernels import PrefixLayout

    from ..models.multimodal import ImageBatch

    n = len(token_ids)
    _check_lengths(n, prompt_lens=prompt_lens, images=images)
    impl = thd.resolve_impl(impl, groups=True)
    sizes = [len(u.seqs) for u in units]
    unit_offsets = np.zeros(len(units) + 1, dtype=np.int64)
    np.cumsum(sizes, out=unit_offsets[1:])
    unit_seqs = np.fromiter((j for u in units for j in u.seqs), dtype=np.int64,
                            count=int(unit_offsets[-1]))
    unit_shared = np.fromiter((u.shared for u in units), dtype=np.int64, count=len(units))
    sel, bounds = thd.select_microbatches(microbatches, len(units), what="unit",
                                          rule="at most one")
    flat, offsets = _flat(token_ids)
    packed = thd._host_impl(impl).pack_groups(
        flat, offsets, thd._ints("prompt_lens", prompt_lens), unit_seqs, unit_offsets,
        unit_shared, sel, bounds)
    out = []
    for b, d in enumerate(packed):
        mb = sel[bounds[b]:bounds[b + 1]]
        if not mb.size:
            out.append(empty_microbatch())
            continue
        mine = mb.tolist()
        suffix = d["suffix_lens"].tolist()
        cuts = np.cumsum([0] + [sizes[u] for u in mine]).tolist()
        layout = PrefixLayout.build(d["prefix_lens"].tolist(),
                                    [suffix[a:b] for a, b in zip(cuts[:-1], cuts[1:])],
                                    device="cpu")
        unit_imgs = [list(images[units[u].seqs[0]]) for u in mine]
        if process is not None:
            unit_imgs = [process(ims) if ims else [] for ims in unit_imgs]
        flat_imgs = [im for ims in unit_imgs for im in ims]
        t = {k: torch.from_numpy(d[k]) for k in ("input_ids", "position_ids", "cu_seqlens", "rows",
                                                 "row_seq", "row_token", "row_targets")}
        out.append(PackedMicroBatch(
            input_ids=t["input_ids"], position_ids=t["position_ids"], cu_seqlens=t["cu_seqlens"],
            max_seqlen=int(d["max_seqlen"]),
            labels=torch.full_like(t["input_ids"], IGNORE_INDEX), rows=t["rows"],
            seqs=d["seqs"].tolist(), row_seq=t["row_seq"], row_token=t["row_token"],
            images=ImageBatch.collate(flat_imgs) if flat_imgs else None,
            prefix_layout=layout, row_targets=t["row_targets"]))
    return out


def pack_shared(token_ids: Sequence[Sequence[int]], prompt_lens: Sequence[int],
                group_ids: Sequence[int], images: Sequence[list], *, dp_rank: int, dp_size: int,
                tokens_per_microbatch: int, image_token_id: int | None = None,
                process: Callable[[list], list] | None = None
                ) -> tuple[list[PackedMicroBatch], dict, float]:
    """This rank's micro-batches in the prefix-shared layout: :func:`group_units`, the DP plan
    over the units' token counts, :func:`pack_groups`.  Returns them, the ``pack/*`` statistics
    (``pack/dense_tokens``, ``pack/tokens``, ``pack/prefix_copies_lost``,
    ``pack/unshared_groups``) and the plan's imbalance."""
    flat = FlatTokens.of(token_ids)  # flattened once for both calls
    units, st = group_units(flat, prompt_lens, group_ids, images, budget=tokens_per_microbatch,
                            image_token_id=image_token_id)
    mine, imbalance = plan([u.length for u in units], dp_rank=dp_rank, dp_size=dp_size,
                           tokens_per_microbatch=tokens_per_microbatch)
    stats = {"pack/dense_tokens": st["dense_tokens"], "pack/tokens": st["shared_tokens"],
             "pack/prefix_copies_lost": st["prefix_copies_lost"],
             "pack/unshared_groups": st["unshared_groups"]}
    return pack_groups(flat, prompt_lens, images, units, mine, process=process), stats, imbalance
