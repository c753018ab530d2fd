"""r4b: a kernel-centric trainer for auto-thinking multimodal models.

Stage one, bi-mode annealing (``python -m r4b.anneal``), teaches a model to answer with and
without a ``<think>`` block; stage two, Bi-mode Policy Optimization
(``torchrun -m r4b.pretrain_bpo``), forces half of each prompt's rollouts into each mode and
normalises advantages over the merged group so the modes compete.
"""

__version__ = "0.1.0"
