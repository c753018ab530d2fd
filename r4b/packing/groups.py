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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from .microbatch import PackedMicroBatch, empty_microbatch
from .thd import IGNORE_INDEX


@dataclass(frozen=True)
class GroupUnit:
    """One packed unit: the shared prefix of ``seqs`` once, then each one's suffix in order."""

    seqs: tuple[int, ...]
    """Sequence indices (into the batch's per-sequence lists) whose suffixes the unit holds."""
    shared: int
    """Tokens of the shared prefix (``token_ids[seqs[0]][:shared]``)."""
    length: int
    """Tokens of the unit: ``shared + sum(len(token_ids[j]) - shared for j in seqs)``."""


def _common_prefix(seqs: Sequence[Sequence[int]], limit: int) -> int:
    """Length of the longest common prefix of ``seqs`` (at most ``limit``)."""
    first = np.asarray(seqs[0][:limit], dtype=np.int64)
    n = len(first)
    for s in seqs[1:]:
        other = np.asarray(s[:n], dtype=np.int64)
        m = min(n, len(other))
        diff = np.nonzero(first[:m] != other[:m])[0]
        n = int(diff[0]) if diff.size else m
        if n == 0:
            break
    return n


def _same_images(a: list, b: list) -> bool:
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


def group_units(token_ids: Sequence[Sequence[int]], prompt_lens: Sequence[int],
                group_ids: Sequence[int], images: Sequence[list], *, budget: int,
                image_token_id: int | None = None) -> tuple[list[GroupUnit], dict]:
    """Split the batch into prefix-shared units, in order of each group's first sequence.

    A group's shared prefix is the longest common prefix of its members' prompts (their whole
    prompt when they are equal).  Sharing needs identical images across the group and no image
    placeholder (``image_token_id``) after the shared prefix; otherwise every member is its own
    unit (prefix = its prompt, one suffix), which is exactly the one-rollout-per-sequence layout.
    A group whose unit would exceed ``budget`` tokens is split first-fit-decreasing over the
    fewest units that fit (each unit repeats the prefix); a single member longer than the budget
    gets a unit of its own.

    Returns the units and statistics: ``dense_tokens`` (the one-rollout-per-sequence count),
    ``shared_tokens`` (tokens of all units), ``prefix_copies_lost`` (extra prefix copies from
    splitting, in tokens) and ``unshared_groups``.
    """
    n = len(token_ids)
    for name, seq in (("prompt_lens", prompt_lens), ("group_ids", group_ids), ("images", images)):
        if len(seq) != n:
            raise ValueError(f"{name} has {len(seq)} entries, expected one per sequence ({n})")
    if budget < 1:
        raise ValueError(f"budget must be >= 1 token, got {budget}")
    lens = [len(t) for t in token_ids]
    for j, (p, L) in enumerate(zip(prompt_lens, lens)):
        if not 1 <= p <= L:
            raise ValueError(f"prompt_lens[{j}] = {p}: expected 1 <= prompt length <= sequence "
                             f"length {L}")
    order: dict[int, list[int]] = {}
    for j, g in enumerate(group_ids):
        order.setdefault(int(g), []).append(j)
    units: list[GroupUnit] = []
    lost = unshared = 0
    for members in order.values():
        shared = _common_prefix([token_ids[j] for j in members],
                                min(int(prompt_lens[j]) for j in members))
        ok = shared >= 1 and all(_same_images(images[members[0]], images[j]) for j in members)
        if ok and image_token_id is not None and images[members[0]]:
            ok = all(image_token_id not in token_ids[j][shared:] for j in members)
        if not ok or len(members) == 1:
            unshared += len(members) > 1
            units += [GroupUnit((j,), int(prompt_lens[j]), lens[j]) for j in members]
            continue
        room = budget - shared
        # first-fit decreasing of the suffixes into units of capacity budget - shared
        bins: list[list[int]] = []
        fill: list[int] = []
        for j in sorted(members, key=lambda j: (-(lens[j] - shared), j)):
            s = lens[j] - shared
            for b in range(len(bins)):
                if fill[b] + s <= room:
                    bins[b].append(j)
                    fill[b] += s
                    break
            else:
                bins.append([j])
                fill.append(s)
        lost += (len(bins) - 1) * shared
        for b, f in zip(bins, fill):
            b.sort()  # suffixes in batch order inside a unit
            units.append(GroupUnit(tuple(b), shared, shared + f))
    stats = {"dense_tokens": int(sum(lens)), "shared_tokens": int(sum(u.length for u in units)),
             "prefix_copies_lost": int(lost), "unshared_groups": int(unshared)}
    return units, stats


