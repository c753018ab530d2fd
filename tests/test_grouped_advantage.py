"""grouped_advantage, sequence_loss_weights, token_advantage_weights: Triton kernel vs torch
reference vs a plain-Python fp64 ground truth, on fresh random inputs.

Triton runs under TRITON_INTERPRET=1 on CPU (set by the root conftest.py).
"""

import itertools
import math
import random
import sys

import pytest
import torch

import r4b_kernels
from r4b_kernels import GroupedAdvantage, grouped_advantage, token_advantage_weights
from r4b_kernels.grouped_advantage import AGGREGATIONS, sequence_loss_weights

ga_module = sys.modules["r4b_kernels.grouped_advantage"]
TRITON_OK = r4b_kernels.HAS_TRITON and (r4b_kernels.TRITON_INTERPRET or r4b_kernels.HAS_TRITON_GPU)
IMPLS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not TRITON_OK, reason="triton needs CUDA or TRITON_INTERPRET=1"))]
COMBOS = list(itertools.product(("group", "mode"), ("std", "none"), (False, True)))
EPS = 1e-6
# Tolerances against the fp64 ground truth: the reference computes in fp64 and rounds once;
# the kernel accumulates in fp32.
TOL = {"torch": dict(rtol=1e-6, atol=1e-6), "triton": dict(rtol=2e-5, atol=2e-5)}


@pytest.fixture
def poison(monkeypatch):
    """Make every buffer the Triton launchers allocate start as NaN / a sentinel integer."""
    def alloc(*shape, dtype, device):
        t = torch.empty(*shape, dtype=dtype, device=device)
        return t.fill_(float("nan") if dtype.is_floating_point else -7)
    monkeypatch.setattr(ga_module, "_alloc", alloc)


def _device():
    return "cuda" if r4b_kernels.HAS_TRITON_GPU else "cpu"


# ----------------------------------------------------------------------------- random batches
def random_batch(n: int, gen: random.Random, with_modes: bool, device="cpu"):
    """Ragged groups with large unsorted int64 ids, a size-1 group, all-equal groups, a mix of
    binary and continuous rewards, rollouts shuffled."""
    sizes, left = [], n
    while left:
        s = min(left, gen.choice([1, 2, 3, 7, 16, 16, 33]))
        sizes.append(s)
        left -= s
    ids_pool = gen.sample(range(2**62), len(sizes))
    rewards, ids = [], []
    for gid, s in zip(ids_pool, sizes):
        kind = gen.choice(["binary", "binary", "cont", "const", "const01"])
        for _ in range(s):
            rewards.append({"binary": float(gen.random() < 0.5), "cont": gen.gauss(0.3, 2.0),
                            "const": 1.0, "const01": 0.1}[kind])
            ids.append(gid)
    perm = list(range(n))
    gen.shuffle(perm)
    r = torch.tensor([rewards[i] for i in perm], dtype=torch.float32, device=device)
    g = torch.tensor([ids[i] for i in perm], dtype=torch.int64, device=device)
    m = (torch.tensor([gen.randrange(3) for _ in range(n)], dtype=torch.int8, device=device)
         if with_modes else None)
    return r, g, m


# ----------------------------------------------------------------------------- ground truth
def ground_truth(rewards, group_ids, modes, baseline, scale, loo, eps):
    """Plain-Python fp64 definition: loops over groups and subgroups."""
    r = [float(x) for x in rewards.cpu().double()]
    ids = group_ids.cpu().tolist()
    md = modes.cpu().tolist() if modes is not None else [0] * len(r)
    members = {}
    for k, gid in enumerate(ids):
        members.setdefault(gid, []).append(k)
    uniq = sorted(members)
    row = {gid: j for j, gid in enumerate(uniq)}

    def stats(ks):
        vals = [r[k] for k in ks]
        n = len(vals)
        mean = math.fsum(vals) / n
        std = math.sqrt(math.fsum((v - mean) ** 2 for v in vals) / (n - 1)) if n > 1 else 0.0
        return n, mean, std, min(vals) == max(vals)

    out = {"group_ids": uniq, "inverse": [row[g] for g in ids], "group_mean": [],
           "group_std": [], "group_size": [], "zero_variance": [], "mode_mean": [],
           "mode_count": []}
    for gid in uniq:
        n, mean, std, flat = stats(members[gid])
        out["group_mean"].append(mean)
        out["group_std"].append(std)
        out["group_size"].append(n)
        out["zero_variance"].append(flat)
        mm, mc = [], []
        for mode in range(3):
            ks = [k for k in members[gid] if md[k] == mode]
            mc.append(len(ks))
            mm.append(math.fsum(r[k] for k in ks) / len(ks) if ks else float("nan"))
        out["mode_mean"].append(mm)
        out["mode_count"].append(mc)
    adv = []
    for k in range(len(r)):
        ks = members[ids[k]]
        if baseline == "mode":
            ks = [j for j in ks if md[j] == md[k]]
        n, mean, std, flat = stats(ks)
        if n <= 1 or flat:
            adv.append(0.0)
            continue
        if loo:
            a = r[k] - math.fsum(r[j] for j in ks if j != k) / (n - 1)
        else:
            a = r[k] - mean
        adv.append(a / (std + eps) if scale == "std" else a)
    out["advantages"] = adv
    return out


