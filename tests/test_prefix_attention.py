"""prefix_shared_attention: the torch reference, the SDPA and flash-attn compositions and the
Triton kernel (under the interpreter on CPU) against a naive dense implementation written here.

Under the interpreter every kernel block is 16 rows, so the layouts below put block edges
inside prompts and responses, several short responses in one query block and responses that
span several blocks.
"""

from __future__ import annotations

import importlib
import math
import sys
import types
import zlib

import pytest
import torch

import r4b_kernels
from r4b_kernels import PrefixLayout, prefix_shared_attention

pa = importlib.import_module("r4b_kernels.prefix_attention")
needs_triton = pytest.mark.skipif(
    not (r4b_kernels.HAS_TRITON and (r4b_kernels.TRITON_INTERPRET or torch.cuda.is_available())),
    reason="Triton needs CUDA or TRITON_INTERPRET=1")

# (prefix_lens, suffix_lens): p = 1, response length 1, several units, a unit without
# responses, token counts that are not multiples of any block size.
LAYOUTS = {
    "one-group": ([7], [[5, 3, 9]]),
    "odd": ([1, 13, 6], [[1, 4], [], [11, 1, 2]]),
    "causal-only": ([19], [[]]),
    "long": ([20, 3], [[17, 30, 1], [40]]),
}


def make_qkv(T, hq, hk, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(T, h, d, generator=g).to(dtype) for h in (hq, hk, hk))
    return q, k, v


def naive_attention(q, k, v, layout: PrefixLayout, scale):
    """Dense [T, T] mask over the whole packed tensor, explicit softmax (fp64)."""
    T, hq, _ = q.shape
    rep = hq // k.shape[1]
    off = layout.unit_offsets()
    unit = torch.zeros(T, dtype=torch.long)
    loc = torch.zeros(T, dtype=torch.long)
    for u in range(layout.num_units):
        unit[off[u]:off[u + 1]] = u
        loc[off[u]:off[u + 1]] = torch.arange(off[u + 1] - off[u])
    p = torch.tensor(layout.prefix_lens_host, dtype=torch.long)[unit]
    seg = layout.seg_start.long()
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    same = unit[:, None] == unit[None, :]
    li, lj = loc[:, None], loc[None, :]
    mask = same & (lj <= li) & ((lj < p[:, None]) | (lj >= seg[:, None]))
    del i, j
    qd, kd, vd = (t.double() for t in (q, k, v))
    kd = kd.repeat_interleave(rep, dim=1)
    vd = vd.repeat_interleave(rep, dim=1)
    s = torch.einsum("ihd,jhd->hij", qd, kd) * scale
    s = s.masked_fill(~mask, float("-inf"))
    return torch.einsum("hij,jhd->ihd", torch.softmax(s, dim=-1), vd)


def _seed(*parts) -> int:
    """A reproducible per-case seed (Python's ``hash`` of a str changes between processes)."""
    return zlib.crc32(repr(parts).encode()) % 1000


def _grads(fn, q, k, v, dout):
    qq, kk, vv = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(qq, kk, vv)
    out.backward(dout.to(out.dtype))
    return out.detach(), qq.grad, kk.grad, vv.grad


@pytest.mark.parametrize("name", sorted(LAYOUTS))
@pytest.mark.parametrize("hq,hk,d", [(4, 2, 16), (3, 3, 24)])
def test_torch_reference_equals_naive_dense(name, hq, hk, d):
    layout = PrefixLayout.build(*LAYOUTS[name])
    T = layout.num_tokens
    q, k, v = make_qkv(T, hq, hk, d, seed=_seed(name, hq, d))
    dout = torch.randn(T, hq, d, generator=torch.Generator().manual_seed(7))
    scale = 1 / math.sqrt(d)
    ref = _grads(lambda a, b, c: prefix_shared_attention(a, b, c, layout, impl="torch"), q, k, v, dout)
    dense = _grads(lambda a, b, c: naive_attention(a, b, c, layout, scale).float(), q, k, v, dout)
    for a, b, what in zip(ref, dense, ("out", "dq", "dk", "dv")):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=what)


