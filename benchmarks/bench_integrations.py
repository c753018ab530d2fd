"""r4b_kernels.integrations: the adapters against their host's default path.

``pytest benchmarks/bench_integrations.py --benchmark``
  * the GRPO loss with Liger's interface: :class:`R4BFusedLinearGRPOLoss` vs liger-kernel's
    ``LigerFusedLinearGRPOLoss`` (``compiled=False`` on CPU), forward + backward;
  * the fused log-prob + entropy seam: verl's ``linear_cross_entropy`` adapter vs verl's torch
    backend (``FusedLinearForPPO``) when verl is importable, and r4b's head vs TRL's
    ``ChunkedLogProbFunction`` when TRL is;
  at the Qwen3-4B head shape cut in vocabulary (H=2560, V=16384 on CPU, fp32; the full
  V=151936 in bf16 on a GPU), T=512 rows on CPU / 8192 on a GPU.  Each row is the median time
  of 3 calls and the peak memory above the inputs: on CPU the growth of the peak resident set
  of a fresh process over one call (``ru_maxrss``; every implementation runs in its own
  process), on a GPU :func:`_harness.peak_extra_memory` minus the returned gradients.  Results
  go to ``benchmarks/results/integrations-<device>.json``.  No gates: these are measurements.
Without ``--benchmark``: a seconds-long smoke run that checks the adapters against the hosts'
implementations on a tiny shape.
"""

from __future__ import annotations

import importlib.util
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _harness import peak_extra_memory, record, time_fn

H4B, V4B = 2560, 151936
HAVE = {name: importlib.util.find_spec(name) is not None for name in ("liger_kernel", "trl", "verl")}
RAY_STUB = ("import sys, types, importlib.util\n"
            "if 'ray' not in sys.modules and importlib.util.find_spec('ray') is None:\n"
            "    r = types.ModuleType('ray'); r.ObjectRef = type('ObjectRef', (), {}); sys.modules['ray'] = r\n")