def check_against_truth(res: GroupedAdvantage, truth, with_modes, tol):
    dev = res.advantages.device
    f64 = dict(dtype=torch.float64, device=dev)
    assert res.advantages.dtype == torch.float32 and res.group_mean.dtype == torch.float32
    assert res.group_ids.tolist() == truth["group_ids"]
    assert res.inverse.tolist() == truth["inverse"]
    assert res.group_size.tolist() == truth["group_size"]
    assert res.zero_variance.dtype == torch.bool
    assert res.zero_variance.tolist() == truth["zero_variance"]
    torch.testing.assert_close(res.advantages.double(), torch.tensor(truth["advantages"], **f64),
                               **tol)
    torch.testing.assert_close(res.group_mean.double(), torch.tensor(truth["group_mean"], **f64),
                               **tol)
    torch.testing.assert_close(res.group_std.double(), torch.tensor(truth["group_std"], **f64),
                               **tol)
    if with_modes:
        assert res.mode_count.tolist() == truth["mode_count"]
        torch.testing.assert_close(res.mode_mean.double(),
                                   torch.tensor(truth["mode_mean"], **f64), equal_nan=True,
                                   **tol)
    else:
        assert res.mode_mean is None and res.mode_count is None


# ----------------------------------------------------------------------------- grouped_advantage
@pytest.mark.parametrize("with_modes", [False, True])
@pytest.mark.parametrize("n", [1, 5, 123, 1031])
@pytest.mark.parametrize("impl", IMPLS)
def test_grouped_advantage_matches_ground_truth(impl, n, with_modes, poison):
    gen = random.Random()  # fresh inputs every run; the seed is printed on failure
    seed = random.randrange(2**31)
    gen.seed(seed)
    r, g, m = random_batch(n, gen, with_modes, _device())
    for baseline, scale, loo in COMBOS:
        res = grouped_advantage(r, g, m, baseline=baseline, scale=scale, leave_one_out=loo,
                                eps=EPS, impl=impl)
        truth = ground_truth(r, g, m, baseline, scale, loo, EPS)
        try:
            check_against_truth(res, truth, with_modes, TOL[impl])
        except AssertionError as e:
            raise AssertionError(f"seed={seed} baseline={baseline} scale={scale} loo={loo}: "
                                 f"{e}") from None


@pytest.mark.parametrize("impl", IMPLS)
def test_zero_variance_size_one_and_flags(impl, poison):
    # group 7: all right; 3: all wrong; 11: size 1; 5: all 0.1 (mean rounds in fp32); 2: mixed.
    r = torch.tensor([1., 0., 0.1, 1., 0.1, 0., 0.5, 0.1, 1., 0.], device=_device())
    g = torch.tensor([7, 3, 5, 7, 5, 3, 11, 5, 2, 2], device=_device())
    m = torch.tensor([1, 0, 1, 0, 1, 1, 2, 0, 0, 1], dtype=torch.int8, device=_device())
    for baseline, scale, loo in COMBOS:
        res = grouped_advantage(r, g, m, baseline=baseline, scale=scale, leave_one_out=loo,
                                impl=impl)
        assert res.group_ids.tolist() == [2, 3, 5, 7, 11]
        assert res.zero_variance.tolist() == [False, True, True, True, True]
        assert res.group_size.tolist() == [2, 2, 3, 2, 1]
        assert res.group_std[1:].tolist() == [0.0] * 4  # size-1 group: std 0, not NaN
        # Exactly zero (not ~1e-2 from a rounded mean over a tiny std) for every flat group.
        flat = g != 2
        assert (res.advantages[flat] == 0).all(), res.advantages
        if baseline == "mode":  # group 2 has one rollout per mode: every subgroup is size 1
            assert (res.advantages == 0).all()
        else:
            assert (res.advantages[~flat] != 0).all()
        assert res.mode_count.tolist()[4] == [0, 0, 1]
        assert math.isnan(res.mode_mean[4, 0]) and res.mode_mean[4, 2] == 0.5


