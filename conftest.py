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


def _selects(config, marker: str) -> bool:
    expr = config.getoption("markexpr", "") or ""
    return marker in expr and f"not {marker}" not in expr


def pytest_collection_modifyitems(config, items):
    # ``exhaustive`` tests (tens of minutes on a 2-core CPU) run only when asked for:
    # ``pytest -m exhaustive`` or R4B_EXHAUSTIVE=1.
    if not (_selects(config, "exhaustive") or os.environ.get("R4B_EXHAUSTIVE", "0") not in ("", "0")):
        off = pytest.mark.skip(reason="exhaustive: run with -m exhaustive or R4B_EXHAUSTIVE=1")
        for item in items:
            if "exhaustive" in item.keywords:
                item.add_marker(off)
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
