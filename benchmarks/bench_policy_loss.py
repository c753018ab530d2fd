"""policy_loss / token_logprobs: fused kernel vs torch reference vs Liger's fused GRPO loss.

``pytest benchmarks/bench_policy_loss.py --benchmark``
  * on a GPU: Qwen3-4B head shape (H=2560, V=151936, bf16, T in 4096 and 16384); time and peak
    memory of every implementation, and the achieved fraction of the GEMM floors (the floor
    time over the measured time: 3 * 2 T H V FLOPs for fwd+bwd, 2 T H V for token_logprobs, at
    the bf16 matmul rate measured in the same run) and of the roofline of ROOFLINE.md (each
    stage at the larger of its FLOPs / matmul rate and its bytes / copy bandwidth, both
    measured in the run).  Gates at T=16384: fwd+bwd <= 1.25 x the 3-GEMM floor, >= 1.5 x
    faster than Liger, peak extra memory <= 1 GB; token_logprobs <= 1.15 x the 1-GEMM floor.
    Results go to ``benchmarks/results/policy_loss-<device>.json``.
  * on CPU: reduced shapes, timings of the reference and the interpreted kernel, the memory
    model and the roofline at the 4B shape, and a line saying the GPU gates were skipped.
Without ``--benchmark``: a tiny smoke run (seconds) that checks kernel == reference, and that
ROOFLINE.md holds the roofline this file computes.

Peak extra memory is measured from a clean baseline: the gradients of earlier calls are
dropped and the allocator cache emptied before the baseline is read, so nothing freed inside
the measured call is counted in the baseline (which made the gate read up to the size of the
gradients, 0.86 GB at the 4B shape, low); inputs are allocated before it.
"""

import importlib

import pytest
import torch

# The package re-exports the function ``policy_loss``, which shadows the submodule attribute
# of the same name, so the module object is fetched by name.
pl = importlib.import_module("r4b_kernels.policy_loss")
from pathlib import Path

from _harness import copy_gbps, matmul_tflops, peak_extra_memory, record, time_fn

H4B, V4B = 2560, 151936
GB = 1e9
ROOFLINE_MD = Path(__file__).with_name("ROOFLINE.md")
# Gates at T=16384 (the DESIGN.md section 5 shape).
MAX_FWD_BWD_OVER_FLOOR = 1.25  # fused fwd+bwd time / 3-GEMM floor
MAX_FWD_OVER_FLOOR = 1.15  # token_logprobs time / 1-GEMM floor
MIN_LIGER_SPEEDUP = 1.5
MAX_PEAK_EXTRA_BYTES = 1 * GB


def _inputs(T, H, V, dtype, device):
    g = torch.Generator(device=device).manual_seed(1234)
    hidden = torch.randn(T, H, device=device, dtype=dtype, generator=g)
    weight = (torch.randn(V, H, device=device, generator=g) / H ** 0.5).to(dtype)
    targets = torch.randint(0, V, (T,), device=device, generator=g)
    old = torch.randn(T, device=device, generator=g) * 0.1 - 12.0
    ref = old + 0.05 * torch.randn(T, device=device, generator=g)
    adv = torch.randn(T, device=device, generator=g)
    return hidden, weight, targets, old, adv, ref


def _loss_fn(impl, hidden, weight, targets, old, adv, ref):
    """(run, reset, h, W): ``run`` is one fwd+bwd; ``reset`` drops the gradients it left."""
    h = hidden.detach().requires_grad_()
    W = weight.detach().requires_grad_()

    def reset():
        h.grad = None
        W.grad = None

    def run():
        reset()
        out = pl.policy_loss(h, W, targets, old, adv, ref_logprobs=ref, kl_coef=0.04, impl=impl)
        out.loss.backward()
        return out

    return run, reset, h, W