@pytest.mark.parametrize("impl", IMPLS)
def test_bpo_merged_group_values(impl):
    """BPO: 2 think + 2 no-think rollouts normalised over the merged group (hand values)."""
    r = torch.tensor([1., 0., 1., 1.], device=_device())
    g = torch.tensor([4, 4, 4, 4], device=_device())
    m = torch.tensor([1, 1, 0, 0], dtype=torch.int8, device=_device())
    res = grouped_advantage(r, g, m, impl=impl, eps=0.0)
    std = math.sqrt((3 * 0.25 ** 2 + 0.75 ** 2) / 3)  # unbiased: divide by n - 1 = 3
    torch.testing.assert_close(res.advantages.cpu(),
                               torch.tensor([0.25, -0.75, 0.25, 0.25]) / std)
    torch.testing.assert_close(res.mode_mean.cpu(), torch.tensor([[1.0, 0.5, float("nan")]]),
                               equal_nan=True)
    rloo = grouped_advantage(r, g, m, impl=impl, scale="none", leave_one_out=True)
    torch.testing.assert_close(rloo.advantages.cpu(), torch.tensor([1 / 3, -1., 1 / 3, 1 / 3]))


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_batch_and_int32_ids(impl):
    dev = _device()
    res = grouped_advantage(torch.zeros(0, device=dev), torch.zeros(0, dtype=torch.int64,
                                                                    device=dev), impl=impl)
    assert res.advantages.shape == (0,) and res.group_ids.shape == (0,)
    r = torch.tensor([1., 0., 2.], device=dev)
    a = grouped_advantage(r, torch.tensor([1, 1, 2], dtype=torch.int32, device=dev), impl=impl)
    b = grouped_advantage(r, torch.tensor([1, 1, 2], device=dev), impl="torch")
    torch.testing.assert_close(a.advantages, b.advantages)


def test_auto_on_cpu_is_the_reference():
    r, g, m = random_batch(50, random.Random(1), True)
    a = grouped_advantage(r, g, m, impl="auto")
    b = grouped_advantage(r, g, m, impl="torch")
    assert torch.equal(a.advantages, b.advantages)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(rewards=torch.ones(3), group_ids=torch.zeros(4, dtype=torch.int64)), ValueError,
     "group_ids must have length 3"),
    (dict(rewards=torch.tensor([0., float("nan"), 1.])), ValueError,
     r"rewards must be finite, got nan at flat index 1"),
    (dict(rewards=torch.tensor([0., 1., float("inf")])), ValueError, "rewards must be finite"),
    (dict(group_ids=torch.tensor([0, -5, 1])), ValueError,
     "group_ids must be non-negative, got -5 at index 1"),
    (dict(modes=torch.tensor([0, 3, 1], dtype=torch.int8)), ValueError,
     r"modes must be in \{0, 1, 2\}.*got 3 at index 1"),
    (dict(modes=torch.tensor([0, 1], dtype=torch.int8)), ValueError, "modes must have length 3"),
    (dict(rewards=torch.ones(3, dtype=torch.float64)), TypeError, "rewards must have dtype"),
    (dict(group_ids=torch.zeros(3)), TypeError, "group_ids must have dtype"),
    (dict(modes=torch.zeros(3)), TypeError, "modes must have dtype"),
    (dict(rewards=torch.ones(3, 1)), ValueError, "rewards must be 1-D"),
    (dict(rewards=[1.0, 2.0, 3.0]), TypeError, "rewards must be a torch.Tensor"),
    (dict(baseline="prompt"), ValueError, "baseline must be one of"),
    (dict(scale="mad"), ValueError, "scale must be one of"),
    (dict(eps=-1.0), ValueError, "eps must be a finite number >= 0, got -1.0"),
    (dict(leave_one_out=1), TypeError, "leave_one_out must be a bool"),
    (dict(impl="cuda"), ValueError, "impl must be one of"),
])
def test_grouped_advantage_bad_input(kwargs, exc, match):
    args = dict(rewards=torch.tensor([1., 0., 1.]), group_ids=torch.tensor([2, 2, 9]),
                modes=torch.tensor([0, 1, 1], dtype=torch.int8))
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        grouped_advantage(args.pop("rewards"), args.pop("group_ids"), args.pop("modes"), **args)


