"""Causal self-attention over packed sequences, and the KV cache for incremental decoding.

Tokens are token-major and packed: ``[T, heads, head_dim]`` with ``cu_seqlens`` (int32
``[n+1]``) marking where each sequence starts; no token attends across a sequence boundary.
The backend is resolved in one place, :func:`resolve_backend`:

* ``flash``: ``flash_attn.flash_attn_varlen_func`` (flash-attn installed, CUDA, fp16/bf16);
* ``torch_varlen``: ``torch.nn.attention.varlen.varlen_attn`` (present in this torch, CUDA,
  fp16/bf16);
* ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention``; a plain ``[B, S]`` batch runs
  as ``[B, H, S, D]`` with ``is_causal``, packed sequences of unequal length are right-padded
  to ``[n, max_seqlen]`` and run the same way (the CPU path; flex attention has no CPU
  backward).

Prefix-shared units (:mod:`r4b.packing.groups`: a group's prompt once, then each rollout's
suffix, which sees the prompt and causally itself) run through
:func:`r4b_kernels.prefix_shared_attention`: flash-attn's varlen kernel under ``flash``, the
r4b Triton kernel on other CUDA fp16/bf16 activations, its SDPA composition (two padded calls:
the prompts; the responses against ``[P; R_i]``) under ``sdpa`` and on CPU.

Cached decoding (:class:`KVCache`) always uses SDPA with an explicit per-row mask: the new
``s`` tokens of row ``r`` see the row's cached prefix and themselves, causally.
"""

from __future__ import annotations

import importlib.util
import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

import r4b_kernels

from ..log import get_logger
from .layers import RMSNorm, apply_rotary, column_linear, row_linear

log = get_logger(__name__)

HAVE_FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None

try:
    from torch.nn.attention.varlen import varlen_attn as _torch_varlen_attn

    _VARLEN_PARAMS = set(inspect.signature(_torch_varlen_attn).parameters)
    HAVE_TORCH_VARLEN = True
except ImportError:  # older torch: no varlen module
    _torch_varlen_attn = None
    _VARLEN_PARAMS = set()
    HAVE_TORCH_VARLEN = False

BACKENDS = ("flash", "torch_varlen", "sdpa")
PREFIX_IMPL = {"flash": "flash", "torch_varlen": "auto", "sdpa": "sdpa"}
"""The :func:`r4b_kernels.prefix_shared_attention` implementation of each backend (torch's
varlen kernel has no such mask: its CUDA activations take the Triton kernel)."""
_HALF = (torch.float16, torch.bfloat16)


def resolve_backend(requested: str, device: torch.device, dtype: torch.dtype) -> str:
    """The attention backend for activations of ``dtype`` on ``device``.

    ``auto`` picks flash-attn, else torch's varlen kernel (both need CUDA and fp16/bf16), else
    SDPA.  Naming a backend that cannot run here raises an error saying why.
    """
    fast_ok = device.type == "cuda" and dtype in _HALF
    if requested == "auto":
        if fast_ok and HAVE_FLASH_ATTN:
            return "flash"
        if fast_ok and HAVE_TORCH_VARLEN:
            return "torch_varlen"
        return "sdpa"
    if requested == "flash":
        if not HAVE_FLASH_ATTN:
            raise ImportError("attention_backend='flash' needs flash-attn: pip install 'r4b[gpu]'")
        if not fast_ok:
            raise ValueError(f"attention_backend='flash' needs CUDA fp16/bf16 activations, got "
                             f"{device.type} {dtype}")
        return "flash"
    if requested == "torch_varlen":
        if not HAVE_TORCH_VARLEN:
            raise ImportError(f"attention_backend='torch_varlen' needs torch.nn.attention.varlen "
                              f"(torch {torch.__version__} has none)")
        if not fast_ok:
            raise ValueError(f"attention_backend='torch_varlen' needs CUDA fp16/bf16 activations, "
                             f"got {device.type} {dtype}")
        return "torch_varlen"
    if requested == "sdpa":
        return "sdpa"
    raise ValueError(f"attention backend must be one of ('auto', {', '.join(map(repr, BACKENDS))}), "
                     f"got {requested!r}")


