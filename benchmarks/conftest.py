"""Micro-benchmark harness.

``pytest benchmarks/ --benchmark`` runs the gated benchmarks: full shapes and the speed/memory
gates of DESIGN.md section 5 on a GPU; reduced shapes on CPU, where the GPU gates are reported
as skipped.  Without ``--benchmark`` every benchmark runs as a quick smoke test (tiny shapes,
one iteration) so that CI keeps them importable and correct.
"""

import pytest


def pytest_addoption(parser):
    parser.addoption("--benchmark", action="store_true", default=False,
                     help="run the gated micro-benchmarks at full size (GPU gates on CUDA)")


@pytest.fixture
def bench_mode(request) -> bool:
    """True under ``--benchmark``; False for the smoke run."""
    return bool(request.config.getoption("--benchmark"))