def test_layout_fields():
    layout = PrefixLayout.build([3, 2], [[2, 1], []])
    assert layout.cu_units.tolist() == [0, 6, 8]
    assert layout.prefix_lens.tolist() == [3, 2]
    assert layout.seg_start.tolist() == [0, 0, 0, 3, 3, 5, 0, 0]
    assert layout.cu_units.dtype == layout.prefix_lens.dtype == layout.seg_start.dtype == torch.int32
    assert layout.max_unit_len == 6 and layout.num_tokens == 8
    assert layout.suffix_lens_host == ((2, 1), ())
    m = layout.mask(0)
    # row 5 (the second response) sees the prompt and itself, not the first response
    assert m[5].tolist() == [True, True, True, False, False, True]
    assert m[4].tolist() == [True, True, True, True, True, False]
    assert layout.mask(1).tolist() == [[True, False], [True, True]]


@pytest.mark.parametrize("prefix,suffix,match", [
    ([0], [[3]], r"prefix_lens\[0\] \(unit 0\) must be >= 1, got 0"),
    ([2, 3], [[1], [4, 0]], r"suffix_lens\[1\]\[1\] \(unit 1, response 1\) must be >= 1, got 0"),
    ([2], [[1], [2]], "one entry per unit"),
])
def test_bad_layouts_raise(prefix, suffix, match):
    with pytest.raises(ValueError, match=match):
        PrefixLayout.build(prefix, suffix)


def test_bad_inputs_raise():
    layout = PrefixLayout.build([3], [[2, 2]])
    q, k, v = make_qkv(7, 4, 2, 16)
    with pytest.raises(ValueError, match=r"layout.num_tokens = 7 rows .* got shape \(6, 4, 16\)"):
        prefix_shared_attention(q[:6], k[:6], v[:6], layout, impl="torch")
    with pytest.raises(ValueError, match=r"k must have shape \[7, Hk, 16\]"):
        prefix_shared_attention(q, k[:6], v[:6], layout, impl="torch")
    q3, k3, v3 = make_qkv(7, 3, 2, 16)
    with pytest.raises(ValueError, match="Hq=3 must be a multiple of the kv heads Hk=2"):
        prefix_shared_attention(q3, k3, v3, layout, impl="torch")
    with pytest.raises(ValueError, match="impl must be one of"):
        prefix_shared_attention(q, k, v, layout, impl="cuda")
    with pytest.raises(RuntimeError, match="impl='flash' needs CUDA fp16/bf16"):
        prefix_shared_attention(q, k, v, layout, impl="flash")
    with pytest.raises(ValueError, match="layout is on meta, expected cpu"):
        prefix_shared_attention(q, k, v, layout.to("meta"), impl="torch")
    with pytest.raises(TypeError, match="k must have dtype"):
        prefix_shared_attention(q, k.double(), v, layout, impl="torch")
    with pytest.raises(ValueError, match="scale must be a finite number > 0"):
        prefix_shared_attention(q, k, v, layout, scale=0.0, impl="torch")
    with pytest.raises(TypeError, match="layout must be a PrefixLayout"):
        prefix_shared_attention(q, k, v, ([3], [[2, 2]]), impl="torch")
    assert r4b_kernels.prefix_shared_attention is prefix_shared_attention


@needs_triton
def test_triton_input_errors():
    layout = PrefixLayout.build([3], [[2]])
    q, k, v = make_qkv(5, 2, 2, 16, dtype=torch.float64)
    with pytest.raises(TypeError, match="impl='triton' supports q/k/v in"):
        prefix_shared_attention(q, k, v, layout, impl="triton")
    q, k, v = make_qkv(5, 2, 2, 192)
    with pytest.raises(ValueError, match="head_dim <= 128, got 192"):
        prefix_shared_attention(q, k, v, layout, impl="triton")


