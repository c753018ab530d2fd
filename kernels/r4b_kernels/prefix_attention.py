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
* ``"sdpa"`` - the flash path's composition with ``torch.nn.functional.
  scaled_dot_product_attention`` (any device and dtype), two padded calls: the prompts,
  right-padded, ``is_causal``; then every response's queries, right-padded, against its keys
  ``[P; R_i]`` gathered by index with an explicit bottom-right causal mask (response row ``r``
  sees keys up to ``p + r``).  Autograd for backward (the gathers' backward sums ``P``'s
  gradients over its copies).  Cost ``O(p^2 + n (p + r) r)`` per unit instead of the
  reference's ``O(L_u^2)``; the gathered keys copy ``P`` once per response.
* ``"flash"`` - flash-attn's ``flash_attn_varlen_func`` (imported when used), two calls: the
  prompts, causal over themselves; then every response's queries against the keys
  ``[P; R_i]`` gathered by index (``cu_seqlens_k`` = ``|P| + |R_i|`` per response,
  ``causal=True``, which flash-attn >= 2.1 aligns to the bottom-right corner, so response row
  ``r`` sees keys up to ``p + r``).  Exact with the standard kernels; CUDA and fp16/bf16 only.
  The gathered keys copy ``P`` once per response (``n * p`` extra K/V rows per layer).
