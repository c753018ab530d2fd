"""prefix_shared_attention: one shared prompt per group vs the dense path ([P; R_i] each its own
causal sequence, the prompt repeated per response).

``pytest benchmarks/bench_prefix_attention.py --benchmark``
  * on CPU: ``impl="torch"`` at Hq=8, Hk=2, D=64, a 512-token prompt with 8 responses
    alternating 200 and 40 tokens, fp32 (the Triton interpreter measures correctness, not
    speed, so it is not timed);
  * on a GPU: the Qwen3-4B attention shape in bf16 (Hq=32, Hk=8, D=128; prompts of 1485 and
    4725 tokens, 8 responses alternating 400 and 80), every implementation that runs there:
    ``triton``, ``flash`` (when flash-attn is installed) and ``torch``.
  Each row: forward + backward time (median) of the shared layout and of the dense path with
  the same implementation, the attention FLOPs counted from the masks (visible query/key
  pairs; forward 4 * pairs * D * Hq, backward 2.5x that), the bytes of the K/V tensors each
  layout holds, the K/V bytes the Triton forward's block schedule loads (vs the same kernel
  run causally over the dense sequences), and on a GPU the peak memory above the inputs.
  Results go to ``benchmarks/results/prefix-attention-<device>.json``.  No gates.
Without ``--benchmark``: a seconds-long smoke run that checks the shared and the dense paths
agree and that the FLOP count equals the masks' sums.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from _harness import peak_extra_memory, record, time_fn

pa = importlib.import_module("r4b_kernels.prefix_attention")
PrefixLayout = pa.PrefixLayout

CPU_SHAPE = dict(prompt=512, responses=[200, 40] * 4, hq=8, hk=2, d=64, dtype=torch.float32)
GPU_SHAPES = [dict(prompt=p, responses=[400, 80] * 4, hq=32, hk=8, d=128, dtype=torch.bfloat16)
              for p in (1485, 4725)]


def layouts(prompt: int, responses: list[int]) -> tuple[PrefixLayout, PrefixLayout]:
    """(shared, dense): one unit [P; R_1; ...; R_n], and n causal units [P; R_i]."""
    shared = PrefixLayout.build([prompt], [responses])
    dense = PrefixLayout.build([prompt + n for n in responses], [[] for _ in responses])
    return shared, dense


def visible_pairs(layout: PrefixLayout) -> int:
    """Query/key pairs the layout's masks let attend (summed over the units)."""
    return sum(int(layout.mask(u).sum()) for u in range(layout.num_units))


def attention_flops(layout: PrefixLayout, hq: int, d: int) -> dict:
    """Forward (QK^T and PV: 2 * 2 * pairs * D per head) and backward (2.5x: S recomputed,
    dV, dP, dQ, dK) FLOPs of the visible pairs only."""
    fwd = 4 * visible_pairs(layout) * d * hq
    return {"fwd_flops": fwd, "bwd_flops": int(2.5 * fwd), "fwd_bwd_flops": fwd + int(2.5 * fwd)}


def kv_bytes_loaded_fwd(layout: PrefixLayout, hq: int, d: int, elem: int, tiles) -> int:
    """K/V bytes the Triton forward loads: per query block and query head, the key rows of
    its two loops (whole tiles, as the kernel loads them), times K and V, D and the element
    size."""
    rows = 0
    bm, bn = tiles.fwd_m, tiles.fwd_n
    for u in range(layout.num_units):
        L, p = layout.unit_len(u), layout.prefix_lens_host[u]
        seg = layout._seg_start_host(u)
        for m0 in range(0, L, bm):
            m1 = min(m0 + bm, L)
            rows += math.ceil(min(p, m1) / bn) * bn
            lo2 = max(p, int(seg[m0]))
            rows += math.ceil(max(m1 - lo2, 0) / bn) * bn
    return rows * hq * 2 * d * elem


