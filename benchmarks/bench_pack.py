"""Packer benchmarks: C++ vs the NumPy reference on CPU; CUDA pack vs device copy on GPU.

CPU (DESIGN.md section 5): plan + pack of every micro-batch of 8192 bimodal rollouts
(8 ranks, 16384 tokens per micro-batch), C++ (``impl="cpp"``) against the NumPy reference
(``impl="python"``) through the public functions; gate >= 30x under ``--benchmark``.  The smoke
run (no ``--benchmark``) uses 256 sequences and only checks that both agree.

GPU: the fused THD pack (``impl="cuda"``) of 64M tokens against a device-to-device copy of the
same number of bytes (bytes read + written); gate >= 70% of copy bandwidth.
"""

import numpy as np
import pytest
import torch

from r4b import _packing_ref as ref
from r4b import packing as P

from ._harness import record, time_fn

FIELDS = ("input_ids", "position_ids", "labels", "loss_mask", "mode", "advantage", "seq_index",
          "cu_seqlens", "response_rows")


def bimodal(n: int, seed: int = 0):
    """Rollouts of 2g=16 per prompt: half non-thinking (30-200 tokens), half thinking
    (lognormal, clipped to 300-8000); flat token buffer, offsets, prompt lengths, advantages."""
    rng = np.random.default_rng(seed)
    think = (np.arange(n) % 16) < 8
    lens = np.where(think, np.clip(rng.lognormal(7.0, 0.8, n), 300, 8000),
                    rng.integers(30, 201, n)).astype(np.int64)
    off = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lens, out=off[1:])
    tok = rng.integers(0, 151_000, int(off[-1])).astype(np.int64)
    plens = np.minimum(rng.integers(20, 400, n), lens)
    adv = rng.standard_normal(n).astype(np.float32)
    return dict(lens=lens, modes=think.astype(np.int8), groups=np.arange(n) // 16, off=off,
                tok=tok, plens=plens, adv=adv)


def plan_and_pack(b: dict, impl: str, ranks: int = 8, budget: int = 16384):
    p = P.plan_microbatches(b["lens"], num_ranks=ranks, tokens_per_microbatch=budget,
                            group_ids=b["groups"], modes=b["modes"], impl=impl)
    packs = [P.pack_microbatch(b["tok"], b["off"], b["plens"], mb, modes=b["modes"],
                               advantages=b["adv"], impl=impl)
             for rank in p.microbatches for mb in rank]
    return p, packs


def core_plan_and_pack(b: dict, impl: str, ranks: int = 8, budget: int = 16384):
    """The same work on the implementations themselves (NumPy in, NumPy out, no torch)."""
    plan, pack = (P._C.plan, P._C.pack) if impl == "cpp" else (ref.plan, ref.pack)
    n = b["lens"].size
    out = plan(b["lens"], ranks, budget, b["groups"], b["modes"], 0, 0, False, 1)
    order = np.lexsort((np.arange(n), out["microbatch_of"], out["rank_of"]))
    key = out["rank_of"][order].astype(np.int64) * n + out["microbatch_of"][order]
    return [pack(b["tok"], b["off"], b["plens"], mb, b["modes"], b["adv"], 1, 0)
            for mb in np.split(order, np.flatnonzero(np.diff(key)) + 1)]


@pytest.mark.skipif(not P.HAS_R4B_C, reason="r4b._C is not built")
def test_pack_cpu_cpp_vs_reference(bench_mode, capsys):
    n = 8192 if bench_mode else 256
    b = bimodal(n)
    pc, kc = plan_and_pack(b, "cpp")
    pp, kp = plan_and_pack(b, "python")
    assert np.array_equal(pc.rank_of, pp.rank_of) and np.array_equal(pc.microbatch_of, pp.microbatch_of)
    assert len(kc) == len(kp)
    for x, y in zip(kc, kp):
        for f in FIELDS:
            assert torch.equal(getattr(x, f), getattr(y, f)), f
    assert pc.imbalance <= 1.02
    if not bench_mode:
        return
    iters = 5
    t_cpp = time_fn(lambda: plan_and_pack(b, "cpp"), warmup=1, iters=iters)
    t_py = time_fn(lambda: plan_and_pack(b, "python"), warmup=1, iters=iters)
    t_cpp_core = time_fn(lambda: core_plan_and_pack(b, "cpp"), warmup=1, iters=iters)
    t_py_core = time_fn(lambda: core_plan_and_pack(b, "python"), warmup=1, iters=iters)
    t_plan_cpp = time_fn(lambda: P.plan_microbatches(b["lens"], num_ranks=8, tokens_per_microbatch=16384,
                                                     group_ids=b["groups"], modes=b["modes"], impl="cpp"),
                         warmup=1, iters=iters)
    t_plan_py = time_fn(lambda: P.plan_microbatches(b["lens"], num_ranks=8, tokens_per_microbatch=16384,
                                                    group_ids=b["groups"], modes=b["modes"], impl="python"),
                        warmup=1, iters=iters)
    rows = [{"what": "plan+pack, public API", "sequences": n, "tokens": int(b["off"][-1]),
             "microbatches": len(kc), "cpp_s": t_cpp, "python_s": t_py, "speedup": t_py / t_cpp},
            {"what": "plan+pack, implementations only", "sequences": n, "cpp_s": t_cpp_core,
             "python_s": t_py_core, "speedup": t_py_core / t_cpp_core},
            {"what": "plan only", "sequences": n, "cpp_s": t_plan_cpp, "python_s": t_plan_py,
             "speedup": t_plan_py / t_plan_cpp},
            {"what": "balance", "imbalance_tokens": pc.imbalance}]
    path = record("pack", rows)
    with capsys.disabled():
        for r in rows:
            print(f"\n[bench_pack] {r}")
        print(f"[bench_pack] recorded {path}")
    speedup = t_py / t_cpp
    assert speedup >= 30.0, (f"C++ packer is {speedup:.1f}x the NumPy reference on {n} sequences "
                             f"(plan+pack), below the 30x bar")


