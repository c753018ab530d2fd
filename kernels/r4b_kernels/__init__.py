"""r4b_kernels: fused Triton kernels for GRPO/BPO-style policy optimisation.

Public API (stable):

* :func:`grouped_advantage` -> :class:`GroupedAdvantage` — per-group (and per-mode) reward
  statistics and advantages in one pass; :func:`sequence_loss_weights` gives each sequence's
  per-token loss weight under a loss aggregation, normalised over the global batch;
  :func:`token_advantage_weights` writes per-token advantage and loss weight into a packed
  (cu_seqlens) layout.
* :func:`policy_loss` -> :class:`PolicyLossOutput` — clipped-ratio policy loss fused with the
  LM-head GEMM and an online logsumexp; logits are never materialised; vocab-parallel.
* :func:`token_logprobs` — forward-only log-probs (and entropy) of target tokens.
* :func:`prefix_shared_attention` over a :class:`PrefixLayout` — attention over packed groups
  that share one prompt (each response sees the prompt and itself, the prompt is computed once).

Every function takes ``impl="auto" | "triton" | "torch"`` (the policy loss and log-probs also
``"chunked"``, their ``auto`` off CUDA; the attention also ``"sdpa"`` and ``"flash"``);
``"torch"`` is the reference implementation and runs everywhere.  Only torch is required (triton when present).
"""

from ._common import HAS_TRITON, HAS_TRITON_GPU, TRITON_INTERPRET
from .grouped_advantage import (GroupedAdvantage, grouped_advantage, sequence_loss_weights,
                                token_advantage_weights)
from .policy_loss import PolicyLossOutput, policy_loss, token_logprobs
from .prefix_attention import PrefixLayout, prefix_shared_attention

__all__ = [
    "HAS_TRITON", "HAS_TRITON_GPU", "TRITON_INTERPRET",
    "GroupedAdvantage", "grouped_advantage", "sequence_loss_weights", "token_advantage_weights",
    "PolicyLossOutput", "policy_loss", "token_logprobs",
    "PrefixLayout", "prefix_shared_attention",
]
__version__ = "0.1.0"
