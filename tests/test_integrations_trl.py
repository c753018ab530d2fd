"""r4b_kernels.integrations.trl against the real host code.

* ``R4BFusedLinearGRPOLoss`` == liger-kernel's ``LigerFusedLinearGRPOLoss`` (the module TRL <=
  1.12 builds for ``use_liger_kernel=True``): loss, metrics and gradients w.r.t. hidden states
  and weight on fresh random inputs, every supported loss type, with and without KL, vLLM
  importance ratio and delta.  Needs liger-kernel (a dependency of r4b).
* With TRL 1.15 - 1.16 installed (an opt-in extra: ``pip install './kernels[integrations]'``):
  ``patch_fused_lm_head`` vs TRL's own fused LM head, per call and for one real
  ``GRPOTrainer`` step on a tiny random Qwen3 (plain SGD, so the parameter change is the
  gradient itself).  Skipped, with the reason, where TRL is not installed.
"""

import importlib.util
import subprocess
import sys
import zlib

import pytest
import torch

from r4b_kernels.integrations.trl import R4BFusedLinearGRPOLoss

HAVE_LIGER = importlib.util.find_spec("liger_kernel") is not None
HAVE_TRL = importlib.util.find_spec("trl") is not None
needs_liger = pytest.mark.skipif(not HAVE_LIGER, reason="liger-kernel is not installed")
needs_trl = pytest.mark.skipif(not HAVE_TRL, reason="TRL is not installed (pip install './kernels[integrations]')")


def _inputs(B, S, H, V, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, S, H, generator=g)
    W = torch.randn(V, H, generator=g) * H ** -0.5 * 2
    y = torch.randint(0, V, (B, S), generator=g)
    mask = (torch.rand(B, S, generator=g) > 0.3).float()
    mask[:, 0] = 1.0
    mask[-1] = 0.0 if B > 2 else mask[-1]  # a fully masked sequence
    adv = torch.randn(B, generator=g)
    with torch.no_grad():
        lp = torch.log_softmax(x @ W.t() / 0.9, -1).gather(-1, y[..., None])[..., 0]
    old = lp + 0.3 * torch.randn(B, S, generator=g)  # ratios on both sides of the clip range
    ref = lp + 0.1 * torch.randn(B, S, generator=g)
    vis = torch.rand(B, S, generator=g) + 0.5
    return x, W, y, mask, adv, old, ref, vis


def _run(mod, x, W, y, mask, adv, **kw):
    xx = x.clone().requires_grad_()
    WW = W.clone().requires_grad_()
    loss, metrics = mod(xx, WW, y, mask, adv, **kw)
    loss.backward()
    return loss.detach(), [m.detach() for m in metrics], xx.grad, WW.grad


@needs_liger
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "luspo"])
@pytest.mark.parametrize("beta,vllm,delta", [(0.0, False, None), (0.04, False, None), (0.04, True, None),
                                              (0.0, True, 1.5), (0.04, False, 1.3)])
def test_matches_liger_grpo_loss(loss_type, beta, vllm, delta):
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    B, S, H, V = 4, 13, 24, 123
    x, W, y, mask, adv, old, ref, vis = _inputs(B, S, H, V, seed=zlib.crc32(repr((loss_type, beta, vllm, delta)).encode()))
    opts = dict(beta=beta, epsilon_low=0.2, epsilon_high=0.28, loss_type=loss_type, max_completion_length=S,
                temperature=0.9, delta=delta, use_ref_model=beta != 0.0)
    call = dict(old_per_token_logps=old, ref_per_token_logps=ref if beta else None,
                vllm_is_ratio=vis if vllm else None)
    want = _run(LigerFusedLinearGRPOLoss(compiled=False, **opts), x, W, y, mask, adv, **call)
    got = _run(R4BFusedLinearGRPOLoss(**opts), x, W, y, mask, adv, **call)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    assert len(got[1]) == len(want[1]) == (2 if beta else 1)
    for g, w in zip(got[1], want[1]):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    assert float(want[1][-1]) > 0, "inputs must clip some tokens for the clip metric to be tested"
    torch.testing.assert_close(got[2], want[2], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got[3], want[3], rtol=1e-4, atol=1e-6)


