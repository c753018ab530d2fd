"""Shared plumbing of r4b_kernels: what is available, and which implementation runs.

Availability is decided once, at import, and logged at debug level with its reason.  Tests
may override it by patching ``HAS_TRITON`` / ``HAS_TRITON_GPU`` or by passing ``impl=``.

This package depends on torch only (triton when present); it never imports r4b, megatron or
vllm, so other RL projects can depend on it alone.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, NamedTuple

import torch

log = logging.getLogger("r4b_kernels")

try:  # Optional dependency: triton (Linux wheels; on CPU only under TRITON_INTERPRET=1).
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
    _TRITON_WHY = f"triton {triton.__version__} importable"
except ImportError as e:  # pragma: no cover - depends on the machine
    HAS_TRITON = False
    _TRITON_WHY = f"triton not importable ({e})"

#: True when Triton kernels run through the interpreter on CPU tensors.
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

#: True when compiled Triton kernels can run on a CUDA device.
HAS_TRITON_GPU = HAS_TRITON and not TRITON_INTERPRET and torch.cuda.is_available()

log.debug("r4b_kernels: HAS_TRITON=%s (%s), TRITON_INTERPRET=%s, HAS_TRITON_GPU=%s",
          HAS_TRITON, _TRITON_WHY, TRITON_INTERPRET, HAS_TRITON_GPU)

IMPLS = ("auto", "triton", "torch")


def resolve_impl(impl: str, device: torch.device) -> str:
    """Map ``impl`` to "triton" or "torch" for tensors on ``device``.

    ``"auto"`` picks Triton on CUDA devices when compiled Triton works, else the PyTorch
    reference.  ``"triton"`` on CPU tensors needs ``TRITON_INTERPRET=1`` (set before triton is
    imported); otherwise it raises with the reason.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "torch":
        return "torch"
    if impl == "auto":
        return "triton" if (device.type == "cuda" and HAS_TRITON_GPU) else "torch"
    if not HAS_TRITON:
        raise RuntimeError(f"impl='triton' requested but {_TRITON_WHY}; install triton")
    if device.type != "cuda" and not TRITON_INTERPRET:
        raise RuntimeError(
            f"impl='triton' on a {device.type} tensor needs TRITON_INTERPRET=1 in the "
            "environment before triton is imported (or move the tensors to CUDA)")
    return "triton"


#: Environment variable that turns on the expensive input checks of the kernels' entry points
#: (NaN/inf scans of the inputs, id range checks) when a call does not pass ``check_inputs``.
CHECKS_ENV = "R4B_KERNEL_CHECKS"


def checks_enabled(check_inputs: bool | None) -> bool:
    """Whether a call runs its value checks: ``check_inputs`` if given, else ``$R4B_KERNEL_CHECKS``.

    Value checks read every element of their tensor and end in a host sync (``bool(...)``), so
    they are off by default; shape, dtype and device checks are free and always run.
    """
    if check_inputs is None:
        return os.environ.get(CHECKS_ENV, "0") not in ("", "0")
    return bool(check_inputs)


def device_guard(device: torch.device):
    """Context that makes ``device`` the current CUDA device (a no-op for other devices).

    Triton launches on the *current* device, not on the device of its tensor arguments, so
    every launcher runs under this guard: a tensor on cuda:1 never launches on cuda:0.
    """
    if torch.device(device).type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


class KernelLaunch(NamedTuple):
    """One Triton launch as data: ``kernel[grid](*args, **meta)``.

    Launchers build their launches with pure functions of shapes and options and then run
    them; the ahead-of-time compile check builds the same launches on meta tensors and
    compiles them for a GPU target without running anything (``r4b_kernels._aot``).
    """

    kernel: Any
    grid: tuple
    args: tuple
    meta: dict

    def run(self):
        return self.kernel[self.grid](*self.args, **self.meta)


def check_tensor(name: str, t, *, ndim: int | None = None, dtypes=None, length: int | None = None,
                 device: torch.device | None = None) -> None:
    """Validate one argument; errors name the argument, its value and what was expected."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if length is not None and t.shape[0] != length:
        raise ValueError(f"{name} must have length {length} (first dim), got {t.shape[0]}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} like the other inputs")


def check_finite(name: str, t: torch.Tensor) -> None:
    """Raise if ``t`` holds NaN or inf, naming the first bad index."""
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        idx = int(bad.reshape(-1).nonzero()[0])
        raise ValueError(f"{name} must be finite, got {t.reshape(-1)[idx].item()} at flat index {idx}")
