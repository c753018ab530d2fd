"""A stand-in for the subset of vLLM's offline API that ``r4b.rollout.vllm_engine`` calls.

For tests only: importable as ``vllm`` when ``tests/vllm_standin`` is put on ``sys.path``
(``tests/test_vllm_engine.py`` does that with ``monkeypatch``); never installed.  It is *not*
vLLM: no scheduler, paged KV cache, CUDA graphs, cumem allocator or tensor parallelism.  It
copies, from the released source of vLLM **0.10.2** and **0.34.0** (the two ends of the range
r4b supports; pick one with ``R4B_VLLM_STANDIN_VERSION=0.10.2|0.34.0`` before import, default
the newest), the behaviours the engine depends on, including the inconvenient ones; each
is marked below with the file and version it copies:

* the keyword sets of ``LLM(...)`` (:data:`ACCEPTED_LLM_KWARGS`) and ``SamplingParams(...)``
  (:data:`ACCEPTED_SAMPLING_KWARGS`) as read from vLLM's source (``vllm/entrypoints/llm.py``
  ``LLM.__init__``, ``vllm/engine/arg_utils.py`` ``EngineArgs``, ``vllm/sampling_params.py``):
  an unknown keyword is a ``TypeError``, as it is in vLLM;
* the external launcher reads ``RANK`` / ``LOCAL_RANK`` from the environment (``KeyError``
  without them);
* a generating model: a real r4b model built from the ``config.json`` in ``LLM(model=dir)``
  (``load_format="dummy"``: vLLM's dummy init, uniform in [-1e-3, 1e-3]);
* vLLM's sampler order for one request (``vllm/v1/sample/sampler.py``): allowed-token mask,
  logit bias, then greedy (``temperature < 1e-5``: no temperature) or temperature, top-k,
  top-p (ascending sort, drop while the cumulative mass <= 1 - p, keep at least one) and an
  exponential race with the request's own ``torch.Generator``; ``logprobs_mode`` picks raw or
  processed log-probs; prompt log-probs from the raw logits (temperature 1), over the
  *expanded* prompt; 0.34's cap of 1024 allowed ids / logit-bias entries per request;
* the multimodal path of LLaVA-OneVision / R-4B: image sizes read from PIL images or arrays
  (0.10.2 reads every array channels-first), each image's first ``<image>`` token expanded to
  the class's own token count (already-expanded token prompts are expanded again), image
  features merged by token id (0.10.2) or by placeholder range (0.34), an encoder cache keyed by
  the image's hash (its content, or the request's ``multi_modal_uuids``) that
  ``reset_prefix_cache`` leaves alone;
* the order of the stop checks (0.10.2: the length cap before the stop ids);
* ``RequestOutput`` / ``CompletionOutput`` / ``Logprob`` shapes, stop ids, ``max_tokens``;
* sleep mode: ``sleep(level)`` (level 2 discards the weights: filled with NaN here, so a
  weight that is not pushed again is caught), ``wake_up(tags)``, generation and weight loading
  refused while the memory they need is asleep;
* ``apply_model(fn)`` with ``fn`` getting a model whose ``load_weights`` takes
  ``(name, tensor)`` pairs under transformers checkpoint names, maps them with the
  ``hf_to_vllm_mapper`` prefixes of vLLM's ``LlavaOnevisionForConditionalGeneration`` /
  ``RForConditionalGeneration`` (identity for ``Qwen3ForCausalLM``), rejects unknown names and
  wrong shapes, and returns the loaded names; ``named_parameters()`` lists the names it holds.

Every call is appended to ``LLM.calls`` so tests can check the order of operations.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

# Bound at import, so a test that patches r4b's functions does not change the stand-in.
from r4b.models import build_model as _build_r4b_model
from r4b.models import read_hf_config as _read_hf_config
from r4b.models.hf import HUB_LAYOUT, TEXT_LAYOUT
from r4b.models.hf import _load_into as _r4b_load_into
from r4b.models.hf import model_hf_state_dict as _hf_state_dict
from r4b.data.images import ImageLayout as _ImageLayout
from r4b.data.images import anyres_grid as _anyres_grid
from r4b.data.images import process_image as _process_image
from r4b.models.attention import make_attn_meta as _make_attn_meta
from r4b.models.attention import resolve_backend as _resolve_backend
from r4b.models.multimodal import ImageBatch as _ImageBatch

try:
    from PIL import Image as _PILImage
except ImportError:  # pragma: no cover - pillow is an install requirement of r4b
    _PILImage = None

VERSIONS = ("0.10.2", "0.34.0")
"""The vLLM releases whose source this stand-in copies (r4b's supported range's two ends)."""
STANDIN_VERSION = os.environ.get("R4B_VLLM_STANDIN_VERSION", VERSIONS[-1])
if STANDIN_VERSION not in VERSIONS:
    raise ImportError(f"R4B_VLLM_STANDIN_VERSION must be one of {VERSIONS}, got {STANDIN_VERSION!r}")
OLD = STANDIN_VERSION == "0.10.2"
"""Behave as vLLM 0.10.2 (else as 0.34.0)."""
__version__ = f"{STANDIN_VERSION}+r4b.standin"

# 0.34.0 vllm/v1/worker/gpu/sample/logit_bias.py: MAX_NUM_ALLOWED_TOKEN_IDS and
# MAX_NUM_LOGIT_BIAS_TOKENS (LogitBiasState.add_request raises above them); the GPU model runner
# of 0.34 is that one (vllm/v1/worker/gpu/).  0.10.2 (vllm/v1/worker/gpu_input_batch.py: a
# [max_num_reqs, vocab] bool mask) has no cap.
MAX_NUM_ALLOWED_TOKEN_IDS = None if OLD else 1024
MAX_NUM_LOGIT_BIAS_TOKENS = None if OLD else 1024

# ``LLM.__init__``'s named parameters (vllm/entrypoints/llm.py at main, commit 10fdb8f) ...
_LLM_PARAMS = (
    "model", "runner", "convert", "tokenizer", "tokenizer_mode", "skip_tokenizer_init",
    "trust_remote_code", "allowed_local_media_path", "allowed_media_domains",
    "tensor_parallel_size", "dtype", "quantization", "revision", "tokenizer_revision", "seed",
    "gpu_memory_utilization", "swap_space", "cpu_offload_gb", "enforce_eager",
    "enable_return_routed_experts", "disable_custom_all_reduce", "hf_token", "hf_overrides",
    "mm_processor_kwargs", "pooler_config", "structured_outputs_config", "profiler_config",
    "attention_config", "kv_cache_memory_bytes", "compilation_config", "logits_processors",
)
# ... and the ``EngineArgs`` fields (vllm/engine/arg_utils.py, ``**kwargs`` of ``LLM``) that
# exist from v0.10.2 on (logprobs_mode is the newest of them).
_ENGINE_ARGS = (
    "max_model_len", "distributed_executor_backend", "pipeline_parallel_size",
    "data_parallel_size", "enable_sleep_mode", "logprobs_mode", "load_format",
    "enable_prefix_caching", "max_num_seqs", "max_num_batched_tokens", "max_logprobs",
    "disable_log_stats", "enable_chunked_prefill", "generation_config", "worker_extension_cls",
    "kv_cache_dtype", "block_size",
)
ACCEPTED_LLM_KWARGS = frozenset(_LLM_PARAMS + _ENGINE_ARGS)
"""Keywords ``vllm.LLM`` accepts (the part of them this stand-in knows)."""

ACCEPTED_SAMPLING_KWARGS = frozenset((
    "n", "presence_penalty", "frequency_penalty", "repetition_penalty", "temperature", "top_p",
    "top_k", "min_p", "seed", "stop", "stop_token_ids", "ignore_eos", "max_tokens",
    "min_tokens", "logprobs", "prompt_logprobs", "detokenize", "skip_special_tokens",
    "spaces_between_special_tokens", "logits_processors", "include_stop_str_in_output",
    "truncate_prompt_tokens", "output_kind", "logit_bias", "allowed_token_ids", "extra_args",
    "bad_words",
))
"""``vllm.SamplingParams`` fields (vllm/sampling_params.py)."""

LOGPROBS_MODES = ("raw_logprobs", "raw_logits", "processed_logprobs", "processed_logits")
EXECUTOR_BACKENDS = ("ray", "mp", "uni", "external_launcher")
SLEEP_TAGS = ("weights", "kv_cache")
_SAMPLING_EPS = 1e-5

# vllm/model_executor/models/llava_onevision.py and rvl.py: hf_to_vllm_mapper.orig_to_new_prefix
LLAVA_PREFIX_MAP = {
    "model.language_model.": "language_model.model.",
    "model.vision_tower.": "vision_tower.",
    "model.multi_modal_projector.": "multi_modal_projector.",
    "model.image_newline": "image_newline",
    "lm_head.": "language_model.lm_head.",
}
PREFIX_MAPS = {
    "Qwen3ForCausalLM": {},
    "LlavaOnevisionForConditionalGeneration": LLAVA_PREFIX_MAP,
    "RForConditionalGeneration": LLAVA_PREFIX_MAP,
}


def _unknown(what: str, given: Iterable[str], accepted) -> None:
    bad = sorted(set(given) - set(accepted))
    if bad:
        raise TypeError(f"{what} got unexpected keyword arguments {bad}")


@dataclass
class Logprob:
    """vllm.logprobs.Logprob"""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    """vllm.outputs.CompletionOutput"""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class RequestOutput:
    """vllm.outputs.RequestOutput"""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[dict[int, Logprob] | None] | None
    outputs: list[CompletionOutput]
    finished: bool = True


class SamplingParams:
    """vllm.SamplingParams (the fields in :data:`ACCEPTED_SAMPLING_KWARGS`, checked as vLLM's
    ``_verify_args`` does for the ones used here)."""

    _DEFAULTS = dict(n=1, temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, seed=None,
                     stop_token_ids=None, ignore_eos=False, max_tokens=16, min_tokens=0,
                     logprobs=None, prompt_logprobs=None, detokenize=True,
                     skip_special_tokens=True, logit_bias=None, allowed_token_ids=None,
                     presence_penalty=0.0, frequency_penalty=0.0, repetition_penalty=1.0)

    def __init__(self, **kwargs: Any):
        _unknown("SamplingParams", kwargs, ACCEPTED_SAMPLING_KWARGS)
        self.kwargs = dict(kwargs)
        for k, v in {**self._DEFAULTS, **kwargs}.items():
            setattr(self, k, v)
        if self.n != 1:
            raise NotImplementedError("the stand-in generates n=1 only")
        if self.temperature < 0:
            raise ValueError(f"temperature must be non-negative, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1 or (self.top_k != -1 and self.top_k < 0):
            raise ValueError(f"top_k must be -1 (disable), 0 or at least 1, got {self.top_k}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < -1):
                raise ValueError(f"{name} must be None, -1 or >= 0, got {v!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise TypeError(f"seed must be an int, got {type(self.seed).__name__}")
        if self.allowed_token_ids is not None and not len(self.allowed_token_ids):
            raise ValueError("allowed_token_ids is not None and empty!")
        if any(p != d for p, d in ((self.presence_penalty, 0.0), (self.frequency_penalty, 0.0),
                                   (self.repetition_penalty, 1.0), (self.min_p, 0.0),
                                   (self.min_tokens, 0))):
            raise NotImplementedError("the stand-in implements no penalties / min_p / min_tokens")


# ---------------------------------------------------------------- the worker's model
def _map_name(name: str, prefix_map: dict[str, str]) -> str:
    for old, new in prefix_map.items():  # WeightsMapper: each matching prefix, in order
        if name.startswith(old):
            name = new + name[len(old):]
    return name


class StandInModel(torch.nn.Module):
    """What ``apply_model``'s function gets: an r4b model behind vLLM's weight interface."""

    def __init__(self, inner, arch: str):
        super().__init__()
        self.inner = inner
        self.arch = arch
        self.prefix_map = PREFIX_MAPS[arch]
        self.layout = TEXT_LAYOUT if inner.cfg.vision is None else HUB_LAYOUT
        self._hf_shapes = {k: tuple(v.shape) for k, v in _hf_state_dict(inner).items()}
        self._hf_name = {_map_name(k, self.prefix_map): k for k in self._hf_shapes}
        self.asleep_weights = False
        self.load_calls: list[list[str]] = []

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        sd = _hf_state_dict(self.inner)
        for name, hf in self._hf_name.items():
            yield prefix + name, sd[hf]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy ``(name, tensor)`` pairs (checkpoint names) into the model; the vLLM names
        loaded.  Unknown names and wrong shapes raise, as vLLM's loaders do."""
        if self.asleep_weights:
            raise RuntimeError("load_weights while the weights are asleep: wake_up(tags="
                               "['weights']) first (vLLM's weight memory is unmapped)")
        pushed: dict[str, torch.Tensor] = {}
        for name, t in weights:
            vname = _map_name(name, self.prefix_map)
            if vname not in self._hf_name:
                raise ValueError(f"There is no module or parameter named {vname!r} "
                                 f"(checkpoint name {name!r}) in {self.arch}")
            if tuple(t.shape) != self._hf_shapes[name]:
                raise ValueError(f"{name}: checkpoint shape {tuple(t.shape)} does not match the "
                                 f"model's {self._hf_shapes[name]}")
            pushed[name] = t.detach().to("cpu").clone()
        merged = {k: v.detach().clone() for k, v in _hf_state_dict(self.inner).items()}
        merged.update(pushed)
        _r4b_load_into(self.inner, merged, self.layout)
        self.load_calls.append(sorted(pushed))
        return {_map_name(k, self.prefix_map) for k in pushed}


