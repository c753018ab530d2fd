"""grouped_advantage and token_advantage_weights: Triton kernel vs PyTorch reference.

Shapes: N rollouts in groups of 16 (8 think + 8 no-think), ids shuffled; packed micro-batches of
T tokens.  ``pytest benchmarks/bench_grouped_advantage.py --benchmark`` on a GPU times both
implementations at N in {4096, 65536} and T in {16384, 65536}, records the results in
``benchmarks/results/`` and gates "the kernel is not slower than the reference" at the largest
shape.  On CPU (Triton interpreter) it times reduced shapes and reports the gate as not
evaluated.  Without ``--benchmark``: tiny shapes, one iteration, results checked only.
"""

from __future__ import annotations

import pytest
import torch

import r4b_kernels
from r4b_kernels import grouped_advantage, token_advantage_weights

from _harness import peak_extra_memory, record, time_fn

GROUP = 16  # 8 think + 8 no-think rollouts per prompt


def make_rollouts(n: int, device):
    g = torch.randperm(n // GROUP, device=device).repeat_interleave(GROUP) * 7919 + 11
    modes = torch.arange(n, device=device).remainder(2).to(torch.int8)  # 0/1 alternate
    rewards = (torch.rand(n, device=device) < 0.4).float()
    perm = torch.randperm(n, device=device)
    return rewards[perm], g[perm], modes[perm]


def make_packed(t: int, device):
    """Sequences of 64..2047 tokens filling ~95% of t rows (the rest is padding)."""
    lens, used = [], 0
    while True:
        length = int(torch.randint(64, 2048, ()))
        if used + length > int(0.95 * t):
            break
        lens.append(length)
        used += length
    lens = lens or [max(2, t // 2)]
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lens).cumsum(0)
    prompt = torch.tensor([int(torch.randint(1, min(L, 512) + 1, ())) for L in lens])
    n = len(lens)
    return (cu.to(device), prompt.to(device), torch.randn(n, device=device),
            torch.rand(n, device=device))


def run(device: str, n_list, t_list, *, warmup: int, iters: int) -> list[dict]:
    """Check agreement, then time both implementations on every shape; returns result rows."""
    rows = []
    for n in n_list:
        r, g, m = make_rollouts(n, device)

        def call(impl):
            return grouped_advantage(r, g, m, impl=impl)

        a, b = call("triton"), call("torch")
        torch.testing.assert_close(a.advantages, b.advantages, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.mode_mean, b.mode_mean, rtol=1e-5, atol=1e-5, equal_nan=True)
        assert torch.equal(a.inverse, b.inverse) and torch.equal(a.zero_variance, b.zero_variance)
        row = {"op": "grouped_advantage", "N": n, "group_size": GROUP}
        for impl in ("triton", "torch"):
            row[f"{impl}_ms"] = 1e3 * time_fn(lambda: call(impl), device=device, warmup=warmup,
                                              iters=iters)
            if device == "cuda":
                row[f"{impl}_peak_extra_MiB"] = peak_extra_memory(lambda: call(impl)) / 2**20
        rows.append(row)
    for t in t_list:
        cu, prompt, adv, w = make_packed(t, device)

        def call(impl):
            return token_advantage_weights(cu, prompt, adv, w, total_tokens=t, impl=impl)

        (ka, kw), (ra, rw) = call("triton"), call("torch")
        assert torch.equal(ka, ra) and torch.equal(kw, rw)
        row = {"op": "token_advantage_weights", "T": t, "sequences": int(prompt.shape[0])}
        for impl in ("triton", "torch"):
            row[f"{impl}_ms"] = 1e3 * time_fn(lambda: call(impl), device=device, warmup=warmup,
                                              iters=iters)
            if device == "cuda":
                row[f"{impl}_peak_extra_MiB"] = peak_extra_memory(lambda: call(impl)) / 2**20
        rows.append(row)
    for row in rows:
        print(row)
    return rows


def test_bench_grouped_advantage(bench_mode):
    """Smoke run everywhere; under --benchmark on CPU, reduced shapes timed (no gate)."""
    if r4b_kernels.HAS_TRITON_GPU:
        if bench_mode:
            pytest.skip("on CUDA under --benchmark, test_bench_grouped_advantage_gpu measures")
        run("cuda", [64], [256], warmup=0, iters=1)
        return
    if not r4b_kernels.TRITON_INTERPRET:
        pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1")
    if not bench_mode:
        run("cpu", [64], [256], warmup=0, iters=1)
        return
    run("cpu", [1024], [4096], warmup=1, iters=3)
    print("grouped_advantage: CPU run (Triton interpreter) at reduced shapes; the GPU gate "
          "(kernel not slower than the reference at N=65536, T=65536) was NOT evaluated.")


@pytest.mark.gpu
def test_bench_grouped_advantage_gpu(bench_mode):
    """GPU: full shapes, recorded; the kernel must not be slower than the reference."""
    if not bench_mode:
        pytest.skip("timed only under --benchmark (the smoke run covers correctness)")
    rows = run("cuda", [4096, 65536], [16384, 65536], warmup=5, iters=20)
    path = record("grouped_advantage", rows)
    print(f"recorded {path}")
    for op, key in (("grouped_advantage", "N"), ("token_advantage_weights", "T")):
        big = max((r for r in rows if r["op"] == op), key=lambda r: r[key])
        assert big["triton_ms"] <= big["torch_ms"], (
            f"{op} at {key}={big[key]}: triton {big['triton_ms']:.3f} ms is slower than the "
            f"torch reference {big['torch_ms']:.3f} ms")