# ----------------------------------------------------------------------------- shared == dense
def _dense_group(q, k, v, p, suffixes, scale):
    """Plain causal attention over each full sequence [P; R_i] (P copied per response)."""
    outs = []
    start = p
    for n in suffixes:
        rows = torch.cat([torch.arange(p), torch.arange(start, start + n)])
        qi, ki, vi = (t[rows].transpose(0, 1) for t in (q, k, v))
        o = torch.nn.functional.scaled_dot_product_attention(
            qi, ki, vi, is_causal=True, scale=scale, enable_gqa=qi.shape[0] != ki.shape[0])
        outs.append(o.transpose(0, 1))
        start += n
    return outs


@pytest.mark.parametrize("name", sorted(LAYOUTS))
@pytest.mark.parametrize("hq,hk,d", [(4, 2, 16), (3, 3, 24)])
def test_sdpa_composition_equals_reference(name, hq, hk, d, monkeypatch):
    """The two padded SDPA calls against the explicit-mask reference, forward and backward."""
    layout = PrefixLayout.build(*LAYOUTS[name])
    T = layout.num_tokens
    q, k, v = make_qkv(T, hq, hk, d, seed=_seed("sdpa", name, hq, d))
    dout = torch.randn(T, hq, d, generator=torch.Generator().manual_seed(_seed(name)))
    ref = _grads(lambda a, b, c: prefix_shared_attention(a, b, c, layout, impl="torch"), q, k, v, dout)
    calls = []
    real = pa._prefix_attention_sdpa
    monkeypatch.setattr(pa, "_prefix_attention_sdpa",
                        lambda *a: calls.append(1) or real(*a))
    got = _grads(lambda a, b, c: prefix_shared_attention(a, b, c, layout, impl="sdpa"), q, k, v, dout)
    assert calls
    for a, b, what in zip(got, ref, ("out", "dq", "dk", "dv")):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=what)


def test_auto_on_cpu_is_the_sdpa_composition():
    layout = PrefixLayout.build(*LAYOUTS["odd"])
    q, k, v = make_qkv(layout.num_tokens, 4, 2, 16)
    assert pa._resolve("auto", q, k, v, layout) == "sdpa"
    assert pa._resolve("torch", q, k, v, layout) == "torch"


@pytest.mark.parametrize("impl", ["torch", "sdpa", pytest.param("triton", marks=needs_triton)])
def test_shared_layout_equals_dense_sequences(impl, monkeypatch):
    monkeypatch.setattr(pa, "POISON_BUFFERS", True)
    p, suffixes, hq, hk, d = 9, [6, 1, 13], 4, 2, 24
    layout = PrefixLayout.build([p], [suffixes])
    T = layout.num_tokens
    q, k, v = make_qkv(T, hq, hk, d, seed=3)
    dout = torch.randn(T, hq, d, generator=torch.Generator().manual_seed(4))
    scale = 1 / math.sqrt(d)
    out, dq, dk, dv = _grads(lambda a, b, c: prefix_shared_attention(a, b, c, layout, scale=scale,
                                                                     impl=impl), q, k, v, dout)
    qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
    dense = _dense_group(qq, kk, vv, p, suffixes, scale)
    n = len(suffixes)
    # the prompt's loss is shared out over its n copies, the responses' stays their own
    loss = 0
    start = p
    for o_i, m in zip(dense, suffixes):
        loss = loss + (o_i[:p] * dout[:p] / n).sum() + (o_i[p:] * dout[start:start + m]).sum()
        start += m
    loss.backward()
    tol = dict(rtol=1e-4, atol=1e-5)
    start = p
    for o_i, m in zip(dense, suffixes):
        torch.testing.assert_close(out[start:start + m], o_i[p:].detach(), **tol)
        torch.testing.assert_close(out[:p], o_i[:p].detach(), **tol)
        start += m
    # qq.grad[:p] etc. are the sums over the n copies of P in the dense sequences
    torch.testing.assert_close(dq, qq.grad, **tol)
    torch.testing.assert_close(dk, kk.grad, **tol)
    torch.testing.assert_close(dv, vv.grad, **tol)
    assert dk[:p].abs().sum() > 0 and dq[p:].abs().sum() > 0


