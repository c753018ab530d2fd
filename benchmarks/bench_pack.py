"""Packer benchmarks: C++ vs the pure-Python and NumPy references on CPU; CUDA pack vs copy on GPU.

CPU (DESIGN.md section 5): plan + pack of every micro-batch of 8192 bimodal rollouts
(8 ranks, 16384 tokens per micro-batch) through the public functions, as a trainer calls them
(``plan_microbatches``, then ``pack_microbatches`` per rank).  Gate under ``--benchmark``: the
C++ packer (``impl="cpp"``) >= 30x the pure-Python reference (``impl="python"``).  Also recorded,
without a gate: the vectorised NumPy fallback (``impl="numpy"``), one ``pack_microbatch`` call
per micro-batch, and the plan alone.  The smoke run (no ``--benchmark``) uses 256 sequences and
only checks that the three implementations agree.

GPU: the fused THD pack (``impl="cuda"``) of 64M tokens against a device-to-device copy of the
same number of bytes (bytes read + written); gate >= 70% of copy bandwidth.

Prefix-shared group units (``r4b.packing.groups``, the BPO default ``--rl.share_prefix``): a
BPO batch of 512 rollouts in groups of 16 (8 forced thinking, 8 forced non-thinking), prompts of
about 1,500 tokens (an image's 1,485 placeholders and a question) that differ after the shared
part by their forced mode prefix, responses of 80-400 (non-thinking) and 300-8000 (thinking)
tokens, 16,384 tokens per micro-batch.  Recorded for C++, NumPy and pure Python: the public
``group_units`` + ``pack_groups`` of every micro-batch from token lists (as the trainer calls
them, each call flattening the lists), the same from one ``FlatTokens`` flattening, and the
cores alone on flat buffers.  No gate; the smoke run checks that the three
implementations agree on a batch of 64.

Each case replaces its own rows in ``benchmarks/results/pack-<device>.json`` and keeps the
others (carried-over rows keep the date they were measured under ``measured``).
"""

import json

import numpy as np
import pytest
import torch

from r4b.packing import groups as G
from r4b.packing import thd as P
from r4b.packing.microbatch import plan as plan_units

from _harness import RESULTS_DIR, environment, record, time_fn

FIELDS = ("input_ids", "position_ids", "labels", "loss_mask", "mode", "advantage", "seq_index",
          "cu_seqlens", "response_rows")


def record_rows(rows: list[dict]):
    """``record("pack", rows)``, keeping the rows of the other cases already in the file."""
    env = environment()
    dev = "".join(c if c.isalnum() else "_" for c in env["device"]).strip("_").lower() or "cpu"
    path = RESULTS_DIR / f"pack-{dev}.json"
    old = json.loads(path.read_text()) if path.exists() else {"results": []}
    mine = {r["what"] for r in rows}
    when = old.get("environment", {}).get("date")
    kept = [{**r, "measured": r.get("measured", when)} for r in old["results"]
            if r["what"] not in mine]
    return record("pack", kept + rows)


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


def plan_and_pack(b: dict, impl: str, ranks: int = 8, budget: int = 16384, batched: bool = True):
    """Plan, then pack every rank's micro-batches (one call per rank, or one per micro-batch)."""
    p = P.plan_microbatches(b["lens"], num_ranks=ranks, tokens_per_microbatch=budget,
                            group_ids=b["groups"], modes=b["modes"], impl=impl)
    kw = dict(modes=b["modes"], advantages=b["adv"], impl=impl)
    if batched:
        packs = [pb for rank in p.microbatches
                 for pb in P.pack_microbatches(b["tok"], b["off"], b["plens"], rank, **kw)]
    else:
        packs = [P.pack_microbatch(b["tok"], b["off"], b["plens"], mb, **kw)
                 for rank in p.microbatches for mb in rank]
    return p, packs


def plan_only(b: dict, impl: str):
    return P.plan_microbatches(b["lens"], num_ranks=8, tokens_per_microbatch=16384,
                               group_ids=b["groups"], modes=b["modes"], impl=impl)


