"""Ahead-of-time compilation of Triton launches for a named GPU target, without a GPU.

Triton compiles a kernel to PTX and cubin for any NVIDIA target with the ``ptxas`` it ships;
no device or driver is needed.  This module compiles the launches the r4b_kernels launchers
really make (built by their own ``planned_launches`` functions, on meta tensors) and reports,
per compiled variant: registers per thread, spill stores / loads, stack frame, shared memory,
and the occupancy and waves that follow from them on an A100 (sm_80) and an H100 (sm_90).

Specialisation is Triton's own: the arguments of each launch go through the JIT's binder for
the target, so integer arguments equal to 1 become constants and 16-divisible integers and
pointers get divisibility hints exactly as at a real launch (meta tensors report address 0,
i.e. the 16-byte alignment of torch's allocations).

Register and spill counts come from ``ptxas -v`` run on the compiled PTX with the flags
Triton's backend uses (the driver-side ``n_regs`` / ``n_spills`` of a loaded kernel need a
GPU); shared memory is the compiled kernel's ``metadata.shared``.

Run it without ``TRITON_INTERPRET`` (the interpreter replaces JIT functions when they are
decorated, so nothing compiles in such a process)::

    python -m r4b_kernels._aot --plans tests/test_kernels_compile.py:default_plans --arch 80 --arch 90

``--plans MODULE:FUNCTION`` (a module name or a ``.py`` path) names a function returning
``[(label, KernelLaunch), ...]``; ``--json PATH`` writes one record per compiled variant.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import importlib.util
import io
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class Target:
    """Per-SM limits of one GPU (CUDA occupancy-calculator values)."""

    arch: int
    gpu: str
    sms: int
    smem_per_block: int  # opt-in maximum per block, bytes
    smem_per_sm: int
    regs_per_sm: int = 65536
    max_threads_per_sm: int = 2048
    max_blocks_per_sm: int = 32
    smem_reserved_per_block: int = 1024  # sm_80+ reserve 1 KB of shared memory per block


TARGETS = {
    80: Target(80, "A100", sms=108, smem_per_block=163 * 1024, smem_per_sm=164 * 1024),
    90: Target(90, "H100 SXM", sms=132, smem_per_block=227 * 1024, smem_per_sm=228 * 1024),
}


def occupancy(target: Target, regs: int, shared: int, num_warps: int) -> tuple[int, float]:
    """(resident programs per SM, fraction of the SM's warp slots they fill).

    Registers are allocated per warp in units of 256, from four 16K-register sub-partitions.
    """
    per_warp = math.ceil(max(regs, 1) * 32 / 256) * 256
    warps_by_regs = 4 * ((target.regs_per_sm // 4) // per_warp)
    by_regs = warps_by_regs // num_warps
    by_threads = target.max_threads_per_sm // (32 * num_warps)
    by_smem = target.smem_per_sm // (shared + target.smem_reserved_per_block)
    blocks = min(by_regs, by_threads, by_smem, target.max_blocks_per_sm)
    return blocks, blocks * num_warps * 32 / target.max_threads_per_sm


def _parse_ptxas_log(log: str) -> dict | None:
    """Registers, spill stores / loads and stack frame from a ``ptxas -v`` log (None if the
    log has no such report)."""
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    stack = re.search(r"(\d+) bytes stack frame", log)
    if regs is None or spill is None:
        return None
    return {"regs": int(regs.group(1)), "spill_stores": int(spill.group(1)),
            "spill_loads": int(spill.group(2)), "stack": int(stack.group(1)) if stack else 0}


def _ptxas_stats(ptx: str, arch: int) -> dict:
    """:func:`_parse_ptxas_log` of ``ptxas -v`` run on the PTX with Triton's flags."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        cmd = [get_ptxas(arch).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
               f"--gpu-name={sm_arch_from_capability(arch)}", str(src), "-o", str(Path(d) / "k.o")]
        r = subprocess.run(cmd, capture_output=True, text=True, check=True)
    stats = _parse_ptxas_log(r.stderr + r.stdout)
    if stats is None:
        raise RuntimeError(f"could not read register / spill counts from ptxas -v:\n{r.stderr}")
    return stats


def _compile(src, target, options):
    """``triton.compile`` with Triton's own ptxas log captured (it runs ``ptxas -v``; the log
    is printed only when asked for): (compiled kernel, log or "" on a cache hit)."""
    import triton
    from triton import knobs

    buf = io.StringIO()
    with knobs.nvidia.scope(), contextlib.redirect_stdout(buf):
        knobs.nvidia.dump_ptxas_log = True
        ck = triton.compile(src, target=target, options=options.__dict__)
    return ck, buf.getvalue()


def _ptxas_stats_cached(ck, arch: int, log: str = "") -> dict:
    """Register / spill report of a compiled kernel: from the log of the compile that just
    ran, else remembered beside Triton's cache by the kernel's compile hash (a Triton cache
    hit runs no ptxas), else from running ptxas again on its PTX."""
    from triton import knobs

    path = Path(knobs.cache.dir) / "r4b_aot" / f"{ck.hash}.json"
    stats = _parse_ptxas_log(log)
    if stats is None:
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            stats = _ptxas_stats(ck.asm["ptx"], arch)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(stats))
        tmp.replace(path)
    except OSError:
        pass  # a read-only cache only costs the next run a ptxas call
    return stats


