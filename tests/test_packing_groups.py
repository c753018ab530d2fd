"""Prefix-shared group units: the C++ core (r4b._C), the NumPy reference and the pure-Python
reference agree on fresh random batches (units, statistics, packed arrays); the units and the
packed rows have the properties the trainer relies on; bad input is rejected by name."""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from r4b.packing import FlatTokens, GroupUnit, group_units, image_classes, pack_groups
from r4b.packing import python_ref as pyref
from r4b.packing import reference as ref
from r4b.packing import thd

needs_c = pytest.mark.skipif(not thd.HAS_R4B_C_GROUPS,
                             reason="r4b._C is not built or lacks the group functions")
IMPLS = [pytest.param("cpp", marks=needs_c), "numpy", "python"]
HOST = (["cpp"] if thd.HAS_R4B_C_GROUPS else []) + ["numpy", "python"]
HYP = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
IMAGE_TOKEN = 0  # drawn tokens are >= 1 unless placed as an image placeholder on purpose
UNIT_KEYS = ("unit_seqs", "unit_offsets", "unit_shared", "unit_length")
STAT_KEYS = ("dense_tokens", "shared_tokens", "prefix_copies_lost", "unshared_groups")
PACK_KEYS = ("input_ids", "position_ids", "cu_seqlens", "rows", "row_targets", "row_seq",
             "row_token", "prefix_lens", "suffix_lens", "seqs")
MB_FIELDS = ("input_ids", "position_ids", "cu_seqlens", "labels", "rows", "row_seq", "row_token",
             "row_targets")


