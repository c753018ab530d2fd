"""prefix_shared_attention: the torch reference, the flash-attn composition and the Triton
kernel (under the interpreter on CPU) against a naive dense implementation written here."""

from __future__ import annotations

import math

import pytest
import torch

import r4b_kernels
from r4b_kernels import PrefixLayout, prefix_shared_attention

# (prefix_lens, suffix_lens): p = 1, response length 1, several units, a unit without
# responses, token counts that are not multiples of any block size.
LAYOUTS = {
    "one-group": ([7], [[5, 3, 9]]),
    "odd": ([1, 13, 6], [[1, 4], [], [11, 1, 2]]),
    "causal-only": ([19], [[]]),
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
    q, k, v = make_qkv(T, hq, hk, d, seed=hash((name, hq, d)) % 1000)
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
    assert r4b_kernels.prefix_shared_attention is prefix_shared_attention