def _specialise(launch, arch: int):
    """What the JIT would compile for this launch on ``arch``, through its own binder:
    (cache key, target, ASTSource, options, specialisation)."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    k = launch.kernel
    if not isinstance(k, JITFunction):
        raise RuntimeError(f"{getattr(k, '__name__', k)!r} is not a compiled-mode JIT function "
                           "(is TRITON_INTERPRET set in this process?)")
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(k.signature, k.params, backend)
    # The options JITFunction.run adds to every launch, so that the compile key matches.
    meta = dict(launch.meta)
    meta["debug"] = meta.get("debug", k.debug) or knobs.runtime.debug
    for opt in ("instrumentation_mode", "fpsan_homomorphic_casts"):
        if hasattr(knobs.compilation, opt):
            meta[opt] = getattr(knobs.compilation, opt)
    bound, spec, opts = binder(*launch.args, **meta)
    options, signature, constexprs, attrs = k._pack_args(backend, dict(opts), bound, spec, opts)
    key = json.dumps([k.__module__, k.__name__, arch, [list(map(str, s)) for s in spec],
                      sorted((a, str(b)) for a, b in opts.items())])
    return key, target, ASTSource(k, signature, constexprs, attrs), options, spec


def _describe(launch, spec) -> str:
    """Constexpr values (integer arguments equal to 1 become ``n_parts=1``) and the integer
    or pointer arguments that are not multiples of 16 (no divisibility hint)."""
    parts, odd = [], []
    for name, (ty, sp) in zip(launch.kernel.arg_names, spec):
        if ty == "constexpr":
            parts.append(f"{name}={int(sp) if isinstance(sp, bool) else sp}")
        elif ty[0] in "iu*" and sp != "D":
            odd.append(name)  # an integer (or address) that is not a multiple of 16
    return " ".join(parts + ([f"not%16:{','.join(odd)}"] if odd else []))


def compile_plans(plans, archs=(80, 90), log=None) -> list[dict]:
    """Compile every distinct (kernel, specialisation) of ``plans`` for every arch.

    Returns one record per compiled variant: kernel, arch, gpu, config, launches (every
    ``[label, programs]`` that compiles to it), regs, spill_stores, spill_loads, stack,
    shared, num_warps, seconds, error (None when it compiled), and, from registers, shared
    memory and warps: blocks_per_sm, occupancy, and programs / waves of its largest launch.
    """
    records: dict[str, dict] = {}
    for arch in archs:
        limits = TARGETS[arch]
        for label, launch in plans:
            name = launch.kernel.__name__
            programs = math.prod(launch.grid)
            try:
                key, target, src, options, spec = _specialise(launch, arch)
            except Exception as e:  # noqa: BLE001 - a failure to bind is reported like a compile error
                records[f"{name}/{arch}/{label}"] = {
                    "kernel": name, "arch": arch, "gpu": limits.gpu, "config": "",
                    "launches": [[label, programs]], "error": f"{type(e).__name__}: {e}"}
                continue
            if key in records:
                records[key]["launches"].append([label, programs])
                continue
            rec = {"kernel": name, "arch": arch, "gpu": limits.gpu, "config": _describe(launch, spec),
                   "launches": [[label, programs]]}
            t0 = time.perf_counter()
            try:
                ck, ptxas_log = _compile(src, target, options)
                rec.update(error=None, shared=int(ck.metadata.shared),
                           num_warps=int(ck.metadata.num_warps), **_ptxas_stats_cached(ck, arch, ptxas_log))
            except Exception as e:  # noqa: BLE001 - every failure is a reported result
                msg = str(e).strip().splitlines()
                rec["error"] = f"{type(e).__name__}: " + " | ".join(msg[:6])
            rec["seconds"] = round(time.perf_counter() - t0, 2)
            records[key] = rec
            if log is not None:
                log(f"sm_{arch} {name} [{rec['config']}] {rec.get('regs', '-')} regs "
                    f"({rec['seconds']:.1f} s){' ERROR' if rec['error'] else ''}")
    for rec in records.values():
        if rec["error"] is None:
            limits = TARGETS[rec["arch"]]
            blocks, occ = occupancy(limits, rec["regs"], rec["shared"], rec["num_warps"])
            programs = max(p for _, p in rec["launches"])
            rec.update(blocks_per_sm=blocks, occupancy=occ, programs=programs,
                       waves=programs / (blocks * limits.sms) if blocks else math.inf)
    return list(records.values())


def problems(rec: dict) -> list[str]:
    """What is wrong with one compiled variant: a compile error, a register spill, shared
    memory over the target's per-block limit.  Empty when it is fine."""
    where = f"{rec['kernel']} on sm_{rec['arch']} [{rec['config']}] ({rec['launches'][0][0]})"
    if rec["error"] is not None:
        return [f"{where}: does not compile: {rec['error']}"]
    out = []
    if rec["spill_stores"] or rec["spill_loads"]:
        out.append(f"{where}: register spill ({rec['spill_stores']} bytes stores, "
                   f"{rec['spill_loads']} bytes loads at {rec['regs']} registers)")
    limit = TARGETS[rec["arch"]].smem_per_block
    if rec["shared"] > limit:
        out.append(f"{where}: shared memory {rec['shared']} bytes > the {limit}-byte limit "
                   f"per block of sm_{rec['arch']}")
    return out