def _inputs(layout: PrefixLayout, hq, hk, d, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    T = layout.num_tokens
    q, k, v = (torch.randn(T, h, d, generator=g, device=device).to(dtype) for h in (hq, hk, hk))
    dout = torch.randn(T, hq, d, generator=g, device=device).to(dtype)
    return q, k, v, dout


def _case(layout, impl, hq, hk, d, dtype, device):
    """(run, reset): ``run`` is one forward + backward; ``reset`` drops its gradients."""
    q, k, v, dout = _inputs(layout, hq, hk, d, dtype, device)
    q, k, v = (t.requires_grad_() for t in (q, k, v))

    def reset():
        for t in (q, k, v):
            t.grad = None

    def run():
        reset()
        out = pa.prefix_shared_attention(q, k, v, layout, impl=impl)
        out.backward(dout)
        return out

    return run, reset


def _runnable(impl: str, device: str, dtype) -> bool:
    if impl == "torch":
        return True
    if device != "cuda":
        return False
    if impl == "flash":
        return dtype in (torch.float16, torch.bfloat16) and pa._flash_available()
    return pa.HAS_TRITON_GPU


def measure(shape: dict, impls, device: str, *, warmup: int, iters: int) -> list[dict]:
    """One row per implementation: shared and dense fwd+bwd times and the cost model."""
    prompt, responses = shape["prompt"], shape["responses"]
    hq, hk, d, dtype = shape["hq"], shape["hk"], shape["d"], shape["dtype"]
    shared, dense = layouts(prompt, responses)
    elem = torch.empty(0, dtype=dtype).element_size()
    gpu_tiles = pa.prefix_attention_tiles(d, dtype, interpret=False)
    base = {"prompt": prompt, "responses": responses, "Hq": hq, "Hk": hk, "D": d,
            "dtype": str(dtype).split(".")[-1], "tokens_shared": shared.num_tokens,
            "tokens_dense": dense.num_tokens}
    for name, lay in (("shared", shared), ("dense", dense)):
        for key, val in attention_flops(lay, hq, d).items():
            base[f"{name}_{key}"] = val
        base[f"{name}_kv_tensor_bytes"] = lay.num_tokens * hk * 2 * d * elem
        base[f"{name}_kv_bytes_loaded_fwd_triton"] = kv_bytes_loaded_fwd(lay, hq, d, elem, gpu_tiles)
    base["triton_fwd_tiles"] = [gpu_tiles.fwd_m, gpu_tiles.fwd_n]
    rows = []
    for impl in impls:
        if not _runnable(impl, device, dtype):
            continue
        row = dict(base, impl=impl, device=device)
        for name, lay in (("shared", shared), ("dense", dense)):
            dev_lay = lay.to(device)
            run, reset = _case(dev_lay, impl, hq, hk, d, dtype, device)
            try:
                row[f"{name}_fwd_bwd_s"] = time_fn(run, device=device, warmup=warmup, iters=iters)
                if device == "cuda":
                    grads = (2 * hk + hq) * lay.num_tokens * d * elem
                    row[f"{name}_peak_extra_bytes"] = peak_extra_memory(run, device, reset=reset) - grads
                row[f"{name}_tflops"] = row[f"{name}_fwd_bwd_flops"] / row[f"{name}_fwd_bwd_s"] / 1e12
            except torch.cuda.OutOfMemoryError:
                row[f"{name}_fwd_bwd_s"] = None
            finally:
                reset()
            if device == "cuda":
                torch.cuda.empty_cache()
        if row.get("shared_fwd_bwd_s") and row.get("dense_fwd_bwd_s"):
            row["speedup_shared_over_dense"] = row["dense_fwd_bwd_s"] / row["shared_fwd_bwd_s"]
        rows.append(row)
    return rows


def _print(rows, tag):
    for r in rows:
        s, dn = r.get("shared_fwd_bwd_s"), r.get("dense_fwd_bwd_s")
        print(f"\n[prefix_attention {tag}] {r['impl']:>6s} p={r['prompt']} responses={r['responses']} "
              f"Hq={r['Hq']} Hk={r['Hk']} D={r['D']} {r['dtype']}: fwd+bwd shared "
              f"{s * 1e3 if s else float('nan'):.1f} ms vs dense {dn * 1e3 if dn else float('nan'):.1f} ms "
              f"({r.get('speedup_shared_over_dense', float('nan')):.2f}x); mask FLOPs "
              f"{r['shared_fwd_bwd_flops'] / 1e9:.1f} vs {r['dense_fwd_bwd_flops'] / 1e9:.1f} GFLOP; "
              f"K/V tensors {r['shared_kv_tensor_bytes'] / 2**20:.1f} vs "
              f"{r['dense_kv_tensor_bytes'] / 2**20:.1f} MiB; Triton fwd K/V loads "
              f"{r['shared_kv_bytes_loaded_fwd_triton'] / 2**20:.0f} vs "
              f"{r['dense_kv_bytes_loaded_fwd_triton'] / 2**20:.0f} MiB")


def test_prefix_attention_smoke(bench_mode):
    if bench_mode:
        pytest.skip("smoke run only without --benchmark")
    prompt, responses, hq, hk, d = 20, [9, 3, 14], 4, 2, 16
    shared, dense = layouts(prompt, responses)
    # pairs from the masks equal the closed form
    pairs = prompt * (prompt + 1) // 2 + sum(n * prompt + n * (n + 1) // 2 for n in responses)
    assert visible_pairs(shared) == pairs
    assert visible_pairs(dense) == sum((prompt + n) * (prompt + n + 1) // 2 for n in responses)
    impl = "triton" if pa.HAS_TRITON and (pa.TRITON_INTERPRET or torch.cuda.is_available()) else "torch"
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    qs, ks, vs, _ = _inputs(shared, hq, hk, d, torch.float32, dev, seed=1)
    # the dense inputs hold the shared ones: P copied before every response
    rows, start = [], prompt
    for n in responses:
        rows += list(range(prompt)) + list(range(start, start + n))
        start += n
    idx = torch.tensor(rows, device=dev)
    out_s = pa.prefix_shared_attention(qs, ks, vs, shared.to(dev), impl=impl)
    out_d = pa.prefix_shared_attention(qs[idx], ks[idx], vs[idx], dense.to(dev), impl=impl)
    torch.testing.assert_close(out_d, out_s[idx], rtol=1e-4, atol=1e-5)
    for run, _ in (_case(shared.to(dev), impl, hq, hk, d, torch.float32, dev),
                   _case(dense.to(dev), impl, hq, hk, d, torch.float32, dev)):
        run()


def test_prefix_attention_cpu_benchmark(bench_mode):
    if not bench_mode:
        pytest.skip("runs under --benchmark")
    if torch.cuda.is_available():
        pytest.skip("GPU present: the GPU benchmark runs instead")
    rows = measure(CPU_SHAPE, ("torch",), "cpu", warmup=1, iters=5)
    path = record("prefix-attention", rows)
    _print(rows, "cpu")
    print(f"[prefix_attention cpu] torch reference only (the Triton interpreter is not timed); "
          f"GPU rows (triton / flash, Qwen3-4B shape) come from a CUDA run -> {path}")


@pytest.mark.gpu
def test_prefix_attention_gpu_benchmark(bench_mode):
    if not bench_mode:
        pytest.skip("runs under --benchmark")
    rows = []
    for shape in GPU_SHAPES:
        rows += measure(shape, ("triton", "flash", "torch"), "cuda", warmup=2, iters=10)
    path = record("prefix-attention", rows)
    _print(rows, "gpu")
    print(f"-> {path}")