# ---------------------------------------------------------------- generators
@st.composite
def group_batches(draw, min_response: int = 0):
    """A ragged batch of groups, members interleaved, with every case the unit rules handle:
    equal prompts, prompt routing (a common prefix, then different tokens), prompts differing
    at token 0, different images, an image placeholder after the prefix (which only matters
    when the group has images), single-member groups; small vocabularies make accidental common
    prefixes likely."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    vocab = draw(st.sampled_from([3, 40]))
    seqs, plens, gids, cls = [], [], [], []
    used_ids: set[int] = set()
    for g in range(int(rng.integers(1, 7))):
        # per-group structure from the seeded generator: uniform over the cases (hypothesis
        # would favour its first choices and rarely combine the rare ones)
        m = int(rng.choice([1, 1, 2, 3, 5, 8]))
        kind = str(rng.choice(["same", "routing", "differ_at_0", "images_differ", "placeholder"]))
        gid = int(rng.integers(-50, 50))
        while gid in used_ids:
            gid += 1
        used_ids.add(gid)
        P = int(rng.integers(1, 12))
        base = rng.integers(1, vocab, P)
        c = int(rng.integers(0, 3))  # 0: no images
        if c and rng.random() < 0.5:  # image placeholders inside the prompt
            base[rng.integers(0, P, 2)] = IMAGE_TOKEN
        for i in range(m):
            prompt = base.copy()
            if kind == "routing":
                cut = int(rng.integers(0, P + 1))
                tail = rng.integers(1, vocab, int(rng.integers(1, 4)))
                prompt = np.concatenate([base[:cut], tail])
            elif kind == "differ_at_0":
                prompt[0] = 1000 + i
            resp = rng.integers(1, vocab, int(rng.integers(min_response, 20)))
            if kind == "placeholder" and resp.size and rng.random() < 0.5:
                # often right after the prompt: the first token outside the shared prefix
                resp[0 if rng.random() < 0.5 else rng.integers(0, resp.size)] = IMAGE_TOKEN
            seqs.append(np.concatenate([prompt, resp]).astype(np.int64))
            plens.append(prompt.size)
            gids.append(gid)
            cls.append(c + 1 + i if kind == "images_differ" and i and rng.random() < 0.7 else c)
    perm = rng.permutation(len(seqs))
    seqs = [seqs[i] for i in perm]
    off = np.zeros(len(seqs) + 1, dtype=np.int64)
    np.cumsum([s.size for s in seqs], out=off[1:])
    dtype = draw(st.sampled_from([np.int64, np.int32]))
    longest = int(max(s.size for s in seqs))
    return dict(token_ids=np.concatenate(seqs).astype(dtype), offsets=off,
                prompt_lens=np.array(plens, dtype=np.int64)[perm],
                group_ids=np.array(gids, dtype=np.int64)[perm],
                image_class=np.array(cls, dtype=np.int64)[perm],
                budget=draw(st.sampled_from([1, 8, longest, longest + 15, 10_000])),
                image_token_id=draw(st.sampled_from([IMAGE_TOKEN, None])), seqs=seqs)


def _core_args(b: dict) -> tuple:
    return (b["token_ids"], b["offsets"], b["prompt_lens"], b["group_ids"], b["image_class"],
            b["budget"])


def _units(impl: str, b: dict) -> dict:
    return thd._host_impl(impl).group_units(*_core_args(b), image_token_id=b["image_token_id"])


def _assert_same(x: dict, y: dict, keys, what) -> None:
    for k in keys:
        assert isinstance(y[k], np.ndarray) and x[k].dtype == y[k].dtype, (what, k)
        assert np.array_equal(x[k], y[k]), (what, k, x[k], y[k])


# ---------------------------------------------------------------- units
@HYP
@given(group_batches())
def test_group_units_implementations_agree(b):
    spec = _units("python", b)
    for impl in HOST:
        out = _units(impl, b)
        _assert_same(spec, out, UNIT_KEYS, impl)
        assert all(type(out[k]) is int and out[k] == spec[k] for k in STAT_KEYS), (impl, out)


@HYP
@given(group_batches())
def test_group_units_invariants(b):
    """Per group, from the inputs: the longest common prefix of the prompts and whether the
    group may share it; then the units: exactly its members, that prefix, suffixes split
    first-fit-decreasing under the budget (or one unit per member with its whole prompt when it
    may not share), groups in order of first appearance; statistics that add up."""
    out = _units(HOST[0], b)
    seqs, plens, cls = b["seqs"], b["prompt_lens"].tolist(), b["image_class"]
    itok = b["image_token_id"]
    bnd = out["unit_offsets"].tolist()
    units = [(out["unit_seqs"][a:e].tolist(), int(c), int(L)) for a, e, c, L in
             zip(bnd[:-1], bnd[1:], out["unit_shared"], out["unit_length"])]
    groups: dict[int, list[int]] = {}
    for j, g in enumerate(b["group_ids"].tolist()):
        groups.setdefault(g, []).append(j)
    at, lost, unshared = 0, 0, 0
    for mem in groups.values():
        limit = min(plens[j] for j in mem)
        lcp = next((t for t in range(limit) if len({int(seqs[j][t]) for j in mem}) > 1), limit)
        can = (len(mem) > 1 and lcp >= 1 and len({int(cls[j]) for j in mem}) == 1
               and not (itok is not None and cls[mem[0]] != 0
                        and any(itok in seqs[j][lcp:].tolist() for j in mem)))
        if not can:
            assert units[at:at + len(mem)] == [([j], plens[j], seqs[j].size) for j in mem]
            at += len(mem)
            unshared += len(mem) > 1
            continue
        k = next((e for e in range(at, len(units) + 1)
                  if sorted(j for u, _, _ in units[at:e] for j in u) == mem), None)
        assert k is not None, (mem, units[at:])
        us, at = units[at:k], k
        room = b["budget"] - lcp
        fills = [L - lcp for _, _, L in us]
        for i, (u, c, L) in enumerate(us):
            assert c == lcp and u == sorted(u)
            assert L == c + sum(seqs[j].size - c for j in u)
            assert fills[i] <= room or len(u) == 1
            for e in range(i + 1, len(us)):  # first fit: no suffix of a later unit fit here
                assert fills[i] + min(seqs[j].size - c for j in us[e][0]) > room
        # decreasing: a unit is opened by its longest suffix, longest first
        longest = [max(seqs[j].size - lcp for j in u) for u, _, _ in us]
        assert longest == sorted(longest, reverse=True)
        lost += (len(us) - 1) * lcp
    assert at == len(units)
    assert out["unshared_groups"] == unshared and out["prefix_copies_lost"] == lost
    assert out["dense_tokens"] == sum(s.size for s in seqs)
    assert out["shared_tokens"] == sum(L for _, _, L in units)


# ---------------------------------------------------------------- pack
def _unit_set(b: dict, rng: np.random.Generator) -> dict:
    """The units of ``b``, some with a shorter (still common) prefix than the builder's, so
    that prefixes ending before the prompt (no scored prefix row) are packed too."""
    out = _units("numpy", b)
    shared = out["unit_shared"].copy()
    shorter = rng.random(shared.size) < 0.3
    shared[shorter] = rng.integers(1, shared[shorter] + 1)
    return dict(unit_seqs=out["unit_seqs"], unit_offsets=out["unit_offsets"], unit_shared=shared)


def _selection(U: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Some of the units in random order, cut into 1-3 micro-batches (some may be empty)."""
    sel = rng.permutation(U)[:int(rng.integers(0, U + 1))].astype(np.int64)
    cuts = np.sort(rng.integers(0, sel.size + 1, int(rng.integers(0, 3))))
    return sel, np.concatenate([[0], cuts, [sel.size]]).astype(np.int64)