# ----------------------------------------------------------------------------- triton kernel
@needs_triton
@pytest.mark.parametrize("name", sorted(LAYOUTS))
@pytest.mark.parametrize("hq,hk,d", [(4, 2, 16), (2, 2, 24)])
def test_triton_equals_reference_fp32(name, hq, hk, d, monkeypatch):
    monkeypatch.setattr(pa, "POISON_BUFFERS", True)
    layout = PrefixLayout.build(*LAYOUTS[name])
    T = layout.num_tokens
    q, k, v = make_qkv(T, hq, hk, d, seed=len(name) + 10 * d)
    dout = torch.randn(T, hq, d, generator=torch.Generator().manual_seed(11))
    ref = _grads(lambda a, b, c: prefix_shared_attention(a, b, c, layout, impl="torch"), q, k, v, dout)
    tri = _grads(lambda a, b, c: prefix_shared_attention(a, b, c, layout, impl="triton"), q, k, v, dout)
    for a, b, what in zip(tri, ref, ("out", "dq", "dk", "dv")):
        assert a.dtype == torch.float32 and torch.isfinite(a).all(), what
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=what)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_half_inputs_against_fp32_reference(dtype, monkeypatch):
    """bf16/fp16 in and out, fp32 inside: the kernel's error against the fp32 reference (on
    the same rounded inputs) is within 2x that of the reference run in the input dtype."""
    monkeypatch.setattr(pa, "POISON_BUFFERS", True)
    layout = PrefixLayout.build(*LAYOUTS["long"])
    T = layout.num_tokens
    q, k, v = make_qkv(T, 4, 2, 16, dtype=dtype, seed=21)
    dout = torch.randn(T, 4, 16, generator=torch.Generator().manual_seed(22)).to(dtype)

    def run(impl, cast):
        return _grads(lambda a, b, c: prefix_shared_attention(a, b, c, layout, impl=impl),
                      q.to(cast), k.to(cast), v.to(cast), dout.to(cast))

    truth = run("torch", torch.float32)
    tri = run("triton", dtype)
    same = run("torch", dtype)
    for a, b, c, what in zip(tri, same, truth, ("out", "dq", "dk", "dv")):
        assert a.dtype == dtype, what
        err = (a.float() - c).abs().max().item()
        err_torch = (b.float() - c).abs().max().item()
        scale = c.abs().max().item()
        assert err <= max(2 * err_torch, 1e-2 * scale), (what, err, err_torch, scale)


@needs_triton
@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")  # response 1's own rows
def test_triton_skips_other_responses_key_blocks():
    """With response 1's keys and values NaN, the prompt's and response 2's outputs (and
    response 2's dq) are finite and exact: those rows never load response 1's key blocks.
    (Responses start on 16-row block edges here; a block shared by two responses loads both.)"""
    layout = PrefixLayout.build([16], [[16, 21]])
    T = layout.num_tokens
    q, k, v = make_qkv(T, 2, 1, 16, seed=5)
    dout = torch.randn(T, 2, 16, generator=torch.Generator().manual_seed(6))
    dout[16:32] = 0
    r1 = slice(16, 32)
    kn, vn = k.clone(), v.clone()
    kn[r1] = float("nan")
    vn[r1] = float("nan")
    out, dq, _, _ = _grads(lambda a, b, c: prefix_shared_attention(a, b, c, layout, impl="triton"),
                           q, kn, vn, dout)
    ref, dq_ref, _, _ = _grads(lambda a, b, c: prefix_shared_attention(a, b, c, layout, impl="torch"),
                               q, k, v, dout)
    keep = torch.cat([torch.arange(16), torch.arange(32, T)])
    torch.testing.assert_close(out[keep], ref[keep], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dq[32:], dq_ref[32:], rtol=1e-4, atol=1e-5)
    assert torch.isnan(out[r1]).all()


