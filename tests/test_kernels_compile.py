"""Every Triton kernel of r4b_kernels compiles for sm_80 and sm_90, at the launches its
launcher really makes, without a register spill or shared memory over the device limit.

The interpreter that runs the kernels on CPU (TRITON_INTERPRET=1, set by the root conftest)
cannot see compile errors, spills, shared memory or occupancy; Triton's compiler and the
ptxas it ships can, without a GPU.  The launches come from the launchers' own
``planned_launches`` (the same tile / warp / chunk functions the launchers call, on meta
tensors), at the Qwen3-4B head shape (H=2560, V=151936; vocab-parallel TP 1 and 2, so
V_local = V / TP), bf16 and fp32 inputs and a few token counts; they are compiled in one
subprocess without TRITON_INTERPRET (``python -m r4b_kernels._aot``), once per session
(Triton's on-disk cache makes later sessions faster).  The table of registers, spills,
shared memory, occupancy and waves is printed (``pytest -s`` shows it).

``test_planned_launches_are_the_launchers_launches`` holds the plans to what the launchers
launch; ``test_checker_catches_planted_faults`` proves the checker fails on a spill, on
shared memory over the limit and on a kernel that does not compile.
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

import r4b_kernels  # noqa: E402
from r4b_kernels._common import KernelLaunch  # noqa: E402

pl = importlib.import_module("r4b_kernels.policy_loss")
ga = importlib.import_module("r4b_kernels.grouped_advantage")
pa = importlib.import_module("r4b_kernels.prefix_attention")
aot = importlib.import_module("r4b_kernels._aot")

H4B, V4B = 2560, 151936  # Qwen3-4B LM head
ARCHS = (80, 90)
THIS = Path(__file__).resolve()
DTYPE_NAME = {torch.bfloat16: "bf16", torch.float32: "fp32"}

# Options of the fused policy loss that change what is compiled (constexpr flags).
TRAINER_DEFAULT = dict(with_grad=True)  # r4b.rl defaults: no KL, no dual clip, no entropy
ALL_ON = dict(with_grad=True, has_ref=True, kl_estimator="k3", dual_clip=3.0, entropy_coef=0.01)
NO_GRAD = dict(with_grad=False)


# ------------------------------------------------------------------ plans (compile subprocess)
def _policy_loss_plans(t_values, dtypes, tps, option_sets):
    out = []
    for T, dtype, tp in itertools.product(t_values, dtypes, tps):
        v_local = V4B // tp
        where = f"T={T} V_local={v_local} {DTYPE_NAME[dtype]} tp{tp}"
        for name, opts in option_sets:
            for launch in pl.planned_launches("policy_loss", T, v_local, dtype, world=tp,
                                              vocab_start=v_local * (tp - 1), interpret=False, **opts):
                out.append((f"policy_loss {where} {name}", launch))
        for launch in pl.planned_launches("token_logprobs", T, v_local, dtype, world=tp,
                                          vocab_start=v_local * (tp - 1), interpret=False):
            out.append((f"token_logprobs {where}", launch))
    return out


def _grouped_plans(configs, token_configs):
    out = []
    for kw in configs:
        for launch in ga.planned_launches("grouped_advantage", **kw):
            out.append(("grouped_advantage " + " ".join(f"{k}={v}" for k, v in kw.items()), launch))
    for kw in token_configs:
        for launch in ga.planned_launches("token_advantage_weights", **kw):
            out.append(("token_advantage_weights " + " ".join(f"{k}={v}" for k, v in kw.items()), launch))
    return out


def default_plans():
    """Every kernel, both dtypes, TP 1 and 2; trainer-default, all-flags and no-grad options;
    T=16384 (the real batch: full chunks) and T=4099 (a ragged last chunk)."""
    options = [("trainer-default", TRAINER_DEFAULT), ("ref/k3+dual+entropy", ALL_ON),
               ("no-grad", NO_GRAD)]
    return (_policy_loss_plans((16384, 4099), (torch.bfloat16, torch.float32), (1, 2), options)
            + _grouped_plans(
                [dict(n=4096, max_group_size=8),  # BPO: 2g = 8 rollouts per prompt
                 dict(n=4096, max_group_size=1000, baseline="mode", leave_one_out=True)],  # 256 lanes
                [dict(n=64, total_tokens=16384), dict(n=1, total_tokens=4099, cu_dtype=torch.int64)])
            + _prefix_attention_plans())


PROMPT_4B = 1485  # one 384-px image
RESPONSES_4B = [400, 80] * 4  # a BPO group of 2g = 8 rollouts


def _prefix_attention_plans():
    """The prefix-shared attention's forward and backward launches on one BPO group at
    Qwen3-4B's attention (Hq=32, Hk=8, D=128, bf16), and D=64 bf16 and D=128 fp32."""
    out = []
    for hq, hk, d, dtype in ((32, 8, 128, torch.bfloat16), (32, 8, 64, torch.bfloat16),
                             (32, 8, 128, torch.float32)):
        where = f"p={PROMPT_4B} responses={RESPONSES_4B} Hq={hq} Hk={hk} D={d} {dtype}"
        for launch in pa.planned_launches([PROMPT_4B], [RESPONSES_4B], num_heads=hq,
                                          num_kv_heads=hk, head_dim=d, dtype=dtype,
                                          interpret=False):
            out.append((f"prefix_attention {where}", launch))
    return out


