"""megatron-core's PP=1 pipeline schedule on an :class:`r4b.models.R4BModel`.

megatron-core 0.16.1's ``forward_backward_no_pipelining`` allocates one CUDA tensor (its token
counter) and so cannot be called on a CPU-only torch; everything it does per micro-batch is
megatron's ``forward_step`` followed by ``backward_step``, which run on CPU.  The CPU tests drive
those two functions over packed micro-batches, as the schedule does, and compare the losses and
accumulated gradients with a plain forward/backward; the GPU test runs the whole schedule
through :func:`r4b.models.pipeline.run_pipeline`.
"""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F

from r4b.models import LMConfig, ModelConfig, build_model
from r4b.models.pipeline import make_forward_step, run_pipeline
from r4b.models.vision import VisionConfig

VOCAB, IMG, TPI = 64, 63, 4  # image placeholder = last id; 8-px tiles of 4-px patches
RTOL, ATOL = 1e-5, 1e-6


def tiny(kind: str, seed: int):
    vision = None
    if kind == "mm":
        vision = VisionConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                              patch_size=4, image_size=8, feature_layer=2)
    cfg = ModelConfig(lm=LMConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                                  num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                                  max_position_embeddings=64, tie_word_embeddings=True),
                      vision=vision, image_token_id=IMG if vision else None)
    torch.manual_seed(seed)
    model = build_model(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def packed_batches(kind: str, g: torch.Generator) -> list[dict]:
    """Three packed micro-batches of different token counts (with images for ``mm``)."""
    layouts = ([5, 9], [12], [3, 7, 4])
    batches = []
    for b, lens in enumerate(layouts):
        seqs = [torch.randint(0, IMG, (n,), generator=g) for n in lens]
        images = None
        if kind == "mm" and b != 1:  # micro-batch 1 is text only
            seqs[0] = torch.cat([seqs[0][:2], torch.full((TPI,), IMG), seqs[0][2:]])
            images = torch.randn(1, 3, 8, 8, generator=g)
        ids = torch.cat(seqs)
        n = torch.tensor([len(s) for s in seqs])
        cu = torch.zeros(len(seqs) + 1, dtype=torch.int32)
        cu[1:] = n.cumsum(0)
        pos = torch.cat([torch.arange(k) for k in n.tolist()])
        batches.append({"input_ids": ids, "cu_seqlens": cu, "position_ids": pos,
                        "max_seqlen": int(n.max()), "images": images,
                        "labels": torch.randint(0, VOCAB, (ids.numel(),), generator=g)})
    return batches


def make_loss_fn(per_token: bool):
    """Cross-entropy of the logits; mean per micro-batch ``(loss, metrics)`` or summed with the
    token count ``(loss, num_tokens, metrics)``."""
    def loss_fn(logits, batch):
        ce = F.cross_entropy(logits.float(), batch["labels"], reduction="sum" if per_token else "mean")
        metrics = {"loss": ce.detach()}  # a view: megatron scales the returned loss in place
        if per_token:
            return ce, torch.tensor(batch["labels"].numel(), dtype=torch.int), metrics
        return ce, metrics

    return loss_fn


def reference(model, batches, loss_fn, per_token: bool):
    """Plain forward of every micro-batch, then one backward of the total the schedule
    optimises: ``sum(loss_i) / N``, or ``sum(loss_i / n_i) / N`` with token counts."""
    model.zero_grad(set_to_none=True)
    keys = ("input_ids", "cu_seqlens", "position_ids", "max_seqlen", "images")
    losses, total = [], 0.0
    for b in batches:
        out = loss_fn(model(**{k: b[k] for k in keys if b[k] is not None}), b)
        losses.append(out[0].detach())
        total = total + (out[0] / out[1] if per_token else out[0]) / len(batches)
    total.backward()
    # None for weights the forward does not use (the vision tower's post_layernorm: features
    # are taken from an inner layer)
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return losses, grads


def megatron_steps(model, batches, forward_step, *, per_token: bool):
    """What ``forward_backward_no_pipelining`` does for each micro-batch, minus its CUDA token
    counter: megatron's ``forward_step`` (our forward step, the loss function and megatron's
    loss scaling) and ``backward_step``."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.utils import get_model_config, get_model_type

    config, model_type = get_model_config(model), get_model_type(model)
    # megatron-core < 0.17 takes the model type between the output grad and the config
    extra = ((model_type,) if "model_type" in inspect.signature(schedules.backward_step).parameters
             else ())
    store, it, n = [], iter(batches), len(batches)
    tokens = torch.zeros([], dtype=torch.int)
    for i in range(n):
        out, num_tokens = schedules.forward_step(
            forward_step, it, model, n, None, store, config, ps.get_context_parallel_world_size(),
            is_first_microbatch=i == 0, current_microbatch=i)
        tokens += num_tokens
        schedules.backward_step(None, out, None, *extra, config)
    assert int(tokens) == (sum(b["labels"].numel() for b in batches) if per_token else 0)
    return store


def test_model_exposes_what_megatron_schedules_read():
    from megatron.core.enums import ModelType
    from megatron.core.utils import get_model_config, get_model_type

    model = tiny("text", 0)

    class Wrapper(torch.nn.Module):  # as DDP / FSDP wrappers expose the model: ``.module``
        def __init__(self, m):
            super().__init__()
            self.module = m

    for m in (model, Wrapper(model)):
        assert get_model_type(m) == ModelType.encoder_or_decoder
        assert get_model_config(m) is model.config
    c = model.config
    assert (c.hidden_size, c.variable_seq_lengths, c.pipeline_dtype) == (64, True, torch.float32)
    assert c.calculate_per_token_loss is False and c.fine_grained_activation_offloading is False


@pytest.mark.parametrize("per_token", [False, True], ids=["mean", "per_token"])
@pytest.mark.parametrize("kind", ["text", "mm"])
def test_megatron_steps_match_plain_forward_backward(kind, per_token):
    model = tiny(kind, 1)
    batches = packed_batches(kind, torch.Generator().manual_seed(2))
    loss_fn = make_loss_fn(per_token)
    want_losses, want_grads = reference(model, batches, loss_fn, per_token)
    store = megatron_steps(model, batches, make_forward_step(loss_fn, return_hidden=False),
                           per_token=per_token)
    got_losses = [m["loss"] for m in store]
    assert len(got_losses) == 3
    got_grads = {n: p.grad for n, p in model.named_parameters()}
    unused = {n for n, w in want_grads.items() if w is None}
    assert {n for n, g in got_grads.items() if g is None} == unused
    assert unused <= {"vision_tower.post_layernorm.weight", "vision_tower.post_layernorm.bias"}
    for a, b in zip(got_losses, want_losses):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)
    for n, w in want_grads.items():
        if w is not None:
            torch.testing.assert_close(got_grads[n], w, rtol=RTOL, atol=ATOL, msg=n)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_run_pipeline_without_cuda_says_why():
    model = tiny("text", 3)
    batches = packed_batches("text", torch.Generator().manual_seed(4))
    step = make_forward_step(make_loss_fn(False), return_hidden=False)
    with pytest.raises(RuntimeError, match="schedules need CUDA, even with PP=1"):
        run_pipeline(model, iter(batches), num_microbatches=3, tokens_per_microbatch=12,
                     forward_step=step)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["text", "mm"])
def test_run_pipeline_matches_plain_forward_backward_on_gpu(kind):
    model = tiny(kind, 5).cuda()
    batches = [{k: v.cuda() if torch.is_tensor(v) else v for k, v in b.items()}
               for b in packed_batches(kind, torch.Generator().manual_seed(6))]
    loss_fn = make_loss_fn(True)
    want_losses, want_grads = reference(model, batches, loss_fn, True)
    metrics = run_pipeline(model, iter(batches), num_microbatches=3, tokens_per_microbatch=16,
                           forward_step=make_forward_step(loss_fn, return_hidden=False))
    assert len(metrics) == 3
    for m, w in zip(metrics, want_losses):
        torch.testing.assert_close(m["loss"], w, rtol=RTOL, atol=ATOL)
    for n, p in model.named_parameters():
        if want_grads[n] is None:
            assert p.grad is None, n
        else:
            torch.testing.assert_close(p.grad, want_grads[n], rtol=1e-4, atol=1e-6, msg=n)
