"""Prefix-shared attention: one shared prompt, several responses, one packed THD tensor.

In RL with grouped rollouts every response of a group continues the same prompt.  A *unit* of
packed tokens is one group: the shared prompt ``P`` (``p`` tokens) once, then the responses
``R_1 .. R_n`` one after the other.  Response tokens attend to all of ``P`` and causally to
their own response, never to another response; prompt tokens attend causally among
themselves.  A unit with no response is an ordinary causal sequence.  Units are packed back to
back in THD layout (tokens major): ``q [T, Hq, D]``, ``k, v [T, Hk, D]``, ``Hq`` a multiple of
``Hk`` (grouped-query attention: query head ``h`` reads kv head ``h // (Hq // Hk)``).

Visibility, with ``i, j`` unit-local token indices and ``seg_start[i]`` the unit-local start of
token ``i``'s own segment (0 in the prompt, ``p + offset of its response`` in a response)::

    query i sees key j  iff  j <= i  and  (j < p  or  j >= seg_start[i])

This is exactly causal attention over each full sequence ``[P; R_i]``, with ``P`` computed once
instead of ``n`` times: the prompt's queries, keys and values (and, in backward, their
gradients, summed over the responses) are shared.

Implementations (``impl=``):

* ``"torch"`` - the reference: per unit, an explicit boolean mask (:meth:`PrefixLayout.mask`)
  and ``torch.nn.functional.scaled_dot_product_attention`` with ``enable_gqa``; autograd for
  backward; any device and dtype; memory per unit ``O(L_u^2)``.
* ``"flash"`` - flash-attn's ``flash_attn_varlen_func`` (imported when used), two calls: the
  prompts, causal over themselves; then every response's queries against the keys
  ``[P; R_i]`` gathered by index (``cu_seqlens_k`` = ``|P| + |R_i|`` per response,
  ``causal=True``, which flash-attn >= 2.1 aligns to the bottom-right corner, so response row
  ``r`` sees keys up to ``p + r``).  Exact with the standard kernels; CUDA and fp16/bf16 only.
  The gathered keys copy ``P`` once per response (``n * p`` extra K/V rows per layer).
* ``"triton"`` - a flash-attention-2 style kernel with this mask (forward and backward, see
  ``_prefix_attention_fwd_kernel``), which skips the key blocks of the other responses and
  reads ``P``'s keys and values once per query block.
* ``"auto"`` - flash when the tensors are on CUDA in fp16/bf16 and flash-attn imports, else
  triton when compiled Triton runs on CUDA, else torch.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import torch

from ._common import (HAS_TRITON, HAS_TRITON_GPU, TRITON_INTERPRET, KernelLaunch, cdiv,
                      check_tensor, device_guard, next_power_of_2, resolve_impl)

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = ["PrefixLayout", "prefix_shared_attention", "PREFIX_ATTENTION_IMPLS",
           "PrefixAttentionTiles", "prefix_attention_tiles", "planned_launches"]

PREFIX_ATTENTION_IMPLS = ("auto", "triton", "torch", "flash")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_FLASH_DTYPES = (torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------- layout
def _as_length(value, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        try:  # numpy / 0-d tensor integers
            import operator

            value = operator.index(value)
        except TypeError:
            raise TypeError(f"{what} must be an int >= {minimum}, got {value!r}") from None
    if value < minimum:
        raise ValueError(f"{what} must be >= {minimum}, got {value}")
    return int(value)


@dataclass
class PrefixLayout:
    """Where the units of a packed prefix-shared batch are, on the device and on the host.

    Build it with :meth:`PrefixLayout.build` from host lengths; move it with :meth:`to` once
    per micro-batch (the attention of every layer reuses it).
    """

    cu_units: torch.Tensor
    """int32 [U+1] token offsets of the units in the packed tensor."""
    prefix_lens: torch.Tensor
    """int32 [U] shared-prefix tokens of each unit (>= 1)."""
    seg_start: torch.Tensor
    """int32 [T] per token, the unit-local start of its segment (0 in the prefix)."""
    max_unit_len: int
    """Tokens of the longest unit."""
    prefix_lens_host: tuple[int, ...]
    """The prefix lengths, on the host."""
    suffix_lens_host: tuple[tuple[int, ...], ...]
    """Per unit, the suffix (response) lengths in order, on the host."""
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def build(cls, prefix_lens: Sequence[int], suffix_lens: Sequence[Sequence[int]],
              device=None) -> "PrefixLayout":
        """Layout of units ``[P_u; R_u1; ...; R_un]`` packed back to back.

        Args:
            prefix_lens: per unit, the shared prompt's tokens (each >= 1).
            suffix_lens: per unit, the lengths of its responses in packing order (each >= 1;
                an empty list makes the unit an ordinary causal sequence).
            device: where the tensors go (default CPU).

        Raises:
            TypeError / ValueError naming the unit (and response) and the bad value.
        """
        if isinstance(prefix_lens, torch.Tensor):
            prefix_lens = prefix_lens.tolist()
        if isinstance(suffix_lens, torch.Tensor):
            raise TypeError("suffix_lens must be a sequence of per-unit sequences of ints, "
                            "got a tensor")
        prefix_lens = list(prefix_lens)
        suffix_lens = list(suffix_lens)
        if len(prefix_lens) != len(suffix_lens):
            raise ValueError(f"prefix_lens and suffix_lens must have one entry per unit, got "
                             f"{len(prefix_lens)} prefix lengths and {len(suffix_lens)} suffix lists")
        ps, ss = [], []
        for u, (p, sl) in enumerate(zip(prefix_lens, suffix_lens)):
            ps.append(_as_length(p, f"prefix_lens[{u}] (unit {u})", 1))
            if isinstance(sl, (int, str, bytes)) or not hasattr(sl, "__iter__"):
                raise TypeError(f"suffix_lens[{u}] (unit {u}) must be a sequence of response "
                                f"lengths, got {sl!r}")
            ss.append(tuple(_as_length(s, f"suffix_lens[{u}][{r}] (unit {u}, response {r})", 1)
                            for r, s in enumerate(sl)))
        lens = [p + sum(s) for p, s in zip(ps, ss)]
        cu = [0]
        for n in lens:
            cu.append(cu[-1] + n)
        if cu[-1] > 2**31 - 1:
            raise ValueError(f"the layout has {cu[-1]} tokens, more than int32 offsets hold")
        seg = []
        for p, s in zip(ps, ss):
            seg.extend([0] * p)
            start = p
            for n in s:
                seg.extend([start] * n)
                start += n
        dev = torch.device("cpu") if device is None else torch.device(device)
        i32 = torch.int32
        return cls(cu_units=torch.tensor(cu, dtype=i32).to(dev),
                   prefix_lens=torch.tensor(ps, dtype=i32).to(dev),
                   seg_start=torch.tensor(seg, dtype=i32).to(dev),
                   max_unit_len=max(lens, default=0), prefix_lens_host=tuple(ps),
                   suffix_lens_host=tuple(ss))

    def to(self, device) -> "PrefixLayout":
        """The same layout with its tensors on ``device`` (host fields shared)."""
        device = torch.device(device)
        return PrefixLayout(cu_units=self.cu_units.to(device), prefix_lens=self.prefix_lens.to(device),
                            seg_start=self.seg_start.to(device), max_unit_len=self.max_unit_len,
                            prefix_lens_host=self.prefix_lens_host,
                            suffix_lens_host=self.suffix_lens_host)

    @property
    def num_units(self) -> int:
        """Number of units ``U``."""
        return len(self.prefix_lens_host)

    @property
    def num_tokens(self) -> int:
        """Packed tokens ``T`` of all units."""
        return sum(self.unit_len(u) for u in range(self.num_units))

    def unit_len(self, u: int) -> int:
        """Tokens of unit ``u``: its prefix plus all its suffixes."""
        return self.prefix_lens_host[u] + sum(self.suffix_lens_host[u])

    def unit_offsets(self) -> list[int]:
        """Host copy of ``cu_units``: ``[0, L_0, L_0 + L_1, ...]``."""
        out = [0]
        for u in range(self.num_units):
            out.append(out[-1] + self.unit_len(u))
        return out

    def _seg_start_host(self, u: int) -> torch.Tensor:
        p = self.prefix_lens_host[u]
        parts = [torch.zeros(p, dtype=torch.int64)]
        start = p
        for n in self.suffix_lens_host[u]:
            parts.append(torch.full((n,), start, dtype=torch.int64))
            start += n
        return torch.cat(parts)

    def mask(self, u: int) -> torch.Tensor:
        """bool [L_u, L_u] visibility of unit ``u`` (row = query, column = key), on the
        layout's device: ``j <= i and (j < p or j >= seg_start[i])``."""
        if isinstance(u, bool) or not isinstance(u, int) or not 0 <= u < self.num_units:
            raise ValueError(f"u must be a unit index in [0, {self.num_units}), got {u!r}")
        L = self.unit_len(u)
        p = self.prefix_lens_host[u]
        i = torch.arange(L)[:, None]
        j = torch.arange(L)[None, :]
        seg = self._seg_start_host(u)[:, None]
        return ((j <= i) & ((j < p) | (j >= seg))).to(self.cu_units.device)

    def _host_index(self, key: str, device: torch.device) -> torch.Tensor:
        """Index tensors of the flash path (and the kernels' block tables), built once per
        device from the host lengths."""
        ck = (key, str(device))
        if ck not in self._cache:
            self._cache[ck] = _build_index(self, key).to(device)
        return self._cache[ck]