def pack_groups(token_ids: Sequence[Sequence[int]], prompt_lens: Sequence[int],
                images: Sequence[list], units: Sequence[GroupUnit],
                microbatches: Sequence[Sequence[int]], *,
                process: Callable[[list], list] | None = None) -> list[PackedMicroBatch]:
    """Pack this rank's micro-batches (lists of indices into ``units``) in the shared layout.

    Each :class:`~r4b.packing.microbatch.PackedMicroBatch` has ``cu_seqlens`` over its units,
    ``prefix_layout`` (:class:`r4b_kernels.PrefixLayout`) for the attention, ``rows`` (scored
    rows, a shared prefix row repeated once per rollout it predicts for), ``row_targets`` (the
    token each scored row predicts), ``seqs`` (the rollouts in packed order) and each unit's
    images once.  ``labels`` is -100 everywhere: with shared rows one label per row cannot hold
    the targets; use ``targets`` (``row_targets``).  An empty micro-batch is the one-token batch
    of :func:`~r4b.packing.microbatch.empty_microbatch`.
    """
    from r4b_kernels import PrefixLayout

    from ..models.multimodal import ImageBatch

    out = []
    for mb in microbatches:
        if not len(mb):
            out.append(empty_microbatch())
            continue
        ids, pos, rows, tgt, row_seq, row_token = [], [], [], [], [], []
        seqs: list[int] = []
        prefix_lens, suffix_lens, unit_imgs = [], [], []
        cu = [0]
        for ui in mb:
            u = units[int(ui)]
            start = cu[-1]
            first = token_ids[u.seqs[0]]
            c = u.shared
            ids.append(np.asarray(first[:c], dtype=np.int64))
            pos.append(np.arange(c, dtype=np.int64))
            at = start + c
            sl = []
            for j in u.seqs:
                t = np.asarray(token_ids[j], dtype=np.int64)
                L, P = len(t), int(prompt_lens[j])
                ids.append(t[c:])
                pos.append(np.arange(c, L, dtype=np.int64))
                v = np.arange(P - 1, L - 1, dtype=np.int64)  # positions that predict a response token
                r = np.where(v < c, start + v, at + (v - c))
                rows.append(r)
                tgt.append(t[v + 1])
                row_seq.append(np.full(v.size, len(seqs), dtype=np.int64))
                row_token.append(v + 1 - P)
                seqs.append(int(j))
                sl.append(L - c)
                at += L - c
            prefix_lens.append(c)
            suffix_lens.append(sl)
            cu.append(at)
            unit_imgs.append(list(images[u.seqs[0]]))
        if process is not None:
            unit_imgs = [process(ims) if ims else [] for ims in unit_imgs]
        flat_imgs = [im for ims in unit_imgs for im in ims]
        cat = lambda xs: torch.from_numpy(np.concatenate(xs)).long()  # noqa: E731
        input_ids = cat(ids)
        layout = PrefixLayout.build(prefix_lens, suffix_lens, device="cpu")
        cu_t = torch.tensor(cu, dtype=torch.int32, device="cpu")
        out.append(PackedMicroBatch(
            input_ids=input_ids, position_ids=cat(pos), cu_seqlens=cu_t,
            max_seqlen=int(np.diff(cu).max()),
            labels=torch.full_like(input_ids, IGNORE_INDEX), rows=cat(rows), seqs=seqs,
            row_seq=cat(row_seq), row_token=cat(row_token),
            images=ImageBatch.collate(flat_imgs) if flat_imgs else None,
            prefix_layout=layout, row_targets=cat(tgt)))
    return out