def exhaustive_plans():
    """Every option that changes a specialisation: KL estimator with and without a reference,
    dual clip, entropy, gradients; T in {1, 100, 4099, 16384}; every grouped-advantage flag at
    every block size and modes dtype."""
    options = []
    for ref, dual, ent, grad in itertools.product((None, "k1", "k2", "k3"), (None, 3.0),
                                                  (0.0, 0.01), (True, False)):
        opts = dict(with_grad=grad, has_ref=ref is not None, kl_estimator=ref or "k3",
                    dual_clip=dual, entropy_coef=ent)
        options.append((f"ref={ref} dual={dual} ent={ent} grad={grad}", opts))
    configs = [dict(n=4096, max_group_size=size, modes_dtype=md, baseline=b, scale=s, leave_one_out=loo)
               for size in (8, 32, 64, 128, 1000) for md in (None, torch.int8, torch.int64)
               for b in ("group", "mode") for s in ("std", "none") for loo in (False, True)]
    token = [dict(n=n, total_tokens=t, cu_dtype=cu, prompt_dtype=pd) for n, t in ((1, 1000), (64, 16384))
             for cu in (torch.int32, torch.int64) for pd in (torch.int32, torch.int64)]
    return (_policy_loss_plans((1, 100, 4099, 16384), (torch.bfloat16, torch.float32), (1, 2), options)
            + _grouped_plans(configs, token))


@triton.jit
def _planted_broken_kernel(x_ptr, BLOCK: tl.constexpr):
    # tl.arange needs a power-of-two range: BLOCK=3 does not compile.
    offs = tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs) + 1.0)


@triton.jit
def _planted_transpose_kernel(x_ptr, y_ptr, M: tl.constexpr, N: tl.constexpr):
    # The transposed store needs the tile re-laid-out through shared memory: a 256 x 256 fp32
    # tile is 256 KB, more than one block may have on either target.
    r = tl.arange(0, M)
    c = tl.arange(0, N)
    x = tl.load(x_ptr + r[:, None] * N + c[None, :])
    tl.store(y_ptr + c[:, None] * M + r[None, :], tl.trans(x))


def planted_plans():
    """Three faults the checker must report: the stats kernel at a tile far too large for the
    register file (128 fp32 per thread per live tile: spills), a kernel whose shared memory
    exceeds the per-block limit, and a kernel that does not compile."""
    meta = torch.device("meta")
    logits = torch.empty(576, V4B, device=meta)
    targets = torch.empty(576, dtype=torch.int64, device=meta)
    stats = torch.empty(576, 4, device=meta)
    oversized = pl.EpilogueTiles(block_r=1, block_v=4096, num_warps=1)
    x = torch.empty(256 * 256, device=meta)
    return [
        ("planted: oversized stats tile", pl._stats_launch(oversized, logits, targets, stats, 0, 0, 1.0)),
        ("planted: shared-memory transpose", KernelLaunch(_planted_transpose_kernel, (1,), (x, x),
                                                           dict(M=256, N=256, num_warps=8))),
        ("planted: broken kernel", KernelLaunch(_planted_broken_kernel, (1,), (x,), dict(BLOCK=3))),
    ]