# ----------------------------------------------------------------------------- loss weights
def random_sequences(n, gen, with_modes, zero_len=True):
    lens = [gen.choice([0, 1, 3, 17, 40, 90]) if zero_len else gen.choice([1, 3, 17, 40, 90])
            for _ in range(n)]
    ids = [gen.choice([5, 11, 2**40 + 3, 77, 123456]) for _ in range(n)]
    modes = [gen.randrange(3) for _ in range(n)] if with_modes else None
    return lens, ids, modes


def weights_truth(lens, ids, modes, aggregation, max_len):
    """Direct definition of each aggregation (Python fp64), sequences with no tokens ignored."""
    live = [i for i, L in enumerate(lens) if L > 0]
    w = [0.0] * len(lens)
    md = modes if modes is not None else [0] * len(lens)
    for i in live:
        if aggregation == "token_mean":
            w[i] = 1 / sum(lens)
        elif aggregation == "seq_mean_token_mean":
            w[i] = 1 / (len(live) * lens[i])
        elif aggregation == "seq_mean_token_sum_norm":
            w[i] = 1 / (len(live) * max_len)
        else:
            groups = {ids[j] for j in live}
            modes_g = {md[j] for j in live if ids[j] == ids[i]}
            tok = sum(lens[j] for j in live if ids[j] == ids[i] and md[j] == md[i])
            w[i] = 1 / (len(groups) * len(modes_g) * tok)
    return w


@pytest.mark.parametrize("with_modes", [False, True])
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("n", [1, 7, 200])
def test_sequence_loss_weights_ground_truth_and_sum(aggregation, with_modes, n):
    gen = random.Random(random.randrange(2**31))
    lens, ids, modes = random_sequences(n, gen, with_modes)
    lens[0] = max(lens[0], 1)  # at least one response token in the batch
    max_len = max(lens) + gen.randrange(5)
    w = sequence_loss_weights(torch.tensor(lens), torch.tensor(ids),
                              None if modes is None else torch.tensor(modes, dtype=torch.int8),
                              aggregation=aggregation, max_response_len=max_len)
    assert w.dtype == torch.float32 and w.shape == (n,)
    truth = weights_truth(lens, ids, modes, aggregation, max_len)
    torch.testing.assert_close(w.double(), torch.tensor(truth, dtype=torch.float64),
                               rtol=1e-6, atol=0)
    total = float((w.double() * torch.tensor(lens, dtype=torch.float64)).sum())
    if aggregation == "seq_mean_token_sum_norm":
        assert 0 < total <= 1 + 1e-6
    else:
        assert total == pytest.approx(1.0, abs=1e-6)
    assert (w[torch.tensor(lens) == 0] == 0).all()


def test_sequence_loss_weights_no_tokens_and_errors():
    w = sequence_loss_weights(torch.tensor([0, 0]), torch.tensor([1, 2]),
                              aggregation="mode_balanced")
    assert torch.equal(w, torch.zeros(2))  # nothing divides by zero
    lens, ids = torch.tensor([3, 4]), torch.tensor([1, 1])
    with pytest.raises(ValueError, match="aggregation must be one of"):
        sequence_loss_weights(lens, ids, aggregation="sum")
    with pytest.raises(ValueError, match="max_response_len is required"):
        sequence_loss_weights(lens, ids, aggregation="seq_mean_token_sum_norm")
    with pytest.raises(ValueError, match=r"max_response_len must be an int >= max\(response_lens\)"
                                         r" = 4.*got 3"):
        sequence_loss_weights(lens, ids, aggregation="seq_mean_token_sum_norm",
                              max_response_len=3)
    with pytest.raises(ValueError, match="response_lens must be >= 0, got -2 at index 1"):
        sequence_loss_weights(torch.tensor([3, -2]), ids, aggregation="token_mean")
    with pytest.raises(ValueError, match="group_ids must have length 2"):
        sequence_loss_weights(lens, torch.tensor([1]), aggregation="token_mean")
    with pytest.raises(ValueError, match="group_ids must be non-negative, got -1 at index 0"):
        sequence_loss_weights(lens, torch.tensor([-1, 1]), aggregation="token_mean")
    with pytest.raises(ValueError, match="modes must be in .*got 4 at index 1"):
        sequence_loss_weights(lens, ids, torch.tensor([0, 4]), aggregation="mode_balanced")
    with pytest.raises(TypeError, match="response_lens must have dtype"):
        sequence_loss_weights(lens.float(), ids, aggregation="token_mean")