def _build_model(path: Path, dtype: str, seed: int):
    """The r4b model ``config.json`` in ``path`` describes, with vLLM's dummy weights."""
    raw = json.loads((path / "config.json").read_text())
    arch = raw["architectures"][0]
    if arch not in PREFIX_MAPS:
        raise ValueError(f"Model architectures {[arch]} are not supported by the stand-in")
    keys: list[str] = []
    if arch != "Qwen3ForCausalLM":  # what vLLM's LLaVA-OneVision module always holds
        keys = [HUB_LAYOUT.lm + "embed_tokens.weight",
                HUB_LAYOUT.vision + "embeddings.patch_embedding.weight", HUB_LAYOUT.newline]
        if arch == "RForConditionalGeneration":
            keys.append(HUB_LAYOUT.projector + "pre_norm.weight")
    cfg, _ = _read_hf_config(path, keys=keys)
    if cfg.vision is not None:
        # vllm/model_executor/models/llava_onevision.py (0.10.2 and 0.34.0):
        # _merge_image_patch_embeddings(..., vision_aspect_ratio="anyres_max_9") is called
        # without the config's value: the feature map is reduced to 9 tiles' worth, always.
        cfg = dataclasses.replace(cfg, vision_aspect_ratio="anyres_max_9")
    if dtype not in ("auto", None):
        cfg = dataclasses.replace(cfg, params_dtype={"half": "float16", "float": "float32"}.get(dtype, dtype))
    model = _build_r4b_model(cfg, init_weights=False).eval()
    g = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.empty(p.shape, dtype=torch.float32).uniform_(-1e-3, 1e-3, generator=g))
    return model, arch, cfg