def _build_index(layout: PrefixLayout, key: str) -> torch.Tensor:
    off = layout.unit_offsets()
    if key == "prefix_idx":  # packed rows of every prefix token, unit order
        return torch.cat([torch.arange(off[u], off[u] + p) for u, p in
                          enumerate(layout.prefix_lens_host)] or [torch.zeros(0)]).long()
    if key == "suffix_idx":  # packed rows of every suffix token, unit then response order
        rows = [torch.arange(off[u] + p, off[u + 1]) for u, p in enumerate(layout.prefix_lens_host)]
        return torch.cat(rows or [torch.zeros(0)]).long()
    if key == "suffix_kv_idx":  # per suffix: its unit's prefix rows, then its own rows
        rows = []
        for u, (p, ss) in enumerate(zip(layout.prefix_lens_host, layout.suffix_lens_host)):
            start = off[u] + p
            for n in ss:
                rows.append(torch.arange(off[u], off[u] + p))
                rows.append(torch.arange(start, start + n))
                start += n
        return torch.cat(rows or [torch.zeros(0)]).long()
    if key == "inverse":  # row of every packed token in cat([prefix rows, suffix rows])
        perm = torch.cat([_build_index(layout, "prefix_idx"), _build_index(layout, "suffix_idx")])
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(perm.numel())
        return inv
    if key.startswith("kv_blocks:"):
        return _kv_block_table(layout, int(key.split(":")[1]))
    raise KeyError(key)