@HYP
@given(group_batches(), st.integers(0, 2**32 - 1))
def test_pack_groups_implementations_agree(b, seed):
    rng = np.random.default_rng(seed)
    units = _unit_set(b, rng)
    sel, bounds = _selection(units["unit_shared"].size, rng)
    args = (b["token_ids"], b["offsets"], b["prompt_lens"], units["unit_seqs"],
            units["unit_offsets"], units["unit_shared"], sel)
    spec = pyref.pack_groups(*args, bounds=bounds)
    assert len(spec) == bounds.size - 1
    for impl in HOST:
        got = thd._host_impl(impl).pack_groups(*args, bounds=bounds)
        assert len(got) == len(spec)
        for x, y in zip(spec, got):
            _assert_same(x, y, PACK_KEYS, impl)
            assert int(y["max_seqlen"]) == x["max_seqlen"]
    one = thd._host_impl(HOST[0]).pack_groups(*args)  # no bounds: one micro-batch of all
    assert len(one) == 1 and np.array_equal(one[0]["seqs"], np.concatenate(
        [d["seqs"] for d in spec]))


@HYP
@given(group_batches(), st.integers(0, 2**32 - 1))
def test_packed_rows_reproduce_each_rollout(b, seed):
    """Unit by unit, the packed tokens and positions are the prefix then each suffix; every
    response token of every packed rollout is predicted exactly once, in order, by a row whose
    position is the previous token's and whose token is the rollout's own."""
    rng = np.random.default_rng(seed)
    units = _unit_set(b, rng)
    sel, bounds = _selection(units["unit_shared"].size, rng)
    outs = thd._host_impl(HOST[0]).pack_groups(
        b["token_ids"], b["offsets"], b["prompt_lens"], units["unit_seqs"],
        units["unit_offsets"], units["unit_shared"], sel, bounds=bounds)
    seqs, plens = b["seqs"], b["prompt_lens"]
    uo, us = units["unit_offsets"], units["unit_seqs"]
    for d, lo, hi in zip(outs, bounds[:-1], bounds[1:]):
        ids, pos, cu = d["input_ids"], d["position_ids"], d["cu_seqlens"]
        order, unit_of, suffix_at = [], [], []
        for i, u in enumerate(sel[lo:hi].tolist()):
            mem, c = us[uo[u]:uo[u + 1]].tolist(), int(units["unit_shared"][u])
            at = int(cu[i]) + c
            for j in mem:
                suffix_at.append(at)
                at += seqs[j].size - c
            want_ids = [seqs[mem[0]][:c]] + [seqs[j][c:] for j in mem]
            want_pos = [np.arange(c)] + [np.arange(c, seqs[j].size) for j in mem]
            a, e = int(cu[i]), int(cu[i + 1])
            assert np.array_equal(ids[a:e], np.concatenate(want_ids))
            assert np.array_equal(pos[a:e], np.concatenate(want_pos))
            assert d["prefix_lens"][i] == c
            order += mem
            unit_of += [i] * len(mem)
        assert d["seqs"].tolist() == order and cu[-1] == ids.size
        assert d["suffix_lens"].tolist() == [seqs[j].size - int(units["unit_shared"][u])
                                             for u in sel[lo:hi].tolist()
                                             for j in us[uo[u]:uo[u + 1]].tolist()]
        for q, j in enumerate(order):
            mine = d["row_seq"] == q
            P, L = int(plens[j]), seqs[j].size
            assert d["row_token"][mine].tolist() == list(range(L - P))
            assert np.array_equal(d["row_targets"][mine], seqs[j][P:])
            r = d["rows"][mine]
            assert np.array_equal(pos[r], np.arange(P - 1, L - 1))
            assert np.array_equal(ids[r], seqs[j][P - 1:L - 1])
            # position v is the unit's prefix row v while v < c, else the rollout's own suffix
            c = int(d["prefix_lens"][unit_of[q]])
            v = np.arange(P - 1, L - 1)
            assert np.array_equal(r, np.where(v < c, int(cu[unit_of[q]]) + v,
                                              suffix_at[q] + v - c))