# ---------------------------------------------------------------- multimodal
def image_size(image) -> tuple[int, int]:
    """``(width, height)`` as vLLM reads it (``ImageProcessorItems.get_image_size``).

    0.10.2 ``vllm/multimodal/parse.py``: a PIL image gives ``image.size``; an array or tensor is
    read channels-first, ``_, h, w = image.shape`` (a ``[H, W, 3]`` array is read as height
    ``W``, width 3).  0.34.0 ``vllm/multimodal/parse.py``: a 3-dim
    array whose last dimension is 1, 3 or 4 is channels-last, otherwise channels-first."""
    if _PILImage is not None and isinstance(image, _PILImage.Image):
        return image.size
    if isinstance(image, (np.ndarray, torch.Tensor)):
        if not OLD and image.ndim == 3 and image.shape[-1] in (1, 3, 4):
            h, w = int(image.shape[0]), int(image.shape[1])
        else:
            _, h, w = (int(x) for x in image.shape)
        return w, h
    raise TypeError(f"unsupported image type {type(image).__name__}")


def num_image_tokens(arch: str, cfg, width: int, height: int) -> int:
    """Placeholder tokens vLLM's processor of ``arch`` gives one image (token counting only).

    ``LlavaOnevisionForConditionalGeneration``: ``LlavaOnevisionProcessingInfo`` (0.10.2 and
    0.34.0 ``vllm/model_executor/models/llava_onevision.py``), LLaVA-NeXT's count with the
    unpadded map reduced to 9 tiles (``ratio = sqrt(h w / (9 p^2))``, hard-coded 9).
    ``RForConditionalGeneration`` (``rvl.py``): registered with ``LlavaNextProcessingInfo``
    (``llava_next.py``): the unpadded map is never reduced.  Both: ``p^2`` base features plus
    one newline per row; every image of a prompt is counted on its own (no multi-image
    form)."""
    lay = dataclasses.replace(_ImageLayout.of(cfg),
                              max_tiles=9 if arch == "LlavaOnevisionForConditionalGeneration" else None)
    return lay.tokens_per_tile + _anyres_grid(height, width, lay).grid_tokens


