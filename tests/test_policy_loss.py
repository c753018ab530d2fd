"""policy_loss / token_logprobs: Triton kernel and torch reference against an fp64 ground
truth (forward and gradients), Liger's fused GRPO loss, edge cases and argument errors.

On CPU the Triton kernels run under TRITON_INTERPRET=1 (set by the root conftest).
"""

import importlib

import pytest
import torch

from r4b_kernels.policy_loss import PolicyLossOutput, policy_loss, token_logprobs

# The package re-exports the function ``policy_loss``, which shadows the submodule attribute
# of the same name, so the module object is fetched by name.
pl = importlib.import_module("r4b_kernels.policy_loss")

TRITON = pytest.param("triton", marks=pytest.mark.skipif(not pl.HAS_TRITON, reason="needs triton"))

# Per-dtype tolerances: the kernel's error vs the fp64 ground truth must be <= 2 x the
# same-dtype torch reference's error + atol * scale (scale = max(1, max |ground truth|)).  bf16 grads
# get a larger atol: the kernel feeds bf16 dlogits to the dH/dW GEMMs (as any bf16 fused loss
# does), while the reference differentiates in fp32 and rounds the gradient once.
TOL = {
    torch.float32: dict(fwd=3e-5, grad=3e-5),
    torch.bfloat16: dict(fwd=3e-5, grad=2e-2),
}


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    """Every internal buffer of the fused path starts as NaN: unwritten elements surface."""
    monkeypatch.setattr(pl, "POISON_BUFFERS", True)


def _gen():
    g = torch.Generator()
    g.seed()  # fresh inputs on every run
    return g


def make_inputs(T, H, V, dtype, *, g=None, scale=1.0):
    g = g or _gen()
    hidden = torch.randn(T, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) * scale / H ** 0.5 * 3).to(dtype)
    targets = torch.randint(0, V, (T,), generator=g)
    with torch.no_grad():
        lp = torch.log_softmax(hidden.double() @ weight.double().T, -1).gather(1, targets[:, None])[:, 0]
    # old/ref close to the current policy so ratios straddle the clip range on both sides
    old = (lp + 0.5 * torch.randn(T, generator=g, dtype=torch.float64)).float()
    ref = (lp + 0.3 * torch.randn(T, generator=g, dtype=torch.float64)).float()
    adv = torch.randn(T, generator=g)
    w = torch.rand(T, generator=g) / T
    return hidden, weight, targets, old, adv, w, ref


def ground_truth(hidden, weight, targets, old, adv, *, token_weights=None, ref_logprobs=None,
                 kl_coef=0.0, kl_estimator="k3", eps_low=0.2, eps_high=0.2, dual_clip=None,
                 entropy_coef=0.0, temperature=1.0):
    """Plain fp64 implementation of the documented semantics, differentiated by autograd."""
    h = hidden.detach().double().requires_grad_()
    W = weight.detach().double().requires_grad_()
    T = h.shape[0]
    z = h @ W.T / temperature
    logsm = torch.log_softmax(z, dim=-1)
    logp = logsm[torch.arange(T), targets]
    ent = -(logsm.exp() * logsm).sum(-1)
    A = adv.double()
    r = torch.exp(logp - old.double())
    pg = torch.max(-A * r, -A * torch.clamp(r, 1 - eps_low, 1 + eps_high))
    if dual_clip is not None:
        pg = torch.where(A < 0, torch.min(pg, -dual_clip * A), pg)
    l = pg
    kl = None
    if ref_logprobs is not None:
        ref = ref_logprobs.double()
        kl = {"k1": logp - ref, "k2": 0.5 * (logp - ref) ** 2,
              "k3": torch.exp(ref - logp) - (ref - logp) - 1}[kl_estimator]
        l = l + kl_coef * kl
    l = l - entropy_coef * ent
    w = token_weights.double() if token_weights is not None else torch.full((T,), 1.0 / T, dtype=torch.float64)
    loss = (w * l).sum()
    loss.backward()
    return dict(loss=loss.detach(), logprobs=logp.detach(), entropy=ent.detach(),
                ratio=r.detach(), kl=None if kl is None else kl.detach(),
                dh=h.grad, dw=W.grad)