# ----------------------------------------------------------------------------- validation
def _check_inputs(q, k, v, layout, scale):
    if not isinstance(layout, PrefixLayout):
        raise TypeError(f"layout must be a PrefixLayout, got {type(layout).__name__}")
    check_tensor("q", q, ndim=3, dtypes=_FLOAT_DTYPES)
    dev = q.device
    check_tensor("k", k, ndim=3, dtypes=(q.dtype,), device=dev)
    check_tensor("v", v, ndim=3, dtypes=(q.dtype,), device=dev)
    T, Hq, D = q.shape
    if T != layout.num_tokens:
        raise ValueError(f"q must have layout.num_tokens = {layout.num_tokens} rows (first dim), "
                         f"got shape {tuple(q.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)} and "
                         f"v {tuple(v.shape)}")
    if k.shape[0] != T or k.shape[2] != D:
        raise ValueError(f"k must have shape [{T}, Hk, {D}] to match q {tuple(q.shape)}, got "
                         f"{tuple(k.shape)}")
    Hk = k.shape[1]
    if Hq < 1 or Hk < 1 or D < 1:
        raise ValueError(f"q and k need at least one head and head_dim >= 1, got q "
                         f"{tuple(q.shape)} and k {tuple(k.shape)}")
    if Hq % Hk:
        raise ValueError(f"the query heads Hq={Hq} must be a multiple of the kv heads Hk={Hk} "
                         "(grouped-query attention)")
    if layout.seg_start.device != dev or layout.cu_units.device != dev:
        raise ValueError(f"layout is on {layout.seg_start.device}, expected {dev} like q; "
                         "move it once per micro-batch with layout.to(device)")
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) \
            or scale <= 0:
        raise ValueError(f"scale must be a finite number > 0 (default 1/sqrt(head_dim)), got {scale!r}")
    return float(scale)


def _flash_varlen():
    """flash-attn's ``flash_attn_varlen_func``, imported when used (RuntimeError if absent)."""
    try:
        return importlib.import_module("flash_attn").flash_attn_varlen_func
    except (ImportError, AttributeError) as e:
        raise RuntimeError(f"impl='flash' needs flash-attn >= 2.1 (flash_attn_varlen_func); it is "
                           f"not importable ({e}); install flash-attn or use impl='triton' / 'torch'") from e


def _flash_available() -> bool:
    try:
        _flash_varlen()
    except RuntimeError:
        return False
    return True


