"""Vision side of the multimodal model: a SigLIP-style ViT tower and the MLP projector.

Both are built on megatron-core's tensor-parallel linear layers, so they split across the
tensor-parallel (TP) group of :mod:`megatron.core.parallel_state`:

* attention: ``q/k/v`` are column-parallel (each rank holds ``num_heads / TP`` whole heads),
  ``out_proj`` is row-parallel (its all-reduce restores the full hidden state);
* MLP: ``fc1`` column-parallel, ``fc2`` row-parallel;
* projector: ``linear_1`` column-parallel, ``linear_2`` row-parallel;
* patch/position embeddings and LayerNorms are replicated on every rank.

With TP=1 nothing needs initialising: when ``torch.distributed`` is not initialised the
megatron layers hold the weights and are applied as plain linears (megatron's region mappings
need a process group).  When it is initialised, ``parallel_state`` must be too.

Weights move in and out under transformers' names (:meth:`SiglipVisionTower.hf_state_dict`,
:meth:`SiglipVisionTower.load_hf_state_dict`, same on :class:`Projector`): full (unsharded)
tensors, gathered from / sliced to this rank's shard.

The tower sees a flat batch of fixed-resolution tiles ``[N, C, image_size, image_size]``.
AnyRes tiling (one base view plus a grid of crops per image) happens upstream: an image maps
to a run of consecutive tiles, and the caller keeps the tiles-per-image counts to regroup the
``[N, tokens_per_image, hidden]`` output.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from megatron.core import ModelParallelConfig, parallel_state
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from torch import nn

from r4b.config import require_choice, require_range

__all__ = [
    "VisionConfig", "SiglipVisionTower", "Projector", "LoadResult",
    "feature_layer_from_llava", "feature_layer_to_llava", "make_parallel_config",
]

#: Activations accepted by the projector, under transformers' ``ACT2FN`` names.
PROJECTOR_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}

#: Key prefix of SigLIP's attention-pooling head (``SiglipVisionModel`` with
#: ``vision_use_head=True``).  The multimodal model never runs it; see ``load_hf_state_dict``.
HEAD_PREFIX = "head."


# ---------------------------------------------------------------- config
@dataclasses.dataclass(kw_only=True)
class VisionConfig:
    """Shape of the SigLIP vision tower and the activation of the projector behind it."""

    hidden_size: int
    """Width of the tower's residual stream (So400m: 1152)."""
    intermediate_size: int
    """Hidden width of each encoder block's MLP (So400m: 4304)."""
    num_layers: int
    """Number of encoder blocks."""
    num_heads: int
    """Attention heads per block; must divide ``hidden_size`` and be divisible by TP size."""
    patch_size: int
    """Side of a square patch in pixels; the patch embedding is a conv with this stride."""
    image_size: int
    """Side of a square input tile in pixels; must be a multiple of ``patch_size``."""
    num_channels: int = 3
    """Colour channels of ``pixel_values``."""
    layer_norm_eps: float = 1e-6
    """Epsilon of every LayerNorm in the tower."""
    feature_layer: int = -1
    """Which tower output feeds the projector.

    ``-1``: output of the last encoder block followed by ``post_layernorm`` (transformers'
    ``SiglipVisionModel(...).last_hidden_state``).  Any other value ``k`` in
    ``[-(num_layers + 1), num_layers]`` selects transformers' ``hidden_states[k]`` with
    ``output_hidden_states=True``: ``0`` = patch + position embeddings, ``i`` = output of block
    ``i`` (1-based), negative ``k`` counts from the end; ``post_layernorm`` is not applied and
    blocks after the selected one are not run.  LLaVA-OneVision's ``vision_feature_layer`` ``v``
    (``hidden_states[v]``, never post-normed) maps to ``num_layers`` for ``v == -1`` and to ``v``
    otherwise; see :func:`feature_layer_from_llava`.
    """
    projector_hidden_act: str = "gelu"
    """Activation between the projector's two linears (``gelu`` is the exact erf GELU)."""

    def __post_init__(self):
        require_range("hidden_size", self.hidden_size, 1)
        require_range("intermediate_size", self.intermediate_size, 1)
        require_range("num_layers", self.num_layers, 1)
        require_range("num_heads", self.num_heads, 1)
        require_range("patch_size", self.patch_size, 1)
        require_range("image_size", self.image_size, self.patch_size)
        require_range("num_channels", self.num_channels, 1)
        require_range("layer_norm_eps", self.layer_norm_eps, 0.0, lo_open=True)
        require_range("feature_layer", self.feature_layer, -(self.num_layers + 1), self.num_layers)
        require_choice("projector_hidden_act", self.projector_hidden_act, PROJECTOR_ACTIVATIONS)
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size must be divisible by num_heads={self.num_heads}, "
                             f"got {self.hidden_size}")
        # image_size need not be a multiple of patch_size: the strided patch convolution drops
        # the remainder (So400m/14@384: 27x27 = 729 patches, the last 6 pixels unused).

    @property
    def tokens_per_image(self) -> int:
        """Tokens the tower emits per tile: ``(image_size // patch_size) ** 2``."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden_size // self.num_heads

    @property
    def layers_run(self) -> int:
        """Encoder blocks the forward pass runs for the selected ``feature_layer``."""
        if self.feature_layer == -1:
            return self.num_layers
        if self.feature_layer >= 0:
            return self.feature_layer
        return self.num_layers + 1 + self.feature_layer


def feature_layer_from_llava(vision_feature_layer: int, num_layers: int) -> int:
    """``VisionConfig.feature_layer`` equivalent to LLaVA-OneVision's ``vision_feature_layer``.

    LLaVA-OneVision feeds ``hidden_states[vision_feature_layer]`` (no ``post_layernorm``) to the
    projector; here ``-1`` means "post-normed last layer", so its ``-1`` becomes ``num_layers``.
    """
    if not isinstance(vision_feature_layer, int):
        raise TypeError("vision_feature_layer must be a single int (multi-layer feature "
                        f"concatenation is not supported), got {vision_feature_layer!r}")
    require_range("vision_feature_layer", vision_feature_layer, -(num_layers + 1), num_layers)
    return num_layers if vision_feature_layer == -1 else vision_feature_layer


def feature_layer_to_llava(feature_layer: int, num_layers: int) -> int:
    """LLaVA-OneVision ``vision_feature_layer`` equivalent to ``feature_layer`` (inverse of
    :func:`feature_layer_from_llava`); ``-1`` (post-normed output) has no equivalent there."""
    require_range("feature_layer", feature_layer, -(num_layers + 1), num_layers)
    if feature_layer == -1:
        raise ValueError("feature_layer=-1 (last layer + post_layernorm) has no LLaVA-OneVision "
                         "vision_feature_layer equivalent: LLaVA-OneVision never applies "
                         "post_layernorm; use feature_layer=num_layers for its -1")
    return -1 if feature_layer == num_layers else feature_layer


# ---------------------------------------------------------------- parallel plumbing
def _tp_group() -> torch.distributed.ProcessGroup | None:
    """The TP group from ``parallel_state``; ``None`` when running single-process."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return None
    if not parallel_state.model_parallel_is_initialized():
        raise RuntimeError(
            "torch.distributed is initialised but megatron.core.parallel_state is not: call "
            "parallel_state.initialize_model_parallel(tensor_model_parallel_size=...) before "
            "building vision modules")
    return parallel_state.get_tensor_model_parallel_group()


