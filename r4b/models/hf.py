"""Hugging Face interop: load a transformers checkpoint directory into this rank's shards and
write the model back as one.

Architectures (``config.json`` ``architectures[0]``):

* ``Qwen3ForCausalLM`` — text-only; weights ``model.*`` and ``lm_head.weight`` (untied only);
* ``LlavaOnevisionForConditionalGeneration`` and R-4B's ``RForConditionalGeneration`` — a
  Qwen3 language model, a SigLIP tower, the projector (R-4B's starts with ``pre_norm``; plain
  LLaVA-OneVision's has none), optional ``image_newline``, and an LM head when untied.

Weight-name layouts of the multimodal checkpoints (:data:`LAYOUTS`; :func:`detect_layout` picks
the one whose embedding and patch-embedding keys are present and says which it found):

=========================  ==========================  ===============================  ==========================
layout                      language model              vision tower                     written by
=========================  ==========================  ===============================  ==========================
``hub``                     ``model.language_model.``   ``model.vision_tower.vision_model.``  the R-4B hub checkpoint; :func:`to_hf`
``transformers``            ``model.language_model.``   ``model.vision_tower.``          ``save_pretrained(save_original_format=False)``
``transformers-original``   ``language_model.model.``   ``vision_tower.``                ``save_pretrained()`` (transformers 5.x default)
``legacy``                  ``language_model.model.``   ``vision_tower.vision_model.``   transformers 4.x
=========================  ==========================  ===============================  ==========================

(projector ``[model.]multi_modal_projector.``, newline ``[model.]image_newline``, head
``lm_head.weight`` or ``language_model.lm_head.weight``, following the language model's family).
Single files (``model.safetensors``) and sharded ones (``model.safetensors.index.json``) are
read lazily.

Each module maps its own weights (``hf_state_dict`` / ``load_hf_state_dict`` with names relative
to its prefix, sharding and gathering over TP); this file routes prefixes, reads and writes
files and translates ``config.json``.  Nothing is pickled.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist

from ..log import get_logger
from .config import LMConfig, ModelConfig, dtype_from_name, dtype_name
from .lm import HFLoadError, format_key_problems
from .multimodal import R4BModel, build_model
from .parallel import ensure_model_parallel, init_model_parallel, is_data_parallel_rank0, parallel_info

log = get_logger(__name__)

TEXT_ARCHS = ("Qwen3ForCausalLM",)
MM_ARCHS = ("LlavaOnevisionForConditionalGeneration", "RForConditionalGeneration")

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class CheckpointLayout:
    """Where a checkpoint keeps each part of the model (key prefixes and single keys)."""

    name: str
    lm: str
    """Prefix of the decoder (``embed_tokens``, ``layers.{i}``, ``norm``)."""
    head: str
    """Key of the untied LM head."""
    vision: str | None = None
    """Prefix of the SigLIP tower (``embeddings``, ``encoder``, ``post_layernorm``, ``head``)."""
    projector: str | None = None
    """Prefix of the projector (``pre_norm``, ``linear_1``, ``linear_2``)."""
    newline: str | None = None
    """Key of LLaVA-OneVision's ``image_newline`` vector."""

    def prefixes(self) -> tuple[str, ...]:
        return tuple(p for p in (self.lm, self.vision, self.projector) if p)


TEXT_LAYOUT = CheckpointLayout("qwen3", lm="model.", head="lm_head.weight")
HUB_LAYOUT = CheckpointLayout("hub", lm="model.language_model.", head="lm_head.weight",
                              vision="model.vision_tower.vision_model.",
                              projector="model.multi_modal_projector.", newline="model.image_newline")
LAYOUTS: tuple[CheckpointLayout, ...] = (
    HUB_LAYOUT,
    CheckpointLayout("transformers", lm="model.language_model.", head="lm_head.weight",
                     vision="model.vision_tower.", projector="model.multi_modal_projector.",
                     newline="model.image_newline"),
    CheckpointLayout("legacy", lm="language_model.model.", head="language_model.lm_head.weight",
                     vision="vision_tower.vision_model.", projector="multi_modal_projector.",
                     newline="image_newline"),
    CheckpointLayout("transformers-original", lm="language_model.model.",
                     head="language_model.lm_head.weight", vision="vision_tower.",
                     projector="multi_modal_projector.", newline="image_newline"),
)
"""Multimodal layouts, most specific vision prefix first (``vision_tower.vision_model.`` also
starts with ``vision_tower.``)."""

