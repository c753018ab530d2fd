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

Cached decoding has two caches.  :class:`KVCache` holds every row's whole sequence (a dense
``[rows, max_seqlen]`` buffer per layer) and uses SDPA with an explicit per-row mask: the new
``s`` tokens of row ``r`` see the row's cached prefix and themselves, causally.
:class:`SharedKVCache` holds shared prompt segments once: a :class:`PrefixTree` of *nodes*
(token segments, each continuing its parent node) and *rows* (each continuing one node with
its own tokens), all in one flat ``[kv_heads, tokens, head_dim]`` buffer per layer.  A row's
keys are its node chain (root first) and then its own tokens, at the positions they would
have in one sequence, so attention over them is the dense cache's attention.  It is computed
in two parts (:func:`shared_cached_attention`): the chain once per distinct node continued,
for all the queries continuing it (a prompt's keys are read once per step, not once per row),
each query's own tokens causally, and the two merged exactly with their log-sum-exps.
"""

from __future__ import annotations

import importlib.util
import inspect
import math
import numbers
from dataclasses import dataclass
from typing import Sequence

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

    @property
    def held_tokens(self) -> int:
        """Token slots the cache's buffers hold per layer (``batch_size * max_seqlen``)."""
        return int(self.k[0].shape[0] * self.k[0].shape[1]) if self.k else 0


@dataclass
class CacheStep:
    """One cached forward: ``positions [b, s]`` of the new tokens, ``mask [b, 1, s, kv_len]``."""

    rows: torch.Tensor
    rows_host: torch.Tensor
    positions: torch.Tensor
    kv_len: int
    mask: torch.Tensor
    s: int

    def attend(self, q, k_new, v_new, k_cache, v_cache, scale: float) -> torch.Tensor:
        """:func:`cached_attention` with this step (one layer)."""
        return cached_attention(q, k_new, v_new, k_cache, v_cache, self, scale)


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


# ---------------------------------------------------------------- shared-prefix KV cache
def _int_tuple(name: str, values, lo: int) -> tuple[int, ...]:
    """``values`` as a tuple of ints ``>= lo``; errors name ``name[i]``."""
    out = []
    for i, x in enumerate(values):
        if isinstance(x, bool) or not isinstance(x, numbers.Integral) or int(x) < lo:
            raise ValueError(f"{name}[{i}] must be an int >= {lo}, got {x!r}")
        out.append(int(x))
    return tuple(out)


@dataclass
class PrefixTree:
    """Layout of a :class:`SharedKVCache`: shared token segments (*nodes*) and the rows that
    continue them.

    A node continues its parent node (or starts a sequence at position 0); a row continues one
    node (its whole prompt is that node's chain) with up to ``row_tokens[r]`` tokens of its
    own.  The positions of a row's tokens are those of one sequence: chain, then own tokens.
    """

    node_lengths: Sequence[int]
    """Tokens of each node (each >= 1)."""
    node_parents: Sequence[int]
    """The node each node continues: an earlier node's index (parents come first), or -1 for
    a root (starting at position 0)."""
    row_nodes: Sequence[int]
    """The node each row continues (-1: none, the row starts at position 0)."""
    row_tokens: Sequence[int]
    """Tokens each row can append after its node (each >= 1)."""

    def __post_init__(self):
        self.node_lengths = _int_tuple("node_lengths", self.node_lengths, 1)
        self.node_parents = _int_tuple("node_parents", self.node_parents, -1)
        self.row_nodes = _int_tuple("row_nodes", self.row_nodes, -1)
        self.row_tokens = _int_tuple("row_tokens", self.row_tokens, 1)
        n = len(self.node_lengths)
        if len(self.node_parents) != n:
            raise ValueError(f"node_parents must have one entry per node ({n}), got "
                             f"{len(self.node_parents)}")
        if len(self.row_nodes) != len(self.row_tokens):
            raise ValueError(f"row_nodes must have one entry per row ({len(self.row_tokens)}), "
                             f"got {len(self.row_nodes)}")
        if not self.row_tokens:
            raise ValueError("row_tokens must describe at least one row, got none")
        for j, p in enumerate(self.node_parents):
            if p >= j:
                raise ValueError(f"node_parents[{j}] must name an earlier node (< {j}) or -1, "
                                 f"got {p}")
        for r, j in enumerate(self.row_nodes):
            if j >= n:
                raise ValueError(f"row_nodes[{r}] must be -1 or a node in [0, {n}), got {j}")

    @property
    def num_nodes(self) -> int:
        """Number of nodes."""
        return len(self.node_lengths)

    @property
    def batch_size(self) -> int:
        """Number of rows."""
        return len(self.row_tokens)


@dataclass
class SharedCacheStep:
    """One cached forward on a :class:`SharedKVCache` (``b`` slots, ``s`` new tokens each).

    ``positions [b, s]``: absolute positions of the new tokens; ``write [b*s]``: their flat
    buffer index; ``own_idx [b, L]`` / ``own_mask [b, s, L]``: each slot's own keys, causal;
    ``chain_sel``: the slots that continue a node, ``chain_of [n]`` the distinct nodes they
    continue, slot ``chain_sel[j]`` being row ``chain_rank[j]`` of group ``chain_inv[j]``;
    ``chain_idx [n, P]`` / ``chain_valid [n, P]``: each group's chain keys (every token of
    the node's path from its root); ``chain_rows``: the largest group."""

    slots: torch.Tensor
    slots_host: torch.Tensor
    positions: torch.Tensor
    write: torch.Tensor
    own_idx: torch.Tensor
    own_mask: torch.Tensor
    chain_sel: torch.Tensor | None
    chain_inv: torch.Tensor | None
    chain_rank: torch.Tensor | None
    chain_idx: torch.Tensor | None
    chain_valid: torch.Tensor | None
    chain_rows: int
    kv_len: int
    s: int

    def attend(self, q, k_new, v_new, k_cache, v_cache, scale: float) -> torch.Tensor:
        """:func:`shared_cached_attention` with this step (one layer)."""
        return shared_cached_attention(q, k_new, v_new, k_cache, v_cache, self, scale)


class SharedKVCache:
    """Key/value cache that holds shared prompt segments once (see :class:`PrefixTree` and the
    module docstring).

    ``k[i], v[i]``: ``[kv_heads_local, held_tokens, head_dim]`` for local layer ``i``: every
    node's tokens, then every row's ``row_tokens``, back to back.  The model's cached forward
    appends to rows (``model(..., kv_cache=cache, cache_rows=rows)``) or, through the
    :attr:`nodes` view, to nodes (``kv_cache=cache.nodes, cache_rows=node_ids``).  A node or row
    attends to its chain only once every node of the chain is full (prefill parents first).
    Build it with ``model.new_kv_cache(batch_size, max_seqlen, prefix_tree=tree)``.
    """

    def __init__(self, tree: PrefixTree, *, num_layers: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        if not isinstance(tree, PrefixTree):
            raise TypeError(f"tree must be a PrefixTree, got {type(tree).__name__}")
        n = tree.num_nodes
        caps = list(tree.node_lengths) + list(tree.row_tokens)
        parents = list(tree.node_parents) + list(tree.row_nodes)
        starts = [0] * len(caps)
        for j in range(1, len(caps)):
            starts[j] = starts[j - 1] + caps[j - 1]
        chains: list[tuple[int, ...]] = []  # ancestor nodes of each slot, root first
        base = []  # position of each slot's first token
        for p in parents:
            chains.append(() if p < 0 else chains[p] + (p,))
            base.append(0 if p < 0 else base[p] + caps[p])
        self.tree = tree
        self.num_nodes = n
        self.batch_size = tree.batch_size
        self.device = torch.device(device)
        self._parent = torch.tensor(parents, dtype=torch.long, device="cpu")
        self._cap = torch.tensor(caps, dtype=torch.long, device="cpu")
        self._start = torch.tensor(starts, dtype=torch.long, device="cpu")
        self._base = torch.tensor(base, dtype=torch.long, device="cpu")
        self._len = torch.zeros(len(caps), dtype=torch.long, device="cpu")
        self._chain = chains
        self.max_seqlen = int((self._base + self._cap).max())
        # Per node, the flat index of every token of its path from the root (padded by
        # repeating the last one), built once on the device: a step only picks rows of it.
        self._path_len = self._base[:n] + self._cap[:n]
        width = int(self._path_len.max()) if n else 0
        path = torch.zeros((n, width), dtype=torch.long, device="cpu")
        for j in range(n):
            seg = [torch.arange(starts[a], starts[a] + caps[a], device="cpu")
                   for a in chains[j] + (j,)]
            idx = torch.cat(seg)
            path[j, :idx.numel()] = idx
            path[j, idx.numel():] = idx[-1]
        self._path = path.to(self.device)
        self._path_len_d = self._path_len.to(self.device)
        total = sum(caps)
        shape = (kv_heads, total, head_dim)  # head-major: gathers feed batched matmuls as they are
        # zeros, not empty: padded reads repeat a written key, and no slot ever holds NaN bits
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.nodes = _NodeSlots(self)

    @property
    def held_tokens(self) -> int:
        """Token slots the cache's buffers hold per layer (all nodes + all rows' own tokens)."""
        return int(self.k[0].shape[1]) if self.k else 0

    def row_lengths(self) -> torch.Tensor:
        """Host LongTensor ``[batch_size]``: tokens each row sees (its chain + its own)."""
        r = slice(self.num_nodes, None)
        return self._base[r] + self._len[r]

    def node_lengths(self) -> torch.Tensor:
        """Host LongTensor ``[num_nodes]``: tokens written to each node so far."""
        return self._len[:self.num_nodes].clone()

    def reset(self, rows: torch.Tensor | None = None) -> None:
        """Forget the own tokens of ``rows`` (all rows by default); nodes are kept."""
        if rows is None:
            self._len[self.num_nodes:] = 0
        else:
            self._len[torch.as_tensor(rows).cpu().long() + self.num_nodes] = 0

    def plan(self, rows: torch.Tensor, s: int) -> SharedCacheStep:
        """Positions, write indices and attention layout for appending ``s`` tokens to each of
        ``rows``."""
        return self._plan(rows, s, "cache_rows", self.batch_size, self.num_nodes)

    def advance(self, step: SharedCacheStep) -> None:
        """Record that ``step.s`` tokens were appended to each of ``step``'s slots."""
        self._len[step.slots_host] += step.s

    def _plan(self, ids, s: int, name: str, count: int, offset: int) -> SharedCacheStep:
        ids_host = torch.as_tensor(ids).detach().cpu().long()
        kind = "row" if offset else "node"
        if ids_host.dim() != 1 or ids_host.numel() == 0:
            raise ValueError(f"{name} must be a non-empty 1-D LongTensor, got shape "
                             f"{tuple(ids_host.shape)}")
        if int(ids_host.min()) < 0 or int(ids_host.max()) >= count:
            raise ValueError(f"{name} must lie in [0, {count}), got {ids_host.tolist()}")
        if ids_host.unique().numel() != ids_host.numel():
            raise ValueError(f"{name} must not repeat a {kind}, got {ids_host.tolist()}")
        slots = ids_host + offset
        length, cap = self._len[slots], self._cap[slots]
        end = length + s
        if bool((end > cap).any()):
            bad = [(int(i), int(e), int(c)) for i, e, c in zip(ids_host, end, cap) if e > c]
            raise ValueError(f"KV cache overflow: ({kind}, own tokens after append, capacity) "
                             f"{bad}")
        if bool((self._len[:self.num_nodes] < self._cap[:self.num_nodes]).any()):
            for i, slot in zip(ids_host.tolist(), slots.tolist()):
                short = [(j, int(self._len[j]), int(self._cap[j])) for j in self._chain[slot]
                         if self._len[j] < self._cap[j]]
                if short:
                    raise ValueError(f"{kind} {i} continues nodes that are not fully written "
                                     f"(node, tokens, length) {short}: prefill them first")
        start, base, parent = self._start[slots], self._base[slots], self._parent[slots]
        sel = torch.nonzero(parent >= 0).reshape(-1)
        uniq, inv, counts = torch.unique(parent[sel], return_inverse=True, return_counts=True)
        # a slot's row within its node's group: its place among the group's slots
        order = torch.argsort(inv, stable=True)
        first = torch.cumsum(counts, 0) - counts
        rank = torch.empty_like(inv)
        rank[order] = torch.arange(inv.numel(), device=inv.device) - first[inv[order]]
        # O(b) host vectors in one copy; the O(b x L) index tensors are built on the device
        host = [slots, start, length, base, sel, uniq, inv, rank]
        flat = torch.cat(host)
        if self.device.type != "cpu":
            flat = flat.to(self.device, non_blocking=True)
        slots_d, start_d, length_d, base_d, sel_d, uniq_d, inv_d, rank_d = \
            flat.split([t.numel() for t in host])
        ar = torch.arange(s, device=self.device)
        pos_in = length_d[:, None] + ar[None]  # [b, s] own positions of the new tokens
        L = int(end.max())
        al = torch.arange(L, device=self.device)
        own_idx = start_d[:, None] + torch.minimum(al[None], (length_d + s - 1)[:, None])
        own_mask = al[None, None, :] <= pos_in[:, :, None]
        chain = dict(chain_sel=None, chain_inv=None, chain_rank=None, chain_idx=None,
                     chain_valid=None, chain_rows=0)
        if uniq.numel():
            P = int(self._path_len[uniq].max())
            chain = dict(chain_sel=sel_d, chain_inv=inv_d, chain_rank=rank_d,
                         chain_idx=self._path[uniq_d, :P],
                         chain_valid=torch.arange(P, device=self.device)[None]
                         < self._path_len_d[uniq_d][:, None],
                         chain_rows=int(counts.max()))
        return SharedCacheStep(slots=slots_d, slots_host=slots, positions=base_d[:, None] + pos_in,
                               write=(start_d[:, None] + pos_in).reshape(-1), own_idx=own_idx,
                               own_mask=own_mask, kv_len=int((base + end).max()), s=s, **chain)


class _NodeSlots:
    """The nodes of a :class:`SharedKVCache` addressed like cache rows (``cache_rows`` are
    node indices), for prefilling them with the model's cached forward."""

    def __init__(self, cache: SharedKVCache):
        self._cache = cache
        self.k, self.v = cache.k, cache.v
        self.batch_size = cache.num_nodes
        self.max_seqlen = cache.max_seqlen

    def plan(self, nodes, s: int) -> SharedCacheStep:
        """Like :meth:`SharedKVCache.plan`, for nodes."""
        c = self._cache
        if c.num_nodes == 0:
            raise ValueError("the cache has no nodes to write")
        return c._plan(nodes, s, "cache_rows (node indices)", c.num_nodes, 0)

    def advance(self, step: SharedCacheStep) -> None:
        """Like :meth:`SharedKVCache.advance`."""
        self._cache.advance(step)


def _attend_part(qh: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 mask: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``qh [Hk, n, m, D]`` against ``k, v [Hk, n, L, D]`` under ``mask`` (broadcast to
    ``[Hk, n, m, L]``, True = visible), fp32: the normalised output ``[Hk, n, m, D]`` and the
    log-sum-exp of the scores ``[Hk, n, m]``."""
    sc = torch.matmul(qh, k.transpose(-1, -2)).mul_(scale).masked_fill_(~mask, float("-inf"))
    lse = torch.logsumexp(sc, dim=-1)
    o = torch.matmul(sc.sub_(lse[..., None]).exp_(), v)
    return o, lse


def shared_cached_attention(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                            k_cache: torch.Tensor, v_cache: torch.Tensor, step: SharedCacheStep,
                            scale: float) -> torch.Tensor:
    """Write ``k_new, v_new [b*s, Hk, D]`` into a :class:`SharedKVCache` layer's head-major
    buffers ``k_cache, v_cache [Hk, N, D]``, attend ``q [b*s, Hq, D]`` to each query slot's
    chain and own tokens; returns ``[b*s, Hq, D]`` (in ``q``'s dtype).

    Exactly softmax attention over ``[chain ; own tokens]``, in two parts merged with their
    log-sum-exps: ``o = w_c o_c + w_o o_o`` with ``o_k`` each part's normalised output,
    ``w_k = exp(l_k - logsumexp(l_c, l_o))`` and ``l_k`` the log-sum-exp of its scores.  The
    chain part runs once per distinct node continued, for all its queries at once
    (``[Hk, nodes, rows x s x rep, P]`` scores): a prompt's keys are read once per step, not
    once per row.  Gathers from the head-major buffers are batched-matmul operands as they
    are (no transposed copies).  Scores, softmax and the merge are fp32."""
    b, s = step.positions.shape
    hk, d = k_new.shape[1], k_new.shape[2]
    rep = q.shape[1] // hk
    k_cache.index_copy_(1, step.write, k_new.transpose(0, 1).to(k_cache.dtype))
    v_cache.index_copy_(1, step.write, v_new.transpose(0, 1).to(v_cache.dtype))
    # query head h uses kv head h // rep: per kv head and slot, its s x rep queries
    qh = q.float().view(b, s, hk, rep, d).permute(2, 0, 1, 3, 4).reshape(hk, b, s * rep, d)
    L = step.own_idx.shape[1]
    own = step.own_mask[:, :, None, :].expand(b, s, rep, L).reshape(b, s * rep, L)
    o, lse = _attend_part(qh, k_cache[:, step.own_idx].float(), v_cache[:, step.own_idx].float(),
                          own, scale)
    if step.chain_idx is not None:
        sel, inv, rank = step.chain_sel, step.chain_inv, step.chain_rank
        n, m = step.chain_idx.shape[0], step.chain_rows
        qg = qh.new_zeros((hk, n, m, s * rep, d))
        qg[:, inv, rank] = qh[:, sel]
        oc, lc = _attend_part(qg.view(hk, n, m * s * rep, d), k_cache[:, step.chain_idx].float(),
                              v_cache[:, step.chain_idx].float(), step.chain_valid[:, None, :],
                              scale)
        oc = oc.view(hk, n, m, s * rep, d)[:, inv, rank]
        lc = lc.view(hk, n, m, s * rep)[:, inv, rank]
        lo = lse[:, sel]
        tot = torch.logaddexp(lo, lc)
        o[:, sel] = o[:, sel] * torch.exp(lo - tot)[..., None] + oc * torch.exp(lc - tot)[..., None]
    out = o.view(hk, b, s, rep, d).permute(1, 2, 0, 3, 4).reshape(b * s, hk * rep, d)
    return out.to(q.dtype)


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
            o = step.attend(q, k, v, cache[0], cache[1], self.scale)
        elif self.recompute_core and torch.is_grad_enabled():
            # selective recomputation: the core's saved tensors (SDPA's padded copies and its
            # softmax statistics) are rebuilt from q, k, v in backward
            o = torch.utils.checkpoint.checkpoint(packed_attention, q, k, v, meta, self.scale,
                                                  use_reentrant=False)
        else:
            o = packed_attention(q, k, v, meta, self.scale)
        return self.o_proj(o.reshape(t, self.hq * d))[0]