def _group_size_rank(group) -> tuple[int, int]:
    if group is None:
        return 1, 0
    return torch.distributed.get_world_size(group), torch.distributed.get_rank(group)


def make_parallel_config(params_dtype: torch.dtype = torch.float32) -> ModelParallelConfig:
    """Megatron ``ModelParallelConfig`` for the vision modules: current TP size, weights
    initialised on CPU (move the module to the GPU afterwards), no sequence parallelism."""
    tp_size, _ = _group_size_rank(_tp_group())
    return ModelParallelConfig(tensor_model_parallel_size=tp_size, use_cpu_initialization=True,
                               params_dtype=params_dtype, perform_initialization=True)


def _check_parallel_config(cfg: ModelParallelConfig) -> None:
    if cfg.sequence_parallel:
        raise ValueError("parallel_config.sequence_parallel must be False for the vision "
                         "modules (activations are [tiles, tokens, hidden], not sequence-split)")
    if cfg.gradient_accumulation_fusion:
        raise ValueError("parallel_config.gradient_accumulation_fusion must be False for the "
                         "vision modules")


def _init_normal(std: float) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda w: nn.init.normal_(w, mean=0.0, std=std)


def _divisible(name: str, value: int, tp_size: int) -> None:
    if value % tp_size:
        raise ValueError(f"{name} must be divisible by the tensor-parallel size {tp_size}, "
                         f"got {value} (choose a tp_size that divides it)")


