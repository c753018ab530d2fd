"""Vectorised NumPy implementation of the ragged packer (``impl="numpy"``, the fallback when
``r4b._C`` is missing).

Every function here has a C++ twin in ``csrc/pack_core.cpp`` and a pure-Python twin in
``r4b/packing/python_ref.py`` with the same validation, the same algorithm and the same tie-breaking,
so all three produce identical outputs; the tests compare them on random inputs.  Inputs are
NumPy arrays already converted by ``r4b.packing.thd`` (int64 lengths/offsets/indices, int8 modes,
float32 advantages); outputs are NumPy arrays.

Plan (see ``plan``):

1. each sequence's length is padded to ``pad_to_multiple``; its cost is the padded length
   (``cost=COST_TOKENS``) or ``a*L + L*L`` (``cost=COST_FLOPS``);
2. units are sequences, or whole groups with ``keep_groups`` (numbered by first appearance);
3. LPT: units in order of (cost desc, unit id asc) go to the rank with the smallest
   (load, units of the same mode already there, rank id) — the mode term spreads think and
   no-think rollouts when loads tie;
4. refinement: while some single move or pairwise swap between the most loaded rank and another
   rank lowers the larger of the two loads, apply the one that brings the pair closest to even
   (ties: move before swap, then smaller unit ids); ranks are tried in (load asc, id asc) order;
5. per rank, first-fit-decreasing of its sequences (padded length desc, index asc) into
   micro-batches of at most ``tokens_per_microbatch`` rows.
"""

from __future__ import annotations

import numpy as np

IGNORE_INDEX = -100
COST_TOKENS = 0
COST_FLOPS = 1
MAX_MODE = 127
INT32_MAX = 2**31 - 1


