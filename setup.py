"""Build and install r4b (the trainer) and its C++/CUDA packer.

The Triton kernels are their own distribution, ``r4b-kernels`` (import name ``r4b_kernels``,
sources in ``kernels/r4b_kernels/``, built by ``kernels/pyproject.toml``); r4b depends on it
through a direct reference to that folder, so ``pip install -e .`` installs both.  To edit the
kernels in place as well, run ``pip install --no-deps -e ./kernels`` after it.

The packer extension is built by CMake (CMakeLists.txt).  The C++ module ``r4b._C`` always
builds; the CUDA module ``r4b._C_cuda`` builds only when nvcc is found and ``R4B_SKIP_CUDA``
is not set.  Neither links against torch: they take raw pointers and sizes, so builds take
seconds and survive torch upgrades, and a build-isolated ``pip install`` never pulls torch.

Environment variables:
  R4B_SKIP_CUDA=1    never build the CUDA module (same result as a machine without nvcc)
  R4B_CUDA_ARCHS     CMake CUDA architectures (default "80;90")
  R4B_BUILD_TYPE     CMake build type (default Release)
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _find_nvcc():
    if os.environ.get("R4B_SKIP_CUDA", "0") not in ("", "0"):
        return None, "R4B_SKIP_CUDA is set"
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
        cand = Path(home) / "bin" / "nvcc"
        nvcc = str(cand) if cand.exists() else None
    return nvcc, (None if nvcc else "no nvcc found on PATH or in CUDA_HOME")


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """One CMake build produces every module; each extension entry then only checks that its
    file exists, so setuptools copies all of them (editable installs included)."""

    def build_extension(self, ext):
        if ext.name != "r4b._C":  # built by the r4b._C entry's CMake run
            path = Path(self.get_ext_fullpath(ext.name))
            if not path.exists():
                raise RuntimeError(f"CMake did not produce {path.name} for {ext.name}")
            return
        cmake = shutil.which("cmake")
        if cmake is None:
            raise RuntimeError(
                "building the r4b packer extension needs cmake>=3.18 on PATH "
                "(apt-get install cmake, or pip install cmake)")
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        out_dir.mkdir(parents=True, exist_ok=True)
        build_temp = Path(self.build_temp).resolve() / "cmake"
        build_temp.mkdir(parents=True, exist_ok=True)
        nvcc, why_not = _find_nvcc()
        import pybind11

        args = [
            f"-DCMAKE_BUILD_TYPE={os.environ.get('R4B_BUILD_TYPE', 'Release')}",
            f"-DR4B_OUTPUT_DIR={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DR4B_WITH_CUDA={'ON' if nvcc else 'OFF'}",
        ]
        if nvcc:
            args += [f"-DCMAKE_CUDA_COMPILER={nvcc}",
                     f"-DCMAKE_CUDA_ARCHITECTURES={os.environ.get('R4B_CUDA_ARCHS', '80;90')}"]
        subprocess.run([cmake, "-S", str(ROOT), "-B", str(build_temp), *args],
                       check=True, stdout=subprocess.DEVNULL)
        jobs = str(max(1, os.cpu_count() or 1))
        subprocess.run([cmake, "--build", str(build_temp), "-j", jobs], check=True,
                       stdout=subprocess.DEVNULL)
        if not nvcc:
            print(f"r4b: CUDA kernels were not built ({why_not}); the C++ packer and "
                  "CPU paths are available.", file=sys.stderr)


setup(
    name="r4b",
    version="0.1.0",
    description="Kernel-centric trainer for auto-thinking multimodal models (R-4B bi-mode "
                "annealing and Bi-mode Policy Optimization)",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["r4b", "r4b.*"]),
    ext_modules=[CMakeExtension("r4b._C")]
    + ([CMakeExtension("r4b._C_cuda")] if _find_nvcc()[0] else []),
    cmdclass={"build_ext": CMakeBuild},
    # Every range names versions that have run the test suite: the lower ends are what
    # `.ci/run` resolves on Python 3.11 (torch 2.13.0 CPU), the upper ends what `.ci/newest`
    # resolved on Python 3.12+ (README "Install", "Tested versions").
    install_requires=[
        # Install torch first (CPU: `pip install torch==2.13.0`), or pip picks the CUDA build.
        "torch>=2.13,<2.16",
        # The kernels' own distribution, from this checkout (kernels/pyproject.toml).
        f"r4b-kernels @ {(ROOT / 'kernels').as_uri()}",
        "triton>=3.9,<3.10; platform_system == 'Linux'",
        # 0.17+ need Python >= 3.12; on 3.10/3.11 pip resolves 0.16.1.
        "megatron-core>=0.16.1,<0.20",
        "liger-kernel>=0.8.5,<0.9",
        "numpy>=2.4,<3",
        "safetensors>=0.8,<1",
        "tyro>=1.0.17,<2",
        "tqdm>=4.70,<5",
        "pillow>=13,<14",  # image decoding and AnyRes resizing (r4b.data.images)
    ],
    extras_require={
        "test": [
            "pytest>=9.2,<10",
            "pytest-benchmark>=5.3,<6",
            "pybind11>=3.1,<4",  # the extension-build tests configure CMake against it
            "hypothesis>=6.170,<7",
            # 5.25 imports Hugging Face's `kernels` package (see tests/test_layout.py)
            "transformers>=5.25,<6",
            "pyarrow>=26,<27",
            "matplotlib>=3.11,<4",
            "tensorboard>=2.21,<3",
        ],
        # Optional, imported lazily; none of them installs or runs on a CPU-only machine.
        # vllm: the engine is checked against the released source of 0.10.2 and 0.34.0.
        "gpu": ["flash-attn>=2.7", "transformer-engine[pytorch]>=2.9", "vllm>=0.10.2,<0.35"],
    },
    zip_safe=False,
)
