"""The Qwen3-architecture language model as one tensor/pipeline-parallel stage.

:class:`Qwen3LM` is what one pipeline stage of the language model holds: the vocab-parallel
embedding (first stage), a contiguous range of decoder layers, and the final RMSNorm plus the
vocab-parallel LM head (last stage).  Activations are token-major ``[T, hidden]``; a ``[B, S]``
batch is flattened row-major by the caller (``r4b.models.multimodal.R4BModel``).

Weights move in and out under transformers' Qwen3 names (relative to the decoder's prefix,
e.g. ``layers.3.self_attn.q_proj.weight``; the untied head as ``lm_head.weight``):
:meth:`Qwen3LM.hf_state_dict` gathers full tensors over the TP group, and
:meth:`Qwen3LM.load_hf_state_dict` keeps this rank's slice of each.  Layer indices are global,
so stages of one pipeline write disjoint keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.utils.checkpoint
from torch import nn

from .attention import (AttnMeta, CacheStep, KVCache, ParallelSelfAttention, PrefixTree,
                        SharedKVCache)
from .config import LMConfig
from .layers import ParallelSwiGLUMLP, RotaryEmbedding, column_linear, init_normal, make_rms_norm

INIT_STD = 0.02  # transformers' Qwen3 initializer_range


class DecoderLayer(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, cfg: LMConfig, *, config, tp_group, tp_size: int, device=None):
        super().__init__()
        dt = config.params_dtype
        self.input_layernorm = make_rms_norm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dt, device=device)
        self.self_attn = ParallelSelfAttention(
            hidden=cfg.hidden_size, num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim, eps=cfg.rms_norm_eps, config=config, tp_group=tp_group,
            tp_size=tp_size, init_std=INIT_STD, num_layers=cfg.num_layers, device=device)
        self.post_attention_layernorm = make_rms_norm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dt,
                                                      device=device)
        self.mlp = ParallelSwiGLUMLP(cfg.hidden_size, cfg.intermediate_size, config=config,
                                     tp_group=tp_group, tp_size=tp_size, init_std=INIT_STD,
                                     num_layers=cfg.num_layers)

    _recompute: str = "none"

    @property
    def recompute(self) -> str:
        """'full': keep only this layer's input and recompute the layer in backward;
        'selective': recompute the attention core and the MLP activation; 'none' (see
        r4b.training)."""
        return self._recompute

    @recompute.setter
    def recompute(self, mode: str) -> None:
        self._recompute = mode
        self.self_attn.recompute_core = self.mlp.recompute_act = mode == "selective"

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
                meta: AttnMeta | None = None, cache=None, step: CacheStep | None = None) -> torch.Tensor:
        """``x [T, hidden]`` → ``[T, hidden]``."""
        if self.recompute == "full" and cache is None and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self._block, x, cos, sin, meta,
                                                     use_reentrant=False)
        return self._block(x, cos, sin, meta, cache, step)

    def _block(self, x, cos, sin, meta=None, cache=None, step=None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, meta=meta, cache=cache, step=step)
        return x + self.mlp(self.post_attention_layernorm(x))


class _GatherLastDim(torch.autograd.Function):
    """All-gather along the last dimension over a group; backward keeps this rank's slice.

    (megatron-core's own gather allocates on ``torch.cuda.current_device()``, so it cannot run
    on CPU/gloo; this one allocates on the input's device.)
    """

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        ctx.rank, ctx.size = dist.get_rank(group), dist.get_world_size(group)
        parts = [torch.empty_like(x) for _ in range(ctx.size)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, g):
        return g.chunk(ctx.size, dim=-1)[ctx.rank].contiguous(), None


def gather_last_dim(x: torch.Tensor, group) -> torch.Tensor:
    """``[..., n]`` on each of the group's ranks → ``[..., n * group_size]`` (rank order)."""
    return _GatherLastDim.apply(x, group)


# ---------------------------------------------------------------- HF weight mapping
@dataclass
class HFEntry:
    """How one local parameter maps to transformers tensors.

    ``parts``: ``(hf_name, full_rows)`` pieces stacked along dim 0 in the local parameter, each
    split evenly over TP ranks (fused QKV / gate-up); a single part with ``split_dim`` 1 is a
    row-parallel weight; ``split_dim`` None is replicated.  ``save=False``: loaded but written by
    another stage (the tied head copy on the last pipeline stage).
    """

    param: torch.Tensor
    parts: tuple[tuple[str, int], ...]
    split_dim: int | None
    full_shape: tuple[int, ...]  # of a single-part entry; fused parts share the trailing dims
    save: bool = True

    def part_shapes(self) -> dict[str, tuple[int, ...]]:
        """Full (unsharded) HF shape of each part."""
        if len(self.parts) == 1:
            return {self.parts[0][0]: self.full_shape}
        return {name: (rows, *self.full_shape[1:]) for name, rows in self.parts}


def _gather_entry(e: HFEntry, tp_group, tp_size: int) -> dict[str, torch.Tensor]:
    local = e.param.detach().contiguous()
    if e.split_dim is None or tp_size == 1:
        if len(e.parts) == 1:
            return {e.parts[0][0]: local.clone()}
        shards = [local]
    else:
        shards = [torch.empty_like(local) for _ in range(tp_size)]
        dist.all_gather(shards, local, group=tp_group)
    if len(e.parts) == 1:
        return {e.parts[0][0]: torch.cat(shards, dim=e.split_dim)}
    out, off = {}, 0
    for name, rows in e.parts:
        n = rows // tp_size
        out[name] = torch.cat([s[off:off + n] for s in shards], dim=0)
        off += n
    return out


def _local_slice(e: HFEntry, tensors: dict[str, torch.Tensor], tp_rank: int, tp_size: int) -> torch.Tensor:
    if e.split_dim is None:
        return tensors[e.parts[0][0]]
    pieces = []
    for name, _rows in e.parts:
        full = tensors[name]
        n = full.shape[e.split_dim] // tp_size
        pieces.append(full.narrow(e.split_dim, tp_rank * n, n))
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0)