def run_impl(impl, hidden, weight, targets, old, adv, **kw):
    h = hidden.clone().requires_grad_()
    W = weight.clone().requires_grad_()
    out = policy_loss(h, W, targets, old, adv, impl=impl, return_entropy=True, **kw)
    out.loss.backward()
    return out, h.grad, W.grad


def err(a, b):
    return (a.double() - b.double()).abs().max().item()


def assert_close_to_truth(name, kern, ref, truth, atol):
    scale = max(truth.abs().max().item(), 1.0)
    e_k, e_r = err(kern, truth), err(ref, truth)
    assert torch.isfinite(kern).all(), f"{name}: non-finite values (unwritten buffer?)"
    assert e_r <= atol * scale, f"{name}: torch reference err {e_r:.3g} (scale {scale:.3g})"
    assert e_k <= 2 * e_r + atol * scale, f"{name}: kernel err {e_k:.3g} vs torch err {e_r:.3g} (scale {scale:.3g})"


CASES = [
    # (T, H, V, dtype, options)
    (1, 48, 257, torch.float32, dict(ref=True, kl_coef=0.1, kl_estimator="k3", entropy_coef=0.01)),
    (5, 200, 1000, torch.bfloat16, dict(weights=True, ref=True, kl_coef=0.05, kl_estimator="k1")),
    (123, 48, 257, torch.float32, dict(weights=True, ref=True, kl_coef=0.2, kl_estimator="k2",
                                       dual_clip=3.0, temperature=0.7)),
    (123, 48, 1000, torch.bfloat16, dict(weights=True, ref=True, kl_coef=0.1, kl_estimator="k3",
                                         dual_clip=2.0, entropy_coef=0.02, eps_low=0.1, eps_high=0.28,
                                         temperature=1.3)),
    (1031, 48, 257, torch.float32, dict(eps_low=0.2, eps_high=0.28, entropy_coef=0.01)),
]


