"""Pure-Python reference of the ragged packer: the specification, written token by token.

Three implementations of the packer produce identical output (the tests compare them on random
inputs):

* ``r4b._C`` (``impl="cpp"``) — the C++ core, used by default;
* ``r4b.packing.reference`` (``impl="numpy"``) — vectorised NumPy, the fallback when ``r4b._C`` is
  not built;
* this module (``impl="python"``) — plain Python over ints and lists (loops over sequences,
  list building per sequence, no NumPy arithmetic).  It is the readable statement of what a
  plan and a packed micro-batch are, and the pure-Python baseline the C++ packer is
  benchmarked against (``benchmarks/bench_pack.py``).  It is slow (roughly 0.2 µs per packed
  row); use it to read, test and debug, not to train.

Validation is shared with the NumPy reference (same checks, same messages), so every
implementation rejects bad input with the same error.  Inputs and outputs follow
``r4b.packing.reference``: NumPy arrays in (already converted by ``r4b.packing.thd``), a dict of NumPy
arrays out.  The algorithm and its tie-breaks are described in ``r4b.packing.reference``'s
module docstring.
"""

from __future__ import annotations

from bisect import bisect_left

import numpy as np

from . import reference as ref
from .reference import COST_TOKENS, IGNORE_INDEX


# ---------------------------------------------------------------- plan
def _best_exchange(cost: list[int], hi: list[int], lo: list[int], gap: int):
    """Best move of a unit ``x`` of rank ``hi`` to rank ``lo``, or swap of ``x`` with a unit
    ``y`` of ``lo``: ``(obj, kind, x, y)`` with ``obj = |2 * moved - gap|`` (``moved``: the
    load that leaves ``hi``), kind 0 move / 1 swap; only exchanges with ``obj < gap`` (the larger
    load strictly drops) count; the smallest tuple wins.  ``hi`` / ``lo`` list unit ids in
    ascending order."""
    best = None
    for x in hi:
        o = abs(2 * cost[x] - gap)
        if o < gap and (best is None or (o, 0, x, -1) < best):
            best = (o, 0, x, -1)
    # Swap partners: lo sorted by (cost, id); for each x the two costs nearest the ideal.
    ys = sorted(lo, key=lambda y: (cost[y], y))
    twice = [2 * cost[y] for y in ys]
    for x in hi:
        t2 = 2 * cost[x] - gap          # twice the ideal partner cost
        i = bisect_left(twice, t2)      # first partner with 2 * cost >= t2
        cands = []
        if i < len(ys):
            cands.append((twice[i] - t2, ys[i]))
        if i > 0:
            j = bisect_left(twice, twice[i - 1])  # first (smallest id) of that cost
            cands.append((t2 - twice[j], ys[j]))
        for o, y in cands:
            if o < gap and (best is None or (o, 1, x, y) < best):
                best = (o, 1, x, y)
    return best


