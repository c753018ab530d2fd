"""Measuring tensor memory on any device: live bytes and their peak, from the tensors
themselves (CPU included, where the allocator keeps no statistics).

:class:`TensorMemory` is a ``TorchDispatchMode``: every tensor an op creates inside the context
is recorded by its storage, counted once, and subtracted when the storage is freed (a weak
reference to the storage: torch keeps one Python object per live storage).  Tensors that exist
before the context (weights, optimizer state) are added with :meth:`TensorMemory.add`.  What it
measures is tensor bytes, not allocator reservations or fragmentation; on CUDA,
``torch.cuda.max_memory_allocated`` measures the same quantity at allocator granularity.

:func:`saved_activation_bytes` counts what autograd keeps for backward (the bytes whose
lifetime recomputation shortens).
"""

from __future__ import annotations

import weakref
from typing import Callable, Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class TensorMemory(TorchDispatchMode):
    """Live tensor bytes (``current``) and their maximum (``peak``) inside the context."""

    def __init__(self):
        super().__init__()
        self._refs: dict[int, weakref.ref] = {}
        self.current = 0
        self.peak = 0

    def _storage(self, t: torch.Tensor) -> None:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        local = getattr(t, "_local_tensor", None)  # a DTensor: count its shard, not its shape
        if local is not None:
            return self._storage(local)
        if type(t) is not torch.Tensor and torch._C._is_wrapper_subclass(t):
            return  # other wrapper subclasses hold no storage of their own
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # e.g. sparse / nested tensors
            return
        key = st._cdata
        if key in self._refs and self._refs[key]() is not None:
            return
        n = st.nbytes()

        def freed(_ref, key=key, n=n):
            if self._refs.get(key) is _ref:
                del self._refs[key]
                self.current -= n

        self._refs[key] = weakref.ref(st, freed)
        self.current += n
        self.peak = max(self.peak, self.current)

    def add(self, tensors: Iterable[torch.Tensor]) -> "TensorMemory":
        """Count tensors that existed before the context (their storages, once each)."""
        for t in tensors:
            self._storage(t)
        return self

    def reset_peak(self) -> None:
        self.peak = self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            self._storage(t)
        return out


def saved_activation_bytes(fn: Callable[[], torch.Tensor],
                           exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the distinct tensors autograd saves for backward while ``fn()`` runs, without
    the storages of ``exclude`` (the parameters: weights saved by matmuls are not
    activations).  Tensors saved inside non-reentrant recomputation are not kept, so they do
    not count.  Works on the meta device (planning without memory)."""
    skip = {t.untyped_storage()._cdata for t in exclude}
    seen: dict[int, int] = {}

    def pack(t):
        if isinstance(t, torch.Tensor):  # meta tensors count too: shapes are all it needs
            st = t.untyped_storage()
            if st._cdata not in skip:
                seen[st._cdata] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())