class LoadResult(NamedTuple):
    """Keys that a non-strict ``load_hf_state_dict`` left untouched or ignored."""

    missing_keys: list[str]
    unexpected_keys: list[str]


class _HFEntry(NamedTuple):
    param: torch.Tensor
    split_dim: int | None  # dimension sharded across TP ranks; None = replicated


def _full_shape(entry: _HFEntry, tp_size: int) -> tuple[int, ...]:
    shape = list(entry.param.shape)
    if entry.split_dim is not None:
        shape[entry.split_dim] *= tp_size
    return tuple(shape)


def _gather_hf(table: dict[str, _HFEntry], group) -> dict[str, torch.Tensor]:
    """Full tensors under HF names: TP shards all-gathered along their split dimension."""
    tp_size, _ = _group_size_rank(group)
    out = {}
    for name, e in table.items():
        local = e.param.detach()
        if e.split_dim is None or tp_size == 1:
            out[name] = local.clone().contiguous()
            continue
        parts = [torch.empty_like(local) for _ in range(tp_size)]
        torch.distributed.all_gather(parts, local.contiguous(), group=group)
        out[name] = torch.cat(parts, dim=e.split_dim)
    return out


def _load_hf(table: dict[str, _HFEntry], sd: dict[str, torch.Tensor], *, strict: bool, group,
             owner: str, passthrough_prefix: str | None = None) -> LoadResult:
    """Copy this rank's shard of every full tensor in ``sd`` into ``table``'s parameters.

    Everything is checked before anything is copied, so a failed load changes nothing.
    """
    tp_size, rank = _group_size_rank(group)
    missing = [k for k in table if k not in sd]
    unexpected = [k for k in sd if k not in table
                  and not (passthrough_prefix and k.startswith(passthrough_prefix))]
    mismatched = []
    for name, e in table.items():
        if name in sd:
            want = _full_shape(e, tp_size)
            got = tuple(sd[name].shape)
            if got != want:
                mismatched.append(f"{name}: expected {want}, got {got}")
    if strict and (missing or unexpected):
        raise KeyError(f"{owner}.load_hf_state_dict(strict=True): missing keys {missing}, "
                       f"unexpected keys {unexpected}, shape mismatches {mismatched}")
    if mismatched:
        raise ValueError(f"{owner}.load_hf_state_dict: shape mismatches (full, unsharded shapes "
                         f"at TP={tp_size}) {mismatched}")
    with torch.no_grad():
        for name, e in table.items():
            if name not in sd:
                continue
            full = sd[name]
            if e.split_dim is not None and tp_size > 1:
                size = e.param.shape[e.split_dim]
                full = full.narrow(e.split_dim, rank * size, size)
            e.param.copy_(full)
    return LoadResult(missing, unexpected)


def _linear_entries(prefix: str, layer: nn.Module, split_dim: int | None,
                    bias_split: bool) -> dict[str, _HFEntry]:
    out = {f"{prefix}.weight": _HFEntry(layer.weight, split_dim)}
    if layer.bias is not None:
        out[f"{prefix}.bias"] = _HFEntry(layer.bias, split_dim if bias_split else None)
    return out


def _linear(layer: ColumnParallelLinear | RowParallelLinear, x: torch.Tensor) -> torch.Tensor:
    """Apply a megatron TP linear (bias added inside).  Without ``torch.distributed`` the layer
    has no group and megatron's region mappings cannot run, so it acts as a plain linear."""
    if layer.tp_group is None:
        return F.linear(x, layer.weight, layer.bias)
    return layer(x)[0]


def _column(in_f: int, out_f: int, pc: ModelParallelConfig, group,
            std: float) -> ColumnParallelLinear:
    return ColumnParallelLinear(in_f, out_f, config=pc, init_method=_init_normal(std), bias=True,
                                gather_output=False, skip_bias_add=False, tp_group=group)


def _row(in_f: int, out_f: int, pc: ModelParallelConfig, group, std: float) -> RowParallelLinear:
    return RowParallelLinear(in_f, out_f, config=pc, init_method=_init_normal(std), bias=True,
                             input_is_parallel=True, skip_bias_add=False, tp_group=group)