def _liger_fn(hidden, weight, targets, old, adv, ref, seq_len=1024):
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    T, H = hidden.shape
    B = T // seq_len
    mod = LigerFusedLinearGRPOLoss(beta=0.04, use_ref_model=True, loss_type="bnpo", chunk_size=1)
    x = hidden.detach().view(B, seq_len, H).requires_grad_()
    W = weight.detach().requires_grad_()
    mask = torch.ones(B, seq_len, device=hidden.device)
    a = adv.view(B, seq_len)[:, 0].contiguous()

    def reset():
        x.grad = None
        W.grad = None

    def run():
        reset()
        loss, _ = mod(x, W, targets.view(B, seq_len), mask, a, ref_per_token_logps=ref.view(B, seq_len),
                      old_per_token_logps=old.view(B, seq_len))
        loss.backward()

    return run, reset


def memory_model(T=16384, H=H4B, V=V4B, dtype=torch.bfloat16) -> dict:
    """Bytes of the largest temporary of each implementation (inputs and gradients excluded)."""
    C = pl.default_chunk_rows(T, V, dtype, with_grad=True)
    C_fwd = pl.default_chunk_rows(T, V, dtype, with_grad=False)
    return {
        "chunk_rows": C,
        "triton_fwd_bwd_bytes": C * V * (4 + (dtype.itemsize if dtype != torch.float32 else 0)),
        "triton_fwd_only_bytes": C_fwd * V * 4,
        "torch_logits_bytes": T * V * 4,  # one fp32 [T, V]; autograd keeps several such tensors
    }


def _chunk_sizes(T, C):
    return [min(C, T - c0) for c0 in range(0, T, C)]


def roofline(T=16384, H=H4B, V=V4B, dtype=torch.bfloat16) -> dict:
    """FLOPs and bytes of every stage of the fused chunk loop, as the launchers run it.

    ``"fwd_bwd"``: policy_loss forward + backward (gradients for hidden and weight);
    ``"fwd"``: token_logprobs.  Each is ``{"chunk_rows", "chunks", "stages": [...]}`` with, per
    stage, its FLOPs and bytes for one full chunk and summed over the call.  Bytes count every
    read and write of a [C, V] chunk, of W / dW and of H_c; per-row vectors (targets, stats,
    the 8-row output table: under 100 B per row) are left out.  The dW GEMM reads dW from the
    second chunk on (beta=0 on the first).
    """
    e = dtype.itemsize
    dl = e if dtype != torch.float32 else 4  # dlogits in the GEMM dtype
    VH = V * H

    def stages(C, first):
        out = [("logits GEMM  H_c W^T -> fp32", 2 * C * H * V, e * VH + e * C * H + 4 * C * V),
               ("stats kernel (read logits)", 0, 4 * C * V)]
        if first is None:  # forward only
            return out
        return out + [
            ("grad kernel (read logits, write dlogits)", 0, 4 * C * V + dl * C * V),
            ("dH GEMM  dlogits W", 2 * C * H * V, dl * C * V + e * VH + e * C * H),
            ("dW GEMM  dW += dlogits^T H_c", 2 * C * H * V,
             dl * C * V + e * C * H + (1 if first else 2) * e * VH)]

    res = {}
    for name, with_grad in (("fwd_bwd", True), ("fwd", False)):
        C = pl.default_chunk_rows(T, V, dtype, with_grad=with_grad)
        sizes = _chunk_sizes(T, C)
        per_chunk = stages(C, False if with_grad else None)
        totals = [[0, 0] for _ in per_chunk]
        for i, n in enumerate(sizes):
            for j, (_, f, b) in enumerate(stages(n, (i == 0) if with_grad else None)):
                totals[j][0] += f
                totals[j][1] += b
        res[name] = {"chunk_rows": C, "chunks": len(sizes), "stages": [
            {"stage": st, "chunk_flops": f, "chunk_bytes": b, "total_flops": tf, "total_bytes": tb}
            for (st, f, b), (tf, tb) in zip(per_chunk, totals)]}
    return res


def roofline_seconds(model: dict, tflops: float, gbps: float) -> float:
    """Time of a call if every stage ran at the larger of FLOPs / rate and bytes / bandwidth."""
    return sum(max(s["total_flops"] / (tflops * 1e12), s["total_bytes"] / (gbps * 1e9))
               for s in model["stages"])