def plan(seq_lens: np.ndarray, num_ranks: int, tokens_per_microbatch: int,
         group_ids: np.ndarray | None = None, modes: np.ndarray | None = None,
         cost: int = COST_TOKENS, flops_a: int = 0, keep_groups: bool = False,
         pad_to_multiple: int = 1) -> dict:
    """Assign sequences to ranks and micro-batches; same contract as ``r4b.packing.reference.plan``."""
    ref._check_plan(seq_lens, num_ranks, tokens_per_microbatch, group_ids, modes, cost, flops_a,
                    keep_groups, pad_to_multiple)
    R, budget, m, a = int(num_ranks), int(tokens_per_microbatch), int(pad_to_multiple), int(flops_a)
    lens = seq_lens.tolist()
    n = len(lens)
    plen = [(L + m - 1) // m * m for L in lens]
    c = [L if cost == COST_TOKENS else a * L + L * L for L in plen]
    mode_of = modes.tolist() if modes is not None else [0] * n

    # Units: sequences, or groups numbered by first appearance.
    if keep_groups:
        unit_id: dict[int, int] = {}
        unit_of_seq = [unit_id.setdefault(g, len(unit_id)) for g in group_ids.tolist()]
        U = len(unit_id)
    else:
        unit_of_seq, U = list(range(n)), n
    ucost, umode = [0] * U, [None] * U
    for i in range(n):
        u = unit_of_seq[i]
        ucost[u] += c[i]
        if umode[u] is None:
            umode[u] = mode_of[i]

    # LPT: largest unit first, to the least loaded rank; ties to the rank with fewer units of
    # the same mode, then the lowest rank id.
    load = [0] * R
    mcount = [dict() for _ in range(R)]
    urank = [0] * U
    for u in sorted(range(U), key=lambda u: (-ucost[u], u)):
        low = min(load)
        r = min((r for r in range(R) if load[r] == low), key=lambda r: (mcount[r].get(umode[u], 0), r))
        urank[u] = r
        load[r] += ucost[u]
        mcount[r][umode[u]] = mcount[r].get(umode[u], 0) + 1

    # Refinement: improve the most loaded rank by one move or swap while any helps.
    for _ in range(4 * U + 16):
        M = load.index(max(load))
        applied = False
        for r in sorted(range(R), key=lambda r: (load[r], r)):
            if r == M:
                continue
            gap = load[M] - load[r]
            if gap <= 1:
                break
            ex = _best_exchange(ucost, [u for u in range(U) if urank[u] == M],
                                [u for u in range(U) if urank[u] == r], gap)
            if ex is None:
                continue
            _, kind, x, y = ex
            urank[x] = r
            load[M] -= ucost[x]
            load[r] += ucost[x]
            if kind == 1:
                urank[y] = M
                load[r] -= ucost[y]
                load[M] += ucost[y]
            applied = True
            break
        if not applied:
            break

    # First-fit-decreasing into micro-batches of at most `budget` rows, per rank.
    rank_of = [urank[unit_of_seq[i]] for i in range(n)]
    mb_of = [0] * n
    counts = [0] * R
    rank_tokens = [0] * R
    for r in range(R):
        fill: list[int] = []
        for i in sorted((i for i in range(n) if rank_of[i] == r), key=lambda i: (-plen[i], i)):
            b = next((b for b, f in enumerate(fill) if f + plen[i] <= budget), len(fill))
            if b == len(fill):
                fill.append(0)
            fill[b] += plen[i]
            mb_of[i] = b
            rank_tokens[r] += plen[i]
        counts[r] = len(fill)
    return {"rank_of": np.array(rank_of, dtype=np.int32),
            "microbatch_of": np.array(mb_of, dtype=np.int32),
            "rank_costs": np.array(load, dtype=np.int64),
            "rank_tokens": np.array(rank_tokens, dtype=np.int64),
            "microbatch_counts": np.array(counts, dtype=np.int32),
            "max_unit_cost": max(ucost, default=0)}


# ---------------------------------------------------------------- pack
def pack(token_ids: np.ndarray, offsets: np.ndarray, prompt_lens: np.ndarray,
         seq_indices: np.ndarray, modes: np.ndarray | None = None,
         advantages: np.ndarray | None = None, pad_to_multiple: int = 1,
         pad_token_id: int = 0, bounds: np.ndarray | None = None) -> dict:
    """THD micro-batches built sequence by sequence; same contract as ``r4b.packing.reference.pack``.

    Row ``p`` of sequence ``s`` (length ``L``, prompt ``P``, padded length ``Lp``): input token
    ``p`` (``pad_token_id`` when ``p >= L``), position ``p``, and — iff ``P - 1 <= p < L - 1``
    — label token ``p + 1`` of the same sequence, loss mask 1 and the sequence's advantage.
    """
    bnd = ref._check_pack(token_ids.shape[0], offsets, prompt_lens, seq_indices, modes,
                          advantages, pad_to_multiple, bounds).tolist()
    m = int(pad_to_multiple)
    sel = seq_indices.tolist()
    out = []
    for lo, hi in zip(bnd[:-1], bnd[1:]):  # one micro-batch: rows numbered from 0
        input_ids, position_ids, labels, loss_mask, mode, advantage, seq_index, response_rows = (
            [] for _ in range(8))
        cu, longest = [0], 0
        for j, s in enumerate(sel[lo:hi]):
            start, end = int(offsets[s]), int(offsets[s + 1])
            seq = token_ids[start:end].tolist()
            L, P = end - start, int(prompt_lens[s])
            Lp = (L + m - 1) // m * m
            pad = Lp - L
            md = int(modes[s]) if modes is not None else 0
            adv = float(advantages[s]) if advantages is not None else 0.0
            # Rows 0 .. P-2 unscored, P-1 .. L-2 scored (L - P rows), L-1 .. Lp-1 unscored.
            input_ids += seq + [pad_token_id] * pad
            position_ids += range(Lp)
            labels += [IGNORE_INDEX] * (P - 1) + seq[P:] + [IGNORE_INDEX] * (pad + 1)
            loss_mask += [False] * (P - 1) + [True] * (L - P) + [False] * (pad + 1)
            mode += [md] * Lp
            advantage += [0.0] * (P - 1) + [adv] * (L - P) + [0.0] * (pad + 1)
            seq_index += [j] * Lp
            response_rows += range(cu[-1] + P - 1, cu[-1] + L - 1)
            cu.append(cu[-1] + Lp)
            longest = max(longest, Lp)
        out.append({"input_ids": np.array(input_ids, dtype=np.int64),
                    "position_ids": np.array(position_ids, dtype=np.int64),
                    "labels": np.array(labels, dtype=np.int64),
                    "loss_mask": np.array(loss_mask, dtype=np.bool_),
                    "mode": np.array(mode, dtype=np.int8),
                    "advantage": np.array(advantage, dtype=np.float32),
                    "seq_index": np.array(seq_index, dtype=np.int32),
                    "cu_seqlens": np.array(cu, dtype=np.int32),
                    "response_rows": np.array(response_rows, dtype=np.int64),
                    "max_seqlen": longest})
    return out


# ---------------------------------------------------------------- unpack
def unpack_rows(values: np.ndarray, cu_seqlens: np.ndarray, seq_lens: np.ndarray) -> np.ndarray:
    """Rows of each packed sequence without its padding, concatenated in sequence order."""
    ref._check_unpack(values.shape[0], cu_seqlens, seq_lens)
    rows = [r for start, L in zip(cu_seqlens.tolist(), seq_lens.tolist())
            for r in range(start, start + L)]
    return values[np.array(rows, dtype=np.int64)]


# ---------------------------------------------------------------- prefix-shared group units
def group_units(token_ids: np.ndarray, offsets: np.ndarray, prompt_lens: np.ndarray,
                group_ids: np.ndarray, image_class: np.ndarray, budget: int,
                image_token_id: int | None = None) -> dict:
    """Prefix-shared units, group by group; same contract as ``r4b.packing.reference.group_units``
    (whose comment states the rules)."""
    ref.check_group_units(token_ids.shape[0], offsets, prompt_lens, group_ids, image_class,
                          int(budget))
    off, plens, cls = offsets.tolist(), prompt_lens.tolist(), image_class.tolist()
    n = len(plens)
    seq = [token_ids[off[j]:off[j + 1]].tolist() for j in range(n)]
    groups: dict[int, list[int]] = {}
    for j, g in enumerate(group_ids.tolist()):
        groups.setdefault(g, []).append(j)
    units: list[tuple[list[int], int, int]] = []  # (sequences, shared, length)
    lost = unshared = 0
    for members in groups.values():
        head = seq[members[0]]
        shared = min(plens[j] for j in members)
        for j in members[1:]:
            t = 0
            while t < shared and seq[j][t] == head[t]:
                t += 1
            shared = t
        ok = shared >= 1 and all(cls[j] == cls[members[0]] for j in members)
        if ok and image_token_id is not None and cls[members[0]] != 0:
            ok = all(image_token_id not in seq[j][shared:] for j in members)
        if not ok or len(members) == 1:
            unshared += len(members) > 1
            units += [([j], plens[j], len(seq[j])) for j in members]
            continue
        room = int(budget) - shared
        bins: list[list[int]] = []
        fill: list[int] = []
        for j in sorted(members, key=lambda j: (-(len(seq[j]) - shared), j)):
            s = len(seq[j]) - shared
            b = next((b for b, f in enumerate(fill) if f + s <= room), len(fill))
            if b == len(fill):
                bins.append([])
                fill.append(0)
            bins[b].append(j)
            fill[b] += s
        lost += (len(bins) - 1) * shared
        units += [(sorted(b), shared, shared + f) for b, f in zip(bins, fill)]
    unit_offsets = [0]
    for s, _, _ in units:
        unit_offsets.append(unit_offsets[-1] + len(s))
    i64 = lambda xs: np.array(xs, dtype=np.int64)  # noqa: E731
    return {"unit_seqs": i64([j for s, _, _ in units for j in s]),
            "unit_offsets": i64(unit_offsets), "unit_shared": i64([c for _, c, _ in units]),
            "unit_length": i64([L for _, _, L in units]),
            "dense_tokens": sum(len(s) for s in seq),
            "shared_tokens": sum(L for _, _, L in units), "prefix_copies_lost": lost,
            "unshared_groups": unshared}


def pack_groups(token_ids: np.ndarray, offsets: np.ndarray, prompt_lens: np.ndarray,
                unit_seqs: np.ndarray, unit_offsets: np.ndarray, unit_shared: np.ndarray,
                unit_indices: np.ndarray, bounds: np.ndarray | None = None) -> list[dict]:
    """Prefix-shared micro-batches built unit by unit, row by row; same contract as
    ``r4b.packing.reference.pack_groups``."""
    bnd = ref.check_group_pack(token_ids, offsets, prompt_lens, unit_seqs, unit_offsets,
                               unit_shared, unit_indices, bounds).tolist()
    off, plens = offsets.tolist(), prompt_lens.tolist()
    useqs, uoff, ushared = unit_seqs.tolist(), unit_offsets.tolist(), unit_shared.tolist()
    sel = unit_indices.tolist()
    out = []
    for lo, hi in zip(bnd[:-1], bnd[1:]):
        ids, pos, rows, tgt, row_seq, row_token = [], [], [], [], [], []
        prefix_lens, suffix_lens, seqs, cu = [], [], [], [0]
        for u in sel[lo:hi]:
            members = useqs[uoff[u]:uoff[u + 1]]
            c, start = ushared[u], cu[-1]
            ids += token_ids[off[members[0]]:off[members[0]] + c].tolist()
            pos += range(c)
            at = start + c  # first row of the next suffix
            for j in members:
                t = token_ids[off[j]:off[j + 1]].tolist()
                L, P = len(t), plens[j]
                ids += t[c:]
                pos += range(c, L)
                for v in range(P - 1, L - 1):  # row of position v predicts token v + 1
                    rows.append(start + v if v < c else at + v - c)
                    tgt.append(t[v + 1])
                    row_seq.append(len(seqs))
                    row_token.append(v + 1 - P)
                seqs.append(j)
                suffix_lens.append(L - c)
                at += L - c
            prefix_lens.append(c)
            cu.append(at)
        i64 = lambda xs: np.array(xs, dtype=np.int64)  # noqa: E731
        out.append({"input_ids": i64(ids), "position_ids": i64(pos),
                    "cu_seqlens": np.array(cu, dtype=np.int32), "rows": i64(rows),
                    "row_targets": i64(tgt), "row_seq": i64(row_seq), "row_token": i64(row_token),
                    "prefix_lens": i64(prefix_lens), "suffix_lens": i64(suffix_lens),
                    "seqs": i64(seqs),
                    "max_seqlen": max((b - a for a, b in zip(cu[:-1], cu[1:])), default=0)})
    return out