@needs_liger
def test_matches_liger_without_old_logps_and_with_ref_model_inputs():
    """old_per_token_logps=None (ratio 1) and the reference computed from ref_input/ref_weight."""
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    B, S, H, V = 3, 9, 16, 77
    x, W, y, mask, adv, *_ = _inputs(B, S, H, V, seed=7)
    ref_x = x + 0.05 * torch.randn_like(x)
    ref_W = W + 0.05 * torch.randn_like(W)
    opts = dict(beta=0.1, loss_type="bnpo", use_ref_model=True, temperature=1.3)
    call = dict(ref_input=ref_x, ref_weight=ref_W)
    want = _run(LigerFusedLinearGRPOLoss(compiled=False, **opts), x, W, y, mask, adv, **call)
    got = _run(R4BFusedLinearGRPOLoss(**opts), x, W, y, mask, adv, **call)
    for g, w in zip([got[0], *got[1], got[2], got[3]], [want[0], *want[1], want[2], want[3]]):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kw,needle", [
    (dict(loss_type="cispo"), "loss_type='cispo'"), (dict(loss_type="sapo"), "loss_type='sapo'"),
    (dict(importance_sampling_level="sequence"), "importance_sampling_level='sequence'"),
    (dict(use_bias_correction_kl=True), "use_bias_correction_kl=True"),
    (dict(delta=1.1, epsilon_high=0.28), "delta=1.1"), (dict(loss_type="dr_grpo"), "max_completion_length"),
])
def test_unsupported_options_name_themselves(kw, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(".", r"\.")):
        R4BFusedLinearGRPOLoss(**kw)


def test_bias_and_bad_shapes_are_errors():
    B, S, H, V = 2, 5, 8, 30
    x, W, y, mask, adv, *_ = _inputs(B, S, H, V, seed=3)
    mod = R4BFusedLinearGRPOLoss(beta=0.0, use_ref_model=False)
    with pytest.raises(ValueError, match="bias"):
        mod(x, W, y, mask, adv, bias=torch.zeros(V))
    with pytest.raises(ValueError, match=r"advantages must have shape \(2,\)"):
        mod(x, W, y, mask, adv[:, None].expand(B, S))
    with pytest.raises(ValueError, match="use_ref_model=True needs"):
        R4BFusedLinearGRPOLoss(beta=0.1, use_ref_model=True)(x, W, y, mask, adv)


