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
from ..data.images import parse_vision_aspect_ratio
from .vision import VisionConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

IMAGE_LAYOUTS = ("tile", "anyres")

#: LLaVA-OneVision's default ``image_grid_pinpoints`` (``(height, width)``, row-major: the order
#: decides ties in the best-fit choice).
LLAVA_ONEVISION_PINPOINTS: tuple[tuple[int, int], ...] = tuple(
    (h, w) for h in range(384, 2305, 384) for w in range(384, 2305, 384))


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
    """Token id of the image placeholder; how many an image fills depends on ``image_layout``."""
    projector_pre_norm: bool = True
    """Projector starts with a LayerNorm (R-4B: yes; plain LLaVA-OneVision: no)."""
    projector_eps: float = 1e-6
    """Epsilon of the projector's LayerNorm."""
    image_newline: bool = False
    """Hold LLaVA-OneVision's ``image_newline`` vector: appended after every row of an
    ``anyres`` image's features (required there); a ``tile`` model only keeps it for checkpoint
    round trips."""
    image_layout: str = "tile"
    """How an image becomes tiles and placeholder tokens (:mod:`r4b.data.images`).  ``tile``:
    the image is one ``num_channels x image_size x image_size`` tile in [0, 1], unnormalised,
    filling ``vision.tokens_per_image`` placeholders.  ``anyres``: LLaVA-OneVision AnyRes (base
    view + best-fit grid of crops, unpadded, ``image_newline`` rows; R-4B)."""
    image_grid_pinpoints: tuple[tuple[int, int], ...] = LLAVA_ONEVISION_PINPOINTS
    """``(height, width)`` resolutions in pixels that ``anyres`` resizes an image into (each a
    multiple of ``vision.image_size``); default: LLaVA-OneVision's, multiples of 384 up to
    2304 x 2304.  Unused by ``tile``."""
    vision_aspect_ratio: str = "anyres_max_9"
    """``anyres_max_N``: an ``anyres`` image whose grid features exceed ``N`` tiles' worth by
    more than 10% is downscaled (bilinear) to about ``N`` tiles' worth; ``anyres``: never
    downscaled.  Unused by ``tile``."""
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    """Per-channel mean subtracted from ``anyres`` pixels after rescaling to [0, 1] (SigLIP:
    0.5); also the padding colour of the multi-image square view.  Unused by ``tile``."""
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    """Per-channel divisor of ``anyres`` pixels after the mean (SigLIP: 0.5, giving [-1, 1]).
    Unused by ``tile``."""
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
        self._check_image_layout()

    def _check_image_layout(self) -> None:
        require_choice("image_layout", self.image_layout, IMAGE_LAYOUTS)
        try:
            pins = tuple((int(h), int(w)) for h, w in self.image_grid_pinpoints)
        except (TypeError, ValueError) as e:
            raise ValueError(f"image_grid_pinpoints must be (height, width) pairs of ints, got "
                             f"{self.image_grid_pinpoints!r}") from e
        self.image_grid_pinpoints = pins
        for name in ("image_mean", "image_std"):
            v = tuple(float(x) for x in getattr(self, name))
            if len(v) != 3:
                raise ValueError(f"{name} must hold 3 values (R, G, B), got {v!r}")
            setattr(self, name, v)
        if any(not 0.0 <= m <= 1.0 for m in self.image_mean):
            raise ValueError(f"image_mean values must be in [0, 1], got {self.image_mean!r}")
        if any(not s > 0.0 for s in self.image_std):
            raise ValueError(f"image_std values must be > 0, got {self.image_std!r}")
        if self.image_layout != "anyres":
            return
        parse_vision_aspect_ratio(self.vision_aspect_ratio)
        if self.vision is None:
            raise ValueError("image_layout='anyres' needs a vision config, got vision=None")
        if not self.image_newline:
            raise ValueError("image_layout='anyres' appends image_newline after every feature "
                             "row: set image_newline=True, got False")
        if self.vision.num_channels != 3:
            raise ValueError(f"image_layout='anyres' makes RGB tiles: vision.num_channels must "
                             f"be 3, got {self.vision.num_channels}")
        s = self.vision.image_size
        bad = [p for p in pins if p[0] < s or p[1] < s or p[0] % s or p[1] % s]
        if not pins or bad:
            raise ValueError(f"image_grid_pinpoints must be a non-empty list of (height, width) "
                             f"multiples of vision.image_size={s}, got {list(pins)[:6]}"
                             + (f" (offending: {bad[:4]})" if bad else ""))

    @property
    def torch_dtype(self) -> torch.dtype:
        """``params_dtype`` as a ``torch.dtype``."""
        return DTYPES[self.params_dtype]

    @property
    def tokens_per_image(self) -> int:
        """Placeholder tokens one ``tile`` image occupies, i.e. features per tile (0 for
        text-only models); an ``anyres`` image's count depends on its size:
        :func:`r4b.data.images.num_image_tokens`."""
        return 0 if self.vision is None else int(self.vision.tokens_per_image)
