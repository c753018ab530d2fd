"""Rollout engines: completions with their sampling log-probs, per requested mode.

* :class:`EmbeddedEngine` — batched KV-cache sampler on r4b's own model (the default; CPU and
  GPU, any TP size).
* :class:`VLLMEngine` — the same interface on vLLM for GPU users (``pip install 'r4b[gpu]'``;
  imported lazily, ``HAVE_VLLM`` says whether it can be).
* :class:`SamplingParams` / :func:`sample` — temperature, top-k, top-p and per-mode budgets.
"""

from .engine import MODES, EmbeddedEngine, Rollout, RolloutRequest, validate_requests
from .sampling import SamplingParams, sample, truncated_logits
from .vllm_engine import HAVE_VLLM, VLLMEngine

__all__ = [
    "EmbeddedEngine", "HAVE_VLLM", "MODES", "Rollout", "RolloutRequest", "SamplingParams",
    "VLLMEngine", "sample", "truncated_logits", "validate_requests",
]
