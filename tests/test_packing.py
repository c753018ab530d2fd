"""Ragged packer: C++ (r4b._C), NumPy and pure-Python implementations agree; invariants,
balance, bad input, CUDA."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from r4b.packing import python_ref as pyref
from r4b.packing import reference as ref
from r4b.packing import thd as P

needs_c = pytest.mark.skipif(not P.HAS_R4B_C, reason="r4b._C is not built")
IMPLS = [pytest.param("cpp", marks=needs_c), "numpy", "python"]
FAST = "cpp" if P.HAS_R4B_C else "numpy"  # the implementation used where speed matters
HYP = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PACK_FIELDS = ("input_ids", "position_ids", "labels", "loss_mask", "mode", "advantage",
               "seq_index", "cu_seqlens", "response_rows", "seq_indices", "seq_lens",
               "prompt_lens")


# ---------------------------------------------------------------- generators
@st.composite
def plan_inputs(draw):
    n = draw(st.integers(1, 48))
    kind = draw(st.sampled_from(["uniform", "skewed", "bimodal", "equal"]))
    if kind == "uniform":
        lens = draw(st.lists(st.integers(1, 300), min_size=n, max_size=n))
    elif kind == "skewed":  # one or two giants among tiny sequences
        lens = draw(st.lists(st.integers(1, 8), min_size=n, max_size=n))
        for i in draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=2)):
            lens[i] = draw(st.integers(500, 4000))
    elif kind == "bimodal":
        lens = [draw(st.integers(200, 2000)) if draw(st.booleans()) else draw(st.integers(5, 40))
                for _ in range(n)]
    else:
        lens = [draw(st.integers(1, 50))] * n
    pad = draw(st.sampled_from([1, 1, 2, 8]))
    maxp = -(-max(lens) // pad) * pad
    return dict(
        seq_lens=np.array(lens, dtype=np.int64),
        num_ranks=draw(st.integers(1, 9)),
        tokens_per_microbatch=maxp + draw(st.sampled_from([0, 1, 17, 500, 5000])),
        group_ids=np.array(draw(st.lists(st.integers(0, max(1, n // 3)), min_size=n, max_size=n)),
                           dtype=np.int64),
        modes=np.array(draw(st.lists(st.integers(0, 2), min_size=n, max_size=n)), dtype=np.int8),
        cost=draw(st.sampled_from(["tokens", "flops"])),
        flops_a=draw(st.sampled_from([0, 7, 4096])),
        keep_groups=draw(st.booleans()),
        pad_to_multiple=pad,
    )


@st.composite
def pack_inputs(draw):
    n = draw(st.integers(1, 24))
    lens = draw(st.lists(st.integers(1, 40), min_size=n, max_size=n))
    plens = [draw(st.integers(1, L)) for L in lens]
    off = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lens, out=off[1:])
    extra = draw(st.integers(0, 5))  # trailing tokens that belong to no sequence
    dtype = draw(st.sampled_from([np.int64, np.int32]))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    tok = rng.integers(0, 50_000, int(off[-1]) + extra).astype(dtype)
    sel = rng.permutation(n)[:draw(st.integers(0, n))]
    return dict(token_ids=tok, offsets=off, prompt_lens=np.array(plens, dtype=np.int64),
                seq_indices=sel.astype(np.int64),
                modes=rng.integers(0, 3, n).astype(np.int8),
                advantages=rng.standard_normal(n).astype(np.float32),
                pad_to_multiple=draw(st.sampled_from([1, 1, 3, 8])),
                pad_token_id=draw(st.sampled_from([0, 151643])))


def bimodal_batch(n=8192, seed=0, group=16):
    """Short non-thinking (30-200) and long-tailed thinking (lognormal, 300-8000) rollouts."""
    rng = np.random.default_rng(seed)
    think = np.zeros(n, dtype=bool)
    think[np.arange(n) % group < group // 2] = True  # g think + g no-think per prompt
    lens = np.where(think, np.clip(rng.lognormal(7.0, 0.8, n), 300, 8000),
                    rng.integers(30, 201, n)).astype(np.int64)
    return lens, think.astype(np.int8), np.arange(n) // group


# ---------------------------------------------------------------- invariants
def check_plan(p: P.Plan, a: dict) -> None:
    lens, R = a["seq_lens"], a["num_ranks"]
    n = lens.shape[0]
    plen = ref.padded_lengths(lens, a["pad_to_multiple"])
    seen = np.concatenate([mb for rank in p.microbatches for mb in rank]) if n else np.zeros(0)
    assert np.array_equal(np.sort(seen), np.arange(n)), "every sequence exactly once"
    for r, rank in enumerate(p.microbatches):
        assert len(rank) == p.microbatch_counts[r]
        for j, mb in enumerate(rank):
            assert mb.size > 0 and np.all(np.diff(mb) > 0)
            assert plen[mb].sum() <= a["tokens_per_microbatch"], "budget respected"
            assert np.all(p.rank_of[mb] == r) and np.all(p.microbatch_of[mb] == j)
    c = plen if a["cost"] == "tokens" else a["flops_a"] * plen + plen * plen
    assert np.array_equal(p.rank_costs, np.bincount(p.rank_of, weights=c, minlength=R).astype(np.int64))
    assert np.array_equal(p.rank_tokens, np.bincount(p.rank_of, weights=plen, minlength=R).astype(np.int64))
    if a["keep_groups"]:
        for g in np.unique(a["group_ids"]):
            assert np.unique(p.rank_of[a["group_ids"] == g]).size == 1, "group kept on one rank"
    assert p.imbalance >= 1.0 - 1e-12


# ---------------------------------------------------------------- property tests
@HYP
@given(plan_inputs())
def test_plan_implementations_agree_and_invariants(a):
    kw = dict(a)
    lens = kw.pop("seq_lens")
    plans = {impl: P.plan_microbatches(lens, impl=impl, **kw)
             for impl in (["cpp"] if P.HAS_R4B_C else []) + ["numpy", "python"]}
    spec = plans.pop("python")
    for impl, p in plans.items():
        for f in ("rank_of", "microbatch_of", "rank_costs", "rank_tokens", "microbatch_counts"):
            assert np.array_equal(getattr(p, f), getattr(spec, f)), (impl, f)
        assert p.lower_bound == spec.lower_bound
    check_plan(spec, a)


@pytest.mark.parametrize("impl", IMPLS)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(a=pack_inputs())
def test_pack_invariants_and_round_trips(impl, a):
    kw = dict(a)
    pb = P.pack_microbatch(kw.pop("token_ids"), kw.pop("offsets"), kw.pop("prompt_lens"),
                           kw.pop("seq_indices"), impl=impl, **kw)
    assert pb.input_ids.dtype == torch.int64 and pb.cu_seqlens.dtype == torch.int32
    # cu_seqlens consistent: padded lengths, position ids restart at every boundary.
    sel, off, m = a["seq_indices"], a["offsets"], a["pad_to_multiple"]
    lens = off[sel + 1] - off[sel]
    padded = -(-lens // m) * m
    assert pb.cu_seqlens.tolist() == [0] + np.cumsum(padded).tolist()
    assert pb.max_seqlen == (int(padded.max()) if sel.size else 0)
    # Per sequence: its rows carry its index, mode, positions 0.., padding ids after its end,
    # and its advantage exactly on the L - P scored rows.
    for j, s in enumerate(sel.tolist()):
        lo, hi = int(pb.cu_seqlens[j]), int(pb.cu_seqlens[j + 1])
        L, Pn = int(lens[j]), int(a["prompt_lens"][s])
        assert torch.equal(pb.position_ids[lo:hi], torch.arange(hi - lo))
        assert torch.all(pb.seq_index[lo:hi] == j) and torch.all(pb.mode[lo:hi] == a["modes"][s])
        assert torch.all(pb.input_ids[lo + L:hi] == a["pad_token_id"])
        mask = pb.loss_mask[lo:hi]
        assert mask.sum() == L - Pn and torch.all(mask[Pn - 1:L - 1])
        assert torch.equal(pb.advantage[lo:hi], torch.where(mask, float(a["advantages"][s]), 0.0))
    assert torch.equal(pb.response_rows, pb.loss_mask.nonzero()[:, 0])
    # Labels never cross a sequence boundary: the last row of every sequence is ignored.
    ends = pb.cu_seqlens[1:].long() - 1
    assert torch.all(pb.labels[ends] == -100)
    # Round trips: rows → sequences, response rows → response tokens.
    back = pb.unpack(pb.input_ids, impl=impl)
    tok = a["token_ids"]
    for j, s in enumerate(sel.tolist()):
        assert back[j].tolist() == tok[off[s]:off[s + 1]].tolist()
    resp = pb.unpack_response(pb.labels[pb.response_rows])
    for j, s in enumerate(sel.tolist()):
        assert resp[j].tolist() == tok[off[s] + a["prompt_lens"][s]:off[s + 1]].tolist()


@HYP
@given(pack_inputs())
def test_pack_implementations_agree(a):
    kw = dict(a)
    args = [kw.pop(k) for k in ("token_ids", "offsets", "prompt_lens", "seq_indices")]
    spec = P.pack_microbatch(*args, impl="python", **kw)
    for impl in (["cpp"] if P.HAS_R4B_C else []) + ["numpy"]:
        pb = P.pack_microbatch(*args, impl=impl, **kw)
        for f in PACK_FIELDS:
            x, y = getattr(pb, f), getattr(spec, f)
            assert x.dtype == y.dtype and torch.equal(x, y), (impl, f)
        assert pb.max_seqlen == spec.max_seqlen


@HYP
@given(pack_inputs(), st.data())
def test_pack_microbatches_equals_one_call_per_microbatch(a, data):
    """The batched call (one validation, one pass, shared buffers) gives exactly what packing
    each micro-batch on its own gives, for every implementation."""
    kw = dict(a)
    args = [kw.pop(k) for k in ("token_ids", "offsets", "prompt_lens")]
    sel = kw.pop("seq_indices")
    cuts = sorted(data.draw(st.lists(st.integers(0, sel.size), max_size=4)))
    mbs = np.split(sel, cuts)  # may hold empty micro-batches
    single = [P.pack_microbatch(*args, mb, impl="python", **kw) for mb in mbs]
    for impl in (["cpp"] if P.HAS_R4B_C else []) + ["numpy", "python"]:
        many = P.pack_microbatches(*args, mbs, impl=impl, **kw)
        assert len(many) == len(mbs)
        for x, y in zip(many, single):
            for f in PACK_FIELDS:
                assert getattr(x, f).dtype == getattr(y, f).dtype, (impl, f)
                assert torch.equal(getattr(x, f), getattr(y, f)), (impl, f)
            assert x.max_seqlen == y.max_seqlen


@pytest.mark.parametrize("impl", IMPLS)
def test_pack_microbatches_rejects_a_sequence_in_two_microbatches(impl):
    tok, off, pl = np.arange(10), [0, 4, 6, 9], [1, 2, 2]
    with pytest.raises(ValueError, match=r"sequence 2 is at microbatches\[0\]\[1\] and "
                                         r"microbatches\[2\]\[0\]"):
        P.pack_microbatches(tok, off, pl, [[0, 2], [1], [2]], impl=impl)
    with pytest.raises(ValueError, match=r"microbatches\[1\]\[0\] must be a sequence index "
                                         r"in \[0, 3\), got 3"):
        P.pack_microbatches(tok, off, pl, [[0], [3]], impl=impl)
    with pytest.raises(ValueError, match=r"microbatches\[1\] must be 1-D"):
        P.pack_microbatches(tok, off, pl, [[0], [[1]]], impl=impl)
    assert P.pack_microbatches(tok, off, pl, [], impl=impl) == []


BAD_BOUNDS = [([], "bounds must have at least 1 entry, got 0"),
              ([1, 3], "bounds must start at 0, got 1 at index 0"),
              ([0, 2, 1, 3], "bounds must be non-decreasing, got 1 at index 2 after 2"),
              ([0, 2], "bounds must end at len(seq_indices) = 3, got 2 at index 1")]


@pytest.mark.parametrize("bounds,msg", BAD_BOUNDS)
def test_implementations_validate_bounds_alike(bounds, msg):
    args = (np.arange(10), np.array([0, 4, 6, 9]), np.array([1, 2, 2]), np.array([0, 1, 2]))
    impls = [ref.pack, pyref.pack] + ([P._C.pack] if P.HAS_R4B_C else [])
    for pack in impls:
        with pytest.raises(ValueError) as e:
            pack(*args, None, None, 1, 0, np.array(bounds, dtype=np.int64))
        assert msg in str(e.value), (pack, str(e.value))


@pytest.mark.parametrize("impl", IMPLS)
def test_whole_batch_every_token_in_exactly_one_microbatch(impl):
    rng = np.random.default_rng(1)
    lens, modes, gids = bimodal_batch(600, seed=2, group=8)
    off = np.zeros(lens.size + 1, dtype=np.int64)
    np.cumsum(lens, out=off[1:])
    tok = rng.integers(0, 1000, int(off[-1]))
    pl = np.minimum(rng.integers(1, 100, lens.size), lens)
    p = P.plan_microbatches(lens, num_ranks=4, tokens_per_microbatch=9000, group_ids=gids,
                            modes=modes, keep_groups=True, pad_to_multiple=4,
                            equal_microbatches=True, impl=impl)
    assert {len(r) for r in p.microbatches} == {p.num_microbatches}
    got = np.zeros(int(off[-1]), dtype=np.int64)
    for rank in p.microbatches:
        for mb, pb in zip(rank, P.pack_microbatches(tok, off, pl, rank, modes=modes,
                                                    pad_to_multiple=4, impl=impl)):
            assert pb.num_rows <= 9000 and pb.num_rows % 4 == 0
            for s, vals in zip(pb.seq_indices.tolist(), pb.unpack(pb.input_ids, impl=impl)):
                got[off[s]:off[s + 1]] += 1
                assert np.array_equal(vals.numpy(), tok[off[s]:off[s + 1]])
    assert np.all(got == 1)


# ---------------------------------------------------------------- balance
@pytest.mark.parametrize("keep_groups", [False, True])
def test_balance_bimodal_8192_within_2_percent(keep_groups, capsys):
    lens, modes, gids = bimodal_batch()
    kw = dict(num_ranks=8, tokens_per_microbatch=16384, group_ids=gids, modes=modes,
              keep_groups=keep_groups, impl=FAST)
    pt = P.plan_microbatches(lens, cost="tokens", **kw)
    pf = P.plan_microbatches(lens, cost="flops", flops_a=4096, **kw)
    assert pt.lower_bound == max(lens.sum() / 8, (np.bincount(gids, weights=lens).max()
                                                 if keep_groups else lens.max()))
    assert pt.imbalance <= 1.02, pt.imbalance
    assert pf.imbalance <= 1.02, pf.imbalance
    think = modes.astype(bool)
    per_rank_think = np.bincount(pt.rank_of[think], minlength=8)
    assert per_rank_think.min() >= 0.85 * think.sum() / 8, per_rank_think  # modes spread
    with capsys.disabled():
        print(f"\n[packing] 8192 bimodal seqs, 8 ranks, keep_groups={keep_groups}: imbalance "
              f"tokens {pt.imbalance:.6f}, flops {pf.imbalance:.6f}; think/rank {per_rank_think.tolist()}")


def test_naive_dispatch_is_worse_than_the_plan():
    """The plan must beat contiguous dispatch, which puts a prompt's long siblings together."""
    lens, modes, gids = bimodal_batch(1024, seed=3)
    p = P.plan_microbatches(lens, num_ranks=8, tokens_per_microbatch=16384, modes=modes)
    naive = np.array([c.sum() for c in np.array_split(lens, 8)])
    assert p.rank_costs.max() < naive.max()
    assert p.imbalance < naive.max() / p.lower_bound