* ``"triton"`` - flash-attention-2 style kernels with this mask, as an autograd Function.
  Forward: one program per (query block, unit, query head), online softmax in fp32, two key
  loops (the prompt; then from the segment start of the block's first query), so the keys of
  earlier responses are not loaded (only a query block that straddles two responses loads
  the earlier one's tail, masked); the base-2 logsumexp is saved.  Backward: a delta =
  rowsum(dO * O) preprocess; a dK/dV kernel with one program per (segment-aligned key
  block, kv head), which loops over the kv head's query heads (GQA) and over every query
  that can see the block (for a prompt block: all later queries of the unit, every
  response, so ``P``'s K/V are loaded once per group) and accumulates in registers (no
  atomics, no per-head partials); a dQ kernel per query block that mirrors the forward.
  bf16/fp16/fp32 in, fp32 math, outputs in the input dtype; head dims up to 128 (padded to
  a power of two and masked).  Under ``TRITON_INTERPRET=1`` it runs on CPU tensors.
* ``"auto"`` - flash when the tensors are on CUDA in fp16/bf16 and flash-attn imports, else
  triton for CUDA fp16/bf16 when compiled Triton runs, else sdpa (fp32 included: the Triton
  fp32 path multiplies in full fp32 without tensor cores and is a correctness path).
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

PREFIX_ATTENTION_IMPLS = ("auto", "triton", "torch", "sdpa", "flash")
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
        return cls(cu_units=torch.tensor(cu, dtype=i32, device="cpu").to(dev),
                   prefix_lens=torch.tensor(ps, dtype=i32, device="cpu").to(dev),
                   seg_start=torch.tensor(seg, dtype=i32, device="cpu").to(dev),
                   max_unit_len=max(lens, default=0), prefix_lens_host=tuple(ps),
                   suffix_lens_host=tuple(ss))

    def to(self, device) -> "PrefixLayout":
        """The same layout with its tensors on ``device`` (host fields shared); itself when it
        is there already."""
        device = torch.device(device)
        if self.cu_units.device == device:
            return self
        return PrefixLayout(cu_units=self.cu_units.to(device), prefix_lens=self.prefix_lens.to(device),
                            seg_start=self.seg_start.to(device), max_unit_len=self.max_unit_len,
                            prefix_lens_host=self.prefix_lens_host,
                            suffix_lens_host=self.suffix_lens_host,
                            _cache=self._cache)  # entries are keyed by device

    @property
    def num_units(self) -> int:
        """Number of units ``U``."""
        return len(self.prefix_lens_host)

    @property
    def num_tokens(self) -> int:
        """Packed tokens ``T`` of all units."""
        return self.unit_offsets()[-1]

    def unit_len(self, u: int) -> int:
        """Tokens of unit ``u``: its prefix plus all its suffixes."""
        return self.prefix_lens_host[u] + sum(self.suffix_lens_host[u])

    def unit_offsets(self) -> list[int]:
        """Host copy of ``cu_units``: ``[0, L_0, L_0 + L_1, ...]`` (computed once)."""
        if "offsets" not in self._cache:
            out = [0]
            for u in range(self.num_units):
                out.append(out[-1] + self.unit_len(u))
            self._cache["offsets"] = out
        return list(self._cache["offsets"])

    def _seg_start_host(self, u: int) -> torch.Tensor:
        p = self.prefix_lens_host[u]
        parts = [torch.zeros(p, dtype=torch.int64, device="cpu")]
        start = p
        for n in self.suffix_lens_host[u]:
            parts.append(torch.full((n,), start, dtype=torch.int64, device="cpu"))
            start += n
        return torch.cat(parts)

    def mask(self, u: int) -> torch.Tensor:
        """bool [L_u, L_u] visibility of unit ``u`` (row = query, column = key), on the
        layout's device: ``j <= i and (j < p or j >= seg_start[i])``."""
        if isinstance(u, bool) or not isinstance(u, int) or not 0 <= u < self.num_units:
            raise ValueError(f"u must be a unit index in [0, {self.num_units}), got {u!r}")
        L = self.unit_len(u)
        p = self.prefix_lens_host[u]
        i = torch.arange(L, device="cpu")[:, None]
        j = torch.arange(L, device="cpu")[None, :]
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
        return torch.cat([torch.arange(off[u], off[u] + p, device="cpu") for u, p in
                          enumerate(layout.prefix_lens_host)] or [torch.zeros(0, device="cpu")]).long()
    if key == "suffix_idx":  # packed rows of every suffix token, unit then response order
        rows = [torch.arange(off[u] + p, off[u + 1], device="cpu") for u, p in enumerate(layout.prefix_lens_host)]
        return torch.cat(rows or [torch.zeros(0, device="cpu")]).long()
    if key == "suffix_kv_idx":  # per suffix: its unit's prefix rows, then its own rows
        rows = []
        for u, (p, ss) in enumerate(zip(layout.prefix_lens_host, layout.suffix_lens_host)):
            start = off[u] + p
            for n in ss:
                rows.append(torch.arange(off[u], off[u] + p, device="cpu"))
                rows.append(torch.arange(start, start + n, device="cpu"))
                start += n
        return torch.cat(rows or [torch.zeros(0, device="cpu")]).long()
    if key == "inverse":  # row of every packed token in cat([prefix rows, suffix rows])
        perm = torch.cat([_build_index(layout, "prefix_idx"), _build_index(layout, "suffix_idx")])
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(perm.numel(), device=perm.device)
        return inv
    if key.startswith("kv_blocks:"):
        return _kv_block_table(layout, int(key.split(":")[1]))
    if key.startswith("sdpa_"):
        return _sdpa_index(layout, key)
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
        mod = importlib.import_module("flash_attn")
        fn = mod.flash_attn_varlen_func
    except (ImportError, AttributeError) as e:
        raise RuntimeError(f"impl='flash' needs flash-attn >= 2.1 (flash_attn_varlen_func); it is "
                           f"not importable ({e}); install flash-attn or use impl='triton' / "
                           "'torch'") from e
    version = getattr(mod, "__version__", None)
    if isinstance(version, str):
        try:
            major_minor = tuple(int(x) for x in version.split(".")[:2])
        except ValueError:
            major_minor = None
        # before 2.1 causal=True aligned the mask to the top-left corner: wrong for [P; R_i]
        if major_minor is not None and major_minor < (2, 1):
            raise RuntimeError(f"impl='flash' needs flash-attn >= 2.1 (bottom-right causal "
                               f"alignment), got {version}")
    return fn


def _flash_available() -> bool:
    try:
        _flash_varlen()
    except RuntimeError:
        return False
    return True


def _resolve(impl: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             layout: PrefixLayout) -> str:
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
        if (dev.type == "cuda" and HAS_TRITON_GPU and q.dtype in _FLASH_DTYPES
                and q.shape[2] <= MAX_TRITON_HEAD_DIM):
            return "triton"
        return "sdpa"
    if impl in ("torch", "sdpa"):
        return impl
    impl = resolve_impl(impl, dev)
    if impl == "triton":
        if q.dtype not in _KERNEL_DTYPES:
            raise TypeError(f"impl='triton' supports q/k/v in {[str(d) for d in _KERNEL_DTYPES]}, "
                            f"got {q.dtype}; use impl='torch'")
        if q.shape[2] > MAX_TRITON_HEAD_DIM:
            raise ValueError(f"impl='triton' supports head_dim <= {MAX_TRITON_HEAD_DIM}, got "
                             f"{q.shape[2]}; use impl='flash' or 'torch'")
        row = max(q.stride(0), k.stride(0), v.stride(0), q.shape[1] * q.shape[2])
        span = layout.max_unit_len * row
        if span >= 2**31:
            raise ValueError(f"impl='triton' indexes rows inside a unit in int32: the longest unit "
                             f"({layout.max_unit_len} tokens) times the token stride must stay "
                             f"below 2**31, got {span}")
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


# ----------------------------------------------------------------------------- SDPA composition
def _prefix_attention_sdpa(q, k, v, layout: PrefixLayout, scale: float) -> torch.Tensor:
    """Two padded SDPA calls: the prompts (causal); the responses against [P; R_i]."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    dev = q.device
    gqa = q.shape[1] != k.shape[1]
    if layout.num_units == 0:
        return q.new_zeros(q.shape)

    def padded(x, key, rows):  # [T, H, D] -> [n, H, rows, D] by a gather index
        return x.index_select(0, layout._host_index(key, dev)).view(
            -1, rows, x.shape[1], x.shape[2]).transpose(1, 2)

    def valid(o, key):  # [n, H, rows, D] -> the real rows, [t, H, D]
        return o.transpose(1, 2).reshape(-1, o.shape[1], o.shape[3]).index_select(
            0, layout._host_index(key, dev))

    mp = max(layout.prefix_lens_host)
    o_p = sdpa(padded(q, "sdpa_prompt_rows", mp), padded(k, "sdpa_prompt_rows", mp),
               padded(v, "sdpa_prompt_rows", mp), is_causal=True, scale=scale, enable_gqa=gqa)
    outs = [valid(o_p, "sdpa_prompt_valid")]
    suffixes = [n for ss in layout.suffix_lens_host for n in ss]
    if suffixes:
        mn = max(suffixes)
        mk = max(p + n for p, ss in zip(layout.prefix_lens_host, layout.suffix_lens_host)
                 for n in ss)
        mask = layout._host_index("sdpa_suffix_mask", dev)
        o_s = sdpa(padded(q, "sdpa_suffix_rows", mn), padded(k, "sdpa_suffix_kv_rows", mk),
                   padded(v, "sdpa_suffix_kv_rows", mk), attn_mask=mask, scale=scale,
                   enable_gqa=gqa)
        outs.append(valid(o_s, "sdpa_suffix_valid"))
    return torch.cat(outs, dim=0)[layout._host_index("inverse", dev)]


def _sdpa_index(layout: PrefixLayout, key: str) -> torch.Tensor:
    """Gather indices, valid-row indices and the suffix mask of the SDPA composition.  Pad
    slots gather the unit's first row: a prompt's pads sit after its real rows (causality
    keeps them out), a response's key pads are masked, query pads are dropped (each sees one
    key, so no row of the padded call is empty)."""
    off = layout.unit_offsets()
    ps, ss = layout.prefix_lens_host, layout.suffix_lens_host
    ar = lambda n: torch.arange(n, dtype=torch.long, device="cpu")  # noqa: E731
    if key in ("sdpa_prompt_rows", "sdpa_prompt_valid"):
        mp = max(ps)
        s = ar(mp)
        if key == "sdpa_prompt_rows":
            return torch.cat([torch.where(s < p, off[u] + s, off[u]) for u, p in enumerate(ps)])
        return torch.cat([u * mp + ar(p) for u, p in enumerate(ps)])
    sfx = []  # (unit start, prompt length, response start, response length)
    for u, (p, sl) in enumerate(zip(ps, ss)):
        at = off[u] + p
        for n in sl:
            sfx.append((off[u], p, at, n))
            at += n
    mn = max(n for *_, n in sfx)
    mk = max(p + n for _, p, _, n in sfx)
    r, j = ar(mn), ar(mk)
    if key == "sdpa_suffix_rows":
        return torch.cat([torch.where(r < n, a + r, a) for _, _, a, n in sfx])
    if key == "sdpa_suffix_valid":
        return torch.cat([i * mn + ar(n) for i, (*_, n) in enumerate(sfx)])
    if key == "sdpa_suffix_kv_rows":
        return torch.cat([torch.where(j < p, u0 + j, torch.where(j < p + n, a + j - p, u0))
                          for u0, p, a, n in sfx])
    if key == "sdpa_suffix_mask":  # [S, 1, mn, mk]: row r sees keys j <= p + r (pads: key 0)
        return torch.stack([torch.where((r < n)[:, None], j[None, :] <= p + r[:, None],
                                        j[None, :] == 0) for _, p, _, n in sfx])[:, None]
    raise KeyError(key)


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
#: Tests set this to fill the kernels' outputs with NaN before the launch, so that an element
#: no program writes shows up in the results instead of stale memory.
POISON_BUFFERS = False

_LOG2E = 1.4426950408889634


def _alloc(shape, dtype, device) -> torch.Tensor:
    if POISON_BUFFERS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


if HAS_TRITON:

    @triton.jit
    def _prefix_attention_fwd_kernel(
        q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, cu_ptr, plen_ptr, seg_ptr,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
        stride_lh, qk_scale, head_dim, group,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):
        # One program per (query block of a unit, unit, query head).  Row indices are
        # unit-local int32 (i, j in [0, L)); the unit's first row and the head are folded into
        # int64 base pointers once, so the tiles' index vectors stay 32-bit.
        #   loop 1: prompt keys [0, min(p, m1)), visible iff j <= i;
        #   loop 2: keys [max(p, seg_start of the block's first query), m1), visible iff
        #           seg_start[i] <= j <= i.  Keys of earlier responses (between the prompt and
        #           that start) are never loaded: the saving over a causal kernel.
        # Scores live in base-2 units (scale * log2 e folded into qk_scale) so the online
        # softmax uses exp2; m, l, acc and the saved logsumexp are fp32.
        mb = tl.program_id(0)
        u = tl.program_id(1)
        h = tl.program_id(2).to(tl.int64)
        start = tl.load(cu_ptr + u)
        L = tl.load(cu_ptr + u + 1) - start
        m0 = mb * BLOCK_M
        if m0 >= L:
            return
        p = tl.load(plen_ptr + u)
        m1 = tl.minimum(m0 + BLOCK_M, L)
        row0 = start.to(tl.int64)
        kvh = h // group
        q_base = q_ptr + row0 * stride_qt + h * stride_qh
        k_base = k_ptr + row0 * stride_kt + kvh * stride_kh
        v_base = v_ptr + row0 * stride_vt + kvh * stride_vh
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        m_ok = offs_m < m1
        d_ok = offs_d < head_dim
        q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :],
                    mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:  # the interpreter multiplies raw bits of bf16 tiles: dot in fp32 there
            q = q.to(tl.float32)
        seg = tl.load(seg_ptr + start + offs_m, mask=m_ok, other=0)
        # A finite start for the running max: rows past the unit (all keys masked) then stay
        # at exp2(-inf) = 0 instead of producing inf - inf.
        m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

        hi1 = tl.minimum(p, m1)
        for n0 in range(0, hi1, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_ok = offs_n < hi1
            kv_mask = n_ok[:, None] & d_ok[None, :]
            k = tl.load(k_base + offs_n[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
            if UPCAST:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
            vis = n_ok[None, :] & (offs_n[None, :] <= offs_m[:, None])
            s = tl.where(vis, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            pm = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(pm, 1)
            acc = acc * alpha[:, None] + tl.dot(pm.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new

        lo2 = tl.maximum(p, tl.load(seg_ptr + start + m0))
        for n0 in range(lo2, m1, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_ok = offs_n < m1
            kv_mask = n_ok[:, None] & d_ok[None, :]
            k = tl.load(k_base + offs_n[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
            if UPCAST:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
            vis = (n_ok[None, :] & (offs_n[None, :] <= offs_m[:, None])
                   & (offs_n[None, :] >= seg[:, None]))
            s = tl.where(vis, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            pm = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(pm, 1)
            acc = acc * alpha[:, None] + tl.dot(pm.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new

        l_safe = tl.where(l_i > 0.0, l_i, 1.0)
        out = acc / l_safe[:, None]
        o_base = o_ptr + row0 * stride_ot + h * stride_oh
        tl.store(o_base + offs_m[:, None] * stride_ot + offs_d[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
        # base-2 logsumexp of the scaled scores: backward recomputes P = exp2(s - lse)
        tl.store(lse_ptr + h * stride_lh + row0 + offs_m, m_i + tl.log2(l_safe), mask=m_ok)

    @triton.jit
    def _prefix_attention_bwd_preprocess_kernel(
        o_ptr, do_ptr, delta_ptr, stride_ot, stride_oh, stride_dot, stride_doh, stride_lh,
        n_tokens, head_dim, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        # delta[h, i] = sum_d dO[i, h, d] * O[i, h, d] (fp32): the row term of the softmax
        # backward, dS = P * (dP - delta).
        mb = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1).to(tl.int64)
        offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        mask = (offs_m < n_tokens)[:, None] & (offs_d < head_dim)[None, :]
        o = tl.load(o_ptr + offs_m[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
                    mask=mask, other=0.0).to(tl.float32)
        do = tl.load(do_ptr + offs_m[:, None] * stride_dot + h * stride_doh + offs_d[None, :],
                     mask=mask, other=0.0).to(tl.float32)
        tl.store(delta_ptr + h * stride_lh + offs_m, tl.sum(o * do, 1), mask=offs_m < n_tokens)

    @triton.jit
    def _prefix_attention_bwd_dkdv_kernel(
        q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, blocks_ptr,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
        stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_lh,
        qk_scale, sm_scale, head_dim, group,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):
        # One program per (key block, kv head).  Key blocks never straddle a segment; the
        # table row is (unit start, k0, k1, q1) with unit-local keys [k0, k1) and the queries
        # that can see them, [k0, q1): [k0, unit end) for a prompt block (every later query of
        # the unit, all responses: the prompt's K/V are loaded once for the whole group) and
        # [k0, response end) for a response block.  Inside that range visibility is j <= i.
        # The program loops over the `group` query heads of its kv head and accumulates dK/dV
        # in fp32 registers: no atomics, no per-head partials, a fixed summation order.
        kb = tl.program_id(0).to(tl.int64)
        kvh = tl.program_id(1).to(tl.int64)
        row0 = tl.load(blocks_ptr + kb * 4).to(tl.int64)
        k0 = tl.load(blocks_ptr + kb * 4 + 1)
        k1 = tl.load(blocks_ptr + kb * 4 + 2)
        q1 = tl.load(blocks_ptr + kb * 4 + 3)
        offs_n = k0 + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        n_ok = offs_n < k1
        d_ok = offs_d < head_dim
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + row0 * stride_kt + kvh * stride_kh + offs_n[:, None] * stride_kt
                    + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + row0 * stride_vt + kvh * stride_vh + offs_n[:, None] * stride_vt
                    + offs_d[None, :], mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        for g in range(group):
            h = kvh * group + g
            q_base = q_ptr + row0 * stride_qt + h * stride_qh
            do_base = do_ptr + row0 * stride_dot + h * stride_doh
            lse_base = lse_ptr + h * stride_lh + row0
            delta_base = delta_ptr + h * stride_lh + row0
            for m0 in range(k0, q1, BLOCK_M):
                offs_m = m0 + tl.arange(0, BLOCK_M)
                m_ok = offs_m < q1
                q_mask = m_ok[:, None] & d_ok[None, :]
                q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :], mask=q_mask,
                            other=0.0)
                do = tl.load(do_base + offs_m[:, None] * stride_dot + offs_d[None, :], mask=q_mask,
                             other=0.0)
                if UPCAST:
                    q = q.to(tl.float32)
                    do = do.to(tl.float32)
                lse = tl.load(lse_base + offs_m, mask=m_ok, other=0.0)
                delta = tl.load(delta_base + offs_m, mask=m_ok, other=0.0)
                # transposed tiles [keys, queries]: dK = dS^T Q and dV = P^T dO need no
                # transpose of the accumulators
                st = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
                vis = n_ok[:, None] & m_ok[None, :] & (offs_n[:, None] <= offs_m[None, :])
                pt = tl.exp2(tl.where(vis, st - lse[None, :], float("-inf")))
                dv += tl.dot(pt.to(do.dtype), do, input_precision=DOT_PRECISION)
                dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
                dst = pt * (dpt - delta[None, :])
                dk += tl.dot(dst.to(q.dtype), q, input_precision=DOT_PRECISION)
        dk = dk * sm_scale
        tl.store(dk_ptr + row0 * stride_dkt + kvh * stride_dkh + offs_n[:, None] * stride_dkt
                 + offs_d[None, :], dk.to(dk_ptr.dtype.element_ty), mask=kv_mask)
        tl.store(dv_ptr + row0 * stride_dvt + kvh * stride_dvh + offs_n[:, None] * stride_dvt
                 + offs_d[None, :], dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)

    @triton.jit
    def _prefix_attention_bwd_dq_kernel(
        q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, cu_ptr, plen_ptr, seg_ptr,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
        stride_dqt, stride_dqh, stride_lh, qk_scale, sm_scale, head_dim, group,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):
        # One program per (query block of a unit, unit, query head), the forward's two key
        # loops: dQ = scale * sum_j dS_ij K_j with dS = P * (dO V^T - delta).
        mb = tl.program_id(0)
        u = tl.program_id(1)
        h = tl.program_id(2).to(tl.int64)
        start = tl.load(cu_ptr + u)
        L = tl.load(cu_ptr + u + 1) - start
        m0 = mb * BLOCK_M
        if m0 >= L:
            return
        p = tl.load(plen_ptr + u)
        m1 = tl.minimum(m0 + BLOCK_M, L)
        row0 = start.to(tl.int64)
        kvh = h // group
        k_base = k_ptr + row0 * stride_kt + kvh * stride_kh
        v_base = v_ptr + row0 * stride_vt + kvh * stride_vh
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        m_ok = offs_m < m1
        d_ok = offs_d < head_dim
        q_mask = m_ok[:, None] & d_ok[None, :]
        q = tl.load(q_ptr + row0 * stride_qt + h * stride_qh + offs_m[:, None] * stride_qt
                    + offs_d[None, :], mask=q_mask, other=0.0)
        do = tl.load(do_ptr + row0 * stride_dot + h * stride_doh + offs_m[:, None] * stride_dot
                     + offs_d[None, :], mask=q_mask, other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        lse = tl.load(lse_ptr + h * stride_lh + row0 + offs_m, mask=m_ok, other=0.0)
        delta = tl.load(delta_ptr + h * stride_lh + row0 + offs_m, mask=m_ok, other=0.0)
        seg = tl.load(seg_ptr + start + offs_m, mask=m_ok, other=0)
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

        hi1 = tl.minimum(p, m1)
        for n0 in range(0, hi1, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_ok = offs_n < hi1
            kv_mask = n_ok[:, None] & d_ok[None, :]
            k = tl.load(k_base + offs_n[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
            if UPCAST:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
            vis = n_ok[None, :] & m_ok[:, None] & (offs_n[None, :] <= offs_m[:, None])
            pm = tl.exp2(tl.where(vis, s - lse[:, None], float("-inf")))
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
            ds = pm * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)

        lo2 = tl.maximum(p, tl.load(seg_ptr + start + m0))
        for n0 in range(lo2, m1, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_ok = offs_n < m1
            kv_mask = n_ok[:, None] & d_ok[None, :]
            k = tl.load(k_base + offs_n[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
            if UPCAST:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
            vis = (n_ok[None, :] & m_ok[:, None] & (offs_n[None, :] <= offs_m[:, None])
                   & (offs_n[None, :] >= seg[:, None]))
            pm = tl.exp2(tl.where(vis, s - lse[:, None], float("-inf")))
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
            ds = pm * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)

        dq = dq * sm_scale
        tl.store(dq_ptr + row0 * stride_dqt + h * stride_dqh + offs_m[:, None] * stride_dqt
                 + offs_d[None, :], dq.to(dq_ptr.dtype.element_ty), mask=q_mask)


class PrefixAttentionTiles(NamedTuple):
    """Block sizes, warps and pipeline stages of the three attention kernels (+ preprocess)."""

    block_d: int
    fwd_m: int
    fwd_n: int
    fwd_warps: int
    fwd_stages: int
    dkdv_n: int
    dkdv_m: int
    dkdv_warps: int
    dkdv_stages: int
    dq_m: int
    dq_n: int
    dq_warps: int
    dq_stages: int
    pre_m: int = 64


def prefix_attention_tiles(head_dim: int, dtype: torch.dtype, *,
                           interpret: bool | None = None) -> PrefixAttentionTiles:
    """Tiles of the kernels for this head dim and dtype.

    The head dim is padded to the next power of two (>= 16, ``tl.dot``'s smallest K) and
    masked.  Under the interpreter (``interpret``, default ``TRITON_INTERPRET``) every block is
    16 rows, so that small test layouts cross block and segment boundaries.

    On a GPU the sizes are ones that compile without a register spill and within the sm_80
    shared-memory limit on sm_80 and sm_90 (checked by tests/test_kernels_compile.py
    at the Qwen3-4B attention shape).  Swept with Triton 3.9's ptxas; at D=128 bf16 the
    128 x 64 forward tile spilled on sm_80 (255 registers), 128 x 32 with 8 warps does not
    (192); the dK/dV program holds two [64, D] fp32 accumulators plus its K and V tiles, so
    it walks the queries 32 rows at a time with 8 warps.  fp32 inputs multiply in full fp32
    (``input_precision="ieee"``, no tensor cores), which only fits small tiles: a
    correctness path, not a fast one (``impl="auto"`` sends fp32 to the reference).
    """
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 1:
        raise ValueError(f"head_dim must be an int >= 1, got {head_dim!r}")
    d = max(16, next_power_of_2(head_dim))
    if TRITON_INTERPRET if interpret is None else interpret:
        return PrefixAttentionTiles(d, 16, 16, 1, 1, 16, 16, 1, 1, 16, 16, 1, 1, 16)
    wide = d > 64
    if dtype == torch.float32:
        if wide:
            return PrefixAttentionTiles(d, 32, 16, 8, 1, 16, 16, 2, 1, 16, 32, 4, 1)
        return PrefixAttentionTiles(d, 32, 32, 4, 1, 16, 32, 4, 1, 32, 32, 4, 1)
    if wide:
        return PrefixAttentionTiles(d, 128, 32, 8, 3, 64, 32, 8, 2, 64, 64, 8, 2)
    return PrefixAttentionTiles(d, 128, 64, 8, 3, 64, 32, 8, 2, 64, 64, 4, 2)


#: Largest head dim of the Triton kernels (their tiles are sized for D <= 128).
MAX_TRITON_HEAD_DIM = 128


def _kv_block_table(layout: PrefixLayout, block_n: int) -> torch.Tensor:
    """int32 [NB, 4] rows (unit start, k0, k1, q1) of the dK/dV kernel: unit-local key blocks
    [k0, k1) of at most ``block_n`` rows that never straddle a segment, and the end q1 of the
    queries [k0, q1) that can see them; longest query ranges first (the prompt blocks), so the
    long programs start in the first wave."""
    off = layout.unit_offsets()
    rows = []
    for u, (p, ss) in enumerate(zip(layout.prefix_lens_host, layout.suffix_lens_host)):
        L = off[u + 1] - off[u]
        segs = [(0, p, L)]
        start = p
        for n in ss:
            segs.append((start, start + n, start + n))
            start += n
        for a, b, q1 in segs:
            for k0 in range(a, b, block_n):
                rows.append((off[u], k0, min(k0 + block_n, b), q1))
    rows.sort(key=lambda r: r[1] - r[3])  # stable: most queries first
    return torch.tensor(rows, dtype=torch.int32, device="cpu").reshape(-1, 4)


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: full-precision products (the default tf32 keeps 10 mantissa bits);
    # fp16/bf16 tiles are exact in any mode.
    return "ieee" if dtype == torch.float32 else "tf32"


def _upcast(interpret: bool | None) -> bool:
    return bool(TRITON_INTERPRET if interpret is None else interpret)


def _fwd_launch(tiles, q, k, v, o, lse, cu, plen, seg, n_units, max_unit_len, scale,
                interpret=None) -> KernelLaunch:
    group = q.shape[1] // k.shape[1]
    return KernelLaunch(
        _prefix_attention_fwd_kernel, (cdiv(max_unit_len, tiles.fwd_m), n_units, q.shape[1]),
        (q, k, v, o, lse, cu, plen, seg, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
         v.stride(0), v.stride(1), o.stride(0), o.stride(1), lse.stride(0), scale * _LOG2E,
         q.shape[2], group),
        dict(BLOCK_M=tiles.fwd_m, BLOCK_N=tiles.fwd_n, BLOCK_D=tiles.block_d,
             UPCAST=_upcast(interpret), DOT_PRECISION=_dot_precision(q.dtype),
             num_warps=tiles.fwd_warps, num_stages=tiles.fwd_stages))


def _bwd_launches(tiles, q, k, v, o, do, lse, delta, dq, dk, dv, cu, plen, seg, blocks,
                  n_units, max_unit_len, scale, interpret=None) -> list[KernelLaunch]:
    T, hq, d = q.shape
    group = hq // k.shape[1]
    up, prec = _upcast(interpret), _dot_precision(q.dtype)
    pre = KernelLaunch(
        _prefix_attention_bwd_preprocess_kernel, (cdiv(T, tiles.pre_m), hq),
        (o, do, delta, o.stride(0), o.stride(1), do.stride(0), do.stride(1), delta.stride(0), T, d),
        dict(BLOCK_M=tiles.pre_m, BLOCK_D=tiles.block_d, num_warps=4))
    dkdv = KernelLaunch(
        _prefix_attention_bwd_dkdv_kernel, (blocks.shape[0], k.shape[1]),
        (q, k, v, do, lse, delta, dk, dv, blocks, q.stride(0), q.stride(1), k.stride(0),
         k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1), dk.stride(0),
         dk.stride(1), dv.stride(0), dv.stride(1), lse.stride(0), scale * _LOG2E, scale, d, group),
        dict(BLOCK_M=tiles.dkdv_m, BLOCK_N=tiles.dkdv_n, BLOCK_D=tiles.block_d, UPCAST=up,
             DOT_PRECISION=prec, num_warps=tiles.dkdv_warps, num_stages=tiles.dkdv_stages))
    dql = KernelLaunch(
        _prefix_attention_bwd_dq_kernel, (cdiv(max_unit_len, tiles.dq_m), n_units, hq),
        (q, k, v, do, lse, delta, dq, cu, plen, seg, q.stride(0), q.stride(1), k.stride(0),
         k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1), dq.stride(0),
         dq.stride(1), lse.stride(0), scale * _LOG2E, scale, d, group),
        dict(BLOCK_M=tiles.dq_m, BLOCK_N=tiles.dq_n, BLOCK_D=tiles.block_d, UPCAST=up,
             DOT_PRECISION=prec, num_warps=tiles.dq_warps, num_stages=tiles.dq_stages))
    return [pre, dkdv, dql]


def _rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    # the kernels take token and head strides; the head dim must be unit-stride
    return t if t.stride(-1) == 1 else t.contiguous()


def prefix_attention_fwd(q, k, v, layout: PrefixLayout, scale: float):
    """Launcher of the forward kernel: (out [T, Hq, D] in q's dtype, base-2 logsumexp
    [Hq, T] fp32 of the scaled scores)."""
    T, hq, d = q.shape
    tiles = prefix_attention_tiles(d, q.dtype)
    o = _alloc((T, hq, d), q.dtype, q.device)
    lse = _alloc((hq, T), torch.float32, q.device)
    if T == 0:
        return o, lse
    with device_guard(q.device):
        _fwd_launch(tiles, q, k, v, o, lse, layout.cu_units, layout.prefix_lens, layout.seg_start,
                    layout.num_units, layout.max_unit_len, scale).run()
    return o, lse


def prefix_attention_bwd(do, q, k, v, o, lse, layout: PrefixLayout, scale: float):
    """Launcher of the backward: delta preprocess, dK/dV kernel, dQ kernel -> (dq, dk, dv)."""
    T, hq, d = q.shape
    tiles = prefix_attention_tiles(d, q.dtype)
    dq = _alloc(q.shape, q.dtype, q.device)
    dk = _alloc(k.shape, k.dtype, k.device)
    dv = _alloc(v.shape, v.dtype, v.device)
    if T == 0:
        return dq, dk, dv
    delta = _alloc((hq, T), torch.float32, q.device)
    blocks = layout._host_index(f"kv_blocks:{tiles.dkdv_n}", q.device)
    with device_guard(q.device):
        for launch in _bwd_launches(tiles, q, k, v, o, do, lse, delta, dq, dk, dv, layout.cu_units,
                                    layout.prefix_lens, layout.seg_start, blocks, layout.num_units,
                                    layout.max_unit_len, scale):
            launch.run()
    return dq, dk, dv


class _PrefixAttentionFunction(torch.autograd.Function):
    """Triton forward and backward of :func:`prefix_shared_attention`."""

    @staticmethod
    def forward(ctx, q, k, v, layout, scale):
        q, k, v = (_rows_contiguous(t) for t in (q, k, v))
        o, lse = prefix_attention_fwd(q, k, v, layout, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.layout, ctx.scale = layout, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = prefix_attention_bwd(_rows_contiguous(do), q, k, v, o, lse, ctx.layout,
                                          ctx.scale)
        return dq, dk, dv, None, None


def planned_launches(prefix_lens: Sequence[int], suffix_lens: Sequence[Sequence[int]], *,
                     num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                     with_grad: bool = True, scale: float | None = None,
                     interpret: bool | None = None) -> list[KernelLaunch]:
    """Every Triton launch of one ``prefix_shared_attention(impl="triton")`` forward (and,
    with ``with_grad``, backward) at this layout and shape, built by the launchers' own
    functions on meta tensors (nothing is allocated or run), for the ahead-of-time compile
    check; ``interpret`` picks the interpreter's tiles (default ``TRITON_INTERPRET``)."""
    layout = PrefixLayout.build(prefix_lens, suffix_lens)
    T, U = layout.num_tokens, layout.num_units
    dev = torch.device("meta")
    tiles = prefix_attention_tiles(head_dim, dtype, interpret=interpret)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale

    def e(shape, dt=dtype):
        return torch.empty(shape, dtype=dt, device=dev)

    i32 = torch.int32
    q, k, v = e((T, num_heads, head_dim)), e((T, num_kv_heads, head_dim)), e((T, num_kv_heads, head_dim))
    o, lse = e((T, num_heads, head_dim)), e((num_heads, T), torch.float32)
    cu, plen, seg = e(U + 1, i32), e(U, i32), e(T, i32)
    out = [_fwd_launch(tiles, q, k, v, o, lse, cu, plen, seg, U, layout.max_unit_len, scale,
                       interpret)]
    if with_grad:
        nb = _kv_block_table(layout, tiles.dkdv_n).shape[0]
        out += _bwd_launches(tiles, q, k, v, o, e(o.shape), lse, e(lse.shape, torch.float32),
                             e(q.shape), e(k.shape), e(v.shape), cu, plen, seg, e((nb, 4), i32),
                             U, layout.max_unit_len, scale, interpret)
    return out


def prefix_shared_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            layout: PrefixLayout, *, scale: float | None = None,
                            impl: str = "auto") -> torch.Tensor:
    """Attention over packed prefix-shared units (see the module docstring for the mask).

    Args:
        q: [T, Hq, D] queries, T = ``layout.num_tokens``.
        k, v: [T, Hk, D] keys and values (q's dtype and device), ``Hq % Hk == 0``.
        layout: :class:`PrefixLayout` on q's device.
        scale: softmax scale, default ``1 / sqrt(D)``.
        impl: ``"auto"`` | ``"triton"`` | ``"torch"`` | ``"sdpa"`` | ``"flash"``.

    Returns:
        [T, Hq, D] in q's dtype; differentiable w.r.t. q, k and v.
    """
    scale = _check_inputs(q, k, v, layout, scale)
    impl = _resolve(impl, q, k, v, layout)
    if impl == "torch":
        return _prefix_attention_torch(q, k, v, layout, scale)
    if impl == "sdpa":
        return _prefix_attention_sdpa(q, k, v, layout, scale)
    if impl == "flash":
        return _prefix_attention_flash(q, k, v, layout, scale)
    return _PrefixAttentionFunction.apply(q, k, v, layout, scale)