_EMBED = "embed_tokens.weight"
_PATCH = "embeddings.patch_embedding.weight"


def detect_layout(keys, multimodal: bool) -> CheckpointLayout:
    """The layout whose token-embedding (and, for multimodal checkpoints, patch-embedding) key is
    among ``keys``; ``ValueError`` listing what was looked for when none is."""
    keys = set(keys)
    if not multimodal:
        if TEXT_LAYOUT.lm + _EMBED not in keys:
            raise ValueError(f"a Qwen3ForCausalLM checkpoint must hold {TEXT_LAYOUT.lm + _EMBED!r}; "
                             f"found keys such as {sorted(keys)[:5]}")
        return TEXT_LAYOUT
    for lay in LAYOUTS:
        if lay.lm + _EMBED in keys and lay.vision + _PATCH in keys:
            return lay
    looked = [(lay.name, lay.lm + _EMBED, lay.vision + _PATCH) for lay in LAYOUTS]
    raise ValueError(f"unrecognised multimodal checkpoint layout: none of the known (layout, "
                     f"embedding key, patch-embedding key) pairs {looked} is present; found keys "
                     f"such as {sorted(keys)[:6]}")


# ---------------------------------------------------------------- reading safetensors
class SafetensorsReader(Mapping):
    """Lazy read-only mapping over a checkpoint directory's safetensors file(s).

    ``keys()`` and :meth:`shape_of` read headers only; ``reader[key]`` loads one tensor.
    """

    def __init__(self, path: str | Path):
        from safetensors import safe_open

        self.path = Path(path)
        index = self.path / INDEX_FILE
        single = self.path / SINGLE_FILE
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        elif single.exists():
            files = [SINGLE_FILE]
            weight_map = None
        else:
            raise FileNotFoundError(f"{str(self.path)!r} holds neither {SINGLE_FILE} nor {INDEX_FILE}")
        self.files = files
        self._handles = {}
        for f in files:
            try:
                self._handles[f] = safe_open(str(self.path / f), framework="pt")
            except Exception as e:  # safetensors raises its own error types for bad headers
                raise HFLoadError(f"cannot read {str(self.path / f)!r}: {e}") from e
        self._where: dict[str, str] = {}
        for f, h in self._handles.items():
            for k in h.keys():
                self._where[k] = f
        if weight_map is not None:
            missing = sorted(k for k in weight_map if k not in self._where)
            if missing:
                raise HFLoadError(f"{INDEX_FILE} names tensors absent from its files: {missing}")

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._handles[self._where[key]].get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, key) -> bool:
        return key in self._where

    def shape_of(self, key: str) -> tuple[int, ...]:
        """Shape from the file header, without reading the data."""
        return tuple(self._handles[self._where[key]].get_slice(key).get_shape())


class PrefixView(Mapping):
    """``reader`` restricted to keys under ``prefix``, with the prefix stripped; ``extra`` maps
    further relative names to full keys (``lm_head.weight`` sits outside the decoder prefix)."""

    def __init__(self, reader: Mapping, prefix: str, extra: dict[str, str] | None = None):
        self.reader, self.prefix = reader, prefix
        self._map = {k[len(prefix):]: k for k in reader if k.startswith(prefix)}
        for rel, full in (extra or {}).items():
            if full in reader:
                self._map[rel] = full

    def __getitem__(self, key):
        return self.reader[self._map[key]]

    def __iter__(self):
        return iter(self._map)

    def __len__(self):
        return len(self._map)

    def shape_of(self, key) -> tuple[int, ...]:
        """Shape of ``key`` without loading it."""
        fn = getattr(self.reader, "shape_of", None)
        full = self._map[key]
        return tuple(fn(full)) if fn else tuple(self.reader[full].shape)


# ---------------------------------------------------------------- config.json translation
def _get_rope_theta(d: dict) -> float:
    rp = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling")
    rope_type = rp.get("rope_type", rp.get("type", "default"))
    if scaling not in (None, {}) or rope_type != "default":
        raise ValueError(f"only plain RoPE is supported; config.json has rope_scaling={scaling!r}, "
                         f"rope_parameters={rp!r}")
    theta = rp.get("rope_theta", d.get("rope_theta"))
    if theta is None:
        raise ValueError("config.json names no rope_theta (neither top-level nor in rope_parameters)")
    return float(theta)