@pytest.mark.skipif(not P.HAS_R4B_C, reason="r4b._C is not built")
def test_pack_cpu_cpp_vs_reference(bench_mode, capsys):
    n = 8192 if bench_mode else 256
    b = bimodal(n)
    pc, kc = plan_and_pack(b, "cpp")
    for impl in ("numpy", "python"):
        pp, kp = plan_and_pack(b, impl)
        assert np.array_equal(pc.rank_of, pp.rank_of), impl
        assert np.array_equal(pc.microbatch_of, pp.microbatch_of), impl
        assert len(kc) == len(kp)
        for x, y in zip(kc, kp):
            for f in FIELDS:
                assert torch.equal(getattr(x, f), getattr(y, f)), (impl, f)
    assert pc.imbalance <= 1.02
    if not bench_mode:
        return
    t = {}
    for impl, iters in (("cpp", 9), ("numpy", 5), ("python", 3)):
        t[impl] = time_fn(lambda: plan_and_pack(b, impl), warmup=1, iters=iters)
        t[impl, "per-call"] = time_fn(lambda: plan_and_pack(b, impl, batched=False), warmup=1,
                                      iters=iters)
        t[impl, "plan"] = time_fn(lambda: plan_only(b, impl), warmup=1, iters=iters)
    common = {"sequences": n, "tokens": int(b["off"][-1]), "microbatches": len(kc)}
    rows = [{"what": "plan+pack (pack_microbatches per rank)", **common,
             **{f"{i}_s": t[i] for i in ("cpp", "numpy", "python")},
             "speedup_vs_python": t["python"] / t["cpp"], "speedup_vs_numpy": t["numpy"] / t["cpp"]},
            {"what": "plan+pack (pack_microbatch per micro-batch)", **common,
             **{f"{i}_s": t[i, "per-call"] for i in ("cpp", "numpy", "python")},
             "speedup_vs_python": t["python", "per-call"] / t["cpp", "per-call"],
             "speedup_vs_numpy": t["numpy", "per-call"] / t["cpp", "per-call"]},
            {"what": "plan only", "sequences": n,
             **{f"{i}_s": t[i, "plan"] for i in ("cpp", "numpy", "python")},
             "speedup_vs_python": t["python", "plan"] / t["cpp", "plan"],
             "speedup_vs_numpy": t["numpy", "plan"] / t["cpp", "plan"]},
            {"what": "balance", "imbalance_tokens": pc.imbalance}]
    path = record_rows(rows)
    with capsys.disabled():
        for r in rows:
            print(f"\n[bench_pack] {r}")
        print(f"[bench_pack] recorded {path}")
    speedup = rows[0]["speedup_vs_python"]
    assert speedup >= 30.0, (f"C++ packer is {speedup:.1f}x the pure-Python reference on {n} "
                             f"sequences (plan+pack), below the 30x bar")


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
                                impl="numpy")
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
    path = record_rows(rows)
    with capsys.disabled():
        for r in rows:
            print(f"\n[bench_pack] {r}")
        print(f"[bench_pack] recorded {path}")
    assert t_copy / t_kernel >= 0.7, rows[0]


# ---------------------------------------------------------------- prefix-shared group units
IMAGE_TOKEN, THINK, NO_THINK = 151_655, [151_667, 198], [151_667, 271, 151_668, 271]


