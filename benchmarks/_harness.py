"""Timing, memory and result-recording helpers shared by the micro-benchmarks."""

from __future__ import annotations

import datetime as _dt
import gc
import json
import os
import platform
import time
from pathlib import Path
from typing import Callable

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], object], *, device="cpu", warmup: int = 2, iters: int = 5) -> float:
    """Median wall time of ``fn()`` in seconds (CUDA events on GPU, perf_counter on CPU)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        if torch.device(device).type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def peak_extra_memory(fn: Callable[[], object], device="cuda",
                      reset: Callable[[], object] | None = None) -> int:
    """Peak CUDA memory allocated during ``fn()`` above a clean baseline (bytes).

    ``reset()`` runs first and must drop what earlier calls left behind (gradients of a
    previous backward): anything still held when the baseline is taken and freed inside the
    measured call would make the peak read low by its size.  Then garbage is collected, the
    caching allocator emptied, the peak statistics reset and the baseline read.  The inputs of
    ``fn`` must be allocated before (they are part of the baseline, not of the result).
    """
    if reset is not None:
        reset()
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def copy_gbps(nbytes: int = 2 * 2**30, device="cuda") -> float:
    """Measured device-memory bandwidth (GB/s) of a large copy: bytes read + bytes written."""
    a = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    t = time_fn(lambda: b.copy_(a), device=device, warmup=2, iters=10)
    return 2 * a.numel() / t / 1e9


def matmul_tflops(m: int, n: int, k: int, dtype=torch.bfloat16, device="cuda") -> float:
    """Measured dense matmul rate (TFLOP/s) of an [m,k]x[k,n] product on ``device``."""
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n, device=device, dtype=dtype)
    t = time_fn(lambda: a @ b, device=device, warmup=3, iters=10)
    return 2 * m * n * k / t / 1e12


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict:
    """Device name, date and versions, to stamp every recorded result."""
    import importlib.metadata as md

    def ver(p):
        try:
            return md.version(p)
        except md.PackageNotFoundError:
            return None

    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "cpu": _cpu_name(), "cpu_threads": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "triton": ver("triton"), "cuda": torch.version.cuda,
        "liger_kernel": ver("liger-kernel"), "python": platform.python_version(),
    }


def record(name: str, rows: list[dict]) -> Path:
    """Write ``rows`` with the environment stamp to ``benchmarks/results/<name>-<device>.json``."""
    env = environment()
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    dev = "".join(c if c.isalnum() else "_" for c in env["device"]).strip("_").lower() or "cpu"
    path = RESULTS_DIR / f"{name}-{dev}.json"
    path.write_text(json.dumps({"environment": env, "results": rows}, indent=2) + "\n")
    return path
