"""Model presets: small functions returning a :class:`ModelConfig`.

* ``tiny`` — runs in seconds on a 2-core CPU; the embedded default of the training jobs.
* ``r4b-4b`` — R-4B's shape: SigLIP2-So400m/14@384 tower + 2-layer MLP projector + Qwen3-4B.

``get_preset(name, **overrides)`` looks a preset up by name.  The entry points' default,
``--setup.model.preset auto`` (:class:`r4b.components.ModelChoice`), is not a preset here: it
takes the network from a checkpoint's ``config.json`` (``hf_path``), or is ``tiny`` without one.
"""

from __future__ import annotations

from typing import Callable

from .config import LLAVA_ONEVISION_PINPOINTS, LMConfig, ModelConfig
from .vision import VisionConfig


def tiny(vocab_size: int = 512, *, image_token_id: int | None = None, vision: bool = True,
         image_size: int = 16, params_dtype: str = "float32") -> ModelConfig:
    """A 4-layer, 128-wide Qwen3-style LM (~0.9M parameters plus embeddings) and, with
    ``vision``, a 2-layer 64-wide ViT on ``image_size``-pixel tiles with 4-pixel patches
    (16 tokens per 16-px tile) whose last block's output, without post-LayerNorm, feeds the
    projector (LLaVA-OneVision's ``vision_feature_layer=-1``, as in R-4B, so tiny models export
    to the same checkpoint layout).  ``vocab_size`` comes from the tokenizer in use;
    ``image_token_id`` defaults to its last id."""
    lm = LMConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=384, num_layers=4,
                  num_heads=4, num_kv_heads=2, head_dim=32, rope_theta=10_000.0,
                  rms_norm_eps=1e-6, max_position_embeddings=4096, tie_word_embeddings=True)
    vis = None
    if vision:
        vis = VisionConfig(hidden_size=64, intermediate_size=256, num_layers=2, num_heads=4,
                           patch_size=4, image_size=image_size, num_channels=3,
                           layer_norm_eps=1e-6, feature_layer=2, projector_hidden_act="gelu")
        if image_token_id is None:
            image_token_id = vocab_size - 1
    return ModelConfig(lm=lm, vision=vis, image_token_id=image_token_id if vision else None,
                       params_dtype=params_dtype)


def r4b_4b(*, params_dtype: str = "bfloat16") -> ModelConfig:
    """R-4B: SigLIP2-So400m/14@384 + MLP projector (with LayerNorm) + Qwen3-4B.

    Language model, from Qwen/Qwen3-4B's config.json (architectures Qwen3ForCausalLM):
    hidden_size 2560, intermediate_size 9728, num_hidden_layers 36, num_attention_heads 32,
    num_key_value_heads 8, head_dim 128, vocab_size 151936, rope_theta 1000000,
    rms_norm_eps 1e-6, max_position_embeddings 40960, tie_word_embeddings true (the model card
    states 36 layers and 32 Q / 8 KV heads as well).

    Vision tower: So400m geometry as in transformers' ``LlavaOnevisionConfig`` vision
    sub-config defaults (transformers 5.x, ``configuration_llava_onevision.py``): hidden_size
    1152, intermediate_size 4304, num_attention_heads 16, patch_size 14, image_size 384, and
    26 encoder layers — LLaVA-OneVision ships So400m without its 27th layer and feeds the last
    remaining layer's output (``vision_feature_layer=-1``, no post-LayerNorm) to the projector,
    i.e. ``feature_layer = num_layers`` here.  ``layer_norm_eps`` 1e-6 (``SiglipVisionConfig``
    default).  Projector: LayerNorm(eps 1e-6) → Linear → GELU → Linear, as in vLLM's
    ``RForConditionalGeneration`` (``rvl.py``).  ``image_token_id`` 151646 is
    LlavaOnevisionConfig's default ``image_token_index``; ``from_hf`` takes the checkpoint's own.

    Images: LLaVA-OneVision AnyRes with its defaults (``image_layout="anyres"``,
    ``vision_aspect_ratio="anyres_max_9"``, ``image_grid_pinpoints`` multiples of 384 up to
    2304 x 2304, ``image_newline`` rows, SigLIP normalisation mean = std = 0.5): 1,485 tokens
    for a 384 x 384 image, 7,269 for 1920 x 1080 (see :mod:`r4b.data.images`).
    """
    lm = LMConfig(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_layers=36,
                  num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=1_000_000.0,
                  rms_norm_eps=1e-6, max_position_embeddings=40960, tie_word_embeddings=True)
    vis = VisionConfig(hidden_size=1152, intermediate_size=4304, num_layers=26, num_heads=16,
                       patch_size=14, image_size=384, num_channels=3, layer_norm_eps=1e-6,
                       feature_layer=26, projector_hidden_act="gelu")
    return ModelConfig(lm=lm, vision=vis, image_token_id=151646, projector_pre_norm=True,
                       projector_eps=1e-6, image_newline=True, image_layout="anyres",
                       image_grid_pinpoints=LLAVA_ONEVISION_PINPOINTS,
                       vision_aspect_ratio="anyres_max_9", image_mean=(0.5, 0.5, 0.5),
                       image_std=(0.5, 0.5, 0.5), params_dtype=params_dtype)


PRESETS: dict[str, Callable[..., ModelConfig]] = {"tiny": tiny, "r4b-4b": r4b_4b}


def get_preset(name: str, **kwargs) -> ModelConfig:
    """The preset called ``name`` (``tiny`` or ``r4b-4b``), with keyword overrides passed to it."""
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
    return PRESETS[name](**kwargs)
