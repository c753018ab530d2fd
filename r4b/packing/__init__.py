"""The packer: from a batch of rollouts (or SFT examples) to this rank's packed micro-batches.

A batch goes one way down this package:

* :mod:`~r4b.packing.microbatch` — the trainer's view: :func:`plan` (this rank's share of a
  balanced DP plan), :func:`pack` (its micro-batches as :class:`PackedMicroBatch`, per-sequence
  rows and images attached), :func:`forward_rows`;
* :mod:`~r4b.packing.groups` — the prefix-shared layout of BPO groups (a group's prompt once,
  then each rollout's response): :func:`group_units`, :func:`pack_groups`, dispatched like
  :mod:`~r4b.packing.thd` (``impl=``);
* :mod:`~r4b.packing.thd` — the packer proper: the balanced plan and the THD layout, dispatched
  to the C++ extension (``r4b._C``), the CUDA gathers (``r4b._C_cuda``) or the references;
* :mod:`~r4b.packing.reference` (vectorised NumPy) and :mod:`~r4b.packing.python_ref`
  (row-by-row pure Python, the specification): the same contract as the C++ core.
"""

from .groups import FlatTokens, GroupUnit, group_units, image_classes, pack_groups, pack_shared
from .microbatch import PackedMicroBatch, empty_microbatch, forward_rows, pack, plan
from .thd import (COSTS, HAS_R4B_C, HAS_R4B_C_GROUPS, HAS_R4B_CUDA, IGNORE_INDEX, PackedBatch, Plan,
                  flatten_sequences, gather_rows, pack_microbatch, pack_microbatches,
                  plan_microbatches, resolve_impl, scatter_rows, unpack_response, unpack_rows)

__all__ = [
    "PackedMicroBatch", "empty_microbatch", "forward_rows", "pack", "plan",
    "FlatTokens", "GroupUnit", "group_units", "image_classes", "pack_groups", "pack_shared",
    "COSTS", "HAS_R4B_C", "HAS_R4B_C_GROUPS", "HAS_R4B_CUDA", "IGNORE_INDEX", "PackedBatch", "Plan",
    "flatten_sequences", "gather_rows", "pack_microbatch", "pack_microbatches",
    "plan_microbatches", "resolve_impl", "scatter_rows", "unpack_response", "unpack_rows",
]