def direct_batch_loss(token_losses, ids, modes, aggregation, max_len):
    """The batch loss of each aggregation, computed directly from per-token losses."""
    live = [i for i, t in enumerate(token_losses) if t]
    if aggregation == "token_mean":
        flat = [x for i in live for x in token_losses[i]]
        return math.fsum(flat) / len(flat)
    if aggregation == "seq_mean_token_mean":
        seq_means = [math.fsum(token_losses[i]) / len(token_losses[i]) for i in live]
        return math.fsum(seq_means) / len(seq_means)
    if aggregation == "seq_mean_token_sum_norm":
        return math.fsum(math.fsum(token_losses[i]) for i in live) / (len(live) * max_len)
    md = modes if modes is not None else [0] * len(ids)
    per_group = []
    for gid in sorted({ids[i] for i in live}):
        per_mode = []
        for mode in range(3):
            toks = [x for i in live if ids[i] == gid and md[i] == mode for x in token_losses[i]]
            if toks:
                per_mode.append(math.fsum(toks) / len(toks))  # per-mode token mean
        per_group.append(math.fsum(per_mode) / len(per_mode))  # mean over modes
    return math.fsum(per_group) / len(per_group)  # mean over groups


@pytest.mark.parametrize("with_modes", [False, True])
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("impl", IMPLS)
def test_micro_batches_and_ranks_sum_to_the_batch_loss(impl, aggregation, with_modes):
    """Split a batch over 3 ranks x several packed micro-batches: the sum of the per-micro-batch
    weighted losses equals the batch loss under the aggregation, computed directly."""
    gen = random.Random(random.randrange(2**31))
    n = 40
    lens, ids, modes = random_sequences(n, gen, with_modes)
    lens[0] = max(lens[0], 1)
    prompt_lens = [gen.randrange(1, 9) for _ in range(n)]
    max_len = max(lens) + 3
    token_losses = [[gen.gauss(0, 1) for _ in range(L)] for L in lens]
    w = sequence_loss_weights(torch.tensor(lens), torch.tensor(ids),
                              None if modes is None else torch.tensor(modes, dtype=torch.int8),
                              aggregation=aggregation, max_response_len=max_len)
    adv = torch.randn(n)

    order = list(range(n))
    gen.shuffle(order)
    ranks = [order[r::3] for r in range(3)]
    total = 0.0
    for seqs in ranks:
        cuts = sorted(gen.sample(range(1, len(seqs)), 2)) if len(seqs) > 2 else []
        for mb in (seqs[a:b] for a, b in zip([0] + cuts, cuts + [len(seqs)])):
            # Pack: prompt tokens then response tokens; row p carries the loss of token p + 1.
            seq_lens = [prompt_lens[i] + lens[i] for i in mb]
            cu = torch.tensor([0] + list(itertools.accumulate(seq_lens)), dtype=torch.int32)
            pad = gen.randrange(0, 6)
            t = int(cu[-1]) + pad
            row_loss = torch.zeros(t, dtype=torch.float64)
            for j, i in enumerate(mb):
                start = int(cu[j]) + prompt_lens[i] - 1
                row_loss[start:start + lens[i]] = torch.tensor(token_losses[i], dtype=torch.float64)
            row_loss[int(cu[-1]):] = 1e6  # padding rows must get weight 0
            dev = _device()
            tok_adv, tok_w = token_advantage_weights(
                cu.to(dev), torch.tensor([prompt_lens[i] for i in mb], device=dev),
                adv[mb].to(dev), w[mb].to(dev), total_tokens=t, impl=impl)
            tok_adv, tok_w = tok_adv.cpu(), tok_w.cpu()
            total += float((tok_w.double() * row_loss).sum())
            assert torch.equal(tok_adv != 0, tok_w != 0)  # the same rows carry both
    expect = direct_batch_loss(token_losses, ids, modes, aggregation, max_len)
    assert total == pytest.approx(expect, rel=1e-5, abs=1e-6)


# ----------------------------------------------------------------------------- packed layout
def packed_truth(cu, prompt_lens, adv, w, total):
    a, ww = [0.0] * total, [0.0] * total
    for i in range(len(prompt_lens)):
        start, length = cu[i], cu[i + 1] - cu[i]
        for p in range(length):
            if prompt_lens[i] - 1 <= p < length - 1:
                a[start + p], ww[start + p] = float(adv[i]), float(w[i])
    return torch.tensor(a), torch.tensor(ww)