# ---------------------------------------------------------------- tower
class VisionAttention(nn.Module):
    """Bidirectional multi-head self-attention with q/k/v/out biases; heads split across TP."""

    def __init__(self, cfg: VisionConfig, pc: ModelParallelConfig, group):
        super().__init__()
        tp_size, _ = _group_size_rank(group)
        _divisible("the vision tower's num_heads (vision.num_heads)", cfg.num_heads, tp_size)
        self.heads_per_rank = cfg.num_heads // tp_size
        self.head_dim = cfg.head_dim
        h, std = cfg.hidden_size, cfg.hidden_size ** -0.5
        self.q_proj = _column(h, h, pc, group, std)
        self.k_proj = _column(h, h, pc, group, std)
        self.v_proj = _column(h, h, pc, group, std)
        self.out_proj = _row(h, h, pc, group, std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [N, T, hidden]`` -> ``[N, T, hidden]`` (all-reduced over TP)."""
        n, t, _ = x.shape

        def heads(proj):
            return _linear(proj, x).view(n, t, self.heads_per_rank, self.head_dim).transpose(1, 2)

        o = F.scaled_dot_product_attention(heads(self.q_proj), heads(self.k_proj),
                                           heads(self.v_proj), is_causal=False)
        o = o.transpose(1, 2).reshape(n, t, self.heads_per_rank * self.head_dim)
        return _linear(self.out_proj, o)

    def hf_entries(self, prefix: str) -> dict[str, _HFEntry]:
        """HF name -> (parameter, TP split dim) for this block's attention."""
        out = {}
        for name in ("q_proj", "k_proj", "v_proj"):
            out.update(_linear_entries(f"{prefix}.{name}", getattr(self, name), 0, True))
        out.update(_linear_entries(f"{prefix}.out_proj", self.out_proj, 1, False))
        return out


class VisionMLP(nn.Module):
    """``fc1`` (column-parallel) -> tanh-approximated GELU -> ``fc2`` (row-parallel)."""

    def __init__(self, cfg: VisionConfig, pc: ModelParallelConfig, group):
        super().__init__()
        tp_size, _ = _group_size_rank(group)
        _divisible("the vision tower's MLP width (vision.intermediate_size)", cfg.intermediate_size, tp_size)
        self.fc1 = _column(cfg.hidden_size, cfg.intermediate_size, pc, group,
                           cfg.hidden_size ** -0.5)
        self.fc2 = _row(cfg.intermediate_size, cfg.hidden_size, pc, group,
                        cfg.intermediate_size ** -0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [N, T, hidden]`` -> ``[N, T, hidden]``."""
        return _linear(self.fc2, F.gelu(_linear(self.fc1, x), approximate="tanh"))

    def hf_entries(self, prefix: str) -> dict[str, _HFEntry]:
        """HF name -> (parameter, TP split dim) for this block's MLP."""
        return {**_linear_entries(f"{prefix}.fc1", self.fc1, 0, True),
                **_linear_entries(f"{prefix}.fc2", self.fc2, 1, False)}


class VisionEncoderLayer(nn.Module):
    """Pre-norm block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``."""

    def __init__(self, cfg: VisionConfig, pc: ModelParallelConfig, group):
        super().__init__()
        h, eps, dt = cfg.hidden_size, cfg.layer_norm_eps, pc.params_dtype
        self.layer_norm1 = nn.LayerNorm(h, eps=eps, dtype=dt)
        self.self_attn = VisionAttention(cfg, pc, group)
        self.layer_norm2 = nn.LayerNorm(h, eps=eps, dtype=dt)
        self.mlp = VisionMLP(cfg, pc, group)

    recompute: str = "none"
    """'full' or 'selective': keep only this block's input and recompute it in backward (the
    tower's blocks are small next to the language model's; both modes recompute whole blocks);
    'none' (see r4b.training)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [N, T, hidden]`` -> ``[N, T, hidden]``."""
        if self.recompute != "none" and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self._block, x, use_reentrant=False)
        return self._block(x)

    def _block(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))

    def hf_entries(self, prefix: str) -> dict[str, _HFEntry]:
        """HF name -> (parameter, TP split dim) for the whole block."""
        return {f"{prefix}.layer_norm1.weight": _HFEntry(self.layer_norm1.weight, None),
                f"{prefix}.layer_norm1.bias": _HFEntry(self.layer_norm1.bias, None),
                **self.self_attn.hf_entries(f"{prefix}.self_attn"),
                f"{prefix}.layer_norm2.weight": _HFEntry(self.layer_norm2.weight, None),
                f"{prefix}.layer_norm2.bias": _HFEntry(self.layer_norm2.bias, None),
                **self.mlp.hf_entries(f"{prefix}.mlp")}