def test_adapters_import_no_host_library():
    code = ("import sys, r4b_kernels.integrations.trl, r4b_kernels.integrations.verl\n"
            "bad = [m for m in ('trl', 'verl', 'liger_kernel', 'transformers', 'ray', 'r4b', 'megatron')"
            " if m in sys.modules]\n"
            "assert not bad, bad\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


# ------------------------------------------------------------------------------ TRL itself
def _tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(ord("!"), ord("~") + 1)] + ["Ġ", "Ċ"]
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(chars)}, merges=[], fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<pad>", "<eos>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def _tiny_qwen3(vocab, seed):
    import transformers

    cfg = transformers.Qwen3Config(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                   max_position_embeddings=128, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return transformers.Qwen3ForCausalLM(cfg)


@needs_trl
def test_patched_fused_lm_head_matches_trls():
    """The patched head returns TRL's log_probs and entropy and their gradients."""
    from trl.trainer.utils import add_fused_lm_head

    from r4b_kernels.integrations.trl import patch_fused_lm_head

    tok = _tiny_tokenizer()
    model = _tiny_qwen3(len(tok), seed=1)
    add_fused_lm_head(model, temperature=0.8, outputs=("log_probs", "entropy"))
    ids = torch.randint(0, len(tok), (3, 11), generator=torch.Generator().manual_seed(2))
    labels = ids.clone()
    labels[0, :4] = -100
    ga = torch.randn(3, 10)
    gb = torch.randn(3, 10)
    res = []
    for patched in (False, True):
        undo = patch_fused_lm_head() if patched else (lambda: None)
        try:
            model.zero_grad()
            out = model(input_ids=ids, labels=labels, fused_lm_head=True)
            ((out.log_probs * ga).sum() + (out.entropy * gb).sum()).backward()
        finally:
            undo()
        res.append([out.log_probs.detach(), out.entropy.detach()] +
                   [p.grad.clone() for p in (model.lm_head.weight, model.model.norm.weight)])
    for got, want in zip(res[1], res[0]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def _grpo_step(tmp_path, patched, seed=0, monkeypatch=None):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from r4b_kernels.integrations.trl import use_r4b

    tok = _tiny_tokenizer()
    path = tmp_path / "model"  # TRL loads the reference model (beta > 0) from the policy's path
    if not path.exists():
        _tiny_qwen3(len(tok), seed=11).save_pretrained(str(path))
        tok.save_pretrained(str(path))
    data = Dataset.from_dict({"prompt": ["ab", "cde", "fg", "hij"]})

    def reward(completions, **_):  # varies across a group, so advantages are non-zero
        return [float(sum(c in "aeiou" for c in text)) + 0.1 * len(text) for text in completions]

    args = GRPOConfig(output_dir=str(tmp_path / ("r4b" if patched else "trl")), per_device_train_batch_size=4,
                      num_generations=4, max_completion_length=6, max_steps=1, learning_rate=0.5, optim="sgd",
                      beta=0.04, loss_type="dapo", epsilon=0.2, temperature=0.9, report_to=[], logging_steps=1,
                      save_strategy="no", use_cpu=True, bf16=False, seed=seed, lr_scheduler_type="constant",
                      max_grad_norm=0.0, dataloader_num_workers=0)
    trainer = GRPOTrainer(model=str(path), reward_funcs=reward, args=args, train_dataset=data, processing_class=tok)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    undo = use_r4b(trainer) if patched else (lambda: None)
    try:
        trainer.train()
    finally:
        undo()
    return {n: p.detach() - before[n] for n, p in trainer.model.named_parameters()}


@needs_trl
def test_grpo_trainer_step_with_r4b_head_equals_trls(tmp_path, monkeypatch):
    """One real GRPOTrainer step (beta > 0, so the reference model's head is patched too):
    every parameter's change equals the change TRL's own head gives."""
    import r4b_kernels.integrations.trl as adapter

    calls = []
    real = adapter.logprobs_entropy
    monkeypatch.setattr(adapter, "logprobs_entropy", lambda *a, **k: calls.append(1) or real(*a, **k))
    want = _grpo_step(tmp_path, patched=False)
    assert not calls
    got = _grpo_step(tmp_path, patched=True)
    assert len(calls) >= 2, "the step must score the policy and the reference with r4b's head"
    assert max(float(d.abs().max()) for d in want.values()) > 1e-4, "the step must move the parameters"
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-7, msg=name)


def _fused_available():
    from r4b_kernels import HAS_TRITON, TRITON_INTERPRET

    return HAS_TRITON and (TRITON_INTERPRET or torch.cuda.is_available())


@pytest.mark.skipif(not _fused_available(), reason="needs triton (a GPU or TRITON_INTERPRET=1)")
def test_logprobs_entropy_fused_path_matches_reference():
    """The shared log-prob + entropy function on the fused kernels (impl="triton") equals its
    PyTorch reference, values and gradients, under mixed-sign and zero incoming gradients."""
    from r4b_kernels.integrations import logprobs_entropy

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(4)
    T, H, V = 19, 16, 131
    x, W = torch.randn(T, H, generator=g).to(dev), (torch.randn(V, H, generator=g) * 0.5).to(dev)
    y = torch.randint(0, V, (T,), generator=g).to(dev)
    ga, gb = torch.randn(T, generator=g).to(dev), torch.randn(T, generator=g).to(dev)
    ga[::3], gb[::2] = 0.0, 0.0
    out = []
    for impl in ("torch", "triton"):
        xx, WW = x.clone().requires_grad_(), W.clone().requires_grad_()
        lp, ent = logprobs_entropy(xx, WW, y, temperature=0.8, impl=impl)
        ((lp * ga).sum() + (ent * gb).sum()).backward()
        out.append((lp.detach(), ent.detach(), xx.grad, WW.grad))
    for got, want in zip(out[1], out[0]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@needs_liger
@pytest.mark.skipif(not _fused_available(), reason="needs triton (a GPU or TRITON_INTERPRET=1)")
def test_fused_path_matches_liger_grpo_loss():
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    B, S, H, V = 3, 7, 16, 97
    x, W, y, mask, adv, old, ref, vis = _inputs(B, S, H, V, seed=21)
    opts = dict(beta=0.04, loss_type="grpo", use_ref_model=True, epsilon_high=0.28, temperature=0.9)
    call = dict(old_per_token_logps=old, ref_per_token_logps=ref, vllm_is_ratio=vis)
    want = _run(LigerFusedLinearGRPOLoss(compiled=False, **opts), x, W, y, mask, adv, **call)
    got = _run(R4BFusedLinearGRPOLoss(impl="triton", **opts), x, W, y, mask, adv, **call)
    for g, w in zip([got[0], *got[1], got[2], got[3]], [want[0], *want[1], want[2], want[3]]):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
