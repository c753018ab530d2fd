"""Stage two: Bi-mode Policy Optimization (:mod:`r4b.rl.bpo`) and its configuration."""

from .bpo import BPOTrainer
from .config import RLConfig

__all__ = ["BPOTrainer", "RLConfig"]