def _resolve(impl: str, q: torch.Tensor) -> str:
    if impl not in PREFIX_ATTENTION_IMPLS:
        raise ValueError(f"impl must be one of {PREFIX_ATTENTION_IMPLS}, got {impl!r}")
    dev = q.device
    if impl == "flash":
        if dev.type != "cuda" or q.dtype not in _FLASH_DTYPES:
            raise RuntimeError(f"impl='flash' needs CUDA fp16/bf16 tensors (flash-attn kernels), "
                               f"got {q.dtype} on {dev}; use impl='triton' or 'torch'")
        _flash_varlen()
        return "flash"
    if impl == "auto":
        if dev.type == "cuda" and q.dtype in _FLASH_DTYPES and _flash_available():
            return "flash"
        if dev.type == "cuda" and HAS_TRITON_GPU and q.dtype in _KERNEL_DTYPES:
            return "triton"
        return "torch"
    impl = resolve_impl(impl, dev)
    if impl == "triton" and q.dtype not in _KERNEL_DTYPES:
        raise TypeError(f"impl='triton' supports q/k/v in {[str(d) for d in _KERNEL_DTYPES]}, got "
                        f"{q.dtype}; use impl='torch'")
    return impl


# ----------------------------------------------------------------------------- torch reference
def _prefix_attention_torch(q, k, v, layout: PrefixLayout, scale: float) -> torch.Tensor:
    """Reference: per unit, SDPA with the explicit boolean mask; memory per unit L_u^2."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    off = layout.unit_offsets()
    outs = []
    gqa = q.shape[1] != k.shape[1]
    for u in range(layout.num_units):
        s, e = off[u], off[u + 1]
        qu, ku, vu = (t[s:e].transpose(0, 1) for t in (q, k, v))  # [H, L, D]
        mask = layout.mask(u).to(q.device)
        o = sdpa(qu, ku, vu, attn_mask=mask, scale=scale, enable_gqa=gqa)
        outs.append(o.transpose(0, 1))
    if not outs:  # no units: T = 0
        return q.new_zeros(q.shape)
    return torch.cat(outs, dim=0)


# ----------------------------------------------------------------------------- flash-attn path
def _prefix_attention_flash(q, k, v, layout: PrefixLayout, scale: float) -> torch.Tensor:
    """Two ``flash_attn_varlen_func`` calls (prompts; responses against [P; R_i])."""
    fa = _flash_varlen()
    dev = q.device
    ps = layout.prefix_lens_host
    suffixes = [n for ss in layout.suffix_lens_host for n in ss]
    pidx = layout._host_index("prefix_idx", dev)
    cu_p = torch.tensor([0] + _cumsum(ps), dtype=torch.int32, device=dev)
    o_p = fa(q[pidx], k[pidx], v[pidx], cu_p, cu_p, max(ps), max(ps), dropout_p=0.0,
             softmax_scale=scale, causal=True)
    if not suffixes:
        return o_p[layout._host_index("inverse", dev)]
    sidx = layout._host_index("suffix_idx", dev)
    kvidx = layout._host_index("suffix_kv_idx", dev)
    klens = [p + n for p, ss in zip(ps, layout.suffix_lens_host) for n in ss]
    cu_q = torch.tensor([0] + _cumsum(suffixes), dtype=torch.int32, device=dev)
    cu_k = torch.tensor([0] + _cumsum(klens), dtype=torch.int32, device=dev)
    # causal=True with seqlen_q < seqlen_k: flash-attn >= 2.1 aligns the causal mask to the
    # bottom-right corner, so response row r sees keys [0, p + r]: all of P and R_i[:r + 1].
    o_s = fa(q[sidx], k[kvidx], v[kvidx], cu_q, cu_k, max(suffixes), max(klens), dropout_p=0.0,
             softmax_scale=scale, causal=True)
    return torch.cat([o_p, o_s], dim=0)[layout._host_index("inverse", dev)]


def _cumsum(xs):
    out, s = [], 0
    for x in xs:
        s += x
        out.append(s)
    return out


# ----------------------------------------------------------------------------- Triton kernels
# (filled in below)
def _kv_block_table(layout: PrefixLayout, block_n: int) -> torch.Tensor:
    raise NotImplementedError


def prefix_shared_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            layout: PrefixLayout, *, scale: float | None = None,
                            impl: str = "auto") -> torch.Tensor:
    """Attention over packed prefix-shared units (see the module docstring for the mask).

    Args:
        q: [T, Hq, D] queries, T = ``layout.num_tokens``.
        k, v: [T, Hk, D] keys and values (q's dtype and device), ``Hq % Hk == 0``.
        layout: :class:`PrefixLayout` on q's device.
        scale: softmax scale, default ``1 / sqrt(D)``.
        impl: ``"auto"`` | ``"triton"`` | ``"torch"`` | ``"flash"``.

    Returns:
        [T, Hq, D] in q's dtype; differentiable w.r.t. q, k and v.
    """
    scale = _check_inputs(q, k, v, layout, scale)
    impl = _resolve(impl, q)
    if impl == "torch":
        return _prefix_attention_torch(q, k, v, layout, scale)
    if impl == "flash":
        return _prefix_attention_flash(q, k, v, layout, scale)
    raise NotImplementedError("impl='triton'")
