"""Device discipline: every tensor the trainer creates names its device.

On a GPU node a tensor created without ``device=`` lands on the CPU; the first op that mixes it
with the model's CUDA tensors fails (or, worse, a whole computation silently runs on the host).
On a CPU-only machine that bug is invisible, because host and model share one device.
:func:`explicit_devices` makes it visible everywhere: inside the context, a tensor factory
(``torch.tensor``, ``torch.zeros``, ``torch.arange``, ...) called without an explicit ``device``
raises :class:`ImplicitDeviceError` naming the call site.  Host metadata that stays on the host
on purpose says so with ``device="cpu"``; tensors derived from others (``x.new_zeros``,
``torch.zeros_like``, arithmetic) inherit their device and are not affected.

What this catches: factories without a device in r4b's code and in the Python code of the
libraries it calls, on any machine.  What it cannot catch on a CPU-only machine: a tensor
created with an explicit but wrong device (``device="cpu"`` handed to the model) — that needs
a second device to fail.  ``R4B_EXPLICIT_DEVICES=1`` turns the check on for a whole run
(:func:`maybe_explicit_devices`).
"""

from __future__ import annotations

import contextlib
import os
import traceback

import torch
from torch.overrides import TorchFunctionMode

#: Factories whose result device comes from the (global) default when ``device`` is omitted.
FACTORIES = frozenset({
    torch.tensor, torch.as_tensor, torch.zeros, torch.ones, torch.empty, torch.full,
    torch.arange, torch.range, torch.linspace, torch.logspace, torch.eye, torch.rand,
    torch.randn, torch.randint, torch.randperm, torch.empty_strided, torch.scalar_tensor,
    torch.normal, torch.tril_indices, torch.triu_indices,
})


class ImplicitDeviceError(RuntimeError):
    """A tensor factory was called without an explicit ``device``."""


def _caller() -> str:
    """The innermost frame outside torch and this module (where the factory was called)."""
    for fr in reversed(traceback.extract_stack()):
        f = fr.filename.replace("\\", "/")
        if "/torch/" in f or f.endswith("/r4b/devices.py"):
            continue
        return f"{fr.filename}:{fr.lineno} in {fr.name}: {fr.line}"
    return "<unknown>"


class _ExplicitDevices(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES and kwargs.get("device") is None:
            exempt = func is torch.as_tensor and args and isinstance(args[0], torch.Tensor)
            exempt |= func is torch.normal and args and isinstance(args[0], torch.Tensor)
            if not exempt:
                raise ImplicitDeviceError(
                    f"torch.{func.__name__}(...) without device= at {_caller()}: name the "
                    f"device (the model's, or 'cpu' for host metadata)")
        return func(*args, **kwargs)


@contextlib.contextmanager
def explicit_devices():
    """Within the context, tensor factories without ``device=`` raise (see the module
    docstring)."""
    with _ExplicitDevices():
        yield


def maybe_explicit_devices():
    """:func:`explicit_devices` when ``R4B_EXPLICIT_DEVICES`` is set to a non-zero value, else
    a no-op context."""
    if os.environ.get("R4B_EXPLICIT_DEVICES", "0") not in ("", "0"):
        return explicit_devices()
    return contextlib.nullcontext()