def lm_config_from_hf(d: dict) -> LMConfig:
    """``LMConfig`` from a Qwen3 ``config.json`` dict (text config)."""
    if d.get("model_type", "qwen3") != "qwen3":
        raise ValueError(f"language model must be model_type 'qwen3', got {d.get('model_type')!r}")
    if d.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act must be 'silu' (SwiGLU), got {d.get('hidden_act')!r}")
    if d.get("attention_bias", False):
        raise ValueError("attention_bias=true is not supported (Qwen3 has no attention biases)")
    if d.get("use_sliding_window", False):
        raise ValueError("use_sliding_window=true is not supported")
    heads = int(d["num_attention_heads"])
    return LMConfig(
        vocab_size=int(d["vocab_size"]), hidden_size=int(d["hidden_size"]),
        intermediate_size=int(d["intermediate_size"]), num_layers=int(d["num_hidden_layers"]),
        num_heads=heads, num_kv_heads=int(d.get("num_key_value_heads") or heads),
        head_dim=int(d.get("head_dim") or int(d["hidden_size"]) // heads),
        rope_theta=_get_rope_theta(d), rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(d.get("max_position_embeddings", 32768)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)))


def lm_config_to_hf(c: LMConfig) -> dict:
    """Qwen3 ``config.json`` entries for ``c``."""
    return {
        "model_type": "qwen3", "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads, "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim, "hidden_act": "silu", "rms_norm_eps": c.rms_norm_eps,
        "max_position_embeddings": c.max_position_embeddings,
        "rope_theta": c.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
        "rope_scaling": None, "attention_bias": False, "attention_dropout": 0.0,
        "use_sliding_window": False, "tie_word_embeddings": c.tie_word_embeddings,
    }