class SiglipVisionTower(nn.Module):
    """SigLIP ViT: conv patch embedding + learned position embedding, pre-norm encoder blocks,
    ``post_layernorm``; no pooling head.  Tensor-parallel over ``parallel_state``'s TP group.

    ``forward(pixel_values [N, C, H, W])`` returns ``[N, tokens_per_image, hidden]`` for the
    layer chosen by ``cfg.feature_layer``.  ``parallel_config`` (megatron) sets the parameter
    dtype and init device; the default is :func:`make_parallel_config`.
    """

    def __init__(self, cfg: VisionConfig, *, parallel_config: ModelParallelConfig | None = None):
        super().__init__()
        pc = parallel_config if parallel_config is not None else make_parallel_config()
        _check_parallel_config(pc)
        self.cfg = cfg
        self.tp_group = _tp_group()
        dt = pc.params_dtype
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size,
                                         stride=cfg.patch_size, dtype=dt)
        self.position_embedding = nn.Embedding(cfg.tokens_per_image, cfg.hidden_size, dtype=dt)
        nn.init.normal_(self.position_embedding.weight, std=cfg.hidden_size ** -0.5)
        self.layers = nn.ModuleList(VisionEncoderLayer(cfg, pc, self.tp_group)
                                    for _ in range(cfg.num_layers))
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dt)
        # ``head.*`` tensors kept verbatim from the last load, re-emitted by hf_state_dict.
        self.hf_passthrough: dict[str, torch.Tensor] = {}

    def _check_pixels(self, pixel_values: torch.Tensor) -> None:
        c, s = self.cfg.num_channels, self.cfg.image_size
        if not isinstance(pixel_values, torch.Tensor):
            raise TypeError("pixel_values must be a torch.Tensor, "
                            f"got {type(pixel_values).__name__}")
        if not pixel_values.is_floating_point():
            raise TypeError("pixel_values must be a floating-point tensor, "
                            f"got {pixel_values.dtype}")
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (c, s, s):
            raise ValueError(f"pixel_values must have shape [N, {c}, {s}, {s}] (tiles, "
                             "num_channels, image_size, image_size), "
                             f"got {tuple(pixel_values.shape)}")

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Patch + position embeddings: ``[N, C, H, W]`` -> ``[N, tokens_per_image, hidden]``."""
        self._check_pixels(pixel_values)
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        x = x.flatten(2).transpose(1, 2)  # [N, hidden, gh, gw] -> [N, gh*gw, hidden], row-major
        return x + self.position_embedding.weight

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Tile features ``[N, tokens_per_image, hidden]`` from ``cfg.feature_layer``."""
        x = self.embed(pixel_values)
        for layer in self.layers[:self.cfg.layers_run]:
            x = layer(x)
        if self.cfg.feature_layer == -1:
            x = self.post_layernorm(x)
        return x

    def _hf_table(self) -> dict[str, _HFEntry]:
        table = {
            "embeddings.patch_embedding.weight": _HFEntry(self.patch_embedding.weight, None),
            "embeddings.patch_embedding.bias": _HFEntry(self.patch_embedding.bias, None),
            "embeddings.position_embedding.weight": _HFEntry(self.position_embedding.weight, None),
        }
        for i, layer in enumerate(self.layers):
            table.update(layer.hf_entries(f"encoder.layers.{i}"))
        table["post_layernorm.weight"] = _HFEntry(self.post_layernorm.weight, None)
        table["post_layernorm.bias"] = _HFEntry(self.post_layernorm.bias, None)
        return table

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """Full tensors under transformers' ``SiglipVisionModel`` names (no ``vision_model.``
        prefix), gathered across TP ranks (a collective: call it on every TP rank), plus any
        ``head.*`` tensors kept from the last :meth:`load_hf_state_dict`."""
        out = _gather_hf(self._hf_table(), self.tp_group)
        out.update({k: v.clone() for k, v in self.hf_passthrough.items()})
        return out

    def load_hf_state_dict(self, sd: dict[str, torch.Tensor], strict: bool = True) -> LoadResult:
        """Load full tensors named as in :meth:`hf_state_dict`, keeping this rank's shard.

        ``head.*`` keys (SigLIP's attention-pooling head, present in standalone SigLIP
        checkpoints with ``vision_use_head=True``; LLaVA-OneVision-style towers have none) are
        never run: they are kept verbatim in ``hf_passthrough`` and written back by
        :meth:`hf_state_dict`, so a round trip is lossless; they are neither missing nor
        unexpected.  With ``strict``, missing or unexpected keys raise ``KeyError``; shape
        mismatches always raise ``ValueError``; each lists every offending key.
        """
        result = _load_hf(self._hf_table(), sd, strict=strict, group=self.tp_group,
                          owner=type(self).__name__, passthrough_prefix=HEAD_PREFIX)
        self.hf_passthrough = {k: v.detach().clone() for k, v in sd.items()
                               if k.startswith(HEAD_PREFIX)}
        return result


