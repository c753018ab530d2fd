"""Bi-mode annealing: curation heuristics, the SFT mix, the loss rule, and exact resume."""

import json

import pytest
import torch

import r4b.anneal as anneal_mod
from r4b.anneal import (AnnealConfig, AnnealJob, annealing_examples, curate,
                        direct_examples, run_anneal)
from r4b.data import Sample, TaskConfig
from r4b.components import Setup, make_template, make_tokenizer, model_config
from r4b.evaluate import EvalConfig
from r4b.log import read_metrics
from r4b.models import build_model
from r4b.runtime import init_runtime
from r4b.sft import OptimConfig, batch_indices, cosine_lr

TEXT_TASK = TaskConfig(vision=False)


@pytest.fixture(scope="module")
def rt():
    return init_runtime(1)


def _model_and_template(seed=0):
    setup = Setup(task=TEXT_TASK, seed=seed)
    tok = make_tokenizer(setup.model)
    cfg = model_config(setup.model, tok, TEXT_TASK)
    torch.manual_seed(seed)
    model = build_model(cfg)
    return model, make_template(tok, cfg), tok


class _ScriptedEngine:
    """Returns fixed completions so the curation rule can be checked exactly."""

    def __init__(self, template, answers):
        self.t, self.answers = template, answers

    def generate(self, reqs, params, gen):
        from r4b.rollout.engine import Rollout
        out = []
        for r in reqs:
            ans = self.answers[r.uid].pop(0)
            ids = self.t.response_ids(ans, None, "no_think")
            out.append(Rollout(request=r, response_ids=ids, logprobs=[0.0] * len(ids), finished=True))
        return out


def test_curation_rule_all_n_wrong_means_thinking():
    _, tmpl, _ = _model_and_template()
    items = [Sample(uid=f"u{i}", question="sum of all?", answer="7", reasoning="3+4=7", level=i + 1)
             for i in range(3)]
    items.append(Sample(uid="open", question="why?", answer="because", reasoning="it is so",
                        verifiable=False, level=9))
    n = 4
    answers = {0: ["7", "1", "2", "3"],        # one right -> non-thinking
               1: ["1", "2", "3", "4"],        # all wrong -> thinking
               2: ["7", "7", "7", "7"]}        # all right -> non-thinking
    needs, stats = curate(items, _ScriptedEngine(tmpl, answers), tmpl, n_samples=n,
                          temperature=1.0, seed=0)
    assert needs == [False, True, False, True]  # the open-ended item: default judge (has reasoning)
    assert stats["thinking_fraction"] == 0.5
    assert stats["per_level"]["2"]["thinking_fraction"] == 1.0
    judged, _ = curate(items[3:], _ScriptedEngine(tmpl, {}), tmpl, n_samples=n, temperature=1.0,
                       seed=0, judge=lambda s: False)
    assert judged == [False]


def test_annealing_mix_forms_and_loss_mask():
    _, tmpl, tok = _model_and_template()
    items = TEXT_TASK.make(0, 40, split="train")
    needs = [it.level >= 3 for it in items]
    ex = annealing_examples(items, needs, tmpl, forced_mode_fraction=0.0, seed=0)
    assert len(ex) == len(items)
    for e, it, nd in zip(ex, items, needs):
        text = tok.decode(e.ids[e.prompt_len:])
        assert text.startswith("\n" if nd else "\n\n</think>")  # routing token is trained
        assert tok.decode(e.ids[:e.prompt_len]).endswith("<think>")  # auto prompt
        assert e.mode == int(nd)
    both = annealing_examples(items, needs, tmpl, forced_mode_fraction=1.0, seed=0)
    assert len(both) == 2 * len(items)
    forced = [e for e in both if not tok.decode(e.ids[:e.prompt_len]).endswith("<think>")]
    assert len(forced) == len(items)
    for e in direct_examples(items, tmpl):
        assert tok.decode(e.ids[:e.prompt_len]).endswith("<think>\n\n</think>")


def test_schedule_and_batches_are_functions_of_the_step():
    cfg = OptimConfig(lr=1.0, warmup_steps=2, min_lr_ratio=0.1)
    lrs = [cosine_lr(s, 10, cfg) for s in range(10)]
    assert lrs[0] == 0.5 and lrs[1] == 1.0 and lrs[-1] > 0.1 - 1e-9 and lrs[2] > lrs[5] > lrs[9]
    a = batch_indices(50, 16, 7, seed=3)
    assert a == batch_indices(50, 16, 7, seed=3) and len(set(a)) == 16
    assert batch_indices(50, 16, 0, seed=3) != batch_indices(50, 16, 3, seed=3)