def mm_hash(image) -> str:
    """``MultiModalHasher.hash_kwargs(model_id=..., image=...)`` stand-in: the image's content."""
    h = hashlib.sha256()
    if _PILImage is not None and isinstance(image, _PILImage.Image):
        h.update(repr((image.mode, image.size)).encode())
        h.update(image.tobytes())
    else:
        a = np.ascontiguousarray(image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else image)
        h.update(repr((a.dtype.str, a.shape)).encode())
        h.update(a.tobytes())
    return h.hexdigest()


class LLMEngine:
    """``LLM.llm_engine`` (``vllm/v1/engine/llm_engine.py``): 0.34.0 has
    ``reset_encoder_cache()`` (``EngineCore.reset_encoder_cache``: "called when model weights
    are updated to ensure stale vision embeddings ... are not reused"); 0.10.2 has none."""

    def __init__(self, llm: "LLM"):
        self._llm = llm

    if not OLD:
        def reset_encoder_cache(self) -> None:
            self._llm.calls.append(("reset_encoder_cache",))
            self._llm.encoder_cache.clear()


# ---------------------------------------------------------------- LLM
class LLM:
    """vllm.LLM: the constructor keywords are checked against :data:`ACCEPTED_LLM_KWARGS` and
    recorded in ``kwargs``; generation runs the r4b model of ``config.json``."""

    def __init__(self, model: str, **kwargs: Any):
        _unknown("LLM.__init__", kwargs, ACCEPTED_LLM_KWARGS)
        self.kwargs = {"model": model, **kwargs}
        self.calls: list[tuple] = []
        backend = kwargs.get("distributed_executor_backend")
        if backend is not None and backend not in EXECUTOR_BACKENDS:
            raise ValueError(f"distributed_executor_backend must be one of {EXECUTOR_BACKENDS}")
        if backend == "external_launcher":
            # ParallelConfig.__post_init__ and ExecutorWithExternalLauncher: 0.10.2
            # vllm/executor/uniproc_executor.py _init_executor, 0.34.0
            # vllm/v1/executor/uniproc_executor.py _distributed_args: int(os.environ["RANK"]),
            # int(os.environ["LOCAL_RANK"]) (a KeyError outside torchrun unless they are set).
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
            self.rank, self.local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
        tp = int(kwargs.get("tensor_parallel_size", 1))
        if int(kwargs.get("data_parallel_size", 1)) > 1:
            raise ValueError("Offline data parallel mode is not supported/useful for dense models.")
        if int(os.environ.get("WORLD_SIZE", "1")) % tp:
            raise ValueError(f"world size is not a multiple of tensor_parallel_size {tp}")
        if tp != 1:
            raise NotImplementedError("the stand-in runs tensor_parallel_size=1 only")
        self.logprobs_mode = kwargs.get("logprobs_mode", "raw_logprobs")
        if self.logprobs_mode not in LOGPROBS_MODES:
            raise ValueError(f"logprobs_mode must be one of {LOGPROBS_MODES}")
        if not 0.0 < float(kwargs.get("gpu_memory_utilization", 0.9)) <= 1.0:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")
        path = Path(model)
        if not (path / "config.json").is_file():
            raise OSError(f"{model} holds no config.json")
        if not kwargs.get("skip_tokenizer_init", False) and not any(
                (path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json",
                                              "vocab.json", "tokenizer.model")):
            raise OSError(f"Can't load tokenizer for '{model}' (skip_tokenizer_init is False)")
        load_format = kwargs.get("load_format", "auto")
        if load_format != "dummy":
            raise NotImplementedError("the stand-in builds dummy weights only (load_format='dummy')")
        inner, arch, cfg = _build_model(path, kwargs.get("dtype", "auto"), kwargs.get("seed", 0))
        self.max_model_len = int(kwargs.get("max_model_len") or cfg.lm.max_position_embeddings)
        if self.max_model_len > cfg.lm.max_position_embeddings:
            raise ValueError(f"max_model_len {self.max_model_len} exceeds the model's "
                             f"max_position_embeddings {cfg.lm.max_position_embeddings}")
        self.vocab_size = int(cfg.lm.vocab_size)
        self.cfg, self.arch = cfg, arch
        self.model = StandInModel(inner, arch)
        self.encoder_cache: dict[str, torch.Tensor] = {}
        self.encoder_runs = 0
        self.llm_engine = LLMEngine(self)
        self.sleep_mode = bool(kwargs.get("enable_sleep_mode", False))
        self.asleep: set[str] = set()
        self.prompts_seen: list[list[dict]] = []
        self.params_seen: list[list[SamplingParams]] = []

    # ------------------------------------------------------------ control
    def sleep(self, level: int = 1) -> None:
        if not self.sleep_mode:
            raise ValueError("Sleep mode is not enabled (enable_sleep_mode=False)")
        if level not in (1, 2):
            raise ValueError(f"sleep level must be 1 or 2, got {level}")
        self.reset_prefix_cache()  # LLM.sleep does this first
        if not OLD:
            # 0.34.0 vllm/v1/engine/core.py: EngineCore.sleep(level >= 1) -> pause_scheduler(
            # clear_cache=True) -> _reset_caches -> reset_encoder_cache.  0.10.2 keeps it.
            self.encoder_cache.clear()
        self.calls.append(("sleep", level))
        self.asleep = set(SLEEP_TAGS)
        self.model.asleep_weights = True
        if level == 2:  # the weights are discarded
            with torch.no_grad():
                for p in self.model.inner.parameters():
                    p.fill_(float("nan"))

    def wake_up(self, tags: list[str] | None = None) -> None:
        if tags is not None and (not tags or set(tags) - set(SLEEP_TAGS)):
            raise ValueError(f"wake_up tags must be in {SLEEP_TAGS}, got {tags!r}")
        self.calls.append(("wake_up", None if tags is None else tuple(tags)))
        self.asleep -= set(SLEEP_TAGS if tags is None else tags)
        self.model.asleep_weights = "weights" in self.asleep

    def reset_prefix_cache(self, reset_running_requests: bool = False,
                           reset_connector: bool = False) -> bool:
        """KV-cache prefixes only: the encoder cache (vision features by image hash) is a
        separate store (``vllm/v1/core/encoder_cache_manager.py``, both versions)."""
        self.calls.append(("reset_prefix_cache",))
        return True

    def apply_model(self, func: Callable[[torch.nn.Module], Any]) -> list[Any]:
        self.calls.append(("apply_model",))
        return [func(self.model)]

    # ------------------------------------------------------------ generation
    def generate(self, prompts, sampling_params=None, *, use_tqdm=True, lora_request=None,
                 priority=None, tokenization_kwargs=None) -> list[RequestOutput]:
        if self.asleep:
            raise RuntimeError(f"generate while asleep ({sorted(self.asleep)}): call wake_up()")
        prompts = list(prompts) if isinstance(prompts, (list, tuple)) else [prompts]
        sps = sampling_params if isinstance(sampling_params, (list, tuple)) \
            else [sampling_params or SamplingParams()] * len(prompts)
        if len(sps) != len(prompts):
            raise ValueError("The lengths of prompts and sampling_params must be the same.")
        self.calls.append(("generate", len(prompts)))
        self.prompts_seen.append(prompts)
        self.params_seen.append(list(sps))
        return [self._one(str(i), p, sp) for i, (p, sp) in enumerate(zip(prompts, sps))]

    # ------------------------------------------------------------ the model
    @torch.no_grad()
    def _embed_ids(self, ids: list[int]) -> torch.Tensor:
        inner = self.model.inner
        return inner.language_model.embed(torch.tensor(ids, dtype=torch.long))

    @torch.no_grad()
    def _logits_of_embeds(self, emb: torch.Tensor) -> torch.Tensor:
        """Logits ``[S, V]`` of one sequence given its input embeddings (the model forward
        after vLLM's ``get_input_embeddings``)."""
        inner = self.model.inner
        s = emb.shape[0]
        backend = _resolve_backend(inner.cfg.attention_backend, emb.device, emb.dtype)
        meta = _make_attn_meta(torch.tensor([0, s], dtype=torch.int32), s, backend=backend,
                               dense=(1, s))
        hidden = inner.language_model.run_layers(emb, torch.arange(s), meta=meta)
        out = inner._head(hidden, False, True).float()  # final norm + LM head
        if torch.isnan(out).any():
            raise RuntimeError("NaN logits: the weights were discarded by sleep(level=2) and "
                               "not loaded again")
        return out

    @torch.no_grad()
    def _encode(self, image, key: str) -> torch.Tensor:
        """Vision features of one image, from the encoder cache when ``key`` is in it
        (``EncoderCacheManager.check_and_update_cache``: shared across requests by hash, kept
        after the request ends until evicted)."""
        if key in self.encoder_cache:
            return self.encoder_cache[key]
        # The HF image processor gets each image on its own (vLLM passes a flat list, which
        # transformers' LLaVA-OneVision image processor treats as single images: AnyRes).
        pix = _process_image(image, self.cfg)
        feats = self.model.inner.encode_images(_ImageBatch.collate([pix])).float()
        self.encoder_runs += 1
        self.encoder_cache[key] = feats
        return feats

    def _multimodal(self, ids: list[int], prompt: dict) -> tuple[list[int], torch.Tensor]:
        """Expanded prompt ids and their input embeddings, as vLLM's processor and model
        runner build them from a token prompt and its ``multi_modal_data``."""
        mm = prompt.get("multi_modal_data") or {}
        if set(mm) - {"image"}:
            raise NotImplementedError(f"the stand-in takes images only, got {sorted(mm)}")
        if not mm:
            return ids, self._embed_ids(ids)
        if self.cfg.vision is None:
            raise ValueError(f"{self.arch} is not a multimodal model")
        images = mm["image"] if isinstance(mm["image"], list) else [mm["image"]]
        uuids = (prompt.get("multi_modal_uuids") or {}).get("image")
        if uuids is not None:
            uuids = uuids if isinstance(uuids, list) else [uuids]
            if len(uuids) != len(images):  # 0.10.2 vllm/v1/engine/processor.py
                raise ValueError(f"multi_modal_uuids for modality 'image' must have same length "
                                 f"as data: got {len(uuids)} uuids vs {len(images)} items.")
        img_id = int(self.cfg.image_token_id)
        # Prompt updates (0.10.2 vllm/multimodal/processing.py _apply_matches /
        # _apply_prompt_updates; 0.34.0 vllm/multimodal/processing/processor.py
        # _plan_prompt_updates / _apply_token_matches_with_placeholders): for token prompts
        # too, item k's target (one <image> id) is the first match at or after the end of
        # item k-1's match; it is replaced by the item's K tokens.  Tokens a caller already
        # expanded are not recognised: they stay where they are.
        out, ranges, prev = [], [], 0
        for k, image in enumerate(images):
            w, h = image_size(image)
            n = num_image_tokens(self.arch, self.cfg, w, h)
            try:
                at = ids.index(img_id, prev)
            except ValueError:
                raise RuntimeError(f"Expected there to be {len(images)} prompt updates "
                                   f"corresponding to {len(images)} image items, but instead "
                                   f"found {k} prompt updates!") from None
            out += ids[prev:at]
            ranges.append((len(out), n))
            out += [img_id] * n
            prev = at + 1
        out += ids[prev:]
        feats = [self._encode(im, uuids[k] if uuids is not None and uuids[k] is not None
                              else mm_hash(im)) for k, im in enumerate(images)]
        emb = self._embed_ids(out)
        if OLD:
            # 0.10.2 vllm/model_executor/models/utils.py merge_multimodal_embeddings: the
            # positions are the image token ids of input_ids (masked_scatter).
            mask = torch.tensor(out) == img_id
        else:
            # 0.34.0: the model runner's is_mm_embed mask covers the placeholder ranges only;
            # other image token ids are embedded as text.
            mask = torch.zeros(len(out), dtype=torch.bool)
            for start, n in ranges:
                mask[start:start + n] = True
        flat = torch.cat(feats)
        if int(mask.sum()) != flat.shape[0]:  # _merge_multimodal_embeddings, both versions
            raise ValueError(f"Attempted to assign {' + '.join(str(f.shape[0]) for f in feats)} "
                             f"= {flat.shape[0]} multimodal tokens to {int(mask.sum())} "
                             f"placeholders")
        emb = emb.clone()
        emb[mask] = flat.to(emb.dtype)
        return out, emb

    def _one(self, rid: str, prompt: dict, sp: SamplingParams) -> RequestOutput:
        if not isinstance(prompt, dict) or "prompt_token_ids" not in prompt:
            raise NotImplementedError("the stand-in takes token prompts {'prompt_token_ids': ...}")
        unknown = set(prompt) - {"prompt_token_ids", "multi_modal_data", "multi_modal_uuids"}
        if unknown:
            raise TypeError(f"unknown prompt keys {sorted(unknown)}")
        ids = [int(t) for t in prompt["prompt_token_ids"]]
        if not ids or min(ids) < 0 or max(ids) >= self.vocab_size:
            raise ValueError("prompt token ids out of vocabulary")
        V = self.vocab_size
        allowed = None
        if sp.allowed_token_ids is not None:
            cap = MAX_NUM_ALLOWED_TOKEN_IDS
            if cap is not None and len(sp.allowed_token_ids) > cap:  # 0.34.0 logit_bias.py
                raise ValueError(f"Too many allowed token IDs: {len(sp.allowed_token_ids)}. "
                                 f"The max size is {cap}.")
            if min(sp.allowed_token_ids) < 0 or max(sp.allowed_token_ids) >= V:
                raise ValueError("allowed_token_ids contains out-of-vocab token id!")
            allowed = torch.zeros(V, dtype=torch.bool)
            allowed[torch.tensor(list(sp.allowed_token_ids), dtype=torch.long)] = True
        if sp.logit_bias:
            cap = MAX_NUM_LOGIT_BIAS_TOKENS
            if cap is not None and len(sp.logit_bias) > cap:  # 0.34.0 logit_bias.py
                raise ValueError(f"Too many logit bias tokens: {len(sp.logit_bias)}. The max "
                                 f"size is {cap}.")
            bad = [t for t in sp.logit_bias if not 0 <= int(t) < V]
            if bad:  # vllm/v1/engine/processor.py _validate_logit_bias
                raise ValueError(f"token_id(s) {bad} in logit_bias contain out-of-vocab token "
                                 f"ids. Vocabulary size: {V}")
        ids, emb = self._multimodal(ids, prompt)
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt of {len(ids)} tokens does not fit max_model_len "
                             f"{self.max_model_len}")
        plp = None
        if sp.prompt_logprobs is not None:
            # over the processed (expanded) prompt: one entry per position, entry 0 None
            lp = torch.log_softmax(self._logits_of_embeds(emb), -1)  # raw logits: no temperature
            plp = [None] + [{ids[k]: Logprob(float(lp[k - 1, ids[k]]))} for k in range(1, len(ids))]
        gen = torch.Generator().manual_seed(sp.seed) if sp.seed is not None else None
        stop = set(sp.stop_token_ids or [])
        out_ids: list[int] = []
        out_lps: list[dict[int, Logprob]] = []
        finish, stop_reason = None, None
        max_tokens = sp.max_tokens if sp.max_tokens is not None else self.max_model_len - len(ids)
        while finish is None:
            raw = self._logits_of_embeds(emb)[-1]
            z = raw.clone()
            if allowed is not None:
                z = z.masked_fill(~allowed, float("-inf"))
            for t, b in (sp.logit_bias or {}).items():
                z[int(t)] += max(-100.0, min(100.0, float(b)))
            if sp.temperature < _SAMPLING_EPS:
                tok = int(z.argmax())
            else:
                z = z / sp.temperature
                if sp.top_k not in (0, -1) and sp.top_k < V:
                    kth = torch.topk(z, sp.top_k).values[-1]
                    z = z.masked_fill(z < kth, float("-inf"))
                if sp.top_p < 1.0:
                    zs, idx = torch.sort(z, descending=False)
                    cum = torch.softmax(zs, -1).cumsum(-1)
                    mask = cum <= 1 - sp.top_p
                    mask[-1] = False
                    zs = zs.masked_fill(mask, float("-inf"))
                    z = torch.empty_like(z).scatter_(0, idx, zs)
                probs = torch.softmax(z, -1)
                q = torch.empty_like(probs).exponential_(generator=gen)
                tok = int((probs / q).argmax())
            if self.logprobs_mode == "processed_logprobs":
                lp_vec = torch.log_softmax(z, -1)
            elif self.logprobs_mode == "raw_logprobs":
                lp_vec = torch.log_softmax(raw, -1)
            else:
                lp_vec = z if self.logprobs_mode == "processed_logits" else raw
            out_ids.append(tok)
            out_lps.append({tok: Logprob(float(lp_vec[tok]), rank=1)})
            emb = torch.cat([emb, self._embed_ids([tok])])
            # vllm/v1/core/sched/utils.py check_stop.  0.10.2: the length cap first (a stop
            # token drawn as the last allowed token finishes as "length"); 0.34.0: the stop
            # ids first.
            capped = len(ids) + len(out_ids) >= self.max_model_len or len(out_ids) >= max_tokens
            stopped = tok in stop
            if OLD and capped:
                finish = "length"
            elif stopped:
                finish, stop_reason = "stop", tok
            elif capped:
                finish = "length"
        comp = CompletionOutput(index=0, text="", token_ids=out_ids,
                                cumulative_logprob=None if sp.logprobs is None
                                else float(sum(next(iter(d.values())).logprob for d in out_lps)),
                                logprobs=out_lps if sp.logprobs is not None else None,
                                finish_reason=finish, stop_reason=stop_reason)
        return RequestOutput(request_id=rid, prompt=None, prompt_token_ids=ids,
                             prompt_logprobs=plp, outputs=[comp])


__all__ = ["ACCEPTED_LLM_KWARGS", "ACCEPTED_SAMPLING_KWARGS", "CompletionOutput", "LLM",
           "LLMEngine", "Logprob", "RequestOutput", "SamplingParams"]