# ---------------------------------------------------------------- projector
class Projector(nn.Module):
    """Vision-to-language projector: LayerNorm -> Linear -> act -> Linear.

    ``linear_1`` (vision_hidden -> lm_hidden) is column-parallel, ``linear_2`` (lm_hidden ->
    lm_hidden) row-parallel.  ``pre_norm=False`` drops the LayerNorm (LLaVA-OneVision's
    projector has none).  ``act`` is a transformers ``ACT2FN`` name: ``gelu`` (erf) or
    ``gelu_pytorch_tanh``.
    """

    def __init__(self, vision_hidden: int, lm_hidden: int, *, eps: float = 1e-5,
                 act: str = "gelu", pre_norm: bool = True,
                 parallel_config: ModelParallelConfig | None = None):
        super().__init__()
        require_range("vision_hidden", vision_hidden, 1)
        require_range("lm_hidden", lm_hidden, 1)
        require_range("eps", eps, 0.0, lo_open=True)
        require_choice("act", act, PROJECTOR_ACTIVATIONS)
        pc = parallel_config if parallel_config is not None else make_parallel_config()
        _check_parallel_config(pc)
        self.tp_group = _tp_group()
        tp_size, _ = _group_size_rank(self.tp_group)
        _divisible("the projector's output width (the language model's hidden_size)", lm_hidden, tp_size)
        self.vision_hidden, self.lm_hidden, self.act_name = vision_hidden, lm_hidden, act
        self.act = PROJECTOR_ACTIVATIONS[act]
        self.pre_norm = (nn.LayerNorm(vision_hidden, eps=eps, dtype=pc.params_dtype)
                         if pre_norm else None)
        self.linear_1 = _column(vision_hidden, lm_hidden, pc, self.tp_group, vision_hidden ** -0.5)
        self.linear_2 = _row(lm_hidden, lm_hidden, pc, self.tp_group, lm_hidden ** -0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., vision_hidden]`` -> ``[..., lm_hidden]``."""
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != self.vision_hidden:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must have shape [..., {self.vision_hidden}] (vision_hidden), "
                             f"got {shape}")
        lead = x.shape[:-1]
        # megatron's linear backward handles 2-D/3-D activations only: flatten to [1, M, H].
        h = x.reshape(1, -1, self.vision_hidden)
        if self.pre_norm is not None:
            h = self.pre_norm(h)
        h = _linear(self.linear_2, self.act(_linear(self.linear_1, h)))
        return h.reshape(*lead, self.lm_hidden)

    def _hf_table(self) -> dict[str, _HFEntry]:
        table = {}
        if self.pre_norm is not None:
            table["pre_norm.weight"] = _HFEntry(self.pre_norm.weight, None)
            table["pre_norm.bias"] = _HFEntry(self.pre_norm.bias, None)
        table.update(_linear_entries("linear_1", self.linear_1, 0, True))
        table.update(_linear_entries("linear_2", self.linear_2, 1, False))
        return table

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """Full tensors named ``pre_norm.*``, ``linear_1.*``, ``linear_2.*`` (TP-gathered;
        a collective: call it on every TP rank)."""
        return _gather_hf(self._hf_table(), self.tp_group)

    def load_hf_state_dict(self, sd: dict[str, torch.Tensor], strict: bool = True) -> LoadResult:
        """Load full tensors named as in :meth:`hf_state_dict`, keeping this rank's shard;
        errors as in :meth:`SiglipVisionTower.load_hf_state_dict`."""
        return _load_hf(self._hf_table(), sd, strict=strict, group=self.tp_group,
                        owner=type(self).__name__)
