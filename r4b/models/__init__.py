"""r4b's model: a Qwen3-architecture language model built from megatron-core tensor-parallel
layers (pipeline-stage aware), composed with a SigLIP vision tower and an MLP projector.

Public API::

    cfg = get_preset("tiny", vocab_size=512)           # or ModelConfig(lm=LMConfig(...), ...)
    model = build_model(cfg)                            # this rank's TP/PP stage
    logits = model(input_ids=ids)                       # [B, S] -> [B, S, V]
    hidden = model(input_ids=flat, cu_seqlens=cu, position_ids=pos, max_seqlen=m,
                   return_hidden=True)                  # packed [T] -> [T, H]
    cache = model.new_kv_cache(batch_size, max_seqlen)
    logits = model(input_ids=ids, kv_cache=cache, cache_rows=rows)   # [b, s] -> [b, s, V]
    model = from_hf(path, tp_size=1); to_hf(model, path)
"""

import warnings

with warnings.catch_warnings():
    # megatron-core warns at import that Apex and Transformer-Engine are absent (expected on CPU).
    warnings.simplefilter("ignore", UserWarning)
    import megatron.core.parallel_state  # noqa: F401
    import megatron.core.tensor_parallel  # noqa: F401

from .attention import HAVE_FLASH_ATTN, HAVE_TORCH_VARLEN, KVCache
from .config import LMConfig, ModelConfig
from .hf import from_hf, read_hf_config, to_hf
from .layers import HAVE_LIGER, HAVE_TE
from .lm import HFLoadError, Qwen3LM
from .multimodal import ImageBatch, R4BModel, build_model
from .parallel import destroy_model_parallel, init_model_parallel
from .presets import get_preset
from .vision import VisionConfig

__all__ = [
    "LMConfig", "ModelConfig", "VisionConfig", "R4BModel", "Qwen3LM", "ImageBatch", "KVCache",
    "build_model", "get_preset", "from_hf", "to_hf", "read_hf_config", "HFLoadError",
    "init_model_parallel", "destroy_model_parallel",
    "HAVE_FLASH_ATTN", "HAVE_TORCH_VARLEN", "HAVE_LIGER", "HAVE_TE",
]