def roofline_markdown(T=16384, H=H4B, V=V4B, dtype=torch.bfloat16) -> str:
    """The tables of ROOFLINE.md (the smoke test checks that the file holds exactly these)."""
    lines = []
    for name, title in (("fwd_bwd", "policy_loss forward + backward"), ("fwd", "token_logprobs")):
        m = roofline(T, H, V, dtype)[name]
        lines += [f"**{title}** (T={T}, H={H}, V={V}, {str(dtype).split('.')[-1]}): "
                  f"{m['chunks']} chunks of {m['chunk_rows']} rows (last "
                  f"{_chunk_sizes(T, m['chunk_rows'])[-1]})", "",
                  "| stage | GFLOP / chunk | GB / chunk | FLOP / byte | GFLOP / call | GB / call |",
                  "|---|---:|---:|---:|---:|---:|"]
        for s in m["stages"]:
            ai = f"{s['chunk_flops'] / s['chunk_bytes']:.0f}" if s["chunk_flops"] else "-"
            lines.append(f"| {s['stage']} | {s['chunk_flops'] / 1e9:.1f} | {s['chunk_bytes'] / 1e9:.3f} | "
                         f"{ai} | {s['total_flops'] / 1e9:.0f} | {s['total_bytes'] / 1e9:.2f} |")
        tf = sum(s["total_flops"] for s in m["stages"])
        tb = sum(s["total_bytes"] for s in m["stages"])
        cf = sum(s["chunk_flops"] for s in m["stages"])
        cb = sum(s["chunk_bytes"] for s in m["stages"])
        lines += [f"| **total** | {cf / 1e9:.1f} | {cb / 1e9:.3f} | {cf / cb:.0f} | {tf / 1e9:.0f} | "
                  f"{tb / 1e9:.2f} |", ""]
    return "\n".join(lines)


def test_roofline_md_matches_the_model(bench_mode):
    """ROOFLINE.md states the numbers roofline() computes (regenerate it when chunking changes)."""
    if bench_mode:
        pytest.skip("smoke run only without --benchmark")
    text = ROOFLINE_MD.read_text()
    missing = [line for line in roofline_markdown().splitlines() if line and line not in text]
    assert not missing, f"ROOFLINE.md is out of date; regenerate with roofline_markdown():\n{missing}"
    m = roofline()
    assert sum(s["total_flops"] for s in m["fwd_bwd"]["stages"]) == 3 * 2 * 16384 * H4B * V4B
    assert sum(s["total_flops"] for s in m["fwd"]["stages"]) == 2 * 16384 * H4B * V4B


def test_peak_extra_memory_counts_from_a_clean_baseline(monkeypatch, bench_mode):
    """With a simulated allocator: a call that frees the previous call's gradients (G bytes),
    then allocates X bytes of temporaries and G of new gradients must read X + G.  Taking the
    baseline while the old gradients are still held (no reset) reads X: low by G."""
    if bench_mode:
        pytest.skip("smoke run only without --benchmark")
    import _harness as harness

    mem = {"cur": 0, "peak": 0}

    def alloc(n):
        mem["cur"] += n
        mem["peak"] = max(mem["peak"], mem["cur"])

    def reset_peak(*_):
        mem["peak"] = mem["cur"]

    for name, fn in (("synchronize", lambda *_: None), ("empty_cache", lambda *_: None),
                     ("reset_peak_memory_stats", reset_peak),
                     ("memory_allocated", lambda *_: mem["cur"]),
                     ("max_memory_allocated", lambda *_: mem["peak"])):
        monkeypatch.setattr(harness.torch.cuda, name, fn)
    X, G = 500, 860
    grads = []

    def reset():
        while grads:
            alloc(-grads.pop())

    def run():
        reset()
        alloc(X)  # temporaries
        alloc(G)  # the gradients the call returns
        grads.append(G)
        alloc(-X)

    run()  # an earlier call left its gradients allocated
    assert harness.peak_extra_memory(run, "cuda", reset=reset) == X + G
    assert harness.peak_extra_memory(run, "cuda") == X  # the old, falsely passing order