@pytest.mark.parametrize("impl", IMPLS)
def test_plan_is_deterministic_and_stable_under_ties(impl):
    lens = np.full(37, 10, dtype=np.int64)
    a = P.plan_microbatches(lens, num_ranks=4, tokens_per_microbatch=40, impl=impl)
    b = P.plan_microbatches(lens.copy(), num_ranks=4, tokens_per_microbatch=40, impl=impl)
    assert np.array_equal(a.rank_of, b.rank_of) and np.array_equal(a.microbatch_of, b.microbatch_of)
    assert a.rank_of[:4].tolist() == [0, 1, 2, 3]  # ties go to the lowest rank id


def test_empty_inputs():
    p = P.plan_microbatches(np.zeros(0, dtype=np.int64), num_ranks=3, tokens_per_microbatch=8)
    assert p.microbatches == [[], [], []] and p.imbalance == 1.0 and p.num_microbatches == 0
    pb = P.pack_microbatch(np.arange(5), [0, 2, 5], [1, 1], [])
    assert pb.num_rows == 0 and pb.cu_seqlens.tolist() == [0] and pb.max_seqlen == 0
    assert pb.unpack(pb.input_ids) == [] and pb.unpack_response(pb.labels[pb.response_rows]) == []


# ---------------------------------------------------------------- bad input
BAD_PLAN = [
    (dict(seq_lens=[5, 3, 0, 2]), "seq_lens must be non-zero", "index 2"),
    (dict(seq_lens=[1, 2, 3, 4, 5, 6, 7, -3]), "seq_lens must be non-negative, got -3 at index 7", ""),
    (dict(seq_lens=[5, 300, 7]), "exceeds tokens_per_microbatch = 100", "index 1"),
    (dict(seq_lens=[5, 99, 7], pad_to_multiple=8), "padded to 104", "index 1"),
    (dict(group_ids=[0, 1]), "group_ids must have one entry per sequence (3), got 2", ""),
    (dict(modes=[0, 1]), "modes must have one entry per sequence (3), got 2", ""),
    (dict(modes=[0, 200, 1]), "modes must be in [0, 127], got 200", "index 1"),
    (dict(num_ranks=0), "num_ranks must be >= 1, got 0", ""),
    (dict(tokens_per_microbatch=-5), "tokens_per_microbatch must be >= 1, got -5", ""),
    (dict(pad_to_multiple=0), "pad_to_multiple must be >= 1, got 0", ""),
    (dict(keep_groups=True), "keep_groups=True needs group_ids", ""),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kw,msg,where", BAD_PLAN)
def test_plan_rejects_bad_input(impl, kw, msg, where):
    args = dict(seq_lens=[5, 6, 7], num_ranks=2, tokens_per_microbatch=100)
    args.update(kw)
    lens = args.pop("seq_lens")
    with pytest.raises(ValueError) as e:
        P.plan_microbatches(lens, impl=impl, **args)
    assert msg in str(e.value) and where in str(e.value)


BAD_PACK = [
    (dict(offsets=[0, 4, 4, 9]), "zero-length sequences are not allowed", "sequence 1"),
    (dict(offsets=[0, 4, 3, 9]), "offsets must be non-decreasing", "sequence 1"),
    (dict(offsets=[0, 4, 9]), "offsets must have len(prompt_lens) + 1 = 4 entries, got 3", ""),
    (dict(offsets=[0, 4, 6, 99]), "offsets[3] = 99 exceeds len(token_ids) = 10", ""),
    (dict(prompt_lens=[1, 3, 2]), "prompt_lens must be in [1, seq_len] per sequence, got 3", "index 1"),
    (dict(prompt_lens=[1, 0, 2]), "prompt_lens must be in [1, seq_len] per sequence, got 0", "index 1"),
    (dict(seq_indices=[0, 3]), "seq_indices must be in [0, 3), got 3", "index 1"),
    (dict(seq_indices=[0, -1]), "seq_indices must be in [0, 3), got -1", "index 1"),
    (dict(seq_indices=[2, 0, 2]), "seq_indices must not repeat a sequence, got 2", "indices 0 and 2"),
    (dict(modes=[0, 1]), "modes must have one entry per sequence (3), got 2", ""),
    (dict(modes=[0, -1, 1]), "modes must be in [0, 127], got -1", "index 1"),
    (dict(advantages=[0.0, 1.0]), "advantages must have one entry per sequence (3), got 2", ""),
    (dict(advantages=[0.0, float("nan"), 1.0]), "advantages must be finite, got nan", "index 1"),
    (dict(pad_to_multiple=0), "pad_to_multiple must be >= 1, got 0", ""),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kw,msg,where", BAD_PACK)
def test_pack_rejects_bad_input(impl, kw, msg, where):
    args = dict(token_ids=np.arange(10), offsets=[0, 4, 6, 9], prompt_lens=[1, 2, 2],
                seq_indices=[0, 1, 2])
    args.update(kw)
    with pytest.raises(ValueError) as e:
        P.pack_microbatch(args.pop("token_ids"), args.pop("offsets"), args.pop("prompt_lens"),
                          args.pop("seq_indices"), impl=impl, **args)
    assert msg in str(e.value) and where in str(e.value)


@pytest.mark.parametrize("impl", IMPLS)
def test_unpack_rejects_bad_input(impl):
    v = torch.arange(8.0)
    with pytest.raises(ValueError, match=r"seq_lens must be in \[0, cu_seqlens"):
        P.unpack_rows(v, [0, 3, 8], [4, 5], impl=impl)
    with pytest.raises(ValueError, match="values must have cu_seqlens"):
        P.unpack_rows(v, [0, 3, 7], [3, 4], impl=impl)
    with pytest.raises(ValueError, match="cu_seqlens must have len"):
        P.unpack_rows(v, [0, 8], [3, 4], impl=impl)
    with pytest.raises(ValueError, match=r"values must have sum\(seq_lens - prompt_lens\) = 5"):
        P.unpack_response(v, [1, 2], [3, 5])


@needs_c
def test_cpp_layer_validates_its_own_arguments():
    """Direct callers of r4b._C get ValueError naming the argument, not a crash."""
    from r4b import _C

    with pytest.raises(ValueError, match="seq_lens must be a 1-D int64 array, got dtype float64"):
        _C.plan(np.ones(3), 2, 10)
    with pytest.raises(ValueError, match="seq_lens must be non-negative, got -3 at index 7"):
        _C.plan(np.array([1] * 7 + [-3], dtype=np.int64), 2, 10)
    with pytest.raises(ValueError, match="seq_lens must be C-contiguous"):
        _C.plan(np.arange(1, 9, dtype=np.int64)[::2], 2, 10)
    with pytest.raises(ValueError, match="token_ids must be a 1-D int64 array, got dtype float32"):
        _C.pack(np.ones(4, np.float32), np.array([0, 4]), np.array([1]), np.array([0]))
    with pytest.raises(ValueError, match="modes must be a 1-D int8 array"):
        _C.pack(np.arange(4), np.array([0, 4]), np.array([1]), np.array([0]),
                modes=np.zeros(1, np.int64))


# ---------------------------------------------------------------- unpack, dtypes, gathers
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64])
def test_unpack_rows_dtypes_and_trailing_dims(impl, dtype):
    cu, lens = [0, 4, 8, 11], [3, 4, 2]
    vals = torch.randn(11, 3).to(dtype)
    out = P.unpack_rows(vals, cu, lens, impl=impl)
    assert [o.shape for o in out] == [(3, 3), (4, 3), (2, 3)]
    for o, s, L in zip(out, cu, lens):
        assert o.dtype == dtype and torch.equal(o, vals[s:s + L])