@dataclass
class AttnMeta:
    """Per-forward attention metadata, shared by every layer.

    ``cu_seqlens`` int32 ``[n+1]`` on the activations' device; ``max_seqlen`` host int;
    ``dense`` = ``(B, S)`` when all sequences have the same length ``S`` (tokens are then
    ``[B*S]`` row-major); ``pad_rows``: for SDPA on packed sequences of unequal length, the
    flat index ``[T]`` of each token in an ``[n, max_seqlen]`` right-padded layout; ``prefix``:
    the :class:`r4b_kernels.PrefixLayout` of prefix-shared units (``cu_seqlens`` bounds units).
    """

    backend: str
    cu_seqlens: torch.Tensor
    max_seqlen: int
    dense: tuple[int, int] | None = None
    pad_rows: torch.Tensor | None = None
    prefix: object = None


def make_attn_meta(cu_seqlens: torch.Tensor, max_seqlen: int, *, backend: str,
                   dense: tuple[int, int] | None = None, prefix=None) -> AttnMeta:
    """Build the metadata once per forward (the padded layout only where SDPA needs it).

    SDPA on ragged packed sequences runs on a right-padded ``[n, max_seqlen]`` batch with
    ``is_causal``: padding sits after every real token, so causality alone keeps it out, and
    the cost is ``n * max_seqlen^2`` instead of the ``T^2`` of a block-diagonal mask.
    """
    if prefix is not None:
        return AttnMeta(backend=backend, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
                        prefix=prefix)
    pad_rows = None
    if backend == "sdpa" and dense is None:
        n_tok = int(cu_seqlens[-1])
        starts = cu_seqlens[:-1].long()
        lengths = cu_seqlens[1:].long() - starts
        seq = torch.repeat_interleave(torch.arange(lengths.numel(), device=cu_seqlens.device),
                                      lengths, output_size=n_tok)
        pos = torch.arange(n_tok, device=cu_seqlens.device) - starts[seq]
        pad_rows = seq * int(max_seqlen) + pos
    return AttnMeta(backend=backend, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, dense=dense,
                    pad_rows=pad_rows)


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttnMeta,
                     scale: float) -> torch.Tensor:
    """Causal attention within each packed sequence: ``q [T, Hq, D]``, ``k, v [T, Hk, D]`` →
    ``[T, Hq, D]``; ``Hq`` a multiple of ``Hk`` (grouped-query attention)."""
    if meta.prefix is not None:
        return r4b_kernels.prefix_shared_attention(q, k, v, meta.prefix, scale=scale,
                                                   impl=PREFIX_IMPL[meta.backend])
    if meta.backend == "flash":
        from flash_attn import flash_attn_varlen_func

        return flash_attn_varlen_func(q, k, v, meta.cu_seqlens, meta.cu_seqlens, meta.max_seqlen,
                                      meta.max_seqlen, softmax_scale=scale, causal=True)
    if meta.backend == "torch_varlen":
        kw = {"scale": scale}
        if "window_size" in _VARLEN_PARAMS:
            kw["window_size"] = (-1, 0)  # (-1, 0) = causal
        else:
            kw["is_causal"] = True
        if "enable_gqa" in _VARLEN_PARAMS:
            kw["enable_gqa"] = True
        elif k.shape[1] != q.shape[1]:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        return _torch_varlen_attn(q, k, v, meta.cu_seqlens, meta.cu_seqlens, meta.max_seqlen,
                                  meta.max_seqlen, **kw)
    gqa = k.shape[1] != q.shape[1]
    if meta.dense is not None:
        b, s = meta.dense
        qh, kh, vh = (x.view(b, s, x.shape[1], x.shape[2]).transpose(1, 2) for x in (q, k, v))
        o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale, enable_gqa=gqa)
        return o.transpose(1, 2).reshape(q.shape)
    n, s = meta.cu_seqlens.numel() - 1, int(meta.max_seqlen)

    def padded(x):
        buf = x.new_zeros((n * s, x.shape[1], x.shape[2]))
        return buf.index_copy(0, meta.pad_rows, x).view(n, s, x.shape[1], x.shape[2]).transpose(1, 2)

    o = F.scaled_dot_product_attention(padded(q), padded(k), padded(v), is_causal=True,
                                       scale=scale, enable_gqa=gqa)
    return o.transpose(1, 2).reshape(n * s, q.shape[1], q.shape[2]).index_select(0, meta.pad_rows)