@pytest.mark.gpu
@pytest.mark.skipif(not P.HAS_R4B_CUDA, reason="r4b._C_cuda is not built")
def test_pack_cuda_vs_device_copy(bench_mode, capsys):
    tokens = (64 << 20) if bench_mode else (1 << 20)
    rng = np.random.default_rng(0)
    lens = np.clip(rng.lognormal(6.5, 1.0, tokens // 300), 30, 8000).astype(np.int64)
    lens = lens[np.cumsum(lens) <= tokens]
    off = np.zeros(lens.size + 1, dtype=np.int64)
    np.cumsum(lens, out=off[1:])
    plens = np.minimum(rng.integers(20, 400, lens.size), lens)
    adv = rng.standard_normal(lens.size).astype(np.float32)
    modes = (rng.random(lens.size) < 0.5).astype(np.int8)
    tok = torch.randint(0, 151_000, (int(off[-1]),), device="cuda")
    sel = np.arange(lens.size)
    pack = lambda: P.pack_microbatch(tok, off, plens, sel, modes=modes, advantages=adv,  # noqa: E731
                                     impl="cuda")
    pb = pack()
    if not bench_mode:  # smoke: agreement with the CPU path
        cpu = P.pack_microbatch(tok.cpu(), off, plens, sel, modes=modes, advantages=adv,
                                impl="python")
        for f in FIELDS:
            assert torch.equal(getattr(pb, f).cpu(), getattr(cpu, f)), f
        return
    rows_n, resp_n = pb.num_rows, int(pb.response_rows.numel())
    # Kernel only: metadata prepared once, as a trainer reusing a plan would.
    meta = torch.from_numpy(np.concatenate([off[:-1], lens, plens,
                                            np.concatenate([[0], np.cumsum(lens - plens)])])).cuda()
    k = lens.size
    mode_k, adv_k = torch.from_numpy(modes).cuda(), torch.from_numpy(adv).cuda()
    stream = torch.cuda.current_stream().cuda_stream
    o = pb

    def kernel():
        P._C_cuda.pack_rows(
            tok.data_ptr(), 8, meta.data_ptr(), meta[k:].data_ptr(), meta[2 * k:].data_ptr(),
            mode_k.data_ptr(), adv_k.data_ptr(), o.cu_seqlens.data_ptr(), meta[3 * k:].data_ptr(),
            k, rows_n, 0, o.input_ids.data_ptr(), o.position_ids.data_ptr(), o.labels.data_ptr(),
            o.loss_mask.data_ptr(), o.mode.data_ptr(), o.advantage.data_ptr(),
            o.seq_index.data_ptr(), o.response_rows.data_ptr(), resp_n, stream)

    moved = rows_n * (8 + 8 + 8 + 8 + 1 + 1 + 4 + 4) + resp_n * 8  # read ids; write 7 columns
    src = torch.empty(moved // 2, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t_copy = time_fn(lambda: dst.copy_(src), device="cuda", warmup=3, iters=20)
    t_kernel = time_fn(kernel, device="cuda", warmup=3, iters=20)
    t_e2e = time_fn(pack, device="cuda", warmup=2, iters=5)
    idx = torch.arange(rows_n, device="cuda")
    t_gather = time_fn(lambda: P.gather_rows(tok, idx, impl="cuda"), device="cuda", warmup=3, iters=20)
    src2 = torch.empty(rows_n * 8, dtype=torch.uint8, device="cuda")
    dst2 = torch.empty_like(src2)
    t_copy2 = time_fn(lambda: dst2.copy_(src2), device="cuda", warmup=3, iters=20)
    rows = [{"what": "fused THD pack vs d2d copy", "tokens": rows_n, "bytes": moved,
             "pack_s": t_kernel, "copy_s": t_copy, "fraction_of_copy_bw": t_copy / t_kernel,
             "pack_end_to_end_s": t_e2e},
            {"what": "gather_rows int64 vs d2d copy", "tokens": rows_n, "gather_s": t_gather,
             "copy_s": t_copy2, "fraction_of_copy_bw": t_copy2 / t_gather}]
    path = record("pack", rows)
    with capsys.disabled():
        for r in rows:
            print(f"\n[bench_pack] {r}")
        print(f"[bench_pack] recorded {path}")
    assert t_copy / t_kernel >= 0.7, rows[0]