def _vision_config_from_hf(top: dict):
    from .vision import VisionConfig, feature_layer_from_llava

    v = top.get("vision_config") or {}
    if v.get("model_type", "siglip_vision_model") not in ("siglip_vision_model", "siglip2_vision_model"):
        raise ValueError(f"vision_config.model_type must be a SigLIP vision model, got "
                         f"{v.get('model_type')!r}")
    if v.get("hidden_act", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        raise ValueError(f"vision_config.hidden_act must be 'gelu_pytorch_tanh', got {v.get('hidden_act')!r}")
    strategy = top.get("vision_feature_select_strategy", "full")
    if strategy != "full":
        raise ValueError(f"vision_feature_select_strategy must be 'full' (SigLIP has no CLS token), "
                         f"got {strategy!r}")
    if not top.get("multimodal_projector_bias", True):
        raise ValueError("multimodal_projector_bias=false is not supported")
    n = int(v["num_hidden_layers"])
    return VisionConfig(
        hidden_size=int(v["hidden_size"]), intermediate_size=int(v["intermediate_size"]),
        num_layers=n, num_heads=int(v["num_attention_heads"]), patch_size=int(v["patch_size"]),
        image_size=int(v["image_size"]), num_channels=int(v.get("num_channels", 3)),
        layer_norm_eps=float(v.get("layer_norm_eps", 1e-6)),
        feature_layer=feature_layer_from_llava(int(top.get("vision_feature_layer", -1)), n),
        projector_hidden_act=top.get("projector_hidden_act", "gelu"))


def _vision_config_to_hf(vc) -> tuple[dict, int]:
    from .vision import feature_layer_to_llava

    return ({"model_type": "siglip_vision_model", "hidden_size": vc.hidden_size,
             "intermediate_size": vc.intermediate_size, "num_hidden_layers": vc.num_layers,
             "num_attention_heads": vc.num_heads, "patch_size": vc.patch_size,
             "image_size": vc.image_size, "num_channels": vc.num_channels,
             "layer_norm_eps": vc.layer_norm_eps, "hidden_act": "gelu_pytorch_tanh",
             "vision_use_head": False},
            feature_layer_to_llava(vc.feature_layer, vc.num_layers))


def _image_fields_from_hf(raw: dict, vision, newline: bool, path: Path) -> dict:
    """``ModelConfig`` image-layout fields of a LLaVA-OneVision / R-4B checkpoint.

    ``image_grid_pinpoints`` and ``vision_aspect_ratio`` come from ``config.json`` (defaults:
    LLaVA-OneVision's), ``image_mean`` / ``image_std`` from ``preprocessor_config.json`` when
    present, else ``config.json``, else SigLIP's 0.5.  The layout is ``config.json``'s
    ``image_layout`` (written by :func:`hf_config_dict`); without one it is ``anyres`` (as
    transformers runs these checkpoints) unless the tower cannot tile the pinpoints or there is
    no ``image_newline``, which gives ``tile`` with a logged reason.
    """
    from .config import LLAVA_ONEVISION_PINPOINTS

    pins = tuple((int(h), int(w)) for h, w in (raw.get("image_grid_pinpoints")
                                                or LLAVA_ONEVISION_PINPOINTS))
    fields = {"image_grid_pinpoints": pins,
              "vision_aspect_ratio": raw.get("vision_aspect_ratio") or "anyres_max_9"}
    pre_file = path / "preprocessor_config.json"
    pre = json.loads(pre_file.read_text()) if pre_file.exists() else {}
    for k in ("image_mean", "image_std"):
        v = pre.get(k, raw.get(k))
        if v is not None:
            fields[k] = tuple(float(x) for x in (v if isinstance(v, (list, tuple)) else [v] * 3))
    layout = raw.get("image_layout")
    if layout is None:
        s = vision.image_size
        why = None
        if not newline:
            why = "the checkpoint holds no image_newline"
        elif any(h % s or w % s for h, w in pins):
            why = f"image_grid_pinpoints {list(pins)[:3]}... are not multiples of image_size {s}"
        layout = "anyres" if why is None else "tile"
        if why:
            log.warning("%s: image_layout='tile' (fixed %dx%d tiles, no AnyRes): %s",
                        path, s, s, why)
    fields["image_layout"] = layout
    return fields


def read_hf_config(path: str | Path, keys=()) -> tuple[ModelConfig, dict]:
    """``(ModelConfig, raw config.json dict)`` of a checkpoint directory.

    ``keys`` (the checkpoint's tensor names) decide what ``config.json`` does not say: whether
    the projector has a ``pre_norm`` and whether ``image_newline`` is present (without
    ``keys``: both, as in R-4B).  The image layout (``image_layout``, ``image_grid_pinpoints``,
    ``vision_aspect_ratio``, ``image_mean`` / ``image_std``) is read as
    :func:`_image_fields_from_hf` says: LLaVA-OneVision / R-4B checkpoints get ``anyres``.
    """
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{str(path)!r} has no config.json")
    raw = json.loads(cfg_file.read_text())
    archs = raw.get("architectures") or []
    arch = archs[0] if archs else None
    dtype = raw.get("dtype") or raw.get("torch_dtype") or "float32"
    if arch in TEXT_ARCHS:
        return ModelConfig(lm=lm_config_from_hf(raw), params_dtype=str(dtype)), raw
    if arch in MM_ARCHS:
        text = dict(raw.get("text_config") or {})
        # transformers' LLaVA-OneVision config ties when either level says so.
        text["tie_word_embeddings"] = bool(raw.get("tie_word_embeddings")
                                           or text.get("tie_word_embeddings"))
        keys = set(keys)
        lay = detect_layout(keys, multimodal=True) if keys else HUB_LAYOUT
        image_token = raw.get("image_token_index", raw.get("image_token_id"))
        if image_token is None:
            raise ValueError("config.json names no image_token_index / image_token_id")
        vision = _vision_config_from_hf(raw)
        newline = (not keys) or lay.newline in keys
        return ModelConfig(
            lm=lm_config_from_hf(text), vision=vision,
            image_token_id=int(image_token),
            projector_pre_norm=(not keys) or (lay.projector + "pre_norm.weight") in keys,
            projector_eps=float(raw.get("projector_layer_norm_eps", 1e-6)),
            image_newline=newline, params_dtype=str(dtype),
            **_image_fields_from_hf(raw, vision, newline, path)), raw
    raise ValueError(f"unknown architecture {arch!r} in {str(cfg_file)!r}: supported are "
                     f"{list(TEXT_ARCHS + MM_ARCHS)}")


def hf_config_dict(cfg: ModelConfig, base: dict | None = None) -> dict:
    """``config.json`` for ``cfg``; keys of ``base`` (the loaded checkpoint's config) that do not
    describe the network (token ids, processor settings, ``auto_map``...) are kept."""
    out = copy.deepcopy(base) if base else {}
    for k in ("torch_dtype",):
        out.pop(k, None)
    if cfg.vision is None:
        out.update(lm_config_to_hf(cfg.lm))
        out["architectures"] = ["Qwen3ForCausalLM"]
        out["dtype"] = cfg.params_dtype
        return out
    arch = (base or {}).get("architectures", [None])[0]
    if arch not in MM_ARCHS:
        arch = "RForConditionalGeneration" if cfg.projector_pre_norm else MM_ARCHS[0]
    text = dict(out.get("text_config") or {})
    text.update(lm_config_to_hf(cfg.lm))
    text["dtype"] = cfg.params_dtype
    text.pop("torch_dtype", None)
    vision = dict(out.get("vision_config") or {})
    vdict, feature_layer = _vision_config_to_hf(cfg.vision)
    vision.update(vdict)
    vision.pop("torch_dtype", None)
    out.update({"architectures": [arch], "model_type": out.get("model_type", "llava_onevision"),
                "text_config": text, "vision_config": vision,
                "image_token_index": cfg.image_token_id, "vision_feature_layer": feature_layer,
                "vision_feature_select_strategy": "full",
                "projector_hidden_act": cfg.vision.projector_hidden_act,
                "multimodal_projector_bias": True,
                "tie_word_embeddings": cfg.lm.tie_word_embeddings, "dtype": cfg.params_dtype})
    if cfg.projector_pre_norm:
        out["projector_layer_norm_eps"] = cfg.projector_eps
    # image_layout is r4b's own key (transformers ignores it): it keeps a tile model tile.
    out["image_layout"] = cfg.image_layout
    if cfg.image_layout == "anyres":
        out.update({"image_grid_pinpoints": [list(p) for p in cfg.image_grid_pinpoints],
                    "vision_aspect_ratio": cfg.vision_aspect_ratio,
                    "image_mean": list(cfg.image_mean), "image_std": list(cfg.image_std)})
    return out


# ---------------------------------------------------------------- loading
def _load_into(model: R4BModel, reader: Mapping, lay: CheckpointLayout) -> None:
    """Route checkpoint keys (in layout ``lay``) to the modules; raise one error listing every
    problem."""
    cfg = model.cfg
    lm = model.language_model
    problems: list[str] = []
    unexpected: list[str] = []
    known_prefixes = lay.prefixes() if cfg.vision is not None else (lay.lm,)
    known_keys = {lay.head} | ({lay.newline} if cfg.vision is not None and cfg.image_newline else set())
    for k in reader:
        if k not in known_keys and not any(k.startswith(p) for p in known_prefixes):
            unexpected.append(k)
    # A tied model may still find an LM head in a file: accept it only as an exact copy.
    skip_head = False
    if cfg.lm.tie_word_embeddings and lay.head in reader:
        emb_key = lay.lm + _EMBED
        if emb_key in reader and torch.equal(reader[lay.head], reader[emb_key]):
            skip_head = True
        else:
            unexpected.append(lay.head)
            skip_head = True
    view = PrefixView(reader, lay.lm, extra=None if skip_head else {"lm_head.weight": lay.head})
    try:
        lm.load_hf_state_dict(view, strict=True)
    except (KeyError, ValueError) as e:
        problems.append(f"language model (prefix {lay.lm!r}): {e}")
    if model.has_vision:
        for name, module, prefix in (("vision tower", model.vision_tower, lay.vision),
                                     ("projector", model.projector, lay.projector)):
            sd = {k[len(prefix):]: reader[k] for k in reader if k.startswith(prefix)}
            try:
                module.load_hf_state_dict(sd, strict=True)
            except (KeyError, ValueError) as e:
                problems.append(f"{name} (prefix {prefix!r}): {e}")
        if cfg.image_newline:
            if lay.newline not in reader:
                problems.append(f"missing key {lay.newline!r}")
            else:
                t = reader[lay.newline]
                if tuple(t.shape) != tuple(model.image_newline.shape):
                    problems.append(f"{lay.newline}: expected {tuple(model.image_newline.shape)}, "
                                    f"got {tuple(t.shape)}")
                else:
                    with torch.no_grad():
                        model.image_newline.copy_(t)
    if unexpected:
        problems.insert(0, format_key_problems("checkpoint", [], unexpected, []))
    if problems:
        raise HFLoadError(f"cannot load {getattr(reader, 'path', 'checkpoint')} (layout "
                          f"{lay.name!r}):\n" + "\n".join(problems))


def from_hf(path: str | Path, *, tp_size: int = 1, dtype: torch.dtype | str | None = None,
            device: torch.device | str | None = None, num_layers: int | None = None,
            vision_num_layers: int | None = None,
            master_dtype: torch.dtype | None = None) -> R4BModel:
    """Load a transformers checkpoint directory into this rank's model stage.

    Args:
        path: directory with ``config.json`` and safetensors weights (single or sharded), in
            any layout of :data:`LAYOUTS` (multimodal) or Qwen3's (text).
        tp_size: tensor-parallel size; must match the initialised process groups (with 1 and
            nothing initialised, a one-process group is set up).
        dtype: parameter dtype (default: the checkpoint's ``dtype`` / ``torch_dtype``).
        master_dtype: store the parameters in this dtype instead (fp32 master weights for
            sharded training; ``dtype`` stays the compute dtype, see ``build_model``).
        device: where to put the model (default CPU).
        num_layers, vision_num_layers: cut the language model / vision tower to their first
            ``n`` layers (every width, token and format unchanged; the checkpoint's deeper
            layers are not read).  The tower then feeds its last kept layer to the projector.

    Raises:
        FileNotFoundError: ``path`` is not a checkpoint directory.
        HFLoadError: unreadable files, missing / unexpected keys or shape mismatches, all listed.
        ValueError: unknown architecture or unsupported config.json settings.
    """
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        have = ps.get_tensor_model_parallel_world_size()
        if have != tp_size:
            raise ValueError(f"tp_size={tp_size} but the model-parallel groups have TP size {have}")
    elif tp_size == 1:
        ensure_model_parallel()
    else:
        init_model_parallel(tp_size, 1)
    if not Path(path).is_dir():
        raise FileNotFoundError(f"checkpoint path {str(path)!r} is not a directory")
    reader: Mapping = SafetensorsReader(path)
    cfg, raw = read_hf_config(path, keys=list(reader))
    lay = detect_layout(reader.keys(), multimodal=cfg.vision is not None)
    if dtype is not None:
        cfg = dataclasses.replace(cfg, params_dtype=dtype_name(dtype_from_name(dtype)))
    if num_layers is not None or vision_num_layers is not None:
        cfg = cut_depth(cfg, num_layers=num_layers, vision_num_layers=vision_num_layers)
        reader = _DepthCut(reader, lay, cfg)
    model = build_model(cfg, init_weights=False, device=device, master_dtype=master_dtype)
    _load_into(model, reader, lay)
    model.hf_config_source = raw
    model.hf_layout = lay.name
    log.info("loaded %s (%s, %s layout, %d files) at TP=%d", path,
             (raw.get("architectures") or ["?"])[0], lay.name, len(reader.files), tp_size)
    return model


def cut_depth(cfg: ModelConfig, *, num_layers: int | None = None,
              vision_num_layers: int | None = None) -> ModelConfig:
    """``cfg`` with the language model and / or vision tower cut to their first layers; every
    width, the vocabulary and the special tokens stay.  The tower's feature layer moves to its
    last kept layer when the cut removes the configured one."""
    from ..config import require_range

    lm, vis = cfg.lm, cfg.vision
    if num_layers is not None:
        require_range("num_layers", num_layers, 1, lm.num_layers)
        lm = dataclasses.replace(lm, num_layers=num_layers)
    if vision_num_layers is not None:
        if vis is None:
            raise ValueError("vision_num_layers was given but the model has no vision tower")
        require_range("vision_num_layers", vision_num_layers, 1, vis.num_layers)
        feat = vis.feature_layer
        keep_feat = 0 <= feat <= vision_num_layers or feat == -1
        vis = dataclasses.replace(vis, num_layers=vision_num_layers,
                                  feature_layer=feat if keep_feat else vision_num_layers)
    return dataclasses.replace(cfg, lm=lm, vision=vis)


class _DepthCut(Mapping):
    """A checkpoint reader that hides the layers a depth-cut model does not hold."""

    def __init__(self, reader: Mapping, lay: CheckpointLayout, cfg: ModelConfig):
        self.reader, self.path = reader, getattr(reader, "path", None)
        self.files = getattr(reader, "files", [])
        n_lm = cfg.lm.num_layers
        n_vis = cfg.vision.num_layers if cfg.vision is not None else 0

        def kept(k: str) -> bool:
            for prefix, n in ((lay.lm + "layers.", n_lm),
                              ((lay.vision or "") + "encoder.layers.", n_vis)):
                if prefix and k.startswith(prefix):
                    idx = k[len(prefix):].split(".", 1)[0]
                    return not idx.isdigit() or int(idx) < n
            return True

        self._keys = [k for k in reader if kept(k)]
        self._set = set(self._keys)
        self.dropped = len(reader) - len(self._keys)

    def __getitem__(self, key):
        if key not in self._set:
            raise KeyError(key)
        return self.reader[key]

    def __iter__(self):
        return iter(self._keys)

    def __len__(self):
        return len(self._keys)

    def __contains__(self, key) -> bool:
        return key in self._set

    def shape_of(self, key) -> tuple[int, ...]:
        return self.reader.shape_of(key)


# ---------------------------------------------------------------- saving
def model_hf_state_dict(model: R4BModel) -> dict[str, torch.Tensor]:
    """This stage's tensors under full checkpoint names in the ``hub`` layout (a TP collective:
    call on every rank)."""
    cfg = model.cfg
    lay = TEXT_LAYOUT if cfg.vision is None else HUB_LAYOUT
    out = {}
    for k, v in model.language_model.hf_state_dict().items():
        out[lay.head if k == "lm_head.weight" else lay.lm + k] = v
    if model.has_vision:
        out.update({lay.vision + k: v for k, v in model.vision_tower.hf_state_dict().items()})
        out.update({lay.projector + k: v for k, v in model.projector.hf_state_dict().items()})
        if cfg.image_newline:
            out[lay.newline] = model.image_newline.detach().clone()
    return out


def _chunks(sd: dict[str, torch.Tensor], max_bytes: int) -> list[list[str]]:
    groups, cur, size = [], [], 0
    for k, t in sd.items():
        n = t.numel() * t.element_size()
        if cur and size + n > max_bytes:
            groups.append(cur)
            cur, size = [], 0
        cur.append(k)
        size += n
    if cur:
        groups.append(cur)
    return groups


def to_hf(model: R4BModel, path: str | Path, *, max_shard_bytes: int = 5 * 2**30,
          dtype: torch.dtype | str | None = None) -> None:
    """Write the model as a transformers checkpoint directory (collective over all ranks).

    TP shards are gathered; each pipeline stage writes its own file(s) from its first TP rank
    of the first data-parallel replica; one ``config.json`` (and, when there is more than one
    file, ``model.safetensors.index.json``) is written by the very first of those.  ``dtype``
    casts the tensors (e.g. fp32 master weights written in the model's compute dtype).
    """
    from safetensors.torch import save_file

    path = Path(path)
    info = parallel_info()
    sd = model_hf_state_dict(model)
    if dtype is not None:
        want = dtype_from_name(dtype)
        sd = {k: v.to(want) if v.is_floating_point() else v for k, v in sd.items()}
    writer = info.tp_rank == 0 and is_data_parallel_rank0()
    groups = _chunks(sd, max_shard_bytes) if writer else []
    nbytes = sum(t.numel() * t.element_size() for t in sd.values())
    stats = [(len(groups), nbytes)]
    if info.pp_size > 1:
        stats = [None] * info.pp_size
        dist.all_gather_object(stats, (len(groups), nbytes), group=info.pp_group)
    sizes = [int(n) for n, _ in stats]
    total = sum(sizes)
    if writer:
        path.mkdir(parents=True, exist_ok=True)
        first = sum(sizes[:info.pp_rank]) if info.pp_size > 1 else 0
        weight_map = {}
        for i, keys in enumerate(groups):
            fname = SINGLE_FILE if total == 1 else f"model-{first + i + 1:05d}-of-{total:05d}.safetensors"
            tensors = {k: sd[k].detach().to("cpu").contiguous() for k in keys}
            save_file(tensors, str(path / fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in keys})
    else:
        weight_map = {}
    maps = [weight_map]
    if info.pp_size > 1:
        maps = [None] * info.pp_size
        dist.all_gather_object(maps, weight_map, group=info.pp_group)
    if writer and info.pp_rank == 0:
        merged = {}
        for m in maps:
            merged.update(m)
        if total > 1:
            index = {"metadata": {"total_size": sum(int(b) for _, b in stats)},
                     "weight_map": dict(sorted(merged.items()))}
            (path / INDEX_FILE).write_text(json.dumps(index, indent=2))
        cfg_dict = hf_config_dict(model.cfg, getattr(model, "hf_config_source", None))
        (path / "config.json").write_text(json.dumps(cfg_dict, indent=2, sort_keys=True))
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