# ---------------------------------------------------------------- validation
def _first_bad(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def check_seq_lens(seq_lens: np.ndarray) -> None:
    """Every length must be positive (zero-length sequences are rejected, never dropped)."""
    bad = seq_lens <= 0
    if bad.any():
        i = _first_bad(bad)
        what = "non-negative" if seq_lens[i] < 0 else "non-zero (zero-length sequences are not allowed)"
        raise ValueError(f"seq_lens must be {what}, got {int(seq_lens[i])} at index {i}")


def check_modes(modes: np.ndarray, n: int, name: str = "modes") -> None:
    """Modes are small non-negative ids (0 no-think, 1 think, 2 auto, ...)."""
    if modes.shape[0] != n:
        raise ValueError(f"{name} must have one entry per sequence ({n}), got {modes.shape[0]}")
    bad = (modes < 0) | (modes > MAX_MODE)
    if bad.any():
        i = _first_bad(bad)
        raise ValueError(f"{name} must be in [0, {MAX_MODE}], got {int(modes[i])} at index {i}")


def padded_lengths(seq_lens: np.ndarray, pad_to_multiple: int) -> np.ndarray:
    """Lengths rounded up to a multiple of ``pad_to_multiple``."""
    m = int(pad_to_multiple)
    return (seq_lens + (m - 1)) // m * m


# ---------------------------------------------------------------- plan
def _check_plan(seq_lens, num_ranks, tokens_per_microbatch, group_ids, modes, cost, flops_a,
                keep_groups, pad_to_multiple) -> np.ndarray:
    n = seq_lens.shape[0]
    if num_ranks < 1:
        raise ValueError(f"num_ranks must be >= 1, got {num_ranks}")
    if tokens_per_microbatch < 1:
        raise ValueError(f"tokens_per_microbatch must be >= 1, got {tokens_per_microbatch}")
    if pad_to_multiple < 1:
        raise ValueError(f"pad_to_multiple must be >= 1, got {pad_to_multiple}")
    if cost not in (COST_TOKENS, COST_FLOPS):
        raise ValueError(f"cost must be {COST_TOKENS} (tokens) or {COST_FLOPS} (flops), got {cost}")
    if flops_a < 0:
        raise ValueError(f"flops_a must be >= 0, got {flops_a}")
    check_seq_lens(seq_lens)
    if group_ids is not None and group_ids.shape[0] != n:
        raise ValueError(f"group_ids must have one entry per sequence ({n}), got {group_ids.shape[0]}")
    if modes is not None:
        check_modes(modes, n)
    if keep_groups and group_ids is None:
        raise ValueError("keep_groups=True needs group_ids, got None")
    plen = padded_lengths(seq_lens, pad_to_multiple)
    over = plen > tokens_per_microbatch
    if over.any():
        i = _first_bad(over)
        raise ValueError(
            f"seq_lens[{i}] = {int(seq_lens[i])} (padded to {int(plen[i])}) exceeds "
            f"tokens_per_microbatch = {tokens_per_microbatch} at index {i}; raise the budget")
    if cost == COST_FLOPS and n and int(plen.max()) > 2**20:
        raise ValueError(f"seq_lens must be <= {2**20} with the flops cost (int64 overflow), "
                         f"got {int(plen.max())} at index {int(plen.argmax())}")
    return plen


def _best_exchange(costs: np.ndarray, members_hi: np.ndarray, members_lo: np.ndarray, gap: int):
    """Best move (hi→lo) or swap between two ranks; ``(obj, kind, x, y)`` or None.

    ``obj = |2d - gap|`` where ``d`` is the load moved from the higher rank; valid iff
    ``obj < gap`` (the larger load strictly drops).  Ties: smaller obj, move (kind 0) before swap
    (kind 1), smaller x, smaller y.  ``members_*`` are ascending unit ids.
    """
    best = None
    cx = costs[members_hi]
    obj = np.abs(2 * cx - gap)
    ok = obj < gap
    if ok.any():
        o = obj[ok].min()
        x = int(members_hi[ok & (obj == o)][0])
        best = (int(o), 0, x, -1)
    if members_lo.size == 0:
        return best
    order = np.lexsort((members_lo, costs[members_lo]))
    ys, yc = members_lo[order], costs[members_lo][order]
    t2 = 2 * cx - gap                                   # twice the ideal partner cost
    hi = np.searchsorted(2 * yc, t2, side="left")       # first y with 2c >= t2
    cand = []
    has_hi = hi < yc.size
    hi_c = np.where(has_hi, hi, 0)
    cand.append((np.where(has_hi, 2 * yc[hi_c] - t2, np.iinfo(np.int64).max), ys[hi_c]))
    has_lo = hi > 0
    lo_last = np.where(has_lo, hi - 1, 0)
    lo = np.searchsorted(yc, yc[lo_last], side="left")  # first of its equal-cost run
    cand.append((np.where(has_lo, t2 - 2 * yc[lo], np.iinfo(np.int64).max), ys[lo]))
    objs = np.stack([cand[0][0], cand[1][0]])           # [2, |hi|]
    yids = np.stack([cand[0][1], cand[1][1]])
    xs = np.broadcast_to(members_hi, objs.shape)
    valid = objs < gap
    if not valid.any():
        return best
    o, x, y = objs[valid], xs[valid], yids[valid]
    k = np.lexsort((y, x, o))[0]
    sw = (int(o[k]), 1, int(x[k]), int(y[k]))
    return sw if best is None or sw < best else best


def plan(seq_lens: np.ndarray, num_ranks: int, tokens_per_microbatch: int,
         group_ids: np.ndarray | None = None, modes: np.ndarray | None = None,
         cost: int = COST_TOKENS, flops_a: int = 0, keep_groups: bool = False,
         pad_to_multiple: int = 1) -> dict:
    """Assign sequences to ranks and micro-batches (algorithm in the module docstring).

    Returns a dict of NumPy arrays: ``rank_of`` / ``microbatch_of`` (int32 [n]),
    ``rank_costs`` / ``rank_tokens`` (int64 [ranks]), ``microbatch_counts`` (int32 [ranks]) and
    ``max_unit_cost`` (int, the largest unit's cost, for the lower bound).
    """
    plen = _check_plan(seq_lens, num_ranks, tokens_per_microbatch, group_ids, modes, cost,
                       flops_a, keep_groups, pad_to_multiple)
    n, R = seq_lens.shape[0], int(num_ranks)
    c = plen if cost == COST_TOKENS else int(flops_a) * plen + plen * plen
    if keep_groups:
        _, first, inv = np.unique(group_ids, return_index=True, return_inverse=True)
        by_first = np.argsort(first, kind="stable")
        gid = np.empty_like(by_first)
        gid[by_first] = np.arange(by_first.size)
        unit_of_seq = gid[inv.reshape(-1)]
        unit_first = first[by_first]
    else:
        unit_of_seq = np.arange(n)
        unit_first = np.arange(n)
    U = unit_first.size
    ucost = np.zeros(U, dtype=np.int64)
    np.add.at(ucost, unit_of_seq, c)
    umode = (modes[unit_first].astype(np.int64) if modes is not None
             else np.zeros(U, dtype=np.int64))

    # LPT greedy.
    load = np.zeros(R, dtype=np.int64)
    mcount = np.zeros((R, MAX_MODE + 1), dtype=np.int64)
    urank = np.empty(U, dtype=np.int64)
    for u in np.lexsort((np.arange(U), -ucost)).tolist():
        cand = np.flatnonzero(load == load.min())
        r = int(cand[np.argmin(mcount[cand, umode[u]])]) if cand.size > 1 else int(cand[0])
        urank[u] = r
        load[r] += ucost[u]
        mcount[r, umode[u]] += 1

    # Move / pairwise-swap refinement of the most loaded rank.
    for _ in range(4 * U + 16):
        M = int(np.argmax(load))
        applied = False
        for m in np.lexsort((np.arange(R), load)).tolist():
            if m == M:
                continue
            gap = int(load[M] - load[m])
            if gap <= 1:
                break
            ex = _best_exchange(ucost, np.flatnonzero(urank == M), np.flatnonzero(urank == m), gap)
            if ex is None:
                continue
            _, kind, x, y = ex
            urank[x] = m
            load[M] -= ucost[x]
            load[m] += ucost[x]
            if kind == 1:
                urank[y] = M
                load[m] -= ucost[y]
                load[M] += ucost[y]
            applied = True
            break
        if not applied:
            break

    # First-fit-decreasing into micro-batches, per rank.
    rank_of = urank[unit_of_seq]
    mb_of = np.empty(n, dtype=np.int32)
    counts = np.zeros(R, dtype=np.int32)
    for r in range(R):
        mem = np.flatnonzero(rank_of == r)
        mem = mem[np.lexsort((mem, -plen[mem]))]
        fill = np.zeros(mem.size, dtype=np.int64)
        nb = 0
        for i in mem.tolist():
            L = plen[i]
            fits = fill[:nb] <= tokens_per_microbatch - L
            b = int(fits.argmax()) if nb and fits.any() else nb
            nb += b == nb
            fill[b] += L
            mb_of[i] = b
        counts[r] = nb
    rank_tokens = np.zeros(R, dtype=np.int64)
    np.add.at(rank_tokens, rank_of, plen)
    return {"rank_of": rank_of.astype(np.int32), "microbatch_of": mb_of,
            "rank_costs": load, "rank_tokens": rank_tokens, "microbatch_counts": counts,
            "max_unit_cost": int(ucost.max()) if U else 0}


# ---------------------------------------------------------------- pack
def check_bounds(bounds: np.ndarray | None, k: int, indices: str = "seq_indices") -> np.ndarray:
    """Micro-batch boundaries in ``indices`` (``[0, k]`` when ``bounds`` is None)."""
    if bounds is None:
        return np.array([0, k], dtype=np.int64)
    B = bounds.shape[0] - 1
    if B < 0:
        raise ValueError("bounds must have at least 1 entry, got 0")
    if bounds[0] != 0:
        raise ValueError(f"bounds must start at 0, got {int(bounds[0])} at index 0")
    bad = np.diff(bounds) < 0
    if bad.any():
        i = _first_bad(bad) + 1
        raise ValueError(f"bounds must be non-decreasing, got {int(bounds[i])} at index {i} "
                         f"after {int(bounds[i - 1])}")
    if bounds[B] != k:
        raise ValueError(f"bounds must end at len({indices}) = {k}, got {int(bounds[B])} at "
                         f"index {B}")
    return bounds


def _check_pack(token_count, offsets, prompt_lens, seq_indices, modes, advantages,
                pad_to_multiple, bounds=None) -> np.ndarray:
    """Validates a pack request; returns the micro-batch bounds (see :func:`check_bounds`)."""
    n = prompt_lens.shape[0]
    if pad_to_multiple < 1:
        raise ValueError(f"pad_to_multiple must be >= 1, got {pad_to_multiple}")
    if offsets.shape[0] != n + 1:
        raise ValueError(f"offsets must have len(prompt_lens) + 1 = {n + 1} entries, "
                         f"got {offsets.shape[0]}")
    if offsets[0] < 0:
        raise ValueError(f"offsets must be non-negative, got {int(offsets[0])} at index 0")
    lens = np.diff(offsets)
    bad = lens <= 0
    if bad.any():
        i = _first_bad(bad)
        what = ("non-decreasing" if lens[i] < 0 else
                "strictly increasing (zero-length sequences are not allowed)")
        raise ValueError(f"offsets must be {what}: sequence {i} has length {int(lens[i])} "
                         f"(offsets[{i}] = {int(offsets[i])}, offsets[{i + 1}] = {int(offsets[i + 1])})")
    if offsets[n] > token_count:
        raise ValueError(f"offsets[{n}] = {int(offsets[n])} exceeds len(token_ids) = {token_count}")
    bad = (prompt_lens < 1) | (prompt_lens > lens)
    if bad.any():
        i = _first_bad(bad)
        raise ValueError(f"prompt_lens must be in [1, seq_len] per sequence, got {int(prompt_lens[i])} "
                         f"at index {i} (seq_len {int(lens[i])})")
    if modes is not None:
        check_modes(modes, n)
    bnd = check_bounds(bounds, seq_indices.shape[0])
    if advantages is not None:
        if advantages.shape[0] != n:
            raise ValueError(f"advantages must have one entry per sequence ({n}), got {advantages.shape[0]}")
    bad = (seq_indices < 0) | (seq_indices >= n)
    if bad.any():
        j = _first_bad(bad)
        raise ValueError(f"seq_indices must be in [0, {n}), got {int(seq_indices[j])} at index {j}")
    if seq_indices.size > 1:
        order = np.argsort(seq_indices, kind="stable")
        s = seq_indices[order]
        dup = s[1:] == s[:-1]
        if dup.any():
            d = _first_bad(dup)
            a, b = sorted((int(order[d]), int(order[d + 1])))
            raise ValueError(f"seq_indices must not repeat a sequence, got {int(s[d])} at "
                             f"indices {a} and {b}")
    if advantages is not None and seq_indices.size:
        bad = ~np.isfinite(advantages[seq_indices])
        if bad.any():
            j = int(seq_indices[_first_bad(bad)])
            raise ValueError(f"advantages must be finite, got {float(advantages[j])} at index {j}")
    plen = np.concatenate([[0], np.cumsum(padded_lengths(lens[seq_indices], pad_to_multiple))])
    rows = plen[bnd[1:]] - plen[bnd[:-1]]
    over = rows > INT32_MAX
    if over.any():
        raise ValueError(f"the micro-batch holds {int(rows[_first_bad(over)])} rows; cu_seqlens "
                         f"is int32, so at most {INT32_MAX}")
    return bnd


def pack(token_ids: np.ndarray, offsets: np.ndarray, prompt_lens: np.ndarray,
         seq_indices: np.ndarray, modes: np.ndarray | None = None,
         advantages: np.ndarray | None = None, pad_to_multiple: int = 1,
         pad_token_id: int = 0, bounds: np.ndarray | None = None) -> dict:
    """Pack sequences ``seq_indices`` into THD micro-batches (see ``r4b.packing.thd.PackedBatch``).

    ``bounds`` ([B + 1], default ``[0, k]``) splits ``seq_indices`` into B micro-batches.
    Returns a list of B dicts (``input_ids``, ``position_ids``, ``labels``, ``loss_mask``,
    ``mode``, ``advantage``, ``seq_index``, ``cu_seqlens``, ``response_rows``, ``max_seqlen``);
    within a batch ``cu_seqlens`` ([k_b + 1]) starts at 0, ``seq_index`` counts its own
    sequences and ``response_rows`` are its own row numbers.  Here all batches are packed in
    one vectorised pass and returned as views of it.
    """
    bnd = _check_pack(token_ids.shape[0], offsets, prompt_lens, seq_indices, modes, advantages,
                      pad_to_multiple, bounds)
    k, B = seq_indices.size, bnd.size - 1
    start = offsets[seq_indices]
    lens = offsets[seq_indices + 1] - start
    plens = prompt_lens[seq_indices]
    padded = padded_lengths(lens, pad_to_multiple)
    cu = np.zeros(k + 1, dtype=np.int64)              # over all batches
    np.cumsum(padded, out=cu[1:])
    T = int(cu[-1])
    seg = np.repeat(np.arange(k, dtype=np.int32), padded)
    pos = np.arange(T, dtype=np.int64) - cu[:-1][seg]
    seg_len = lens[seg]
    real = pos < seg_len
    src = start[seg] + pos
    input_ids = np.where(real, token_ids[np.where(real, src, 0)] if T else src, pad_token_id)
    scored = (pos >= plens[seg] - 1) & (pos < seg_len - 1)
    labels = np.full(T, IGNORE_INDEX, dtype=np.int64)
    labels[scored] = token_ids[src[scored] + 1]
    mode = (modes[seq_indices] if modes is not None else np.zeros(k, np.int8))[seg]
    advantage = np.zeros(T, dtype=np.float32)
    if advantages is not None:
        advantage[scored] = advantages[seq_indices][seg[scored]]
    # Make every batch's numbering local.
    kb = np.diff(bnd)
    batch_of_seq = np.repeat(np.arange(B), kb)
    row0 = cu[bnd]                                    # first row of each batch, [B + 1]
    batch_of_row = batch_of_seq[seg]
    seq_index = seg - bnd[:-1][batch_of_row].astype(np.int32)
    response_rows = np.flatnonzero(scored)
    response_rows -= row0[:-1][batch_of_row[response_rows]]
    b_of_cu = np.repeat(np.arange(B), kb + 1)         # batch b owns k_b + 1 cu entries
    cu_local = cu[np.arange(k + B) - b_of_cu] - row0[:-1][b_of_cu]
    max_seqlen = np.zeros(B, dtype=np.int64)
    np.maximum.at(max_seqlen, batch_of_seq, padded)
    cols = {"input_ids": input_ids.astype(np.int64, copy=False), "position_ids": pos,
            "labels": labels, "loss_mask": scored, "mode": mode.astype(np.int8, copy=False),
            "advantage": advantage, "seq_index": seq_index.astype(np.int32, copy=False)}
    resp = np.concatenate([[0], np.cumsum(np.bincount(batch_of_row[scored], minlength=B))])
    cu_local = cu_local.astype(np.int32)
    out = []
    for b in range(B):
        d = {f: v[row0[b]:row0[b + 1]] for f, v in cols.items()}
        d["cu_seqlens"] = cu_local[bnd[b] + b:bnd[b + 1] + b + 1]
        d["response_rows"] = response_rows[resp[b]:resp[b + 1]].astype(np.int64)
        d["max_seqlen"] = int(max_seqlen[b])
        out.append(d)
    return out


# ---------------------------------------------------------------- unpack
def _check_unpack(rows: int, cu_seqlens: np.ndarray, seq_lens: np.ndarray) -> None:
    k = seq_lens.shape[0]
    if cu_seqlens.shape[0] != k + 1:
        raise ValueError(f"cu_seqlens must have len(seq_lens) + 1 = {k + 1} entries, "
                         f"got {cu_seqlens.shape[0]}")
    if k + 1 and cu_seqlens[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {int(cu_seqlens[0])} at index 0")
    span = np.diff(cu_seqlens.astype(np.int64))
    bad = (seq_lens < 0) | (seq_lens > span)
    if bad.any():
        j = _first_bad(bad)
        raise ValueError(f"seq_lens must be in [0, cu_seqlens[j+1] - cu_seqlens[j]], got "
                         f"{int(seq_lens[j])} at index {j} (span {int(span[j])})")
    if int(cu_seqlens[-1]) != rows:
        raise ValueError(f"values must have cu_seqlens[-1] = {int(cu_seqlens[-1])} rows, got {rows}")


def unpack_rows(values: np.ndarray, cu_seqlens: np.ndarray, seq_lens: np.ndarray) -> np.ndarray:
    """Rows of each packed sequence without its padding, concatenated in sequence order."""
    _check_unpack(values.shape[0], cu_seqlens, seq_lens)
    if seq_lens.size == 0:
        return values[:0].copy()
    starts = cu_seqlens[:-1].astype(np.int64)
    idx = np.repeat(starts - np.concatenate([[0], np.cumsum(seq_lens)[:-1]]), seq_lens)
    idx += np.arange(int(seq_lens.sum()), dtype=np.int64)
    return values[idx]


# ---------------------------------------------------------------- prefix-shared group units
# The layout of r4b.packing.groups on flat buffers: sequence j is
# ``token_ids[offsets[j]:offsets[j + 1]]`` with prompt length ``prompt_lens[j]``.  A unit set is
# given in CSR form: unit u holds the sequences ``unit_seqs[unit_offsets[u]:unit_offsets[u + 1]]``
# (its suffixes in that order) after a shared prefix of ``unit_shared[u]`` tokens, the first
# ``unit_shared[u]`` tokens of its first sequence.
#
# Units (see ``group_units``):
#
# 1. groups are numbered by first appearance; a group's members are its sequences ascending;
# 2. a group's shared prefix is the longest common prefix of its members' tokens, at most its
#    shortest prompt;
# 3. a group of two or more is shared iff that prefix is non-empty, every member has the first
#    member's ``image_class`` and, when ``image_token_id`` is given and the class is non-zero
#    (0 means "no images"), no member holds ``image_token_id`` at or after the prefix;
# 4. a shared group is split first-fit-decreasing (suffix length desc, index asc) into units of
#    at most ``budget - shared`` suffix tokens (a suffix longer than that gets a unit of its
#    own); units in creation order, members ascending inside each;
# 5. every member of an unshared group (and a group of one) is its own unit, its whole prompt
#    as prefix.
def check_sequences(token_count: int, offsets: np.ndarray, prompt_lens: np.ndarray) -> np.ndarray:
    """Validates the flat sequences of a group request; returns their lengths."""
    n = prompt_lens.shape[0]
    if offsets.shape[0] != n + 1:
        raise ValueError(f"offsets must have len(prompt_lens) + 1 = {n + 1} entries, "
                         f"got {offsets.shape[0]}")
    if offsets[0] < 0:
        raise ValueError(f"offsets must be non-negative, got {int(offsets[0])} at index 0")
    lens = np.diff(offsets)
    bad = lens < 0
    if bad.any():
        i = _first_bad(bad)
        raise ValueError(f"offsets must be non-decreasing: sequence {i} has length {int(lens[i])} "
                         f"(offsets[{i}] = {int(offsets[i])}, offsets[{i + 1}] = {int(offsets[i + 1])})")
    if offsets[n] > token_count:
        raise ValueError(f"offsets[{n}] = {int(offsets[n])} exceeds len(token_ids) = {token_count}")
    bad = (prompt_lens < 1) | (prompt_lens > lens)
    if bad.any():
        j = _first_bad(bad)
        raise ValueError(f"prompt_lens[{j}] = {int(prompt_lens[j])}: expected 1 <= prompt length "
                         f"<= sequence length {int(lens[j])}")
    return lens


def check_group_units(token_count: int, offsets: np.ndarray, prompt_lens: np.ndarray,
                      group_ids: np.ndarray, image_class: np.ndarray, budget: int) -> np.ndarray:
    """Validates a ``group_units`` request; returns the sequence lengths."""
    n = prompt_lens.shape[0]
    for name, a in (("group_ids", group_ids), ("image_class", image_class)):
        if a.shape[0] != n:
            raise ValueError(f"{name} must have one entry per sequence ({n}), got {a.shape[0]}")
    if budget < 1:
        raise ValueError(f"budget must be >= 1 token, got {budget}")
    return check_sequences(token_count, offsets, prompt_lens)


def _first_mismatch(token_ids: np.ndarray, a: np.ndarray, b: np.ndarray,
                    limit: np.ndarray) -> np.ndarray:
    """Per pair i: first t < limit[i] with token_ids[a[i] + t] != token_ids[b[i] + t], else
    limit[i] (every limit >= 1)."""
    if a.size == 0:
        return np.zeros(0, dtype=np.int64)
    starts = np.zeros(a.size, dtype=np.int64)
    np.cumsum(limit[:-1], out=starts[1:])
    pair = np.repeat(np.arange(a.size), limit)
    t = np.arange(int(limit.sum()), dtype=np.int64) - starts[pair]
    val = np.where(token_ids[a[pair] + t] != token_ids[b[pair] + t], t, limit[pair])
    return np.minimum.reduceat(val, starts)


def _ffd(members: np.ndarray, sizes: np.ndarray, room: int) -> list[np.ndarray]:
    """First-fit decreasing of ``members`` (ascending) with ``sizes`` into bins of ``room``;
    each bin's members ascending, bins in creation order."""
    order = np.lexsort((members, -sizes))
    fill = np.zeros(members.size, dtype=np.int64)
    bin_of = np.empty(members.size, dtype=np.int64)
    nb = 0
    for i in order.tolist():
        s = sizes[i]
        fits = fill[:nb] <= room - s
        b = int(fits.argmax()) if nb and fits.any() else nb
        nb += b == nb
        fill[b] += s
        bin_of[i] = b
    return [members[bin_of == b] for b in range(nb)]


def group_units(token_ids: np.ndarray, offsets: np.ndarray, prompt_lens: np.ndarray,
                group_ids: np.ndarray, image_class: np.ndarray, budget: int,
                image_token_id: int | None = None) -> dict:
    """Prefix-shared units of a batch (rules in the comment above this function).

    Returns a dict: ``unit_seqs`` / ``unit_offsets`` / ``unit_shared`` / ``unit_length`` (int64,
    the CSR unit set and each unit's token count) and the int statistics ``dense_tokens``
    (sum of sequence lengths), ``shared_tokens`` (sum of unit lengths), ``prefix_copies_lost``
    (tokens of the extra prefix copies that splitting costs) and ``unshared_groups`` (groups of
    two or more that could not share).
    """
    lens = check_group_units(token_ids.shape[0], offsets, prompt_lens, group_ids, image_class,
                             int(budget))
    n = lens.shape[0]
    if n == 0:
        z = np.zeros(0, dtype=np.int64)
        return {"unit_seqs": z, "unit_offsets": np.zeros(1, dtype=np.int64), "unit_shared": z,
                "unit_length": z.copy(), "dense_tokens": 0, "shared_tokens": 0,
                "prefix_copies_lost": 0, "unshared_groups": 0}
    _, first, inv = np.unique(group_ids, return_index=True, return_inverse=True)
    by_first = np.argsort(first, kind="stable")
    rank = np.empty_like(by_first)
    rank[by_first] = np.arange(by_first.size)
    g = rank[inv.reshape(-1)]                     # group of each sequence, first-appearance order
    G = first.size
    members = np.argsort(g, kind="stable")        # grouped, ascending inside each group
    gsize = np.bincount(g, minlength=G)
    gstart = np.zeros(G + 1, dtype=np.int64)
    np.cumsum(gsize, out=gstart[1:])
    head = members[gstart[:-1]]
    shared = np.minimum.reduceat(prompt_lens[members], gstart[:-1]).astype(np.int64)
    others = np.flatnonzero(head[g] != np.arange(n))
    lcp = _first_mismatch(token_ids, offsets[others], offsets[head[g[others]]], shared[g[others]])
    np.minimum.at(shared, g[others], lcp)
    ok = shared >= 1
    ok &= np.bincount(g, weights=image_class != image_class[head[g]], minlength=G) == 0
    if image_token_id is not None:
        lo, hi = int(offsets[0]), int(offsets[n])
        hit = np.flatnonzero(token_ids[lo:hi] == image_token_id) + lo
        s = np.searchsorted(offsets, hit, side="right") - 1
        bad = (hit - offsets[s] >= shared[g[s]]) & (image_class[head[g[s]]] != 0)
        ok[np.unique(g[s[bad]])] = False
    unshared = int(((~ok) & (gsize > 1)).sum())
    seqs, bounds, sh, length = [], [], [], []
    lost = 0
    for k in range(G):
        mem = members[gstart[k]:gstart[k + 1]]
        if not ok[k] or mem.size == 1:
            seqs.append(mem)
            bounds.append(np.ones(mem.size, dtype=np.int64))
            sh.append(prompt_lens[mem])
            length.append(lens[mem])
            continue
        c = int(shared[k])
        sizes = lens[mem] - c
        bins = _ffd(mem, sizes, int(budget) - c)
        lost += (len(bins) - 1) * c
        seqs += bins
        bounds.append(np.array([b.size for b in bins], dtype=np.int64))
        sh.append(np.full(len(bins), c, dtype=np.int64))
        length.append(np.array([c + int((lens[b] - c).sum()) for b in bins], dtype=np.int64))
    sizes = np.concatenate(bounds)
    unit_offsets = np.zeros(sizes.size + 1, dtype=np.int64)
    np.cumsum(sizes, out=unit_offsets[1:])
    unit_length = np.concatenate(length).astype(np.int64)
    return {"unit_seqs": np.concatenate(seqs).astype(np.int64), "unit_offsets": unit_offsets,
            "unit_shared": np.concatenate(sh).astype(np.int64), "unit_length": unit_length,
            "dense_tokens": int(lens.sum()), "shared_tokens": int(unit_length.sum()),
            "prefix_copies_lost": int(lost), "unshared_groups": unshared}


def check_group_pack(token_ids: np.ndarray, offsets: np.ndarray, prompt_lens: np.ndarray,
                     unit_seqs: np.ndarray, unit_offsets: np.ndarray, unit_shared: np.ndarray,
                     unit_indices: np.ndarray, bounds: np.ndarray | None = None) -> np.ndarray:
    """Validates a ``pack_groups`` request; returns the micro-batch bounds.

    Checked, in this order: the sequences (:func:`check_sequences`); the unit set (``unit_offsets``
    [U + 1] from 0 to ``len(unit_seqs)``, every unit non-empty, ``unit_seqs`` in [0, n));
    ``bounds``; ``unit_indices`` in [0, U) without repeats; no sequence in two packed units;
    per packed unit, ``1 <= unit_shared[u] <= P`` of each of its sequences and their first
    ``unit_shared[u]`` tokens equal to its first sequence's; int32 row counts.
    """
    lens = check_sequences(token_ids.shape[0], offsets, prompt_lens)
    n, U = lens.shape[0], unit_shared.shape[0]
    if unit_offsets.shape[0] != U + 1:
        raise ValueError(f"unit_offsets must have len(unit_shared) + 1 = {U + 1} entries, got "
                         f"{unit_offsets.shape[0]}")
    if unit_offsets[0] != 0:
        raise ValueError(f"unit_offsets must start at 0, got {int(unit_offsets[0])} at index 0")
    cnt = np.diff(unit_offsets)
    bad = cnt < 1
    if bad.any():
        u = _first_bad(bad)
        raise ValueError(f"unit_offsets must be strictly increasing (every unit holds at least "
                         f"one sequence): unit {u} has {int(cnt[u])}")
    if unit_offsets[U] != unit_seqs.shape[0]:
        raise ValueError(f"unit_offsets must end at len(unit_seqs) = {unit_seqs.shape[0]}, got "
                         f"{int(unit_offsets[U])} at index {U}")
    bad = (unit_seqs < 0) | (unit_seqs >= n)
    if bad.any():
        i = _first_bad(bad)
        raise ValueError(f"unit_seqs must be sequence indices in [0, {n}), got "
                         f"{int(unit_seqs[i])} at index {i}")
    k = unit_indices.shape[0]
    bnd = check_bounds(bounds, k, "unit_indices")
    bad = (unit_indices < 0) | (unit_indices >= U)
    if bad.any():
        j = _first_bad(bad)
        raise ValueError(f"unit_indices must be in [0, {U}), got {int(unit_indices[j])} at "
                         f"index {j}")
    if k > 1:
        order = np.argsort(unit_indices, kind="stable")
        s = unit_indices[order]
        dup = s[1:] == s[:-1]
        if dup.any():
            d = _first_bad(dup)
            a, b = sorted((int(order[d]), int(order[d + 1])))
            raise ValueError(f"unit_indices must not repeat a unit, got {int(s[d])} at indices "
                             f"{a} and {b}")
    # The packed sequences in packed order, with their unit.
    cnt_k = cnt[unit_indices]
    unit_of = np.repeat(unit_indices, cnt_k)
    first_pos = np.zeros(k, dtype=np.int64)
    if k:
        np.cumsum(cnt_k[:-1], out=first_pos[1:])
    src = unit_offsets[unit_of] + (np.arange(unit_of.size) - np.repeat(first_pos, cnt_k))
    q = unit_seqs[src]
    if q.size > 1:
        _, fi = np.unique(q, return_index=True)
        again = np.ones(q.size, dtype=bool)
        again[fi] = False
        if again.any():
            p = _first_bad(again)
            e = int(np.flatnonzero(q[:p] == q[p])[0])
            raise ValueError(f"every sequence must be in at most one packed unit, but sequence "
                             f"{int(q[p])} is in units {int(unit_of[e])} and {int(unit_of[p])}")
    c = unit_shared[unit_of]
    bad = (c < 1) | (c > prompt_lens[q])
    if bad.any():
        p = _first_bad(bad)
        raise ValueError(f"unit_shared[{int(unit_of[p])}] = {int(c[p])}: expected 1 <= shared "
                         f"prefix <= prompt length {int(prompt_lens[q[p]])} of its sequence "
                         f"{int(q[p])}")
    head = unit_seqs[unit_offsets[unit_of]]
    rest = np.flatnonzero(q != head)
    t = _first_mismatch(token_ids, offsets[q[rest]], offsets[head[rest]], c[rest])
    bad = t < c[rest]
    if bad.any():
        p = int(rest[_first_bad(bad)])
        raise ValueError(f"unit_shared[{int(unit_of[p])}] = {int(c[p])}: the unit's sequence "
                         f"{int(q[p])} differs from its first sequence {int(head[p])} at token "
                         f"{int(t[bad][0])} (the shared prefix must be common to all of them)")
    # Rows per micro-batch: its units' prefixes plus its sequences' suffixes.
    pre = np.zeros(k + 1, dtype=np.int64)
    np.cumsum(unit_shared[unit_indices], out=pre[1:])
    suf = np.zeros(q.size + 1, dtype=np.int64)
    np.cumsum(lens[q] - c, out=suf[1:])
    fp = np.append(first_pos, q.size)
    per_batch = (pre[bnd[1:]] - pre[bnd[:-1]]) + (suf[fp[bnd[1:]]] - suf[fp[bnd[:-1]]])
    over = per_batch > INT32_MAX
    if over.any():
        raise ValueError(f"the micro-batch holds {int(per_batch[_first_bad(over)])} rows; "
                         f"cu_seqlens is int32, so at most {INT32_MAX}")
    return bnd


def pack_groups(token_ids: np.ndarray, offsets: np.ndarray, prompt_lens: np.ndarray,
                unit_seqs: np.ndarray, unit_offsets: np.ndarray, unit_shared: np.ndarray,
                unit_indices: np.ndarray, bounds: np.ndarray | None = None) -> list[dict]:
    """Pack units ``unit_indices`` into prefix-shared THD micro-batches.

    ``bounds`` ([B + 1], default ``[0, k]``) splits ``unit_indices`` into B micro-batches.  A
    unit with prefix ``c`` is ``c`` tokens of its first sequence (positions ``0 .. c-1``), then
    each sequence's tokens ``c .. L-1`` (positions ``c .. L-1``).  Token ``v + 1`` of a sequence
    (``P - 1 <= v < L - 1``) is predicted by the row holding its position ``v``: the prefix row
    ``v`` when ``v < c`` (only ``v = c - 1 = P - 1``: the last prefix row, once per sequence),
    else its own suffix row.  Returns one dict per micro-batch of int64 arrays (``input_ids``,
    ``position_ids``, ``rows``, ``row_targets``, ``row_seq`` (position in ``seqs``), ``row_token``
    (index of the predicted token in the response), ``prefix_lens`` [units],
    ``suffix_lens`` / ``seqs`` [sequences, packed order]), int32 ``cu_seqlens`` over units and
    ``max_seqlen`` (the longest unit, 0 when empty).
    """
    bnd = check_group_pack(token_ids, offsets, prompt_lens, unit_seqs, unit_offsets, unit_shared,
                           unit_indices, bounds)
    lens = np.diff(offsets)
    out = []
    for lo, hi in zip(bnd[:-1].tolist(), bnd[1:].tolist()):
        us = unit_indices[lo:hi]
        ku = us.size
        cnt = unit_offsets[us + 1] - unit_offsets[us]
        first = np.zeros(ku, dtype=np.int64)
        if ku:
            np.cumsum(cnt[:-1], out=first[1:])
        uo = np.repeat(np.arange(ku), cnt)                         # local unit of each sequence
        seqs = unit_seqs[unit_offsets[us][uo] + np.arange(uo.size) - first[uo]]
        ks = seqs.size
        c_u = unit_shared[us].astype(np.int64)
        c = c_u[uo]
        L, P = lens[seqs], prompt_lens[seqs]
        suf = L - c
        ulen = c_u + (np.add.reduceat(suf, first) if ku else suf[:0])
        cu = np.zeros(ku + 1, dtype=np.int64)
        np.cumsum(ulen, out=cu[1:])
        # Segments in row order: unit 0's prefix, its suffixes, unit 1's prefix, ...
        pre_i = first + np.arange(ku)
        suf_i = np.arange(ks) + uo + 1
        seg_src = np.empty(ku + ks, dtype=np.int64)
        seg_len = np.empty(ku + ks, dtype=np.int64)
        seg_pos = np.empty(ku + ks, dtype=np.int64)
        seg_src[pre_i], seg_len[pre_i], seg_pos[pre_i] = offsets[seqs[first]], c_u, 0
        seg_src[suf_i], seg_len[suf_i], seg_pos[suf_i] = offsets[seqs] + c, suf, c
        row0 = np.zeros(ku + ks + 1, dtype=np.int64)
        np.cumsum(seg_len, out=row0[1:])
        T = int(row0[-1])
        sid = np.repeat(np.arange(ku + ks), seg_len)
        local = np.arange(T, dtype=np.int64) - row0[sid]
        input_ids = token_ids[seg_src[sid] + local].astype(np.int64)
        position_ids = seg_pos[sid] + local
        # Scored rows, sequence by sequence.
        nr = L - P
        r0 = np.zeros(ks, dtype=np.int64)
        if ks:
            np.cumsum(nr[:-1], out=r0[1:])
        rs = np.repeat(np.arange(ks), nr)
        v = (P - 1)[rs] + np.arange(int(nr.sum()), dtype=np.int64) - r0[rs]
        rows = np.where(v < c[rs], cu[:-1][uo][rs] + v, row0[suf_i][rs] + v - c[rs])
        out.append({"input_ids": input_ids, "position_ids": position_ids,
                    "cu_seqlens": cu.astype(np.int32), "rows": rows,
                    "row_targets": token_ids[offsets[seqs][rs] + v + 1].astype(np.int64),
                    "row_seq": rs.astype(np.int64), "row_token": v + 1 - P[rs],
                    "prefix_lens": c_u, "suffix_lens": suf, "seqs": seqs.astype(np.int64),
                    "max_seqlen": int(ulen.max()) if ku else 0})
    return out
