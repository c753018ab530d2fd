"""The embedded default: built-in tokenizer, visual-arithmetic task and the tiny model,
wired together so that every entry point runs on any machine with no downloads.

Shapes: the task draws 4 digits into an 18×18 grayscale tile (a 2×2 grid of 9×9 cells); the
tiny vision tower cuts it into 9×9 patches, so each image is 4 tokens and each token sees one
digit cell.  The vocabulary is the tokenizer's, padded to a multiple of the TP size so the LM
head splits evenly across tensor-parallel ranks (the engine never samples padded ids).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .config import require_choice, require_range
from .data import BuiltinTokenizer, ChatTemplate, HFTokenizer, TaskConfig
from .models import ModelConfig, get_preset


@dataclass(kw_only=True)
class ModelChoice:
    """Which model to build."""

    preset: str = "tiny"
    """Model preset: 'tiny' (the embedded default) or 'r4b-4b'."""
    hf_path: str | None = None
    """Load weights from this Hugging Face checkpoint directory instead of a fresh init."""
    tokenizer_path: str | None = None
    """Hugging Face tokenizer directory; None uses the built-in tokenizer (embedded task)."""
    params_dtype: str = "float32"
    """Parameter dtype: float32, bfloat16 or float16."""

    def __post_init__(self):
        require_choice("model.preset", self.preset, ("tiny", "r4b-4b"))
        require_choice("model.params_dtype", self.params_dtype, ("float32", "bfloat16", "float16"))


def default_task() -> TaskConfig:
    """The embedded task at the tiny model's tile size (18 px, 4 digits, grayscale)."""
    return TaskConfig(n_digits=4, image_size=18, channels=1, noise_std=0.05, vision=True)


def make_tokenizer(choice: ModelChoice):
    """The built-in tokenizer, or a local Hugging Face tokenizer directory."""
    return BuiltinTokenizer() if choice.tokenizer_path is None else HFTokenizer(choice.tokenizer_path)


def model_config(choice: ModelChoice, tokenizer, task: TaskConfig, *, tp_size: int = 1) -> ModelConfig:
    """Model config for ``choice``, sized to the tokenizer and the task's image tiles."""
    if choice.preset == "r4b-4b":
        return get_preset("r4b-4b", params_dtype=choice.params_dtype)
    vocab = -(-tokenizer.vocab_size // tp_size) * tp_size  # padded ids are never sampled
    cfg = get_preset("tiny", vocab_size=vocab, image_token_id=tokenizer.image_token_id,
                     vision=task.vision, params_dtype=choice.params_dtype)
    if cfg.vision is not None:
        patch = task.image_size // 2  # one patch per digit cell of the 2x2 grid
        cfg = dataclasses.replace(cfg, vision=dataclasses.replace(
            cfg.vision, image_size=task.image_size, patch_size=patch, num_channels=task.channels))
    return cfg


def make_template(tokenizer, cfg: ModelConfig) -> ChatTemplate:
    """The chat template with each ``<image>`` expanded to the tower's tokens per image."""
    return ChatTemplate(tokenizer, max(1, cfg.tokens_per_image))


@dataclass(kw_only=True)
class Setup:
    """Everything the entry points share about the model and the data."""

    model: ModelChoice = field(default_factory=ModelChoice)
    """Model preset and optional checkpoint / tokenizer paths."""
    task: TaskConfig = field(default_factory=default_task)
    """The embedded task (used when no data files are given)."""
    seed: int = 0
    """Global seed: model init, task generation and sampling derive from it."""
    tp_size: int = 1
    """Tensor-parallel size (the launch's process count must be a multiple of it)."""

    def __post_init__(self):
        require_range("seed", self.seed, 0)
        require_range("tp_size", self.tp_size, 1)