def bpo_groups(n: int, group: int = 16, image_tokens: int = 1485, seed: int = 0):
    """Token lists, prompt lengths, group ids and images of a BPO batch: per group one image
    (1,485 placeholders) and a 10-40 token question, then the forced mode prefix (the first
    half of the group thinking); responses 80-400 tokens without thinking, lognormal
    300-8000 with."""
    rng = np.random.default_rng(seed)
    toks, plens, gids, ims = [], [], [], []
    for g in range(n // group):
        head = rng.integers(0, 150_000, 10).tolist()
        question = rng.integers(0, 150_000, int(rng.integers(10, 41))).tolist()
        prompt = head + [IMAGE_TOKEN] * image_tokens + question
        image = [torch.rand(3, 8, 8)]  # the group's image (content is not what is timed)
        for i in range(group):
            think = i < group // 2
            p = prompt + (THINK if think else NO_THINK)
            R = (int(np.clip(rng.lognormal(7.0, 0.8), 300, 8000)) if think
                 else int(rng.integers(80, 401)))
            toks.append(p + rng.integers(0, 150_000, R).tolist())
            plens.append(len(p))
            gids.append(g)
            ims.append(image)
    return toks, plens, gids, ims


def shared_pack(b, impl: str, budget: int = 16384, flatten_once: bool = False):
    """What the trainer runs with --rl.share_prefix: units, the plan over them, the pack (from
    the token lists, or from one ``FlatTokens`` built here and given to both calls)."""
    toks, plens, gids, ims = b
    if flatten_once:
        toks = G.FlatTokens.of(toks)
    units, stats = G.group_units(toks, plens, gids, ims, budget=budget,
                                 image_token_id=IMAGE_TOKEN, impl=impl)
    mbs, _ = plan_units([u.length for u in units], dp_rank=0, dp_size=1,
                        tokens_per_microbatch=budget)
    return units, stats, mbs, G.pack_groups(toks, plens, ims, units, mbs, impl=impl)


def _core_inputs(b, units, mbs):
    toks, plens, gids, ims = b
    flat, off = P.flatten_sequences(toks)
    cls = G.image_classes(ims, gids)
    uoff = np.concatenate([[0], np.cumsum([len(u.seqs) for u in units])]).astype(np.int64)
    useqs = np.array([j for u in units for j in u.seqs], dtype=np.int64)
    ushared = np.array([u.shared for u in units], dtype=np.int64)
    sel = np.concatenate([np.asarray(m, dtype=np.int64) for m in mbs])
    bounds = np.concatenate([[0], np.cumsum([len(m) for m in mbs])]).astype(np.int64)
    return (flat, off, np.asarray(plens, dtype=np.int64), np.asarray(gids, dtype=np.int64), cls,
            useqs, uoff, ushared, sel, bounds)


@pytest.mark.skipif(not P.HAS_R4B_C_GROUPS, reason="r4b._C lacks the group functions")
def test_group_units_cpu_cpp_vs_reference(bench_mode, capsys):
    n = 512 if bench_mode else 64
    b = bpo_groups(n, image_tokens=1485 if bench_mode else 40)
    units, stats, mbs, packed = shared_pack(b, "cpp")
    for impl in ("numpy", "python"):
        u2, s2, m2, p2 = shared_pack(b, impl)
        assert u2 == units and s2 == stats and m2 == mbs, impl
        for x, y in zip(packed, p2):
            for f in ("input_ids", "position_ids", "cu_seqlens", "rows", "row_targets",
                      "row_seq", "row_token"):
                assert torch.equal(getattr(x, f), getattr(y, f)), (impl, f)
            assert x.seqs == y.seqs
    assert stats["shared_tokens"] < stats["dense_tokens"]
    if not bench_mode:
        return
    flat, off, pl, gid, cls, useqs, uoff, ushared, sel, bounds = _core_inputs(b, units, mbs)
    t = {}
    for impl, iters in (("cpp", 7), ("numpy", 5), ("python", 3)):
        m = P._host_impl(impl)
        t[impl, "public"] = time_fn(lambda: shared_pack(b, impl), warmup=1, iters=iters)
        t[impl, "once"] = time_fn(lambda: shared_pack(b, impl, flatten_once=True), warmup=1,
                                  iters=iters)
        t[impl, "units"] = time_fn(lambda: m.group_units(flat, off, pl, gid, cls, 16384,
                                                         image_token_id=IMAGE_TOKEN),
                                   warmup=1, iters=iters)
        t[impl, "pack"] = time_fn(lambda: m.pack_groups(flat, off, pl, useqs, uoff, ushared, sel,
                                                        bounds=bounds), warmup=1, iters=iters)
    t["flatten"] = time_fn(lambda: P.flatten_sequences(b[0]), warmup=1, iters=5)
    common = {"rollouts": n, "group_size": 16, "units": len(units), "microbatches": len(mbs),
              "dense_tokens": stats["dense_tokens"], "shared_tokens": stats["shared_tokens"],
              "prefix_copies_lost": stats["prefix_copies_lost"]}

    def row(what, key, **extra):
        return {"what": what, **common, **{f"{i}_s": t[i, key] for i in ("cpp", "numpy", "python")},
                "speedup_vs_python": t["python", key] / t["cpp", key],
                "speedup_vs_numpy": t["numpy", key] / t["cpp", key], **extra}

    rows = [row("group units: group_units + plan + pack_groups (public, token lists in)", "public",
                flatten_s=t["flatten"]),
            row("group units: the same from one FlatTokens (one flattening, timed)", "once"),
            row("group units: group_units core (flat buffers)", "units"),
            row("group units: pack_groups core, every micro-batch (flat buffers)", "pack")]
    path = record_rows(rows)
    with capsys.disabled():
        for r in rows:
            print(f"\n[bench_pack] {r}")
        print(f"[bench_pack] recorded {path}")