# ---------------------------------------------------------------- KV cache
class KVCache:
    """Per-row key/value cache of this rank's local layers and KV heads.

    ``k[i], v[i]``: ``[batch_size, max_seqlen, kv_heads_local, head_dim]`` for local layer
    ``i``; ``lengths``: LongTensor ``[batch_size]`` on the model's device, tokens cached per
    row (starting at 0).  Build it with ``model.new_kv_cache(batch_size, max_seqlen)``; the
    model's cached forward appends to selected rows and advances ``lengths``.
    """

    def __init__(self, *, num_layers: int, batch_size: int, max_seqlen: int, kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_seqlen < 1:
            raise ValueError(f"max_seqlen must be >= 1, got {max_seqlen}")
        shape = (batch_size, max_seqlen, kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self._host_lengths = torch.zeros(batch_size, dtype=torch.long, device="cpu")  # no syncs
        self.batch_size = batch_size
        self.max_seqlen = max_seqlen

    def reset(self, rows: torch.Tensor | None = None) -> None:
        """Forget the cached tokens of ``rows`` (all rows by default)."""
        if rows is None:
            self.lengths.zero_()
            self._host_lengths.zero_()
        else:
            self.lengths[rows.to(self.lengths.device)] = 0
            self._host_lengths[rows.cpu()] = 0

    def plan(self, rows: torch.Tensor, s: int) -> "CacheStep":
        """Positions, key length and mask for appending ``s`` tokens to each of ``rows``."""
        rows_host = rows.detach().cpu().long()
        if rows_host.dim() != 1 or rows_host.numel() == 0:
            raise ValueError(f"cache_rows must be a non-empty 1-D LongTensor, got shape "
                             f"{tuple(rows.shape)}")
        if int(rows_host.min()) < 0 or int(rows_host.max()) >= self.batch_size:
            raise ValueError(f"cache_rows must lie in [0, {self.batch_size}), got "
                             f"{rows_host.tolist()}")
        if rows_host.unique().numel() != rows_host.numel():
            raise ValueError(f"cache_rows must not repeat a row, got {rows_host.tolist()}")
        start = self._host_lengths[rows_host]
        end = start + s
        if int(end.max()) > self.max_seqlen:
            bad = [(int(r), int(e)) for r, e in zip(rows_host, end) if e > self.max_seqlen]
            raise ValueError(f"KV cache overflow: (row, length after append) {bad} exceed the "
                             f"cache's max_seqlen {self.max_seqlen}")
        dev = self.lengths.device
        rows_d = rows.to(dev).long()
        start_d = self.lengths[rows_d]
        positions = start_d[:, None] + torch.arange(s, device=dev)[None, :]  # [b, s]
        kv_len = int(end.max())
        key_idx = torch.arange(kv_len, device=dev)
        mask = key_idx[None, None, :] <= positions[:, :, None]  # [b, s, kv_len]
        return CacheStep(rows=rows_d, rows_host=rows_host, positions=positions, kv_len=kv_len,
                         mask=mask[:, None], s=s)

    def advance(self, step: "CacheStep") -> None:
        """Record that ``step.s`` tokens were appended to each of ``step.rows``."""
        self.lengths[step.rows] += step.s
        self._host_lengths[step.rows_host] += step.s


@dataclass
class CacheStep:
    """One cached forward: ``positions [b, s]`` of the new tokens, ``mask [b, 1, s, kv_len]``."""

    rows: torch.Tensor
    rows_host: torch.Tensor
    positions: torch.Tensor
    kv_len: int
    mask: torch.Tensor
    s: int


def cached_attention(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                     k_cache: torch.Tensor, v_cache: torch.Tensor, step: CacheStep,
                     scale: float) -> torch.Tensor:
    """Write ``k_new, v_new [b*s, Hk, D]`` into the cache rows, attend ``q [b*s, Hq, D]``
    to each row's prefix plus the new tokens; returns ``[b*s, Hq, D]``."""
    b, s = step.positions.shape
    hk, d = k_new.shape[1], k_new.shape[2]
    r = step.rows[:, None].expand(b, s)
    k_cache[r, step.positions] = k_new.view(b, s, hk, d).to(k_cache.dtype)
    v_cache[r, step.positions] = v_new.view(b, s, hk, d).to(v_cache.dtype)
    kk = k_cache[step.rows, :step.kv_len].transpose(1, 2).to(q.dtype)  # [b, Hk, L, D]
    vv = v_cache[step.rows, :step.kv_len].transpose(1, 2).to(q.dtype)
    qh = q.view(b, s, q.shape[1], d).transpose(1, 2)  # [b, Hq, s, D]
    o = F.scaled_dot_product_attention(qh, kk, vv, attn_mask=step.mask, scale=scale,
                                       enable_gqa=kk.shape[1] != qh.shape[1])
    return o.transpose(1, 2).reshape(b * s, q.shape[1], d)


# ---------------------------------------------------------------- the attention block
class ParallelSelfAttention(nn.Module):
    """Qwen3 attention: fused QKV (column-parallel), per-head RMSNorm on q and k, rotary
    embedding, causal attention, output projection (row-parallel).

    Each TP rank holds ``num_heads / tp`` query heads and ``num_kv_heads / tp`` KV heads;
    its ``qkv.weight`` rows are ``[q_r; k_r; v_r]`` (its slices of the three projections).
    """

    def __init__(self, *, hidden: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 eps: float, config, tp_group, tp_size: int, init_std: float, num_layers: int,
                 device=None):
        super().__init__()
        self.head_dim = head_dim
        self.hq = num_heads // tp_size
        self.hk = num_kv_heads // tp_size
        self.scale = head_dim ** -0.5
        dt = config.params_dtype
        self.qkv = column_linear(hidden, (num_heads + 2 * num_kv_heads) * head_dim, config=config,
                                 tp_group=tp_group, std=init_std)
        # Replicated scales applied to this rank's heads only: their gradients are summed over TP.
        group = tp_group if tp_size > 1 else None
        self.q_norm = RMSNorm(head_dim, eps, dtype=dt, grad_group=group)
        self.k_norm = RMSNorm(head_dim, eps, dtype=dt, grad_group=group)
        self.o_proj = row_linear(num_heads * head_dim, hidden, config=config, tp_group=tp_group,
                                 std=init_std / math.sqrt(2 * num_layers))

    recompute_core: bool = False
    """Recompute the attention core in backward (selective recomputation)."""

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
                meta: AttnMeta | None = None, cache: tuple[torch.Tensor, torch.Tensor] | None = None,
                step: CacheStep | None = None) -> torch.Tensor:
        """``x [T, hidden]`` → ``[T, hidden]``; packed path with ``meta``, cached with ``cache``+``step``."""
        t = x.shape[0]
        d = self.head_dim
        qkv = self.qkv(x)[0]
        q, k, v = qkv.split([self.hq * d, self.hk * d, self.hk * d], dim=-1)
        q = self.q_norm(q.reshape(t, self.hq, d))
        k = self.k_norm(k.reshape(t, self.hk, d))
        v = v.reshape(t, self.hk, d)
        q, k = apply_rotary(q, k, cos, sin)
        if cache is not None:
            o = cached_attention(q, k, v, cache[0], cache[1], step, self.scale)
        elif self.recompute_core and torch.is_grad_enabled():
            # selective recomputation: the core's saved tensors (SDPA's padded copies and its
            # softmax statistics) are rebuilt from q, k, v in backward
            o = torch.utils.checkpoint.checkpoint(packed_attention, q, k, v, meta, self.scale,
                                                  use_reentrant=False)
        else:
            o = packed_attention(q, k, v, meta, self.scale)
        return self.o_proj(o.reshape(t, self.hq * d))[0]