@pytest.mark.parametrize("n", [0, 1, 5, 37])
@pytest.mark.parametrize("impl", IMPLS)
def test_token_advantage_weights_matches_loop(impl, n, poison):
    gen = random.Random(random.randrange(2**31))
    lens = [gen.choice([1, 2, 5, 64, 300, 1500]) for _ in range(n)]
    prompt_lens = [gen.randrange(1, L + 1) for L in lens]
    cu = [0] + list(itertools.accumulate(lens))
    pad = gen.choice([0, 1, 1000])
    adv, w = torch.randn(n), torch.rand(n)
    dev = _device()
    out_a, out_w = token_advantage_weights(
        torch.tensor(cu, dtype=torch.int32, device=dev),
        torch.tensor(prompt_lens, dtype=torch.int64, device=dev),
        adv.to(dev), w.to(dev), total_tokens=cu[-1] + pad, impl=impl)
    ta, tw = packed_truth(cu, prompt_lens, adv, w, cu[-1] + pad)
    assert out_a.dtype == torch.float32 and out_a.shape == (cu[-1] + pad,)
    assert torch.equal(out_a.cpu(), ta) and torch.equal(out_w.cpu(), tw)  # pure copies: exact


@pytest.mark.parametrize("impl", IMPLS)
def test_token_advantage_weights_default_total_and_int64_cu(impl):
    dev = _device()
    cu = torch.tensor([0, 4, 6], device=dev)
    a, w = token_advantage_weights(cu, torch.tensor([2, 1], device=dev),
                                   torch.tensor([3., -1.], device=dev),
                                   torch.tensor([.5, .25], device=dev), impl=impl)
    assert a.tolist() == [0, 3, 3, 0, -1, 0] and w.tolist() == [0, .5, .5, 0, .25, 0]


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(cu_seqlens=torch.tensor([1, 4, 6], dtype=torch.int32)), ValueError,
     "cu_seqlens must start at 0, got 1"),
    (dict(cu_seqlens=torch.tensor([0, 4, 3], dtype=torch.int32)), ValueError,
     "cu_seqlens must be non-decreasing, got 3 < 4 at index 2"),
    (dict(cu_seqlens=torch.tensor([0., 4., 6.])), TypeError, "cu_seqlens must have dtype"),
    (dict(prompt_lens=torch.tensor([0, 1])), ValueError,
     r"prompt_lens must satisfy 1 <= prompt_lens\[i\] <= sequence length, got 0 at index 0"),
    (dict(prompt_lens=torch.tensor([2, 3])), ValueError,
     "prompt_lens must satisfy.*got 3 at index 1 \\(sequence length 2\\)"),
    (dict(prompt_lens=torch.tensor([2])), ValueError, "prompt_lens must have length 2"),
    (dict(advantages=torch.tensor([1., float("nan")])), ValueError,
     "advantages must be finite, got nan at flat index 1"),
    (dict(seq_weights=torch.tensor([1., 2., 3.])), ValueError, "seq_weights must have length 2"),
    (dict(advantages=torch.tensor([1., 2.], dtype=torch.float64)), TypeError,
     "advantages must have dtype"),
    (dict(total_tokens=5), ValueError, r"total_tokens must be an int >= cu_seqlens\[-1\] = 6, "
                                       "got 5"),
])
def test_token_advantage_weights_bad_input(kwargs, exc, match):
    args = dict(cu_seqlens=torch.tensor([0, 4, 6], dtype=torch.int32),
                prompt_lens=torch.tensor([2, 1]), advantages=torch.tensor([1., 2.]),
                seq_weights=torch.tensor([.5, .5]), total_tokens=8)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        token_advantage_weights(args.pop("cu_seqlens"), args.pop("prompt_lens"),
                                args.pop("advantages"), args.pop("seq_weights"), **args)


def test_readme_example_runs(capsys):
    """The example in kernels/README.md's grouped_advantage section runs and prints what it
    says."""
    import pathlib
    import re
    text = (pathlib.Path(__file__).resolve().parents[1] / "kernels" / "README.md").read_text()
    section = text.split("## grouped_advantage\n", 1)[1].split("\n## ", 1)[0]
    code = re.findall(r"```python\n(.*?)```", section, re.S)[-1]
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "tensor([ 0.5000, -1.5000,  0.5000,  0.5000,  0.0000" in out
    assert "torch.Size([130]) 84" in out