def _inputs(T, H, V, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    B = 2
    S = T // B
    x = torch.randn(B, S, H, generator=g, device=device, dtype=torch.float32).to(dtype)
    # in place: no freed [V, H] temporary whose pages a later allocation could reuse unseen
    W = torch.randn(V, H, generator=g, device=device).mul_(H ** -0.5).to(dtype)
    y = torch.randint(0, V, (B, S), generator=g, device=device)
    mask = torch.ones(B, S, device=device)
    adv = torch.randn(B, generator=g, device=device)
    old = -torch.rand(B, S, generator=g, device=device) * 2 - 8
    ref = old + 0.05 * torch.randn(B, S, generator=g, device=device)
    return x, W, y, mask, adv, old, ref


def make_case(name, T, H, V, dtype, device):
    """(run, reset, grad_bytes): ``run`` is one forward + backward of implementation ``name``."""
    x, W, y, mask, adv, old, ref = _inputs(T, H, V, dtype, device)
    xx = x.detach().requires_grad_()
    WW = W.detach().requires_grad_()
    ga = torch.randn(y.numel(), device=device)
    if name in ("r4b_grpo_loss", "liger_grpo_loss"):
        if name == "r4b_grpo_loss":
            from r4b_kernels.integrations.trl import R4BFusedLinearGRPOLoss as cls
            mod = cls(beta=0.04, loss_type="bnpo")
        else:
            from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss as cls
            mod = cls(beta=0.04, loss_type="bnpo", compiled=device != "cpu")

        def fwd_bwd():
            loss, _ = mod(xx, WW, y, mask, adv, old_per_token_logps=old, ref_per_token_logps=ref)
            loss.backward()
    else:
        h2, y1 = xx.view(-1, H), y.view(-1)
        if name == "r4b_logprobs":
            from r4b_kernels.integrations import logprobs_entropy

            fn = lambda: logprobs_entropy(h2, WW, y1)  # noqa: E731
        elif name == "verl_torch_backend":
            exec(RAY_STUB, {})
            from verl.utils.experimental.torch_functional import FusedLinearForPPO

            fn = lambda: FusedLinearForPPO()(h2, WW, y1)  # noqa: E731
        elif name == "trl_chunked_logprob":
            from trl.kernels import ChunkedLogProbFunction

            fn = lambda: ChunkedLogProbFunction.apply(h2, WW, None, y1, 1.0, 4096, None, 1.0,  # noqa: E731
                                                      ("entropy",))[:2]
        else:
            raise ValueError(f"unknown implementation {name!r}")

        def fwd_bwd():
            lp, ent = fn()
            (lp * ga).sum().backward()

    def reset():
        xx.grad = None
        WW.grad = None

    def run():
        reset()
        fwd_bwd()

    return run, reset, xx.numel() * xx.element_size() + WW.numel() * WW.element_size()


def _cpu_one(name, T, H, V) -> dict:
    """In this (fresh) process: peak RSS growth over the first call, then the median of 3."""
    torch.set_num_threads(max(1, (os.cpu_count() or 2)))
    run, reset, grad_bytes = make_case(name, T, H, V, torch.float32, "cpu")
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    run()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    t = time_fn(run, warmup=0, iters=3)
    return {"impl": name, "T": T, "H": H, "V": V, "dtype": "fp32", "fwd_bwd_s": t,
            "peak_rss_growth_bytes": peak, "grad_bytes": grad_bytes}


def _cpu_row(name, T, H, V) -> dict:
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import json, bench_integrations as b; "
            f"print('ROW', json.dumps(b._cpu_one({name!r}, {T}, {H}, {V})))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    for line in r.stdout.splitlines():
        if line.startswith("ROW "):
            return json.loads(line[4:])
    raise RuntimeError(f"{name} failed:\n{r.stderr[-3000:]}")


def _pairs():
    out = [("r4b_grpo_loss", "liger_grpo_loss" if HAVE["liger_kernel"] else None),
           ("r4b_logprobs", "verl_torch_backend" if HAVE["verl"] else None)]
    if HAVE["trl"]:
        out.append(("r4b_logprobs", "trl_chunked_logprob"))
    return out


def test_integrations_smoke(bench_mode):
    if bench_mode:
        pytest.skip("smoke run only without --benchmark")
    from r4b_kernels.integrations import logprobs_entropy

    T, H, V = 24, 16, 300
    x, W, y, mask, adv, old, ref = _inputs(T, H, V, torch.float32, "cpu")
    h = x.view(-1, H).detach().requires_grad_()
    lp, ent = logprobs_entropy(h, W, y.view(-1))
    z = torch.log_softmax(h.detach() @ W.t(), -1)
    torch.testing.assert_close(lp, z.gather(1, y.view(-1, 1))[:, 0])
    torch.testing.assert_close(ent, -(z.exp() * z).sum(-1))
    for ours, host in _pairs():  # every implementation the benchmark times runs at a tiny shape
        for name in (ours, host):
            if name is not None:
                run, _, _ = make_case(name, T, H, V, torch.float32, "cpu")
                run()


def test_integrations_cpu_benchmark(bench_mode):
    if not bench_mode:
        pytest.skip("runs under --benchmark")
    if torch.cuda.is_available():
        pytest.skip("GPU present: the GPU benchmark runs instead")
    T, H, V = 512, H4B, 16384
    rows = []
    for ours, host in _pairs():
        for name in (ours, host):
            if name is None or any(r["impl"] == name for r in rows):
                continue
            rows.append(_cpu_row(name, T, H, V))
    path = record("integrations", rows)
    for r in rows:
        print(f"\n[integrations cpu] {r['impl']:>20s} T={T} H={H} V={V} fp32: fwd+bwd {r['fwd_bwd_s'] * 1e3:8.1f} ms, "
              f"peak RSS growth {r['peak_rss_growth_bytes'] / 2**20:8.1f} MiB (gradients {r['grad_bytes'] / 2**20:.1f} MiB)")
    missing = [h for h in ("liger_kernel", "trl", "verl") if not HAVE[h]]
    if missing:
        print(f"[integrations cpu] not installed, rows skipped: {missing}")
    print("[integrations cpu] on CPU r4b runs its PyTorch reference (impl='auto'), which materialises "
          f"[T, V] fp32 logits; the fused path is the GPU's -> {path}")


@pytest.mark.gpu
def test_integrations_gpu_benchmark(bench_mode):
    if not bench_mode:
        pytest.skip("runs under --benchmark")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    T, H, V, dev = 8192, H4B, V4B, "cuda"
    rows = []
    for ours, host in _pairs():
        for name in (ours, host):
            if name is None or any(r["impl"] == name for r in rows):
                continue
            try:
                run, reset, grad_bytes = make_case(name, T, H, V, torch.bfloat16, dev)
                t = time_fn(run, device=dev, warmup=1, iters=3)
                peak = peak_extra_memory(run, dev, reset=reset) - grad_bytes
                reset()
                rows.append({"impl": name, "T": T, "H": H, "V": V, "dtype": "bf16", "fwd_bwd_s": t,
                             "peak_extra_bytes": peak})
            except torch.cuda.OutOfMemoryError:
                rows.append({"impl": name, "T": T, "H": H, "V": V, "dtype": "bf16", "fwd_bwd_s": None})
            torch.cuda.empty_cache()
    path = record("integrations", rows)
    for r in rows:
        print(f"\n[integrations gpu] {r}")
    print(f"-> {path}")