def format_table(records: list[dict]) -> str:
    """One line per compiled variant: registers, spills, shared memory, occupancy, and the
    programs and waves of its largest launch."""
    head = (f"{'kernel':<36} {'arch':<5} {'regs':>4} {'spill':>7} {'smem':>6} {'warps':>5} "
            f"{'occ':>5} {'progs':>6} {'waves':>5}  constexprs  <- first call (+ more)")
    lines = [head, "-" * len(head)]
    for r in sorted(records, key=lambda r: (r["kernel"], r["arch"], r["config"])):
        first = r["launches"][0][0] + (f" (+{len(r['launches']) - 1})" if len(r["launches"]) > 1 else "")
        if r["error"] is not None:
            lines.append(f"{r['kernel']:<36} sm_{r['arch']:<2} COMPILE ERROR {r['error'][:120]}  <- {first}")
            continue
        lines.append(
            f"{r['kernel']:<36} sm_{r['arch']:<2} {r['regs']:>4} "
            f"{r['spill_stores']:>3}/{r['spill_loads']:<3} {r['shared']:>6} {r['num_warps']:>5} "
            f"{r['occupancy']:>5.0%} {r['programs']:>6} {r['waves']:>5.2f}  {r['config']}  <- {first}")
    return "\n".join(lines)


def format_summary(records: list[dict]) -> str:
    """One line per kernel and arch: variants compiled, register range, worst spill, largest
    shared memory, lowest occupancy, most waves."""
    groups: dict[tuple, list] = {}
    for r in records:
        groups.setdefault((r["kernel"], r["arch"]), []).append(r)
    head = (f"{'kernel':<36} {'arch':<5} {'variants':>8} {'regs':>7} {'spill B':>7} {'smem B':>7} "
            f"{'occ':>5} {'waves':>5} errors")
    lines = [head, "-" * len(head)]
    for (kernel, arch), rs in sorted(groups.items()):
        ok = [r for r in rs if r["error"] is None]
        errors = len(rs) - len(ok)
        if not ok:
            lines.append(f"{kernel:<36} sm_{arch:<2} {len(rs):>8} {'-':>7} {'-':>7} {'-':>7} {'-':>5} {'-':>5} {errors}")
            continue
        regs = sorted({r["regs"] for r in ok})
        reg_s = f"{regs[0]}" if len(regs) == 1 else f"{regs[0]}-{regs[-1]}"
        spill = max(r["spill_stores"] + r["spill_loads"] for r in ok)
        lines.append(f"{kernel:<36} sm_{arch:<2} {len(rs):>8} {reg_s:>7} {spill:>7} "
                     f"{max(r['shared'] for r in ok):>7} {min(r['occupancy'] for r in ok):>5.0%} "
                     f"{max(r['waves'] for r in ok):>5.2f} {errors}")
    return "\n".join(lines)


def load_plans(spec: str):
    """``MODULE:FUNCTION`` or ``path/to/file.py:FUNCTION`` -> the function's plans."""
    mod_name, _, fn_name = spec.rpartition(":")
    if mod_name.endswith(".py"):
        path = Path(mod_name).resolve()
        s = importlib.util.spec_from_file_location(f"_aot_plans_{path.stem}", path)
        mod = importlib.util.module_from_spec(s)
        sys.modules[s.name] = mod
        s.loader.exec_module(mod)
    else:
        mod = importlib.import_module(mod_name)
    return getattr(mod, fn_name)()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m r4b_kernels._aot", description=__doc__.split("\n\n")[0])
    ap.add_argument("--plans", required=True, help="MODULE:FUNCTION or FILE.py:FUNCTION")
    ap.add_argument("--arch", type=int, action="append", choices=sorted(TARGETS),
                    help="compute capability to compile for (repeatable; default 80 and 90)")
    ap.add_argument("--json", help="write the records here")
    ap.add_argument("--quiet", action="store_true", help="no per-compile progress lines")
    a = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        ap.error("unset TRITON_INTERPRET: under the interpreter nothing compiles")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the default; silences a warning
    log = None if a.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    records = compile_plans(load_plans(a.plans), tuple(a.arch or (80, 90)), log=log)
    if a.json:
        Path(a.json).write_text(json.dumps(records, indent=1, default=str) + "\n")
    print(format_table(records))
    print()
    print(format_summary(records))
    bad = [p for r in records for p in problems(r)]
    for p in bad:
        print("PROBLEM:", p)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