@needs_triton
def test_triton_larger_tiles(monkeypatch):
    """The kernels at 32-row query / key blocks (fewer, wider blocks than the default 16)."""
    real = pa.prefix_attention_tiles

    def tiles(head_dim, dtype, *, interpret=None):
        return real(head_dim, dtype, interpret=interpret)._replace(
            fwd_m=32, fwd_n=32, dkdv_n=32, dkdv_m=32, dq_m=32, dq_n=16)

    monkeypatch.setattr(pa, "prefix_attention_tiles", tiles)
    monkeypatch.setattr(pa, "POISON_BUFFERS", True)
    layout = PrefixLayout.build(*LAYOUTS["long"])
    T = layout.num_tokens
    q, k, v = make_qkv(T, 4, 1, 16, seed=8)
    dout = torch.randn(T, 4, 16, generator=torch.Generator().manual_seed(9))
    ref = _grads(lambda a, b, c: prefix_shared_attention(a, b, c, layout, impl="torch"), q, k, v, dout)
    tri = _grads(lambda a, b, c: prefix_shared_attention(a, b, c, layout, impl="triton"), q, k, v, dout)
    for a, b, what in zip(tri, ref, ("out", "dq", "dk", "dv")):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=what)


@needs_triton
def test_triton_strided_inputs_and_scale():
    """q/k/v as views of one fused qkv projection (token stride > heads * dim), custom scale."""
    layout = PrefixLayout.build([5], [[3, 8]])
    T, hq, hk, d = layout.num_tokens, 2, 1, 16
    g = torch.Generator().manual_seed(13)
    qkv = torch.randn(T, hq + 2 * hk, d, generator=g)
    q, k, v = qkv[:, :hq], qkv[:, hq:hq + hk], qkv[:, hq + hk:]
    dout = torch.randn(T, hq, d, generator=g)
    ref = _grads(lambda a, b, c: prefix_shared_attention(a, b, c, layout, scale=0.3, impl="torch"),
                 q, k, v, dout)
    tri = _grads(lambda a, b, c: prefix_shared_attention(a, b, c, layout, scale=0.3, impl="triton"),
                 q, k, v, dout)
    for a, b, what in zip(tri, ref, ("out", "dq", "dk", "dv")):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=what)


def test_kv_block_table_covers_every_key_once():
    layout = PrefixLayout.build(*LAYOUTS["long"])
    table = pa._kv_block_table(layout, 16)
    off = layout.unit_offsets()
    seen = torch.zeros(layout.num_tokens, dtype=torch.long)
    for row0, k0, k1, q1 in table.tolist():
        assert 0 < k1 - k0 <= 16 and q1 >= k1
        seen[row0 + k0:row0 + k1] += 1
        u = off.index(row0)
        seg = layout.seg_start[row0 + k0:row0 + k1]
        assert bool((seg == seg[0]).all()), "a key block straddles two segments"
        if k0 < layout.prefix_lens_host[u]:
            assert q1 == off[u + 1] - row0  # a prompt block serves every later query of the unit
    assert bool((seen == 1).all())
    work = (table[:, 3] - table[:, 1]).tolist()
    assert work == sorted(work, reverse=True)


def test_empty_layout():
    layout = PrefixLayout.build([], [])
    q = torch.zeros(0, 2, 16)
    out = prefix_shared_attention(q, q[:, :1], q[:, :1], layout, impl="torch")
    assert out.shape == (0, 2, 16)