# ------------------------------------------------------------------ running the compiler
def compile_in_subprocess(plans: str, tmp: Path, timeout: int = 600) -> tuple[list[dict], str]:
    """Compile ``THIS:plans`` for sm_80 and sm_90 in a process without TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp / f"{plans}.json"
    cmd = [sys.executable, "-m", "r4b_kernels._aot", "--plans", f"{THIS}:{plans}", "--json", str(out),
           "--quiet"] + [f"--arch={a}" for a in ARCHS]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    # rc 1 = problems found (the records say which); anything else is a crash of the tool
    assert r.returncode in (0, 1) and out.exists(), f"{' '.join(cmd)} crashed (rc {r.returncode}):\n" \
                                                    f"{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return json.loads(out.read_text()), r.stdout


@pytest.fixture(scope="module")
def default_records(tmp_path_factory):
    records, _ = compile_in_subprocess("default_plans", tmp_path_factory.mktemp("aot"))
    return records


def all_kernels() -> set[str]:
    """Names of every Triton kernel defined in the r4b_kernels package (launch targets:
    ``*_kernel``; device helpers such as ``_combine_parts`` are inlined into them)."""
    names = set()
    for info in pkgutil.iter_modules(r4b_kernels.__path__):
        mod = importlib.import_module(f"r4b_kernels.{info.name}")
        for name, obj in vars(mod).items():
            if isinstance(obj, triton.runtime.KernelInterface) and name.endswith("_kernel"):
                names.add(name)
    return names


# ------------------------------------------------------------------ tests
def test_default_run_covers_every_kernel_on_sm80_and_sm90(default_records):
    kernels = all_kernels()
    assert {"_policy_loss_stats_kernel", "_policy_loss_grad_kernel", "_grouped_advantage_fwd_kernel",
            "_token_advantage_weights_fwd_kernel"} <= kernels
    for arch in ARCHS:
        seen = {r["kernel"] for r in default_records if r["arch"] == arch}
        assert kernels <= seen, f"sm_{arch}: kernels never compiled: {sorted(kernels - seen)}"


def test_every_kernel_compiles_without_spill_or_shared_overrun(default_records):
    print("\n" + aot.format_table(default_records) + "\n\n" + aot.format_summary(default_records))
    bad = [p for r in default_records for p in aot.problems(r)]
    assert not bad, "\n".join(bad)
    # The epilogue tiles are chosen for full occupancy: 32 registers, 8 programs per SM and
    # one wave for a 576-row chunk (see epilogue_tiles).  A change that costs that shows here.
    for r in default_records:
        if r["kernel"].startswith("_policy_loss") and r["programs"] == 576:
            assert r["regs"] <= 32 and r["occupancy"] == 1.0 and r["waves"] <= 1.0, r


def test_checker_catches_planted_faults(tmp_path):
    records, stdout = compile_in_subprocess("planted_plans", tmp_path)
    found = {}
    for r in records:
        found.setdefault(r["launches"][0][0], []).extend(aot.problems(r))
    for arch in ARCHS:
        assert any(r["arch"] == arch for r in records)
    spill = found["planted: oversized stats tile"]
    assert spill and all("register spill" in p for p in spill), found
    smem = found["planted: shared-memory transpose"]
    assert smem and all("shared memory" in p for p in smem), found
    broken = found["planted: broken kernel"]
    assert broken and all("does not compile" in p and "arange" in p for p in broken), found
    assert stdout.count("PROBLEM:") == sum(len(v) for v in found.values()) == 6


@pytest.mark.exhaustive
def test_exhaustive_sweep_compiles_without_spill_or_shared_overrun(tmp_path):
    """~800 compiles (10-20 min on 2 cores): runs with ``-m exhaustive`` or R4B_EXHAUSTIVE=1."""
    records, _ = compile_in_subprocess("exhaustive_plans", tmp_path, timeout=3600)
    print("\n" + aot.format_table(records) + "\n\n" + aot.format_summary(records))
    bad = [p for r in records for p in aot.problems(r)]
    assert not bad, "\n".join(bad)


# ------------------------------------------------------------------ the plans are the launches
def _signature(launch: KernelLaunch):
    """What decides a compilation: kernel, grid, tensor dtypes / strides, integer values,
    constexprs and options (float values are runtime arguments)."""
    args = []
    for a in launch.args:
        if isinstance(a, torch.Tensor):
            args.append((str(a.dtype), a.stride(), a.storage_offset() * a.element_size() % 16))
        elif isinstance(a, bool) or not isinstance(a, (int, float)):
            args.append(a)
        else:
            args.append(a if isinstance(a, int) else "float")
    return launch.kernel.__name__, launch.grid, tuple(args), launch.meta


@contextlib.contextmanager
def recorded_launches(monkeypatch):
    """Record every KernelLaunch the launchers run (and still run it), checking that each
    runs under the device guard of its tensors' device."""
    seen, guarded = [], []
    real_run = KernelLaunch.run

    @contextlib.contextmanager
    def guard(device):
        guarded.append(torch.device(device))
        try:
            yield
        finally:
            guarded.pop()

    def run(self):
        devs = {a.device for a in self.args if isinstance(a, torch.Tensor)}
        assert guarded and devs == {guarded[-1]}, \
            f"{self.kernel.__name__} launched outside device_guard (guards {guarded}, tensors on {devs})"
        seen.append(_signature(self))
        return real_run(self)

    monkeypatch.setattr(KernelLaunch, "run", run)
    for mod in (pl, ga, pa):
        monkeypatch.setattr(mod, "device_guard", guard)
    yield seen


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("opts", [TRAINER_DEFAULT, ALL_ON, NO_GRAD], ids=["default", "all", "nograd"])
def test_planned_launches_are_the_launchers_launches(monkeypatch, dtype, opts):
    """The plans compiled above equal, launch by launch, what policy_loss / token_logprobs /
    grouped_advantage / token_advantage_weights launch (here under the interpreter, whose tiles
    are passed as ``interpret=True``), and every launch runs under the device guard."""
    T, H, V, C = 37, 16, 300, 16  # three chunks, a ragged last one
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(T, H, generator=g).to(dtype).requires_grad_(opts["with_grad"])
    weight = torch.randn(V, H, generator=g).to(dtype)
    targets = torch.randint(0, V, (T,), generator=g)
    old, adv = torch.randn(T, generator=g) - 5, torch.randn(T, generator=g)
    kw = dict(ref_logprobs=old + 0.1 if opts.get("has_ref") else None,
              kl_coef=0.1 if opts.get("has_ref") else 0.0, kl_estimator=opts.get("kl_estimator", "k3"),
              dual_clip=opts.get("dual_clip"), entropy_coef=opts.get("entropy_coef", 0.0))
    plan_kw = {k: v for k, v in opts.items() if k != "with_grad"}
    with recorded_launches(monkeypatch) as seen:
        with torch.set_grad_enabled(opts["with_grad"]):
            pl.policy_loss(hidden, weight, targets, old, adv, impl="triton", chunk_rows=C, **kw)
        planned = pl.planned_launches("policy_loss", T, V, dtype, chunk_rows=C, interpret=True,
                                      with_grad=opts["with_grad"], **plan_kw)
        assert seen == [_signature(p) for p in planned]
        assert len(seen) == 6
        seen.clear()
        r4b_kernels.token_logprobs(hidden.detach(), weight, targets, impl="triton", chunk_rows=C)
        planned = pl.planned_launches("token_logprobs", T, V, dtype, chunk_rows=C, interpret=True)
        assert seen == [_signature(p) for p in planned] and len(seen) == 3


