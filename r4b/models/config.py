"""Model configuration: the language model (Qwen3 architecture) and the multimodal wrapper.

``LMConfig`` describes the decoder-only language model, ``ModelConfig`` composes it with an
optional vision tower (``r4b.models.vision.VisionConfig``; ``None`` = text-only model).
Parallel layout (TP/PP sizes) is not part of the model config: it comes from the process
groups at build time (see ``r4b.models.parallel``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config import require_choice, require_range
from .vision import VisionConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_from_name(name: str | torch.dtype) -> torch.dtype:
    """``'bfloat16'`` → ``torch.bfloat16`` (a ``torch.dtype`` passes through)."""
    if isinstance(name, torch.dtype):
        if name not in DTYPES.values():
            raise ValueError(f"dtype must be one of {tuple(DTYPES.values())}, got {name}")
        return name
    require_choice("dtype", name, DTYPES)
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` → ``'bfloat16'``."""
    for k, v in DTYPES.items():
        if v == dtype:
            return k
    raise ValueError(f"dtype must be one of {tuple(DTYPES.values())}, got {dtype}")


@dataclass(kw_only=True)
class LMConfig:
    """Qwen3-style decoder: RMSNorm, GQA with per-head QK RMSNorm, RoPE, SwiGLU MLP."""

    vocab_size: int = 512
    """Rows of the embedding / LM head (must be divisible by the tensor-parallel size)."""
    hidden_size: int = 128
    """Width of the residual stream."""
    intermediate_size: int = 384
    """Width of the SwiGLU MLP (gate and up projections each)."""
    num_layers: int = 4
    """Number of decoder layers."""
    num_heads: int = 4
    """Query heads per layer."""
    num_kv_heads: int = 2
    """Key/value heads per layer (grouped-query attention; divides ``num_heads``)."""
    head_dim: int = 32
    """Width of one attention head (Qwen3 does not tie it to hidden_size / num_heads)."""
    rope_theta: float = 1_000_000.0
    """Base of the rotary embedding frequencies."""
    rms_norm_eps: float = 1e-6
    """Epsilon of every RMSNorm (layer norms, QK norms, final norm)."""
    max_position_embeddings: int = 4096
    """Largest position id + 1 the model accepts (longer sequences raise an error)."""
    tie_word_embeddings: bool = True
    """LM head shares the input embedding matrix."""

    def __post_init__(self):
        require_range("lm.vocab_size", self.vocab_size, 1)
        require_range("lm.hidden_size", self.hidden_size, 1)
        require_range("lm.intermediate_size", self.intermediate_size, 1)
        require_range("lm.num_layers", self.num_layers, 1)
        require_range("lm.num_heads", self.num_heads, 1)
        require_range("lm.num_kv_heads", self.num_kv_heads, 1, self.num_heads)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"lm.num_heads ({self.num_heads}) must be a multiple of "
                             f"lm.num_kv_heads ({self.num_kv_heads})")
        require_range("lm.head_dim", self.head_dim, 2)
        if self.head_dim % 2:
            raise ValueError(f"lm.head_dim must be even (rotary pairs), got {self.head_dim}")
        require_range("lm.rope_theta", self.rope_theta, 1.0, lo_open=True)
        require_range("lm.rms_norm_eps", self.rms_norm_eps, 0.0, 1.0, lo_open=True)
        require_range("lm.max_position_embeddings", self.max_position_embeddings, 1)

    def check_tp(self, tp_size: int) -> None:
        """Raise ``ValueError`` unless heads, KV heads, MLP width and vocab split over ``tp_size``."""
        for name in ("num_heads", "num_kv_heads", "intermediate_size", "vocab_size"):
            v = getattr(self, name)
            if v % tp_size:
                hint = (f"; pad the vocabulary to {-(-v // tp_size) * tp_size}"
                        if name == "vocab_size" else "")
                raise ValueError(f"lm.{name}={v} is not divisible by the tensor-parallel size "
                                 f"{tp_size}{hint}")


@dataclass(kw_only=True)
class ModelConfig:
    """The full model: language model plus optional vision tower and projector."""

    lm: LMConfig = field(default_factory=LMConfig)
    """The language model."""
    vision: VisionConfig | None = None
    """The vision tower (SigLIP ViT) and projector; ``None`` builds a text-only model."""
    image_token_id: int | None = None
    """Token id of the image placeholder; each image fills ``vision.tokens_per_image`` of them."""
    projector_pre_norm: bool = True
    """Projector starts with a LayerNorm (R-4B: yes; plain LLaVA-OneVision: no)."""
    projector_eps: float = 1e-6
    """Epsilon of the projector's LayerNorm."""
    image_newline: bool = False
    """Hold LLaVA-OneVision's ``image_newline`` vector (kept for checkpoint round trips; the
    fixed-resolution tiles used here do not insert it)."""
    params_dtype: str = "float32"
    """Parameter dtype: float32, bfloat16 or float16."""
    attention_backend: str = "auto"
    """auto (flash-attn, else torch varlen on CUDA, else SDPA), flash, torch_varlen or sdpa."""

    def __post_init__(self):
        require_choice("params_dtype", self.params_dtype, DTYPES)
        require_range("projector_eps", self.projector_eps, 0.0, lo_open=True)
        require_choice("attention_backend", self.attention_backend,
                       ("auto", "flash", "torch_varlen", "sdpa"))
        if self.vision is not None:
            if self.image_token_id is None:
                raise ValueError("image_token_id must be set when vision is configured, got None")
            require_range("image_token_id", self.image_token_id, 0, self.lm.vocab_size - 1)
        elif self.image_newline:
            raise ValueError("image_newline=True needs a vision config, got vision=None")

    @property
    def torch_dtype(self) -> torch.dtype:
        """``params_dtype`` as a ``torch.dtype``."""
        return DTYPES[self.params_dtype]

    @property
    def tokens_per_image(self) -> int:
        """Placeholder tokens one image occupies (0 for text-only models)."""
        return 0 if self.vision is None else int(self.vision.tokens_per_image)
