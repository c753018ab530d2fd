"""Device discipline: inside an annealing (SFT) step and a BPO step every tensor factory names
its device, so nothing lands on the host by accident when the model is on a GPU."""

from __future__ import annotations

import pytest
import torch

from r4b.components import Setup, build_engine, make_template, make_tokenizer, model_config
from r4b.data import TaskConfig
from r4b.devices import ImplicitDeviceError, explicit_devices
from r4b.models import build_model
from r4b.rl.bpo import BPOTrainer, frozen_copy
from r4b.rl.config import RLConfig
from r4b.runtime import init_runtime
from r4b.sft import Example, make_optimizer, OptimConfig, sft_step

TASK = TaskConfig(image_size=18)  # images: the vision tower and projector take part


@pytest.fixture(scope="module")
def rt():
    return init_runtime(1)


@pytest.fixture(scope="module")
def parts():
    setup = Setup(task=TASK)
    tok = make_tokenizer(setup.model)
    cfg = model_config(setup.model, tok, TASK)
    torch.manual_seed(0)
    model = build_model(cfg)
    tmpl = make_template(tok, cfg)
    items = TASK.make(0, 4, split="train")
    return model, tmpl, tok, items


def _sft_examples(tmpl, items):
    out = []
    for it in items:
        ex = tmpl.sft_example(it.question, it.answer, it.reasoning, it.n_images)
        out.append(Example(ex.input_ids, ex.prompt_len, list(it.images), 1))
    return out


def _trainer(model, tmpl, tok, rt):
    cfg = RLConfig(group_size=2, prompts_per_step=4, max_new_tokens_think=12,
                   max_new_tokens_no_think=6, max_new_tokens_auto=12, kl_coef=0.05)
    return BPOTrainer(cfg, policy=model, engine=build_engine(model, tmpl, tok, max_seqlen=128),
                      template=tmpl, rt=rt, ref_model=frozen_copy(model))


def _bpo_step(trainer, items):
    gen = torch.Generator(device="cpu").manual_seed(0)
    return trainer.step(items, 0, gen)


def test_sft_and_bpo_steps_name_every_device(rt, parts):
    model, tmpl, tok, items = parts
    opt = make_optimizer(model, OptimConfig())
    trainer = _trainer(model, tmpl, tok, rt)  # building models is not part of a step
    with explicit_devices():
        m = sft_step(model, opt, _sft_examples(tmpl, items), rt, lr=1e-3, grad_clip=1.0,
                     tokens_per_microbatch=512)
        b = _bpo_step(trainer, items)
    assert m["skipped"] == 0 and b["skipped_steps"] == 0


def test_a_planted_factory_without_device_fails(rt, parts, monkeypatch):
    """The check is live: a ``torch.zeros(n)`` without ``device=`` planted in the BPO update
    (or in the SFT step) raises and names the call site."""
    model, tmpl, tok, items = parts
    import r4b.rl.bpo as bpo_mod
    import r4b.sft as sft_mod

    real = bpo_mod.BPOTrainer.token_weights

    def planted(self, mb):
        w = real(self, mb)
        return w + torch.zeros(w.shape[0])  # the bug: lands on the host on a GPU node

    trainer = _trainer(model, tmpl, tok, rt)
    monkeypatch.setattr(bpo_mod.BPOTrainer, "token_weights", planted)
    with explicit_devices(), pytest.raises(ImplicitDeviceError, match="torch.zeros.*test_devices.py"):
        _bpo_step(trainer, items)
    monkeypatch.undo()

    real_pack = sft_mod.pack

    def planted_pack(*a, **k):
        torch.arange(3)  # the bug, at the start of the SFT step's packing
        return real_pack(*a, **k)

    monkeypatch.setattr(sft_mod, "pack", planted_pack)
    opt = make_optimizer(model, OptimConfig())
    with explicit_devices(), pytest.raises(ImplicitDeviceError, match="torch.arange"):
        sft_step(model, opt, _sft_examples(tmpl, items), rt, lr=1e-3, grad_clip=1.0,
                 tokens_per_microbatch=512)


def test_explicit_and_derived_tensors_pass():
    with explicit_devices():
        a = torch.zeros(3, device="cpu")
        b = torch.zeros_like(a) + a.new_ones(3)
        c = torch.as_tensor(b)  # an existing tensor: no new device decision
        torch.tensor([1, 2], device=a.device)
    assert c.shape == (3,)
    with pytest.raises(ImplicitDeviceError):
        with explicit_devices():
            torch.tensor([1.0])
