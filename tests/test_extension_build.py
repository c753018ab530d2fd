"""The packer extension: the installed module works, and the CMake project builds from scratch
without CUDA (a machine with no nvcc) and, where nvcc exists, with CUDA."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_installed_module_imports_and_plans():
    _C = pytest.importorskip("r4b._C", reason="r4b._C is not built (pip install -e .)")
    out = _C.plan(np.array([5, 9, 2, 7], dtype=np.int64), 2, 16)
    assert sorted(out["rank_of"].tolist()) == [0, 0, 1, 1]
    assert out["rank_costs"].sum() == 23 and out["max_unit_cost"] == 9


def _build(tmp_path: Path, cuda: bool, timeout: int) -> Path:
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not on PATH")
    import pybind11

    build, out = tmp_path / "build", tmp_path / "out"
    args = [f"-DR4B_WITH_CUDA={'ON' if cuda else 'OFF'}", f"-DR4B_OUTPUT_DIR={out}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}", f"-DPython_EXECUTABLE={sys.executable}",
            "-DCMAKE_BUILD_TYPE=Release"]
    if cuda:
        args += [f"-DCMAKE_CUDA_COMPILER={shutil.which('nvcc')}", "-DCMAKE_CUDA_ARCHITECTURES=80"]
    env = dict(os.environ)
    if not cuda:  # simulate a machine without nvcc: CMake must not even look for it
        env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep)
                                      if not (Path(p) / "nvcc").exists())
    for cmd in ([ "cmake", "-S", str(ROOT), "-B", str(build), *args],
                ["cmake", "--build", str(build), "-j", str(os.cpu_count() or 1)]):
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
        assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return out


def test_cmake_build_without_cuda_imports_in_subprocess(tmp_path):
    out = _build(tmp_path, cuda=False, timeout=60)
    assert list(out.glob("_C.*")) and not list(out.glob("_C_cuda.*"))
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import numpy as np, _C; "
            "o = _C.plan(np.array([3, 1, 2], dtype=np.int64), 2, 4); "
            "assert o['rank_of'].tolist() == [0, 1, 1], o; "
            "p, = _C.pack(np.arange(6), np.array([0, 2, 6]), np.array([1, 2]), np.array([1])); "
            "assert p['labels'].tolist() == [-100, 4, 5, -100], p; print('ok')")
    r = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


@pytest.mark.slow  # nvcc: ~15-70 s on a busy 2-core machine
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
def test_cmake_build_with_cuda_produces_the_cuda_module(tmp_path):
    """One architecture (sm_80) keeps this under ~20 s on 2 cores."""
    out = _build(tmp_path, cuda=True, timeout=300)
    assert list(out.glob("_C_cuda.*")), sorted(p.name for p in out.iterdir())
    # Static cudart: the module imports without a GPU or driver; launches need a device.
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import _C_cuda; "
            "assert _C_cuda.abi_version() >= 1; print('ok')")
    r = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