@pytest.mark.parametrize("T,H,V,dtype,opts", CASES, ids=lambda x: str(x) if not isinstance(x, dict) else "-".join(x))
@pytest.mark.parametrize("impl", ["chunked", TRITON])
def test_matches_fp64_ground_truth(impl, T, H, V, dtype, opts):
    hidden, weight, targets, old, adv, w, ref = make_inputs(T, H, V, dtype)
    opts = dict(opts)
    kw = {k: opts.pop(k) for k in list(opts) if k not in ("weights", "ref")}
    if opts.get("weights"):
        w[::7] = 0.0  # masked tokens
        kw["token_weights"] = w
    if opts.get("ref"):
        kw["ref_logprobs"] = ref
    truth = ground_truth(hidden, weight, targets, old, adv, **kw)
    chunk = max(1, T // 3 + 1)  # several chunks, a ragged last one
    ko, kdh, kdw = run_impl(impl, hidden, weight, targets, old, adv, chunk_rows=chunk, **kw)
    ro, rdh, rdw = run_impl("torch", hidden, weight, targets, old, adv, **kw)
    tol = TOL[dtype]
    for name in ("logprobs", "entropy", "ratio"):
        assert_close_to_truth(name, getattr(ko, name), getattr(ro, name), truth[name], tol["fwd"])
    assert_close_to_truth("loss", ko.loss.detach(), ro.loss.detach(), truth["loss"], tol["fwd"])
    if "ref_logprobs" in kw:
        assert_close_to_truth("kl", ko.kl, ro.kl, truth["kl"], tol["fwd"])
    assert kdh.dtype == dtype and kdw.dtype == dtype
    assert_close_to_truth("grad hidden", kdh, rdh, truth["dh"], tol["grad"])
    assert_close_to_truth("grad weight", kdw, rdw, truth["dw"], tol["grad"])
    # the reference itself is the fp32 ground truth for the statistics
    for f in ("clip_frac", "clip_frac_low", "clip_frac_high", "clip_frac_tokens", "dual_clip_frac", "pg_loss"):
        torch.testing.assert_close(getattr(ko, f), getattr(ro, f), atol=2e-3 if dtype == torch.bfloat16 else 1e-5,
                                   rtol=1e-3, msg=f)


def test_statistics_definitions():
    """Clip fractions follow their documented definitions (checked on the reference)."""
    hidden, weight, targets, old, adv, w, ref = make_inputs(64, 32, 300, torch.float32)
    w[:10] = 0
    out = policy_loss(hidden, weight, targets, old, adv, token_weights=w, ref_logprobs=ref, dual_clip=1.5,
                      eps_low=0.1, eps_high=0.3, impl="torch")
    r = out.ratio
    low = (adv < 0) & (r < 0.9)
    high = (adv > 0) & (r > 1.3)
    assert low.any() and high.any(), "inputs should exercise both clip sides"
    wm = lambda x: (w * x.float()).sum() / w.sum()  # noqa: E731
    torch.testing.assert_close(out.clip_frac_low, wm(low))
    torch.testing.assert_close(out.clip_frac_high, wm(high))
    torch.testing.assert_close(out.clip_frac, wm(low | high))
    active = w > 0
    torch.testing.assert_close(out.clip_frac_tokens, ((low | high) & active).sum() / active.sum())
    pg_unc = torch.maximum(-adv * r, -adv * r.clamp(0.9, 1.3))
    torch.testing.assert_close(out.dual_clip_frac, wm((adv < 0) & (pg_unc > -1.5 * adv)))
    torch.testing.assert_close(out.kl_mean, wm(out.kl))
    assert isinstance(out, PolicyLossOutput) and out.entropy is None and out.entropy_mean is None


@pytest.mark.parametrize("impl", ["torch", "chunked", TRITON])
def test_matches_liger_grpo(impl):
    """Same semantics as Liger's LigerFusedLinearGRPOLoss (token-level ratio, k3 KL with
    beta, same eps) with token_weights reproducing its "bnpo" and "grpo" aggregations."""
    liger = pytest.importorskip("liger_kernel.chunked_loss")
    B, S, H, V = 3, 7, 32, 300
    g = _gen()
    hidden, weight, targets, _, _, _, _ = make_inputs(B * S, H, V, torch.float32, g=g)
    mask = torch.ones(B, S)
    mask[0, 5:] = 0
    mask[2, 3:] = 0
    adv_seq = torch.randn(B, generator=g)
    with torch.no_grad():
        lp = torch.log_softmax(hidden @ weight.T / 0.9, -1).gather(1, targets[:, None])[:, 0]
    old = lp + 0.3 * torch.randn(B * S, generator=g)
    ref = lp + 0.3 * torch.randn(B * S, generator=g)
    for loss_type in ("bnpo", "grpo"):
        if loss_type == "bnpo":
            w = mask / mask.sum()
        else:
            w = mask / mask.sum(1, keepdim=True) / B
        mod = liger.LigerFusedLinearGRPOLoss(beta=0.05, compiled=False, use_ref_model=True, epsilon_low=0.15,
                                             epsilon_high=0.25, loss_type=loss_type, temperature=0.9)
        x = hidden.clone().view(B, S, H).requires_grad_()
        W1 = weight.clone().requires_grad_()
        lig_loss, _ = mod(x, W1, targets.view(B, S), mask, adv_seq, ref_per_token_logps=ref.view(B, S),
                          old_per_token_logps=old.view(B, S))
        lig_loss.backward()
        h2 = hidden.clone().requires_grad_()
        W2 = weight.clone().requires_grad_()
        out = policy_loss(h2, W2, targets, old, adv_seq.repeat_interleave(S), token_weights=w.reshape(-1),
                          ref_logprobs=ref, kl_coef=0.05, kl_estimator="k3", eps_low=0.15, eps_high=0.25,
                          temperature=0.9, impl=impl, chunk_rows=8)
        out.loss.backward()
        torch.testing.assert_close(out.loss, lig_loss.detach(), rtol=1e-4, atol=1e-5, msg=loss_type)
        torch.testing.assert_close(h2.grad, x.grad.view(B * S, H), rtol=1e-3, atol=1e-5, msg=loss_type)
        torch.testing.assert_close(W2.grad, W1.grad, rtol=1e-3, atol=1e-5, msg=loss_type)


@pytest.mark.parametrize("impl", ["torch", "chunked", TRITON])
def test_zero_advantages_and_zero_weights_give_zero_gradient(impl):
    hidden, weight, targets, old, adv, w, ref = make_inputs(40, 32, 300, torch.float32)
    h, W = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = policy_loss(h, W, targets, old, torch.zeros(40), impl=impl, chunk_rows=16)
    out.loss.backward()
    assert out.loss.item() == 0.0
    assert h.grad.abs().max().item() == 0.0 and W.grad.abs().max().item() == 0.0
    h, W = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = policy_loss(h, W, targets, old, adv, token_weights=torch.zeros(40), ref_logprobs=ref, kl_coef=0.3,
                      entropy_coef=0.1, impl=impl, chunk_rows=16)
    out.loss.backward()
    assert out.loss.item() == 0.0 and out.clip_frac.item() == 0.0 and out.clip_frac_tokens.item() == 0.0
    assert h.grad.abs().max().item() == 0.0 and W.grad.abs().max().item() == 0.0


@pytest.mark.parametrize("impl", ["torch", "chunked", TRITON])
def test_gradient_scaling_no_grad_and_frozen_weight(impl):
    hidden, weight, targets, old, adv, w, ref = make_inputs(20, 16, 100, torch.float32)
    h1, W1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    (3.0 * policy_loss(h1, W1, targets, old, adv, impl=impl).loss).backward()
    h2, W2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    policy_loss(h2, W2, targets, old, adv, impl=impl).loss.backward()
    torch.testing.assert_close(h1.grad, 3 * h2.grad)
    torch.testing.assert_close(W1.grad, 3 * W2.grad)
    h3 = hidden.clone().requires_grad_()
    out = policy_loss(h3, weight, targets, old, adv, impl=impl)  # frozen head (e.g. LoRA)
    out.loss.backward()
    torch.testing.assert_close(h3.grad, h2.grad)
    with torch.no_grad():
        out = policy_loss(hidden.clone().requires_grad_(), weight, targets, old, adv, impl=impl)
    assert not out.loss.requires_grad


@pytest.mark.parametrize("impl", ["chunked", TRITON])
def test_fused_weight_grad_is_deterministic_and_backward_once(impl):
    hidden, weight, targets, old, adv, w, ref = make_inputs(70, 32, 300, torch.bfloat16)
    grads = []
    for _ in range(2):
        h, W = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        out = policy_loss(h, W, targets, old, adv, impl=impl, chunk_rows=16)
        out.loss.backward(retain_graph=True)
        grads.append((h.grad.clone(), W.grad.clone()))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
    with pytest.raises(RuntimeError, match="backward ran twice"):
        out.loss.backward()


@pytest.mark.parametrize("impl", ["torch", "chunked", TRITON])
@pytest.mark.parametrize("T,H,V,dtype", [(1031, 48, 257, torch.float32), (77, 200, 1000, torch.bfloat16)])
def test_token_logprobs_matches_log_softmax(impl, T, H, V, dtype):
    hidden, weight, targets, *_ = make_inputs(T, H, V, dtype)
    tau = 0.8
    z = hidden.double() @ weight.double().T / tau
    logsm = torch.log_softmax(z, -1)
    truth_lp = logsm.gather(1, targets[:, None])[:, 0]
    truth_ent = -(logsm.exp() * logsm).sum(-1)
    lp, ent = token_logprobs(hidden, weight, targets, temperature=tau, return_entropy=True, impl=impl,
                             chunk_rows=300)
    assert lp.dtype == torch.float32 and ent.shape == (T,)
    torch.testing.assert_close(lp.double(), truth_lp, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(ent.double(), truth_ent, atol=2e-5, rtol=1e-5)
    lp_only = token_logprobs(hidden, weight, targets, temperature=tau, impl=impl)
    assert isinstance(lp_only, torch.Tensor)
    torch.testing.assert_close(lp_only, lp)
    ref = token_logprobs(hidden, weight, targets, temperature=tau, impl="torch")
    torch.testing.assert_close(lp, ref, atol=2e-5, rtol=1e-5)


@pytest.mark.skipif(not pl.HAS_TRITON, reason="needs triton")
def test_large_logits_are_stable():
    """Logits of magnitude ~1e3: online max keeps exp in range; entropy has no cancellation."""
    hidden, weight, targets, *_ = make_inputs(33, 16, 300, torch.float32, scale=300.0)
    z = hidden.double() @ weight.double().T
    logsm = torch.log_softmax(z, -1)
    lp, ent = token_logprobs(hidden, weight, targets, return_entropy=True, impl="triton")
    torch.testing.assert_close(lp.double(), logsm.gather(1, targets[:, None])[:, 0], atol=2e-3, rtol=1e-5)
    torch.testing.assert_close(ent.double(), -(logsm.exp() * logsm).sum(-1), atol=2e-3, rtol=1e-4)


@pytest.mark.parametrize("impl", ["torch", "chunked", TRITON])
def test_argument_errors_name_the_argument(impl):
    """Shape, dtype, device and option errors: always checked (they cost nothing)."""
    hidden, weight, targets, old, adv, w, ref = make_inputs(6, 16, 50, torch.float32)

    def call(**over):
        args = dict(hidden=hidden, weight=weight, targets=targets, old_logprobs=old, advantages=adv)
        kw = {k: over.pop(k) for k in list(over) if k not in args}
        args.update(over)
        return policy_loss(*args.values(), impl=impl, **kw)

    with pytest.raises(ValueError, match="old_logprobs must have length 6"):
        call(old_logprobs=old[:5])
    with pytest.raises(ValueError, match="weight must have shape"):
        call(weight=weight[:, :8])
    with pytest.raises(ValueError, match="targets must have length 6"):
        call(targets=targets[:4])
    with pytest.raises(TypeError, match="weight must have the dtype of hidden"):
        call(weight=weight.bfloat16())
    with pytest.raises(TypeError, match="targets must have dtype"):
        token_logprobs(hidden, weight, targets.float(), impl=impl)
    with pytest.raises(ValueError, match="kl_coef=0.1 needs ref_logprobs"):
        call(kl_coef=0.1)
    with pytest.raises(ValueError, match="dual_clip must be a finite number in \\(1.0"):
        call(dual_clip=0.5)
    with pytest.raises(ValueError, match="kl_estimator must be one of"):
        call(ref_logprobs=ref, kl_coef=0.1, kl_estimator="k4")
    with pytest.raises(ValueError, match="temperature must be a finite number > 0, got 0"):
        call(temperature=0)
    with pytest.raises(ValueError, match="vocab_start must be an int in \\[0, 0\\]"):
        call(vocab_start=10)
    with pytest.raises(ValueError, match="eps_low"):
        call(eps_low=1.0)
    with pytest.raises(ValueError, match="impl must be one of"):
        policy_loss(hidden, weight, targets, old, adv, impl="cuda")


@pytest.mark.parametrize("impl", ["torch", "chunked", TRITON])
@pytest.mark.parametrize("how", ["argument", "env"])
def test_opt_in_value_checks_name_the_bad_value(impl, how, monkeypatch):
    """check_inputs=True (or R4B_KERNEL_CHECKS=1) reads the values: NaN/inf inputs, target ids
    out of range and negative weights are errors that name the argument and the index."""
    hidden, weight, targets, old, adv, w, ref = make_inputs(6, 16, 50, torch.float32)
    if how == "env":
        monkeypatch.setenv("R4B_KERNEL_CHECKS", "1")
        opt = {}
    else:
        monkeypatch.delenv("R4B_KERNEL_CHECKS", raising=False)
        opt = {"check_inputs": True}

    def call(**over):
        args = dict(hidden=hidden, weight=weight, targets=targets, old_logprobs=old, advantages=adv)
        kw = {k: over.pop(k) for k in list(over) if k not in args}
        args.update(over)
        return policy_loss(*args.values(), impl=impl, **opt, **kw)

    bad_t = targets.clone()
    bad_t[3] = 50
    with pytest.raises(ValueError, match=r"targets must be token ids in \[0, 50\), got 50 at index 3"):
        call(targets=bad_t)
    bad_t[3] = -1
    with pytest.raises(ValueError, match=r"targets must be token ids in \[0, 50\), got -1 at index 3"):
        token_logprobs(hidden, weight, bad_t, impl=impl, **opt)
    nan_w = weight.clone()
    nan_w[7, 2] = float("nan")
    with pytest.raises(ValueError, match="weight must be finite, got nan at flat index 114"):
        call(weight=nan_w)
    with pytest.raises(ValueError, match="weight must be finite"):
        token_logprobs(hidden, nan_w, targets, impl=impl, **opt)
    nan_adv = adv.clone()
    nan_adv[2] = float("nan")
    with pytest.raises(ValueError, match="advantages must be finite, got nan at flat index 2"):
        call(advantages=nan_adv)
    inf_h = hidden.clone()
    inf_h[1, 3] = float("inf")
    with pytest.raises(ValueError, match="hidden must be finite"):
        call(hidden=inf_h)
    with pytest.raises(ValueError, match="ref_logprobs must be finite"):
        call(ref_logprobs=torch.full((6,), float("-inf")))
    with pytest.raises(ValueError, match="token_weights must be >= 0"):
        call(token_weights=-w)
    call()  # valid inputs pass the checks


@pytest.mark.parametrize("impl", ["torch", "chunked", TRITON])
def test_unchecked_bad_values_surface_as_nan(impl, monkeypatch):
    """Without the opt-in checks nothing is read ahead of the kernels, but bad values are not
    silently turned into plausible numbers: an out-of-range target gives a NaN log-prob for
    its row only, and a NaN weight a NaN loss."""
    monkeypatch.delenv("R4B_KERNEL_CHECKS", raising=False)
    hidden, weight, targets, old, adv, w, ref = make_inputs(6, 16, 50, torch.float32)
    good = token_logprobs(hidden, weight, targets, impl=impl)
    bad_t = targets.clone()
    bad_t[3], bad_t[5] = 50, -2
    lp = token_logprobs(hidden, weight, bad_t, impl=impl)
    assert torch.isnan(lp[[3, 5]]).all()
    torch.testing.assert_close(lp[[0, 1, 2, 4]], good[[0, 1, 2, 4]])
    out = policy_loss(hidden, weight, bad_t, old, adv, impl=impl)
    assert torch.isnan(out.logprobs[[3, 5]]).all() and torch.isnan(out.loss)
    assert torch.isfinite(out.logprobs[[0, 1, 2, 4]]).all()
    nan_w = weight.clone()
    nan_w[7, 2] = float("nan")
    assert torch.isnan(policy_loss(hidden, nan_w, targets, old, adv, impl=impl).loss)


# ----------------------------------------------------------------- default path: no sync, no scan
_SYNCS = {  # calls that wait for the device (on CUDA) before they return
    "torch.Tensor.item", "torch.Tensor.tolist", "torch.Tensor.__bool__", "torch.Tensor.__int__",
    "torch.Tensor.__float__", "torch.Tensor.__index__", "torch.Tensor.__complex__",
    "torch.Tensor.nonzero", "torch.nonzero", "torch.argwhere", "torch.Tensor.cpu",
    "torch.Tensor.numpy", "torch.equal", "torch.allclose", "torch.is_nonzero", "torch.unique",
    "torch.Tensor.unique", "torch.unique_consecutive", "torch.masked_select",
    "torch.Tensor.masked_select", "torch.Tensor.__repr__", "torch.Tensor.__format__",
}
_NO_DATA = {  # calls that read no element of their tensor
    "torch.Tensor.size", "torch.Tensor.stride", "torch.Tensor.dim", "torch.Tensor.t",
    "torch.Tensor.view", "torch.Tensor.view_as", "torch.Tensor.detach", "torch.Tensor.numel",
    "torch.Tensor.is_contiguous", "torch.Tensor.storage_offset", "torch.Tensor.element_size",
    "torch.Tensor.data_ptr", "torch.Tensor.untyped_storage", "torch.Tensor.is_floating_point",
    "torch.Tensor.requires_grad_", "torch.Tensor.__len__", "torch.Tensor.unsqueeze",
    "torch.Tensor.__getitem__",  # basic (slice) indexing only: a tensor index is a sync, below
}
_GEMMS = {torch.mm, torch.Tensor.mm, torch.Tensor.addmm_, torch.matmul, torch.Tensor.__matmul__}


class HostSyncCounter(torch.overrides.TorchFunctionMode):
    """Records every torch call that syncs with the device, and every call that reads the data
    of the watched (large) tensors, e.g. hidden and the LM-head weight, other than a GEMM.

    TorchFunctionMode sees Python-level calls, Tensor methods and dunders included
    (``.item()``, ``bool(t)``, ``int(t)``), so a planted sync or scan is caught on CPU, where
    nothing ever waits for a device."""

    def __init__(self, *watched):
        super().__init__()
        self.storages = {t.untyped_storage().data_ptr() for t in watched}
        self.syncs, self.scans, self.gemms = [], [], []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = torch.overrides.resolve_name(func) or repr(func)
        flat = [a for a in torch.utils._pytree.tree_leaves((args, kwargs))]
        if name in _SYNCS:
            self.syncs.append(name)
        elif name in ("torch.Tensor.__getitem__", "torch.Tensor.__setitem__") and any(
                isinstance(a, torch.Tensor) for a in torch.utils._pytree.tree_leaves(args[1:2])):
            self.syncs.append(name + "[tensor index]")
        touches = any(isinstance(a, torch.Tensor) and a.untyped_storage().data_ptr() in self.storages
                      for a in flat)
        no_copy = func is torch.Tensor.contiguous and args[0].is_contiguous()  # returns self
        if touches and not (name.endswith(".__get__") or name in _NO_DATA or no_copy):
            (self.gemms if func in _GEMMS else self.scans).append(name)
        return func(*args, **kwargs)


def _default_path_calls(impl, monkeypatch, T=37, chunk_rows=16):
    """Run policy_loss fwd+bwd and token_logprobs on the default path under the counter.  The
    Triton launches are stubbed out (the interpreter converts tensors to NumPy, which a
    compiled launch never does): only the host code of the launchers is measured."""
    from r4b_kernels._common import KernelLaunch

    monkeypatch.delenv("R4B_KERNEL_CHECKS", raising=False)
    if impl == "triton":
        monkeypatch.setattr(KernelLaunch, "run", lambda self: None)
    hidden, weight, targets, old, adv, w, ref = make_inputs(T, 16, 300, torch.float32)
    h, W = hidden.requires_grad_(), weight.requires_grad_()
    with HostSyncCounter(h, W) as counter:
        out = policy_loss(h, W, targets, old, adv, token_weights=w, ref_logprobs=ref, kl_coef=0.1,
                          dual_clip=3.0, entropy_coef=0.01, return_entropy=True, impl=impl,
                          chunk_rows=chunk_rows)
        out.loss.backward()
        token_logprobs(h.detach(), W.detach(), targets, return_entropy=True, impl=impl,
                       chunk_rows=chunk_rows)
    return counter


@pytest.mark.parametrize("impl", ["torch", "chunked", TRITON])
def test_default_path_has_no_host_sync_and_no_scan_of_the_weights(impl, monkeypatch):
    counter = _default_path_calls(impl, monkeypatch)
    assert counter.syncs == [], f"host syncs on the default path: {counter.syncs}"
    if impl in ("triton", "chunked"):
        # The fused path reads hidden and the weight only in its GEMMs: per chunk the logits
        # GEMM, dH = dlogits @ W and dW += dlogits^T @ H (fwd+bwd), the logits GEMM (log-probs).
        chunks = -(-37 // 16)
        assert counter.scans == [], f"passes over hidden / weight besides the GEMMs: {counter.scans}"
        assert len(counter.gemms) == 3 * chunks + chunks, counter.gemms


@pytest.mark.parametrize("plant", ["item", "bool", "scan"])
def test_sync_counter_catches_a_planted_sync_or_scan(plant, monkeypatch):
    """The counter is not blind: a planted .item(), bool() or full pass over the weight in the
    entry checks of the default path is reported."""
    real_common, real_per_token = pl._check_common, pl._per_token

    def per_token(name, t, *a):
        if plant == "item":
            t.sum().item()
        elif plant == "bool":
            bool((t > 0).any())
        return real_per_token(name, t, *a)

    def check_common(hidden, weight, *a):
        if plant == "scan":
            torch.isfinite(weight).all()  # no sync, but a pass over all of the weight
        return real_common(hidden, weight, *a)

    monkeypatch.setattr(pl, "_per_token", per_token)
    monkeypatch.setattr(pl, "_check_common", check_common)
    counter = _default_path_calls("triton" if pl.HAS_TRITON else "torch", monkeypatch)
    if plant == "scan":
        assert "torch.isfinite" in counter.scans and counter.syncs == []
    else:
        assert counter.syncs and set(counter.syncs) == {
            {"item": "torch.Tensor.item", "bool": "torch.Tensor.__bool__"}[plant]}


@pytest.mark.gpu
def test_tensors_on_a_second_gpu_launch_on_that_gpu():
    """Every launcher makes its tensors' device current: with cuda:0 current, inputs on cuda:1
    give the reference's results (a launch on cuda:0 would read foreign pointers)."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    dev = torch.device("cuda:1")
    hidden, weight, targets, old, adv, w, ref = (t.to(dev) for t in make_inputs(70, 32, 300, torch.float32))
    with torch.cuda.device(0):
        out_k, dh_k, dw_k = run_impl("triton", hidden, weight, targets, old, adv, token_weights=w)
        lp_k = token_logprobs(hidden, weight, targets, impl="triton")
        adv_k = _grouped_adv(adv, dev)
    out_r, dh_r, dw_r = run_impl("torch", hidden, weight, targets, old, adv, token_weights=w)
    torch.testing.assert_close(out_k.loss, out_r.loss, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dh_k, dh_r, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(dw_k, dw_r, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(lp_k, token_logprobs(hidden, weight, targets, impl="torch"),
                               rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(adv_k, _grouped_adv(adv, dev, impl="torch"))


def _grouped_adv(x, dev, impl="triton"):
    from r4b_kernels import grouped_advantage

    return grouped_advantage(x, torch.arange(x.shape[0], device=dev) // 7, impl=impl).advantages
