"""The prefix-shared attention kernels compile for sm_80 and sm_90, at the launches the
launcher really makes, without a register spill or shared memory over the device limit.

The shape is Qwen3-4B's attention (Hq=32, Hk=8, D=128, bf16) on one BPO group: a 1485-token
prompt (one 384-px image) with 8 responses alternating 400 and 80 tokens; also D=64 bf16 and
the fp32 tiles.  The launches come from ``prefix_attention.planned_launches`` (the launcher's
own tile and launch functions on meta tensors) and are compiled in a subprocess without
TRITON_INTERPRET by ``python -m r4b_kernels._aot``, as in tests/test_kernels_compile.py.
``test_planned_launches_are_the_launchers_launches`` holds the plans to what the launcher
launches (under the interpreter here).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

from r4b_kernels._common import KernelLaunch  # noqa: E402

pa = importlib.import_module("r4b_kernels.prefix_attention")
aot = importlib.import_module("r4b_kernels._aot")

ARCHS = (80, 90)
THIS = Path(__file__).resolve()
PROMPT_4B = 1485
RESPONSES_4B = [400, 80] * 4
KERNELS = {"_prefix_attention_fwd_kernel", "_prefix_attention_bwd_preprocess_kernel",
           "_prefix_attention_bwd_dkdv_kernel", "_prefix_attention_bwd_dq_kernel"}


# ------------------------------------------------------------------ plans (compile subprocess)
def prefix_attention_plans():
    """Forward and backward launches: the 4B shape in bf16 (D=128), D=64 bf16, D=128 fp32."""
    out = []
    for hq, hk, d, dtype in ((32, 8, 128, torch.bfloat16), (32, 8, 64, torch.bfloat16),
                             (32, 8, 128, torch.float32)):
        where = f"p={PROMPT_4B} responses={RESPONSES_4B} Hq={hq} Hk={hk} D={d} {dtype}"
        for launch in pa.planned_launches([PROMPT_4B], [RESPONSES_4B], num_heads=hq,
                                          num_kv_heads=hk, head_dim=d, dtype=dtype,
                                          interpret=False):
            out.append((f"prefix_attention {where}", launch))
    return out


def compile_in_subprocess(plans: str, tmp: Path, timeout: int = 900):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    out = tmp / f"{plans}.json"
    cmd = [sys.executable, "-m", "r4b_kernels._aot", "--plans", f"{THIS}:{plans}", "--json", str(out),
           "--quiet"] + [f"--arch={a}" for a in ARCHS]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    assert r.returncode in (0, 1) and out.exists(), f"{' '.join(cmd)} crashed (rc {r.returncode}):\n" \
                                                    f"{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return json.loads(out.read_text()), r.stdout


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    recs, _ = compile_in_subprocess("prefix_attention_plans", tmp_path_factory.mktemp("aot"))
    return recs


def test_every_kernel_compiles_on_sm80_and_sm90(records):
    for arch in ARCHS:
        seen = {r["kernel"] for r in records if r["arch"] == arch}
        assert KERNELS <= seen, f"sm_{arch}: never compiled: {sorted(KERNELS - seen)}"
    defined = {n for n, o in vars(pa).items()
               if isinstance(o, triton.runtime.KernelInterface) and n.endswith("_kernel")}
    assert defined == KERNELS


def test_no_spill_and_shared_memory_within_limits(records):
    print("\n" + aot.format_table(records) + "\n\n" + aot.format_summary(records))
    bad = [p for r in records for p in aot.problems(r)]
    assert not bad, "\n".join(bad)
    for r in records:
        assert r["shared"] <= aot.TARGETS[r["arch"]].smem_per_block, r


# ------------------------------------------------------------------ the plans are the launches
def _signature(launch: KernelLaunch):
    args = []
    for a in launch.args:
        if isinstance(a, torch.Tensor):
            args.append((str(a.dtype), tuple(a.shape), a.stride()))
        elif isinstance(a, bool) or not isinstance(a, (int, float)):
            args.append(a)
        else:
            args.append(a if isinstance(a, int) else round(a, 12))
    return launch.kernel.__name__, launch.grid, tuple(args), launch.meta


@contextlib.contextmanager
def recorded_launches(monkeypatch):
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
    monkeypatch.setattr(pa, "device_guard", guard)
    yield seen


@pytest.mark.skipif(not pa.TRITON_INTERPRET, reason="checks the interpreter's launches")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_planned_launches_are_the_launchers_launches(monkeypatch, dtype):
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