# ---------------------------------------------------------------- the public functions
def _image_batch(rng: np.random.Generator):
    """Token lists, prompt lengths, group ids and images of a small BPO-like batch: groups
    whose members hold equal images as distinct objects, one member with other images, one
    group without images, prompt routing, responses of 1-12 tokens."""
    pool = [torch.full((3, 4, 4), float(v)) for v in range(3)]
    toks, plens, gids, ims = [], [], [], []
    for g in range(4):
        P = int(rng.integers(2, 9))
        base = rng.integers(1, 30, P).tolist()
        img = int(rng.integers(0, 3))
        for i in range(int(rng.integers(1, 6))):
            prompt = base if rng.random() < 0.7 else base[:int(rng.integers(1, P))] + [99]
            toks.append(prompt + rng.integers(1, 30, int(rng.integers(1, 13))).tolist())
            plens.append(len(prompt))
            gids.append(10 * g)
            if g == 3:
                ims.append([])
            elif i == 2 and rng.random() < 0.5:
                ims.append([pool[(img + 1) % 3].clone()])
            else:
                ims.append([pool[img].clone()])
    perm = rng.permutation(len(toks)).tolist()
    return ([toks[i] for i in perm], [plens[i] for i in perm], [gids[i] for i in perm],
            [ims[i] for i in perm])


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**32 - 1))
def test_public_functions_agree_across_implementations(seed):
    """group_units and pack_groups give the same units, statistics and micro-batches (tensors,
    layouts, images) with every implementation; a scored row attends to exactly its rollout's
    tokens before it, at their positions."""
    rng = np.random.default_rng(seed)
    toks, plens, gids, ims = _image_batch(rng)
    budget = int(rng.integers(20, 60))
    res = {impl: group_units(toks, plens, gids, ims, budget=budget, image_token_id=0, impl=impl)
           for impl in HOST}
    units, stats = res["python"]
    assert all(r == (units, stats) for r in res.values())
    order = rng.permutation(len(units)).tolist()
    mbs = [order[:len(order) // 2], [], order[len(order) // 2:]]
    flat = FlatTokens.of(toks)  # one flattening for both calls gives the same result
    assert group_units(flat, plens, gids, ims, budget=budget, image_token_id=0) == (units, stats)
    packed = {impl: pack_groups(toks, plens, ims, units, mbs, impl=impl) for impl in HOST}
    packed["flat"] = pack_groups(flat, plens, ims, units, mbs)
    for impl, mbs_i in packed.items():
        for x, y in zip(packed["python"], mbs_i):
            for f in MB_FIELDS:
                a, b = getattr(x, f), getattr(y, f)
                assert (a is None and b is None) or (a.dtype == b.dtype and torch.equal(a, b)), \
                    (impl, f)
            assert x.seqs == y.seqs and x.max_seqlen == y.max_seqlen
            if x.prefix_layout is not None:
                assert x.prefix_layout.prefix_lens_host == y.prefix_layout.prefix_lens_host
                assert x.prefix_layout.suffix_lens_host == y.prefix_layout.suffix_lens_host
                assert torch.equal(x.prefix_layout.seg_start, y.prefix_layout.seg_start)
            assert (x.images is None) == (y.images is None)
            if x.images is not None:
                assert torch.equal(x.images.pixel_values, y.images.pixel_values)
    for mb, unit_ids in zip(packed[HOST[0]], mbs):
        if not unit_ids:
            assert mb.seqs == [] and mb.rows.numel() == 0
            continue
        lay = mb.prefix_layout
        cu = mb.cu_seqlens.tolist()
        ids, pos = mb.input_ids.tolist(), mb.position_ids.tolist()
        unit_of_row = np.searchsorted(cu, np.arange(len(ids)), side="right") - 1
        masks = [lay.mask(u) for u in range(lay.num_units)]
        for r, q, t, tgt in zip(mb.rows.tolist(), mb.row_seq.tolist(), mb.row_token.tolist(),
                                mb.targets.tolist()):
            seq = toks[mb.seqs[q]]
            v = plens[mb.seqs[q]] + t - 1
            u = int(unit_of_row[r])
            keys = [k for k in range(cu[u], cu[u + 1]) if masks[u][r - cu[u], k - cu[u]]]
            assert tgt == seq[v + 1]
            assert [(pos[k], ids[k]) for k in keys] == list(enumerate(seq[:v + 1]))
        # each unit's images once, from its first rollout
        n_img = sum(len(ims[units[u].seqs[0]]) for u in unit_ids)
        assert (mb.images is None) == (n_img == 0)


def test_auto_dispatch_and_explicit_choices(monkeypatch):
    assert thd.resolve_impl("auto", groups=True) == ("cpp" if thd.HAS_R4B_C_GROUPS else "numpy")
    calls = []
    real = ref.group_units
    monkeypatch.setattr(ref, "group_units", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(thd, "HAS_R4B_C_GROUPS", False)  # a build without the group functions
    assert thd.resolve_impl("auto", groups=True) == "numpy"
    assert thd.resolve_impl("auto") == ("cpp" if thd.HAS_R4B_C else "numpy")  # packing as before
    units, _ = group_units([[1, 2, 3], [1, 2, 4]], [2, 2], [0, 0], [[], []], budget=10)
    assert calls and units == [GroupUnit((0, 1), 2, 4)]
    with pytest.raises(RuntimeError, match="impl='cpp' requested"):
        group_units([[1, 2]], [1], [0], [[]], budget=10, impl="cpp")
    with pytest.raises(ValueError, match=r"impl must be one of .*got 'torch'"):
        pack_groups([[1, 2]], [1], [[]], units, [[0]], impl="torch")


def test_image_classes_follow_content_not_objects():
    a, b = torch.zeros(3, 2, 2), torch.ones(3, 2, 2)
    ims = [[a], [a.clone()], [b], [], [], [a, b], [a.clone(), b.clone()], [a]]
    gids = [0, 0, 0, 1, 1, 2, 2, 3]
    cls = image_classes(ims, gids).tolist()
    assert cls[0] == cls[1] != 0 and cls[2] not in (0, cls[0])  # same content / other image
    assert cls[3] == cls[4] == 0  # no images
    assert cls[5] == cls[6] != 0 and cls[7] != 0 and len({cls[0], cls[2], cls[5], cls[7]}) == 4
    # a member without images in a group with images does not match
    assert len(set(image_classes([[a], []], [5, 5]).tolist())) == 2


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_batches(impl):
    units, st_ = group_units([], [], [], [], budget=8, impl=impl)
    assert units == [] and st_ == {"dense_tokens": 0, "shared_tokens": 0,
                                   "prefix_copies_lost": 0, "unshared_groups": 0}
    assert pack_groups([], [], [], [], [], impl=impl) == []
    units, _ = group_units([[1, 2, 3]], [1], [0], [[]], budget=8, impl=impl)
    (e, mb) = pack_groups([[1, 2, 3]], [1], [[]], units, [[], [0]], impl=impl)
    assert e.seqs == [] and e.rows.numel() == 0 and e.input_ids.numel() == 1  # the no-op batch
    assert mb.seqs == [0] and mb.targets.tolist() == [2, 3] and mb.rows.tolist() == [0, 1]


# ---------------------------------------------------------------- bad input
UNITS_ARGS = dict(token_ids=np.arange(10), offsets=[0, 4, 6, 9], prompt_lens=[1, 2, 2],
                  group_ids=[0, 0, 1], image_class=[0, 0, 0], budget=100)
BAD_UNITS = [
    (dict(group_ids=[0, 1]), "group_ids must have one entry per sequence (3), got 2"),
    (dict(image_class=[0]), "image_class must have one entry per sequence (3), got 1"),
    (dict(budget=0), "budget must be >= 1 token, got 0"),
    (dict(offsets=[0, 4, 9]), "offsets must have len(prompt_lens) + 1 = 4 entries, got 3"),
    (dict(offsets=[-1, 4, 6, 9]), "offsets must be non-negative, got -1 at index 0"),
    (dict(offsets=[0, 4, 3, 9]), "offsets must be non-decreasing: sequence 1 has length -1"),
    (dict(offsets=[0, 4, 6, 99]), "offsets[3] = 99 exceeds len(token_ids) = 10"),
    (dict(prompt_lens=[1, 3, 2]), "prompt_lens[1] = 3: expected 1 <= prompt length <= sequence "
                                  "length 2"),
    (dict(prompt_lens=[0, 2, 2]), "prompt_lens[0] = 0: expected 1 <= prompt length"),
    (dict(offsets=[0, 4, 4, 9], prompt_lens=[1, 1, 2]), "prompt_lens[1] = 1: expected 1 <= "
                                                        "prompt length <= sequence length 0"),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kw,msg", BAD_UNITS)
def test_group_units_core_rejects_bad_input(impl, kw, msg):
    args = {**UNITS_ARGS, **kw}
    arr = {k: (np.asarray(v, dtype=np.int64) if k != "budget" else v) for k, v in args.items()}
    with pytest.raises(ValueError) as e:
        thd._host_impl(impl).group_units(arr["token_ids"], arr["offsets"], arr["prompt_lens"],
                                         arr["group_ids"], arr["image_class"], arr["budget"])
    assert msg in str(e.value)


# sequences [5 6 7 8] [5 6 9] [1 2 3]; unit 0 = (0, 1) sharing [5 6], unit 1 = (2,)
PACK_ARGS = dict(token_ids=[5, 6, 7, 8, 5, 6, 9, 1, 2, 3], offsets=[0, 4, 7, 10],
                 prompt_lens=[3, 3, 2], unit_seqs=[0, 1, 2], unit_offsets=[0, 2, 3],
                 unit_shared=[2, 2], unit_indices=[0, 1], bounds=None)
BAD_PACK = [
    (dict(offsets=[0, 4, 10]), "offsets must have len(prompt_lens) + 1 = 4 entries, got 3"),
    (dict(prompt_lens=[3, 4, 2]), "prompt_lens[1] = 4: expected 1 <= prompt length"),
    (dict(unit_offsets=[0, 3]), "unit_offsets must have len(unit_shared) + 1 = 3 entries, got 2"),
    (dict(unit_offsets=[1, 2, 3]), "unit_offsets must start at 0, got 1 at index 0"),
    (dict(unit_offsets=[0, 0, 3]), "every unit holds at least one sequence): unit 0 has 0"),
    (dict(unit_seqs=[0, 1, 2, 2]), "unit_offsets must end at len(unit_seqs) = 4, got 3 at index 2"),
    (dict(unit_seqs=[0, 3, 2]), "unit_seqs must be sequence indices in [0, 3), got 3 at index 1"),
    (dict(bounds=[]), "bounds must have at least 1 entry, got 0"),
    (dict(bounds=[1, 2]), "bounds must start at 0, got 1 at index 0"),
    (dict(bounds=[0, 2, 1, 2]), "bounds must be non-decreasing, got 1 at index 2 after 2"),
    (dict(bounds=[0, 3]), "bounds must end at len(unit_indices) = 2, got 3 at index 1"),
    (dict(unit_indices=[0, 2]), "unit_indices must be in [0, 2), got 2 at index 1"),
    (dict(unit_indices=[1, 1]), "unit_indices must not repeat a unit, got 1 at indices 0 and 1"),
    (dict(unit_seqs=[0, 1, 1]), "sequence 1 is in units 0 and 1"),
    (dict(unit_shared=[0, 2]), "unit_shared[0] = 0: expected 1 <= shared prefix <= prompt length "
                               "3 of its sequence 0"),
    (dict(unit_shared=[2, 3]), "unit_shared[1] = 3: expected 1 <= shared prefix <= prompt length "
                               "2 of its sequence 2"),
    (dict(unit_shared=[3, 2]), "unit_shared[0] = 3: the unit's sequence 1 differs from its first "
                               "sequence 0 at token 2"),
]


def _pack_core(impl: str, **kw):
    a = {**PACK_ARGS, **kw}
    arr = {k: (None if v is None else np.asarray(v, dtype=np.int64)) for k, v in a.items()}
    return thd._host_impl(impl).pack_groups(
        arr["token_ids"], arr["offsets"], arr["prompt_lens"], arr["unit_seqs"],
        arr["unit_offsets"], arr["unit_shared"], arr["unit_indices"], bounds=arr["bounds"])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kw,msg", BAD_PACK)
def test_pack_groups_core_rejects_bad_input(impl, kw, msg):
    with pytest.raises(ValueError) as e:
        _pack_core(impl, **kw)
    assert msg in str(e.value)


@pytest.mark.parametrize("impl", IMPLS)
def test_pack_groups_checks_only_the_packed_units(impl):
    (d,) = _pack_core(impl, unit_shared=[3, 2], unit_indices=[1])  # unit 0 is not packed
    assert d["seqs"].tolist() == [2] and d["input_ids"].tolist() == [1, 2, 3]


@pytest.mark.parametrize("impl", IMPLS)
def test_public_functions_reject_bad_input_by_name(impl):
    toks, plens = [[5, 6, 7, 8], [5, 6, 9], [1, 2, 3]], [3, 3, 2]
    units, _ = group_units(toks, plens, [0, 0, 1], [[]] * 3, budget=100, impl=impl)
    with pytest.raises(ValueError, match="images has 2 entries, expected one per sequence"):
        group_units(toks, plens, [0, 0, 1], [[]] * 2, budget=100, impl=impl)
    with pytest.raises(ValueError, match="prompt_lens has 2 entries, expected one per sequence"):
        pack_groups(toks, plens[:2], [[]] * 3, units, [[0]], impl=impl)
    with pytest.raises(ValueError, match=r"microbatches\[1\]\[0\] must be a unit index in "
                                         r"\[0, 2\), got 5"):
        pack_groups(toks, plens, [[]] * 3, units, [[0], [5]], impl=impl)
    with pytest.raises(ValueError, match=r"unit 1 is at microbatches\[0\]\[1\] and "
                                         r"microbatches\[1\]\[0\]"):
        pack_groups(toks, plens, [[]] * 3, units, [[0, 1], [1]], impl=impl)
    bad = [GroupUnit((0, 1), 3, 4 + 1), units[1]]  # token 2 differs: 7 vs 9
    with pytest.raises(ValueError, match="sequence 1 differs from its first sequence 0 at token 2"):
        pack_groups(toks, plens, [[]] * 3, bad, [[0, 1]], impl=impl)


@needs_c
def test_cpp_layer_validates_its_own_arguments():
    """Direct callers of r4b._C get ValueError naming the argument, not a crash."""
    from r4b import _C

    i64 = lambda *x: np.array(x, dtype=np.int64)  # noqa: E731
    with pytest.raises(ValueError, match="token_ids must be a 1-D int64 array, got dtype float64"):
        _C.group_units(np.ones(4), i64(0, 4), i64(1), i64(0), i64(0), 8)
    with pytest.raises(ValueError, match="group_ids must be a 1-D int64 array, got dtype int32"):
        _C.group_units(i64(1, 2), i64(0, 2), i64(1), np.zeros(1, np.int32), i64(0), 8)
    with pytest.raises(ValueError, match="offsets must be C-contiguous"):
        _C.group_units(i64(1, 2), i64(0, 9, 2, 9)[::2], i64(1), i64(0), i64(0), 8)
    with pytest.raises(ValueError, match="unit_shared must be a 1-D int64 array"):
        _C.pack_groups(i64(1, 2), i64(0, 2), i64(1), i64(0), i64(0, 1), np.ones(1), i64(0))
    with pytest.raises(ValueError, match="bounds must be a 1-D int64 array"):
        _C.pack_groups(i64(1, 2), i64(0, 2), i64(1), i64(0), i64(0, 1), i64(1), i64(0),
                       bounds=np.zeros((1, 2), np.int64))


def test_flat_tokens_validates_its_arrays():
    ft = FlatTokens.of([[1, 2], [3]])
    assert len(ft) == 2 and ft.flat.tolist() == [1, 2, 3] and ft.offsets.tolist() == [0, 2, 3]
    with pytest.raises(TypeError, match="FlatTokens.flat must be a 1-D int64 NumPy array, got "
                                        "float64"):
        FlatTokens(np.ones(3), np.array([0, 3]))
    with pytest.raises(ValueError, match="FlatTokens.offsets must have n \\+ 1 >= 1 entries"):
        FlatTokens(np.zeros(0, np.int64), np.zeros(0, np.int64))