# ----------------------------------------------------------------------------- flash path
def standin_flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                   max_seqlen_k, dropout_p=0.0, softmax_scale=None, causal=False,
                                   **unsupported):
    """flash-attn's ``flash_attn_varlen_func`` from its documented semantics, in torch.

    flash-attn's docstring (flash_attn_interface.py, 2.1 and later; also in its README): "If
    causal=True, the causal mask is aligned to the bottom right corner of the attention
    matrix.  For example, if seqlen_q = 2 and seqlen_k = 5, the causal mask (1 = keep, 0 =
    masked out) is: 1 1 1 1 0 / 1 1 1 1 1.  If seqlen_q = 5 and seqlen_k = 2, the causal mask
    is: 0 0 / 0 0 / 0 0 / 1 0 / 1 1.  If the row of the mask is all zero, the output will be
    zero."  And: "Supports multi-query and grouped-query attention (MQA/GQA) by passing in KV
    with fewer heads than Q.  Note that the number of heads in Q must be divisible by the
    number of heads in KV."  q: (total_q, nheads, headdim), k/v: (total_k, nheads_k, headdim),
    cu_seqlens_*: int32 (batch_size + 1,).
    """
    assert not unsupported, unsupported
    assert dropout_p == 0.0
    assert cu_seqlens_q.dtype == cu_seqlens_k.dtype == torch.int32
    assert cu_seqlens_q.shape == cu_seqlens_k.shape and cu_seqlens_q.dim() == 1
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    assert cq[0] == ck[0] == 0 and cq[-1] == q.shape[0] and ck[-1] == k.shape[0] == v.shape[0]
    assert q.shape[1] % k.shape[1] == 0 and q.shape[2] == k.shape[2] == v.shape[2]
    rep = q.shape[1] // k.shape[1]
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    outs = []
    for b in range(len(cq) - 1):
        sq, sk = cq[b + 1] - cq[b], ck[b + 1] - ck[b]
        assert sq <= max_seqlen_q and sk <= max_seqlen_k
        qb = q[cq[b]:cq[b + 1]].float().transpose(0, 1)
        kb = k[ck[b]:ck[b + 1]].float().repeat_interleave(rep, 1).transpose(0, 1)
        vb = v[ck[b]:ck[b + 1]].float().repeat_interleave(rep, 1).transpose(0, 1)
        s = qb @ kb.transpose(1, 2) * scale
        if causal:  # bottom-right: query r keeps key c iff c <= r + sk - sq
            r = torch.arange(sq)[:, None]
            c = torch.arange(sk)[None, :]
            keep = c <= r + (sk - sq)
            s = s.masked_fill(~keep, float("-inf"))
            w = torch.softmax(s, -1).nan_to_num(0.0)  # an all-masked row outputs zero
        else:
            w = torch.softmax(s, -1)
        outs.append((w @ vb).transpose(0, 1).to(q.dtype))
    return torch.cat(outs, 0)


def topleft_flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                   max_seqlen_k, dropout_p=0.0, softmax_scale=None, causal=False):
    """The same with the pre-2.1 top-left alignment (query r keeps key c iff c <= r)."""
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    rep = q.shape[1] // k.shape[1]
    outs = []
    for b in range(len(cq) - 1):
        sq, sk = cq[b + 1] - cq[b], ck[b + 1] - ck[b]
        qb = q[cq[b]:cq[b + 1]].transpose(0, 1)
        kb = k[ck[b]:ck[b + 1]].repeat_interleave(rep, 1).transpose(0, 1)
        vb = v[ck[b]:ck[b + 1]].repeat_interleave(rep, 1).transpose(0, 1)
        keep = torch.arange(sk)[None, :] <= torch.arange(sq)[:, None]
        s = (qb @ kb.transpose(1, 2) * softmax_scale).masked_fill(~keep, float("-inf"))
        outs.append((torch.softmax(s, -1) @ vb).transpose(0, 1))
    return torch.cat(outs, 0)


def _install_flash(monkeypatch, fn):
    mod = types.ModuleType("flash_attn")
    mod.flash_attn_varlen_func = fn
    monkeypatch.setitem(sys.modules, "flash_attn", mod)


def test_standin_follows_the_documented_masks():
    """The stand-in reproduces the two example masks of flash-attn's docstring."""
    def mask_of(sq, sk):
        # with v = identity rows and equal scores, output row r = mean of the kept keys
        q = torch.zeros(sq, 1, sk)
        k = torch.zeros(sk, 1, sk)
        v = torch.eye(sk)[:, None, :]
        cu_q = torch.tensor([0, sq], dtype=torch.int32)
        cu_k = torch.tensor([0, sk], dtype=torch.int32)
        o = standin_flash_attn_varlen_func(q, k, v, cu_q, cu_k, sq, sk, causal=True)[:, 0]
        return (o > 0).int().tolist()

    assert mask_of(2, 5) == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert mask_of(5, 2) == [[0, 0], [0, 0], [0, 0], [1, 0], [1, 1]]