def test_gather_and_scatter_reference():
    src = torch.randn(6, 2)
    idx = torch.tensor([5, -1, 0, 0, 3])
    out = P.gather_rows(src, idx, impl="python")
    assert torch.equal(out[0], src[5]) and torch.equal(out[1], torch.zeros(2))
    assert torch.equal(out[2:4], src[[0, 0]]) and torch.equal(out[4], src[3])
    dst = torch.full((7, 2), float("nan"))
    P.scatter_rows(dst, out, torch.tensor([1, -1, 6, 2, 0]), impl="python")
    assert torch.equal(dst[[1, 6, 2, 0]], out[[0, 2, 3, 4]]) and dst[3:6].isnan().all()
    with pytest.raises(ValueError, match="index must be < src.shape"):
        P.gather_rows(src, torch.tensor([6]), impl="python")
    with pytest.raises(ValueError, match="impl='cuda' needs CUDA tensors") if P.HAS_R4B_CUDA else \
            pytest.raises(RuntimeError, match="impl='cuda' requested"):
        P.gather_rows(src, idx, impl="cuda")


def test_custom_ops_match_functions_gradients_and_compile():
    g = torch.Generator().manual_seed(0)
    src = torch.randn(9, 2, 3, dtype=torch.float64, generator=g, requires_grad=True)
    idx = torch.randint(-1, 9, (14,), generator=g)  # repeats and padding rows
    out = torch.ops.r4b.gather_rows(src, idx)
    assert torch.equal(out, P.gather_rows(src.detach(), idx))
    # Gradient: every source row receives the sum of the gradients of the rows copied from it.
    w = torch.randn(out.shape, dtype=torch.float64, generator=g)
    (out * w).sum().backward()
    expect = torch.zeros_like(src)
    for i, j in enumerate(idx.tolist()):
        if j >= 0:
            expect[j] += w[i]
    assert torch.allclose(src.grad, expect, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(lambda s: torch.ops.r4b.gather_rows(s, idx),
                                    (src.detach().requires_grad_(),))
    dst = torch.zeros(12, 2, 3, dtype=torch.float64)
    perm = torch.randperm(12, generator=g)[:9]
    torch.ops.r4b.scatter_rows_(dst, src.detach(), perm)
    assert torch.equal(dst[perm], src.detach())
    for op, args in ((torch.ops.r4b.gather_rows.default, (src.detach().requires_grad_(), idx)),
                     (torch.ops.r4b.scatter_rows_.default, (dst, src.detach(), perm))):
        res = torch.library.opcheck(op, args)
        assert all(v == "SUCCESS" for v in res.values()), res
    f = torch.compile(lambda s, i: torch.ops.r4b.gather_rows(s, i) * 2, backend="aot_eager",
                      fullgraph=True)
    assert torch.equal(f(src.detach(), idx), 2 * P.gather_rows(src.detach(), idx))


def test_impl_resolution(monkeypatch):
    with pytest.raises(ValueError, match="impl must be one of"):
        P.plan_microbatches([3], num_ranks=1, tokens_per_microbatch=4, impl="cuda")
    monkeypatch.setattr(P, "HAS_R4B_C", False)
    assert P.resolve_impl("auto") == "numpy"
    with pytest.raises(RuntimeError, match="impl='cpp' requested"):
        P.resolve_impl("cpp")
    p = P.plan_microbatches([3, 4], num_ranks=2, tokens_per_microbatch=4)
    assert sorted(p.rank_of.tolist()) == [0, 1]


def test_missing_extension_falls_back_with_one_warning(tmp_path):
    code = textwrap.dedent("""
        import importlib.abc, logging, sys
        class Blocker(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name in ("r4b._C", "r4b._C_cuda"):
                    raise ImportError(f"blocked: {name}")
        sys.meta_path.insert(0, Blocker())
        records = []
        class H(logging.Handler):
            def emit(self, r): records.append(r)
        logging.getLogger("r4b").addHandler(H())
        logging.getLogger("r4b").setLevel(logging.DEBUG)
        from r4b.packing import thd as P
        import r4b.packing
        warns = [r for r in records if r.levelno >= logging.WARNING]
        assert len(warns) == 1 and "r4b._C not importable" in warns[0].getMessage(), warns
        assert not P.HAS_R4B_C and not P.HAS_R4B_CUDA
        p = P.plan_microbatches([5, 6, 7], num_ranks=2, tokens_per_microbatch=10)
        pb = P.pack_microbatch([1, 2, 3, 4, 5], [0, 2, 5], [1, 2], [1, 0])
        assert pb.labels.tolist() == [-100, 5, -100, 2, -100], pb.labels
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(__file__)))
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


# ---------------------------------------------------------------- CUDA path
@pytest.mark.gpu
@pytest.mark.skipif(not P.HAS_R4B_CUDA, reason="r4b._C_cuda is not built")
@pytest.mark.parametrize("tok_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("pad", [1, 8])
def test_cuda_pack_equals_cpu(tok_dtype, pad):
    rng = np.random.default_rng(4)
    lens, modes, _ = bimodal_batch(3000, seed=5)
    off = np.zeros(lens.size + 1, dtype=np.int64)
    np.cumsum(lens, out=off[1:])
    tok = torch.from_numpy(rng.integers(0, 150_000, int(off[-1]))).to(tok_dtype)
    pl = np.minimum(rng.integers(1, 300, lens.size), lens)
    adv = rng.standard_normal(lens.size).astype(np.float32)
    sel = rng.permutation(lens.size)[:700]
    cpu = P.pack_microbatch(tok, off, pl, sel, modes=modes, advantages=adv, pad_to_multiple=pad,
                            pad_token_id=7, impl="numpy")
    dev = tok.cuda()
    gpu = P.pack_microbatch(dev, off, pl, sel, modes=modes, advantages=adv, pad_to_multiple=pad,
                            pad_token_id=7, impl="cuda")
    for f in PACK_FIELDS:
        assert torch.equal(getattr(gpu, f).cpu(), getattr(cpu, f)), f
    vals = torch.randn(gpu.num_rows, 3, device="cuda")
    for a, b in zip(P.unpack_rows(vals, gpu.cu_seqlens, gpu.seq_lens, impl="cuda"),
                    P.unpack_rows(vals.cpu(), cpu.cu_seqlens, cpu.seq_lens, impl="numpy")):
        assert torch.equal(a.cpu(), b)


@pytest.mark.gpu
@pytest.mark.skipif(not P.HAS_R4B_CUDA, reason="r4b._C_cuda is not built")
@pytest.mark.parametrize("shape,dtype", [((1000,), torch.int64), ((999, 3), torch.bfloat16),
                                         ((513, 5), torch.uint8), ((300, 8), torch.float32)])
def test_cuda_gather_scatter_equal_reference(shape, dtype):
    src = (torch.randn(shape) * 100).to(dtype).cuda()
    idx = torch.randint(-1, shape[0], (777,), device="cuda")
    out = torch.full((777,) + shape[1:], 99, dtype=dtype, device="cuda")
    got = P.gather_rows(src, idx, impl="cuda")
    assert torch.equal(got, P.gather_rows(src, idx, impl="python"))
    perm = torch.randperm(shape[0] + 5, device="cuda")[:777 if shape[0] + 5 >= 777 else shape[0]]
    n = perm.shape[0]
    d1 = torch.zeros((shape[0] + 5,) + shape[1:], dtype=dtype, device="cuda")
    d2 = d1.clone()
    P.scatter_rows(d1, got[:n], perm, impl="cuda")
    P.scatter_rows(d2, got[:n], perm, impl="python")
    assert torch.equal(d1, d2) and out.shape == got.shape
