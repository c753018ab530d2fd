"""Root pytest configuration: make Triton kernels testable on CPU-only machines.

Triton decides at decoration time whether kernels run through its interpreter, so
TRITON_INTERPRET must be set before any kernel module is imported: this file is loaded first.
"""

import os

import pytest


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


if not _has_cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