@pytest.mark.parametrize("name", ["odd", "long"])
def test_flash_composition_equals_reference(name, monkeypatch):
    """The two varlen calls (prompts; responses against [P; R_i] gathered) and the scatter
    back, forward and backward, with the stand-in (fp32 on CPU: the real kernels need CUDA
    fp16/bf16, so the composition is called directly)."""
    _install_flash(monkeypatch, standin_flash_attn_varlen_func)
    layout = PrefixLayout.build(*LAYOUTS[name])
    T = layout.num_tokens
    q, k, v = make_qkv(T, 4, 2, 16, seed=31)
    dout = torch.randn(T, 4, 16, generator=torch.Generator().manual_seed(32))
    scale = 0.25
    ref = _grads(lambda a, b, c: prefix_shared_attention(a, b, c, layout, impl="torch"), q, k, v, dout)
    fl = _grads(lambda a, b, c: pa._prefix_attention_flash(a, b, c, layout, scale), q, k, v, dout)
    for a, b, what in zip(fl, ref, ("out", "dq", "dk", "dv")):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=what)
    # with top-left alignment the same calls attend to the wrong keys: the test can tell
    _install_flash(monkeypatch, topleft_flash_attn_varlen_func)
    wrong = pa._prefix_attention_flash(q, k, v, layout, scale)
    assert (wrong - ref[0]).abs().max() > 1e-2


def test_flash_composition_without_responses(monkeypatch):
    calls = []

    def fn(*a, **kw):
        calls.append(a[3].tolist())
        return standin_flash_attn_varlen_func(*a, **kw)

    _install_flash(monkeypatch, fn)
    layout = PrefixLayout.build([7, 4], [[], []])
    q, k, v = make_qkv(11, 2, 2, 16, seed=2)
    ref = prefix_shared_attention(q, k, v, layout, impl="torch")
    torch.testing.assert_close(pa._prefix_attention_flash(q, k, v, layout, 0.25), ref)
    assert calls == [[0, 7, 11]]  # one call, over the prompts only


def test_flash_errors(monkeypatch):
    layout = PrefixLayout.build([3], [[2]])
    q, k, v = make_qkv(5, 2, 2, 16)
    _install_flash(monkeypatch, standin_flash_attn_varlen_func)
    for t in (q, q.to(torch.bfloat16)):  # CPU tensors: refused before flash-attn is looked up
        with pytest.raises(RuntimeError, match=r"impl='flash' needs CUDA fp16/bf16 tensors"):
            prefix_shared_attention(t, t, t, layout, impl="flash")
    old = types.ModuleType("flash_attn")
    old.flash_attn_varlen_func, old.__version__ = topleft_flash_attn_varlen_func, "2.0.9"
    monkeypatch.setitem(sys.modules, "flash_attn", old)
    with pytest.raises(RuntimeError, match=r"needs flash-attn >= 2.1 \(bottom-right .* got 2.0.9"):
        pa._flash_varlen()
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # not importable
    with pytest.raises(RuntimeError, match=r"needs flash-attn >= 2.1"):
        pa._flash_varlen()
    assert pa._resolve("auto", q, k, v, layout) == "sdpa"  # CPU: the SDPA composition


def test_readme_example_runs(capsys):
    """The example in kernels/README.md's prefix_shared_attention section runs and prints what
    its comment says."""
    import pathlib
    import re
    text = (pathlib.Path(__file__).resolve().parents[1] / "kernels" / "README.md").read_text()
    section = text.split("## prefix_shared_attention\n", 1)[1].split("\n## ", 1)[0]
    code = re.findall(r"```python\n(.*?)```", section, re.S)[-1]
    exec(compile(code, "README.md", "exec"), {})
    assert capsys.readouterr().out.strip() == "20 torch.Size([20, 8, 64]) True"