class HFLoadError(KeyError):
    """Checkpoint keys or shapes do not match the model; the message lists every problem."""

    def __str__(self):  # KeyError would repr() the message and escape its newlines
        return str(self.args[0]) if self.args else ""


def format_key_problems(owner: str, missing, unexpected, mismatched) -> str:
    """One readable message listing missing keys, unexpected keys and shape mismatches."""
    lines = [f"{owner}: checkpoint does not match the model"]
    if missing:
        lines.append(f"  missing keys ({len(missing)}): {sorted(missing)}")
    if unexpected:
        lines.append(f"  unexpected keys ({len(unexpected)}): {sorted(unexpected)}")
    if mismatched:
        lines.append(f"  shape mismatches ({len(mismatched)}): {mismatched}")
    return "\n".join(lines)


# ---------------------------------------------------------------- the stage
class Qwen3LM(nn.Module):
    """One pipeline stage of the Qwen3 language model, tensor-parallel over ``tp_group``.

    Args:
        cfg: the language model config.
        config: megatron-core ``ModelParallelConfig`` (dtype, CPU init).
        tp_group, tp_rank, tp_size: the tensor-parallel group and this rank's place in it.
        pre_process: this stage embeds tokens (first pipeline stage).
        post_process: this stage applies the final norm and holds the LM head (last stage).
        layer_range: ``(start, end)`` global indices of the decoder layers held here.
        device: where RMSNorm modules are created (Transformer-Engine norms need CUDA).
    """

    def __init__(self, cfg: LMConfig, *, config, tp_group, tp_rank: int, tp_size: int,
                 pre_process: bool = True, post_process: bool = True,
                 layer_range: tuple[int, int] | None = None, device=None):
        super().__init__()
        cfg.check_tp(tp_size)
        start, end = layer_range if layer_range is not None else (0, cfg.num_layers)
        if not 0 <= start <= end <= cfg.num_layers:
            raise ValueError(f"layer_range must satisfy 0 <= start <= end <= num_layers="
                             f"{cfg.num_layers}, got {layer_range}")
        self.cfg = cfg
        self.tp_group, self.tp_rank, self.tp_size = tp_group, tp_rank, tp_size
        self.pre_process, self.post_process = pre_process, post_process
        self.layer_start, self.layer_end = start, end
        self.vocab_size = cfg.vocab_size
        self.vocab_local = cfg.vocab_size // tp_size
        self.vocab_start = tp_rank * self.vocab_local
        dt = config.params_dtype
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)
        if pre_process:
            from megatron.core.tensor_parallel import VocabParallelEmbedding

            self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size,
                                                       init_method=init_normal(INIT_STD),
                                                       config=config, tp_group=tp_group)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, config=config, tp_group=tp_group, tp_size=tp_size, device=device)
            for _ in range(start, end))
        if post_process:
            self.norm = make_rms_norm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dt, device=device)
            # Tied head on the stage that also embeds: reuse the embedding matrix.  Tied head on
            # a last stage without the embedding: a copy, loaded from embed_tokens.weight and
            # kept equal by r4b.models.pipeline.allreduce_tied_embedding_grads.
            share = cfg.tie_word_embeddings and pre_process
            self.lm_head = column_linear(cfg.hidden_size, cfg.vocab_size, config=config,
                                         tp_group=tp_group, std=INIT_STD, skip_weight=share)
            if cfg.tie_word_embeddings and not pre_process:
                self.lm_head.weight.is_tied_embedding_copy = True

    # ------------------------------------------------------------ forward pieces
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings ``[T] → [T, hidden]`` (all-reduced over TP)."""
        return self.embed_tokens(input_ids)

    def run_layers(self, x: torch.Tensor, position_ids: torch.Tensor, *, meta: AttnMeta | None = None,
                   cache: KVCache | None = None, step: CacheStep | None = None) -> torch.Tensor:
        """This stage's decoder layers over ``x [T, hidden]`` at ``position_ids [T]``."""
        cos, sin = self.rotary(position_ids)
        for i, layer in enumerate(self.layers):
            kv = None if cache is None else (cache.k[i], cache.v[i])
            x = layer(x, cos, sin, meta=meta, cache=kv, step=step)
        return x

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        """The final RMSNorm (last stage)."""
        return self.norm(x)

    def lm_head_weight(self) -> torch.Tensor:
        """This rank's ``[V_local, hidden]`` slice of the output matrix (rows
        ``vocab_start : vocab_start + V_local``); the embedding itself when tied."""
        if not self.post_process:
            raise RuntimeError("lm_head_weight() is only defined on the last pipeline stage "
                               "(post_process=True)")
        if self.lm_head.weight is None:
            return self.embed_tokens.weight
        return self.lm_head.weight

    def logits(self, h: torch.Tensor, *, gather: bool = True) -> torch.Tensor:
        """``h [T, hidden]`` (already final-normed) → logits ``[T, V]`` (``[T, V_local]`` when
        ``gather`` is False)."""
        local = self.lm_head(h, weight=self.lm_head_weight(), runtime_gather_output=False)[0]
        if gather and self.tp_size > 1:
            return gather_last_dim(local, self.tp_group)
        return local

    def new_kv_cache(self, batch_size: int, max_seqlen: int, dtype: torch.dtype, device,
                     prefix_tree: PrefixTree | None = None) -> KVCache | SharedKVCache:
        """An empty cache for this stage's layers and this rank's KV heads: a dense
        :class:`KVCache`, or with ``prefix_tree`` a :class:`SharedKVCache` of that layout."""
        kw = dict(num_layers=len(self.layers), kv_heads=self.cfg.num_kv_heads // self.tp_size,
                  head_dim=self.cfg.head_dim, dtype=dtype, device=device)
        if prefix_tree is not None:
            return SharedKVCache(prefix_tree, **kw)
        return KVCache(batch_size=batch_size, max_seqlen=max_seqlen, **kw)

    # ------------------------------------------------------------ HF weights
    def _hf_table(self) -> list[HFEntry]:
        c = self.cfg
        h, d = c.hidden_size, c.head_dim
        out: list[HFEntry] = []
        if self.pre_process:
            out.append(HFEntry(self.embed_tokens.weight, (("embed_tokens.weight", c.vocab_size),), 0,
                               (c.vocab_size, h)))
        for j, layer in enumerate(self.layers):
            p = f"layers.{self.layer_start + j}."
            at, mlp = layer.self_attn, layer.mlp
            qkv_parts = ((p + "self_attn.q_proj.weight", c.num_heads * d),
                         (p + "self_attn.k_proj.weight", c.num_kv_heads * d),
                         (p + "self_attn.v_proj.weight", c.num_kv_heads * d))
            out += [
                HFEntry(layer.input_layernorm.weight, ((p + "input_layernorm.weight", h),), None, (h,)),
                HFEntry(at.qkv.weight, qkv_parts, 0, ((c.num_heads + 2 * c.num_kv_heads) * d, h)),
                HFEntry(at.q_norm.weight, ((p + "self_attn.q_norm.weight", d),), None, (d,)),
                HFEntry(at.k_norm.weight, ((p + "self_attn.k_norm.weight", d),), None, (d,)),
                HFEntry(at.o_proj.weight, ((p + "self_attn.o_proj.weight", h),), 1, (h, c.num_heads * d)),
                HFEntry(layer.post_attention_layernorm.weight,
                        ((p + "post_attention_layernorm.weight", h),), None, (h,)),
                HFEntry(mlp.gate_up.weight, ((p + "mlp.gate_proj.weight", c.intermediate_size),
                                             (p + "mlp.up_proj.weight", c.intermediate_size)), 0,
                        (2 * c.intermediate_size, h)),
                HFEntry(mlp.down.weight, ((p + "mlp.down_proj.weight", h),), 1, (h, c.intermediate_size)),
            ]
        if self.post_process:
            out.append(HFEntry(self.norm.weight, (("norm.weight", h),), None, (h,)))
            if self.lm_head.weight is not None:
                tied_copy = c.tie_word_embeddings
                name = "embed_tokens.weight" if tied_copy else "lm_head.weight"
                out.append(HFEntry(self.lm_head.weight, ((name, c.vocab_size),), 0, (c.vocab_size, h),
                                   save=not tied_copy))
        return out

    def hf_shapes(self) -> dict[str, tuple[int, ...]]:
        """Full HF shapes of every tensor this stage loads (no communication)."""
        shapes = {}
        for e in self._hf_table():
            shapes.update(e.part_shapes())
        return shapes

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """Full tensors under transformers' names, gathered over TP (a collective: call on every
        TP rank).  ``lm_head.weight`` is present only for untied embeddings."""
        out = {}
        for e in self._hf_table():
            if e.save:
                out.update(_gather_entry(e, self.tp_group, self.tp_size))
        return out

    def load_hf_state_dict(self, sd: Mapping[str, torch.Tensor], strict: bool = True) -> None:
        """Load this rank's slices from full tensors named as in :meth:`hf_state_dict`.

        ``sd`` may be lazy (tensors read on ``__getitem__``).  Every key and shape is checked
        before anything is copied; with ``strict`` a missing key or a key this stage does not
        know raises :class:`HFLoadError` listing all of them (keys of other pipeline stages'
        layers are not unexpected).
        """
        shapes = self.hf_shapes()
        keys = set(sd.keys())
        missing = [k for k in shapes if k not in keys]
        mismatched = []
        for k, want in shapes.items():
            if k in keys:
                got = tuple(sd_shape(sd, k))
                if got != want:
                    mismatched.append(f"{k}: expected {want}, got {got}")
        unexpected = [k for k in keys if k not in shapes and not self._known_elsewhere(k)]
        if mismatched or (strict and (missing or unexpected)):
            raise HFLoadError(format_key_problems("Qwen3LM.load_hf_state_dict", missing,
                                                  unexpected, mismatched))
        with torch.no_grad():
            for e in self._hf_table():
                names = [n for n, _ in e.parts]
                if any(n not in keys for n in names):
                    continue
                tensors = {n: sd[n] for n in names}
                e.param.copy_(_local_slice(e, tensors, self.tp_rank, self.tp_size))

    def _known_elsewhere(self, key: str) -> bool:
        """A key of this architecture held by another pipeline stage."""
        c = self.cfg
        if key.startswith("layers."):
            parts = key.split(".", 2)
            return (len(parts) == 3 and parts[1].isdigit() and 0 <= int(parts[1]) < c.num_layers
                    and not self.layer_start <= int(parts[1]) < self.layer_end
                    and parts[2] in LAYER_KEYS)
        if key in ("embed_tokens.weight", "norm.weight"):
            return True
        return key == "lm_head.weight" and not c.tie_word_embeddings


LAYER_KEYS = frozenset(
    ["input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_norm.weight",
     "self_attn.k_norm.weight"]
    + [f"self_attn.{n}_proj.weight" for n in "qkvo"]
    + [f"mlp.{n}_proj.weight" for n in ("gate", "up", "down")])
"""Per-layer tensor names (after ``layers.{i}.``) of a transformers Qwen3 decoder layer."""


def sd_shape(sd: Mapping, key: str) -> tuple[int, ...]:
    """Shape of ``sd[key]`` without loading it when ``sd`` offers ``shape_of`` (lazy readers)."""
    fn = getattr(sd, "shape_of", None)
    return tuple(fn(key)) if fn is not None else tuple(sd[key].shape)