def test_planned_grouped_launches_are_the_launchers_launches(monkeypatch):
    rewards = torch.rand(40)
    groups = torch.arange(40) // 8  # groups of 8: 16 lanes
    modes = (torch.arange(40) % 2).to(torch.int8)
    cu = torch.tensor([0, 5, 12, 30], dtype=torch.int32)
    with recorded_launches(monkeypatch) as seen:
        r4b_kernels.grouped_advantage(rewards, groups, modes, baseline="mode", leave_one_out=True,
                                      impl="triton")
        planned = ga.planned_launches("grouped_advantage", n=40, max_group_size=8, modes_dtype=torch.int8,
                                      baseline="mode", leave_one_out=True)
        r4b_kernels.token_advantage_weights(cu, torch.tensor([2, 3, 1]), torch.rand(3), torch.rand(3),
                                            total_tokens=2000, impl="triton")
        planned += ga.planned_launches("token_advantage_weights", n=3, total_tokens=2000)
    assert seen == [_signature(p) for p in planned] and len(seen) == 2


@pytest.mark.skipif(not pa.TRITON_INTERPRET, reason="checks the interpreter's launches")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_planned_prefix_attention_launches_are_the_launchers_launches(monkeypatch, dtype):
    prefix, suffix = [5, 9], [[3, 17], []]
    layout = pa.PrefixLayout.build(prefix, suffix)
    T, hq, hk, d = layout.num_tokens, 4, 2, 24
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(T, h, d, generator=g).to(dtype).requires_grad_() for h in (hq, hk, hk))
    with recorded_launches(monkeypatch) as seen:
        out = pa.prefix_shared_attention(q, k, v, layout, impl="triton")
        out.backward(torch.randn_like(out))
    planned = pa.planned_launches(prefix, suffix, num_heads=hq, num_kv_heads=hk, head_dim=d,
                                  dtype=dtype, interpret=True)
    assert seen == [_signature(p) for p in planned]
    assert [s[0] for s in seen] == ["_prefix_attention_fwd_kernel",
                                    "_prefix_attention_bwd_preprocess_kernel",
                                    "_prefix_attention_bwd_dkdv_kernel",
                                    "_prefix_attention_bwd_dq_kernel"]