def test_policy_loss_smoke(bench_mode):
    if bench_mode:
        pytest.skip("smoke run only without --benchmark")
    impl = "triton" if pl.HAS_TRITON and (pl.TRITON_INTERPRET or torch.cuda.is_available()) else "torch"
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    hidden, weight, targets, old, adv, ref = _inputs(48, 32, 700, torch.float32, dev)
    run_k, _, hk, Wk = _loss_fn(impl, hidden, weight, targets, old, adv, ref)
    run_r, _, hr, Wr = _loss_fn("torch", hidden, weight, targets, old, adv, ref)
    ok, orf = run_k(), run_r()
    torch.testing.assert_close(ok.loss, orf.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hk.grad, hr.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(Wk.grad, Wr.grad, rtol=1e-4, atol=1e-6)
    mm = memory_model()
    assert mm["triton_fwd_bwd_bytes"] < 1 * GB < mm["torch_logits_bytes"]


def test_policy_loss_cpu_benchmark(bench_mode):
    if not bench_mode:
        pytest.skip("runs under --benchmark")
    if torch.cuda.is_available():
        pytest.skip("GPU present: the gated GPU benchmark runs instead")
    T, H, V = 256, 256, 4096
    hidden, weight, targets, old, adv, ref = _inputs(T, H, V, torch.float32, "cpu")
    run_r, *_ = _loss_fn("torch", hidden, weight, targets, old, adv, ref)
    t_ref = time_fn(run_r, warmup=1, iters=3)
    print(f"\n[policy_loss cpu] T={T} H={H} V={V} fp32: torch reference fwd+bwd {t_ref * 1e3:.1f} ms")
    if pl.HAS_TRITON and pl.TRITON_INTERPRET:
        run_k, *_ = _loss_fn("triton", hidden, weight, targets, old, adv, ref)
        t_k = time_fn(run_k, warmup=1, iters=1)
        print(f"[policy_loss cpu] triton (interpreted) fwd+bwd {t_k * 1e3:.1f} ms "
              "(the interpreter measures correctness, not speed)")
    mm = memory_model()
    rl = roofline()
    for name in ("fwd_bwd", "fwd"):
        f = sum(s["total_flops"] for s in rl[name]["stages"])
        b = sum(s["total_bytes"] for s in rl[name]["stages"])
        print(f"[policy_loss roofline] 4B shape T=16384 {name}: {f / 1e12:.1f} TFLOP, {b / GB:.1f} GB "
              f"moved in {rl[name]['chunks']} chunks of {rl[name]['chunk_rows']} rows (benchmarks/ROOFLINE.md)")
    print(f"[policy_loss memory model] 4B shape T=16384 H={H4B} V={V4B} bf16: fused chunk of "
          f"{mm['chunk_rows']} rows -> largest temporary {mm['triton_fwd_bwd_bytes'] / GB:.3f} GB "
          f"(fwd+bwd), {mm['triton_fwd_only_bytes'] / GB:.3f} GB (token_logprobs); torch reference "
          f"fp32 logits alone {mm['torch_logits_bytes'] / GB:.2f} GB")
    print(f"[policy_loss] GPU gates ({MAX_FWD_BWD_OVER_FLOOR}x 3-GEMM floor, {MIN_LIGER_SPEEDUP}x Liger, "
          f"<= {MAX_PEAK_EXTRA_BYTES / GB:.0f} GB extra, {MAX_FWD_OVER_FLOOR}x 1-GEMM floor for log-probs) "
          "SKIPPED: no CUDA device")


def _gpu_row(T):
    dev, dtype, H, V = "cuda", torch.bfloat16, H4B, V4B
    hidden, weight, targets, old, adv, ref = _inputs(T, H, V, dtype, dev)
    rate = matmul_tflops(T, V, H, dtype=dtype, device=dev)  # TFLOP/s, same device, same run
    bw = copy_gbps(device=dev)  # GB/s, same device, same run
    grad_bytes = hidden.numel() * hidden.element_size() + weight.numel() * weight.element_size()
    rl = roofline(T, H, V, dtype)
    row = {"T": T, "H": H, "V": V, "dtype": "bf16", "matmul_tflops": rate, "copy_gbps": bw,
           "floor_fwd_bwd_s": 3 * 2 * T * H * V / (rate * 1e12),
           "floor_fwd_s": 2 * T * H * V / (rate * 1e12),
           "roofline_fwd_bwd_s": roofline_seconds(rl["fwd_bwd"], rate, bw),
           "roofline_fwd_s": roofline_seconds(rl["fwd"], rate, bw), **memory_model(T, H, V, dtype)}
    run_k, reset_k, *_ = _loss_fn("triton", hidden, weight, targets, old, adv, ref)
    row["triton_fwd_bwd_s"] = time_fn(run_k, device=dev, warmup=2, iters=5)
    # gradients are outputs the caller keeps; "extra" is everything else allocated on the way
    row["triton_peak_extra_bytes"] = peak_extra_memory(run_k, dev, reset=reset_k) - grad_bytes
    fwd = lambda: pl.token_logprobs(hidden, weight, targets, impl="triton")  # noqa: E731
    row["triton_fwd_only_s"] = time_fn(fwd, device=dev, warmup=2, iters=5)
    row["triton_fwd_only_peak_extra_bytes"] = peak_extra_memory(fwd, dev)
    # Achieved fraction of each floor: floor time / measured time (1.0 = at the floor).
    row["fwd_bwd_of_3gemm_floor"] = row["floor_fwd_bwd_s"] / row["triton_fwd_bwd_s"]
    row["fwd_of_1gemm_floor"] = row["floor_fwd_s"] / row["triton_fwd_only_s"]
    row["fwd_bwd_of_roofline"] = row["roofline_fwd_bwd_s"] / row["triton_fwd_bwd_s"]
    row["fwd_of_roofline"] = row["roofline_fwd_s"] / row["triton_fwd_only_s"]
    reset_k()
    for name, make in (("liger", lambda: _liger_fn(hidden, weight, targets, old, adv, ref)),
                       ("torch", lambda: _loss_fn("torch", hidden, weight, targets, old, adv, ref)[:2])):
        reset = None
        try:
            fn, reset = make()
            row[f"{name}_fwd_bwd_s"] = time_fn(fn, device=dev, warmup=1, iters=3)
            row[f"{name}_peak_extra_bytes"] = peak_extra_memory(fn, dev, reset=reset) - grad_bytes
        except torch.cuda.OutOfMemoryError:  # the materialised path needs >= 15 GB here
            row[f"{name}_fwd_bwd_s"] = None
        finally:
            if reset is not None:
                reset()  # its gradients must not sit in the next implementation's baseline
        torch.cuda.empty_cache()
    return row


@pytest.mark.gpu
def test_policy_loss_gpu_gates(bench_mode):
    if not bench_mode:
        pytest.skip("runs under --benchmark")
    rows = [_gpu_row(T) for T in (4096, 16384)]
    path = record("policy_loss", rows)
    for row in rows:
        print(f"\n[policy_loss gpu] {row}")
        print(f"[policy_loss gpu] T={row['T']}: fwd+bwd {row['triton_fwd_bwd_s'] * 1e3:.1f} ms = "
              f"{row['fwd_bwd_of_3gemm_floor']:.0%} of the 3-GEMM floor rate "
              f"({1 / row['fwd_bwd_of_3gemm_floor']:.2f}x the floor), {row['fwd_bwd_of_roofline']:.0%} of "
              f"the roofline; token_logprobs {row['triton_fwd_only_s'] * 1e3:.1f} ms = "
              f"{row['fwd_of_1gemm_floor']:.0%} of the 1-GEMM floor ({1 / row['fwd_of_1gemm_floor']:.2f}x), "
              f"{row['fwd_of_roofline']:.0%} of the roofline; peak extra "
              f"{row['triton_peak_extra_bytes'] / GB:.3f} GB")
    print(f"-> {path}")
    row = rows[-1]  # T=16384: the DESIGN.md section 5 shape
    assert row["triton_fwd_bwd_s"] <= MAX_FWD_BWD_OVER_FLOOR * row["floor_fwd_bwd_s"], row
    assert row["liger_fwd_bwd_s"] is not None and \
        row["liger_fwd_bwd_s"] >= MIN_LIGER_SPEEDUP * row["triton_fwd_bwd_s"], row
    assert row["triton_peak_extra_bytes"] <= MAX_PEAK_EXTRA_BYTES, row
    assert row["triton_fwd_only_s"] <= MAX_FWD_OVER_FLOOR * row["floor_fwd_s"], row