def _job(out):
    return AnnealJob(setup=Setup(task=TEXT_TASK),
                     anneal=AnnealConfig(n_train_items=64, warmup_steps=4, anneal_steps=6,
                                         batch_size=16, curate_items=24, curation_samples=2,
                                         ckpt_every=2, optim=OptimConfig(warmup_steps=1)),
                     eval=EvalConfig(n_items=8, max_new_tokens_think=24, max_new_tokens_auto=24,
                                     max_new_tokens_no_think=8),
                     out_dir=str(out))


def test_resume_after_a_kill_equals_uninterrupted(rt, tmp_path, monkeypatch):
    full = run_anneal(_job(tmp_path / "full"), rt)

    real_train = anneal_mod.train_sft
    calls = {"n": 0}

    def dying(*a, **kw):  # die mid-way through the annealing phase, after a checkpoint
        calls["n"] += 1
        if calls["n"] == 2:
            on_step = kw["on_step"]

            def kill_after_3(step, m):
                on_step(step, m)
                if step == 3:  # checkpoint at 2; step 3 is lost and redone
                    raise KeyboardInterrupt("killed")
            kw["on_step"] = kill_after_3
        return real_train(*a, **kw)

    monkeypatch.setattr(anneal_mod, "train_sft", dying)
    with pytest.raises(KeyboardInterrupt):
        run_anneal(_job(tmp_path / "cut"), rt)
    monkeypatch.setattr(anneal_mod, "train_sft", real_train)
    resumed = run_anneal(_job(tmp_path / "cut"), rt)

    ma = read_metrics(tmp_path / "full" / "metrics.jsonl")
    mb = read_metrics(tmp_path / "cut" / "metrics.jsonl")
    assert [r["step"] for r in ma] == [r["step"] for r in mb]
    assert [r["loss"] for r in ma] == [r["loss"] for r in mb]
    for (ka, va), (kb, vb) in zip(full.model.state_dict().items(), resumed.model.state_dict().items()):
        if isinstance(va, torch.Tensor):
            assert torch.equal(va, vb), ka
    assert full.report == resumed.report
    stats = json.loads((tmp_path / "full" / "curation_stats.json").read_text())
    assert set(stats["per_level"]) == {"1", "2", "3", "4"}
    assert (tmp_path / "full" / "report" / "report.json").exists()


def test_thinking_fraction_mismatch_is_named():
    """Items curated as needing thinking but without a reference reasoning train as direct
    answers; the message gives both fractions, and the second is what the set trains on."""
    _, tmpl, _ = _model_and_template()
    items = TEXT_TASK.make(0, 10, split="train")
    for it in items[2:]:
        it.reasoning = None
    needs = [True] * len(items)
    msg = anneal_mod.thinking_mismatch(items, needs)
    assert "10 of 10 items" in msg and "fraction 1.000" in msg and "8 of them" in msg
    ex = annealing_examples(items, needs, tmpl, forced_mode_fraction=0.0, seed=0)
    trained = sum(e.mode for e in ex) / len(ex)
    assert trained == 0.2 and "thinks on 0.200" in msg
    assert anneal_mod.thinking_mismatch(items[:2], needs[:2]) is None
    assert anneal_mod.thinking_mismatch(items, [False] * len(items)) is None


def test_annealing_warns_when_curation_and_training_disagree(rt, tmp_path, monkeypatch):
    import logging

    train = TEXT_TASK.make(0, 12, split="train")
    for it in train[3:]:
        it.reasoning = None
    evals = TEXT_TASK.make(1, 2, split="eval")
    monkeypatch.setattr(anneal_mod, "anneal_items", lambda job: (train, evals))
    monkeypatch.setattr(anneal_mod, "curate", lambda items, *a, **kw: (
        [True] * len(items), {"n_items": len(items), "thinking_fraction": 1.0,
                              "per_level": {}, "per_topic": {}}))
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logging.getLogger("r4b.anneal").addHandler(handler)
    try:
        job = AnnealJob(setup=Setup(task=TEXT_TASK),
                        anneal=AnnealConfig(warmup_steps=0, anneal_steps=1, batch_size=4,
                                            curate_items=12, curation_samples=1,
                                            optim=OptimConfig(warmup_steps=0)),
                        eval=EvalConfig(n_items=2, max_new_tokens_think=4,
                                        max_new_tokens_auto=4, max_new_tokens_no_think=4,
                                        modes=("no_think",)),
                        out_dir=str(tmp_path / "run"))
        run_anneal(job, rt)
    finally:
        logging.getLogger("r4b.anneal").removeHandler(handler)
    msgs = [r.getMessage() for r in records]
    assert any("9 of them have no reference reasoning" in m and "thinks on 0.250" in m
               for m in msgs), msgs
