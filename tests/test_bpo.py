"""BPO trainer: invariants of the first inner step, NaN handling, exact resume, and a short
end-to-end run of the main job under torchrun (2 processes, gloo)."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from r4b.anneal import AnnealConfig
from r4b.data import TaskConfig
from r4b.components import Setup, build_engine, make_template, make_tokenizer, model_config
from r4b.evaluate import EvalConfig
from r4b.log import read_metrics
from r4b.models import build_model
from r4b.pretrain_bpo import BPOJob, run_bpo
from r4b.rl.bpo import BPOTrainer, frozen_copy
from r4b.rl.config import RLConfig
from r4b.runtime import init_runtime
from r4b.sft import OptimConfig

import r4b_kernels as K

TEXT_TASK = TaskConfig(vision=False)


@pytest.fixture(scope="module")
def rt():
    return init_runtime(1)


def _parts(task=TEXT_TASK, seed=0, **rl):
    setup = Setup(task=task, seed=seed)
    tok = make_tokenizer(setup.model)
    cfg = model_config(setup.model, tok, task)
    torch.manual_seed(seed)
    model = build_model(cfg)
    tmpl = make_template(tok, cfg)
    items = task.make(seed, 4, split="train")
    rlcfg = RLConfig(group_size=2, prompts_per_step=4, max_new_tokens_think=24,
                     max_new_tokens_no_think=8, max_new_tokens_auto=24, **rl)
    return model, tmpl, tok, items, rlcfg


def _prepare(trainer, items, step=0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    batch = trainer.rollout(items, step, gen)
    ga, keep = trainer.advantages(batch)
    weights = trainer.loss_weights(batch, keep)
    mbs, _ = trainer.microbatches(batch, ga.advantages, weights, keep)
    trainer.score_old_and_ref(mbs)
    return batch, ga, mbs


@pytest.mark.parametrize("routing", ["prompt", "token"])
@pytest.mark.parametrize("task", [TEXT_TASK, TaskConfig(image_size=18)], ids=["text", "image"])
def test_first_inner_step_ratio_one_kl_zero_and_engine_logprobs(rt, routing, task):
    model, tmpl, tok, items, cfg = _parts(task=task, routing=routing, kl_coef=0.1)
    ref = frozen_copy(model)
    trainer = BPOTrainer(cfg, policy=model, engine=build_engine(model, tmpl, tok, max_seqlen=256), template=tmpl,
                         rt=rt, ref_model=ref)
    batch, ga, mbs = _prepare(trainer, items)
    assert len(batch) == 4 * 2 * cfg.group_size
    assert {s.mode for s in batch} == {0, 1}
    n_rows = sum(mb.targets.numel() for mb in mbs)
    assert n_rows == sum(len(s.response_ids) for s in batch)
    for mb in mbs:
        # Recomputed old log-probs match the engine's sampling log-probs (KV-cache decode vs
        # packed forward: same fp32 math in a different order).
        torch.testing.assert_close(mb.old_lp, mb.engine_lp, atol=2e-5, rtol=0)
        from r4b.packing import forward_rows
        h = forward_rows(model, mb.pk)
        out = K.policy_loss(h, model.lm_head_weight(), mb.targets, mb.old_lp, mb.advantages,
                            token_weights=mb.weights, ref_logprobs=mb.ref_lp, kl_coef=0.1)
        assert torch.equal(out.ratio, torch.ones_like(out.ratio))
        assert torch.equal(out.kl, torch.zeros_like(out.kl))
    total_w = sum(float(mb.weights.sum()) for mb in mbs)
    assert total_w == pytest.approx(1.0, abs=1e-5)  # mode_balanced weights sum to 1 globally
    if routing == "token":
        assert sum(int(mb.routing_rows.sum()) for mb in mbs) == len(batch)
        # The no-think prefix's second forced token ('</think>') is template: no loss.
        end_think = tmpl.forced_ids("no_think")[1]
        n_template = 0
        for mb in mbs:
            rows = (mb.pk.row_token.to(mb.modes.device) == 1) & (mb.modes == 0)
            assert (mb.targets[rows] == end_think).all()
            assert (mb.weights[rows] == 0).all() and (mb.weights[~rows] > 0).all()
            n_template += int(rows.sum())
        assert n_template == sum(s.mode == 0 for s in batch)


def test_update_changes_weights_and_nan_step_is_skipped(rt):
    model, tmpl, tok, items, cfg = _parts()
    trainer = BPOTrainer(cfg, policy=model, engine=build_engine(model, tmpl, tok, max_seqlen=256), template=tmpl, rt=rt)
    _, _, mbs = _prepare(trainer, items)
    before = [p.detach().clone() for p in model.parameters()]
    # Make every rollout's advantage non-zero so the step must move the weights.
    for mb in mbs:
        mb.advantages = torch.where(mb.advantages == 0, torch.ones_like(mb.advantages), mb.advantages)
    m = trainer.update(mbs)
    assert m["skipped_steps"] == 0 and torch.isfinite(torch.tensor(m["loss"]))
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))

    # Non-finite inputs are never trained on: the step is skipped (and counted), the weights
    # stay as they were.
    after = [p.detach().clone() for p in model.parameters()]
    for mb in mbs:
        mb.advantages = mb.advantages.clone()
        mb.advantages[0] = float("nan")
    m = trainer.update(mbs)
    assert m["skipped_steps"] == 1 and trainer.skipped_steps == 1
    for a, b in zip(after, model.parameters()):
        assert torch.equal(a, b.detach()), "a skipped step must not touch the weights"
    for mb in mbs:
        mb.advantages = torch.ones_like(mb.advantages)
    with torch.no_grad():
        model.lm_head_weight().view(-1)[0] = float("inf")  # poisons activations and the loss
    saved = [p.detach().clone() for p in model.parameters()]
    m = trainer.update(mbs)
    assert m["skipped_steps"] == 1 and trainer.skipped_steps == 2
    for a, b in zip(saved, model.parameters()):
        assert torch.equal(a, b.detach()), "a skipped step must not touch the weights"


def _tiny_job(tmp_path, **kw):
    anneal = AnnealConfig(n_train_items=64, warmup_steps=4, anneal_steps=4, batch_size=16,
                          curate_items=16, curation_samples=2, ckpt_every=2,
                          optim=OptimConfig(warmup_steps=1))
    rl = RLConfig(group_size=2, prompts_per_step=4, max_new_tokens_think=24,
                  max_new_tokens_no_think=8, max_new_tokens_auto=24)
    return BPOJob(setup=Setup(task=TEXT_TASK), anneal=anneal, rl=rl,
                  eval=EvalConfig(n_items=8, max_new_tokens_think=24, max_new_tokens_auto=24,
                                  max_new_tokens_no_think=8),
                  steps=4, eval_every=2, eval_items_during=4, ckpt_every=2, out_dir=str(tmp_path),
                  tensorboard=False, **kw)


def test_exact_resume_reproduces_uninterrupted_metrics(rt, tmp_path):
    full = _tiny_job(tmp_path / "full")
    run_bpo(full, rt)
    half = dataclasses.replace(_tiny_job(tmp_path / "half"), steps=2)
    run_bpo(half, rt)
    resumed = _tiny_job(tmp_path / "half", resume_changed=("steps",))  # 4 steps: resumes at 2
    run_bpo(resumed, rt)
    keys = ("reward", "loss", "think/response_len", "no_think/response_len")
    a = [{k: r.get(k) for k in keys} for r in read_metrics(tmp_path / "full" / "metrics.jsonl")]
    b = [{k: r.get(k) for k in keys} for r in read_metrics(tmp_path / "half" / "metrics.jsonl")]
    assert [r["step"] for r in read_metrics(tmp_path / "half" / "metrics.jsonl")] == [1, 2, 3, 4]
    assert a == b
    rep = json.loads((tmp_path / "full" / "report" / "report.json").read_text())
    assert set(rep) == {"auto", "think", "no_think", "oracle"}
    for mode in rep.values():
        for m in mode.values():
            assert set(m) >= {"accuracy", "mean_tokens", "think_rate"}
    assert (tmp_path / "full" / "report" / "think_rate.png").exists()


def test_main_job_under_torchrun_two_processes(tmp_path):
    """A short BPO run end to end: torchrun, 2 data-parallel ranks on gloo, annealing first."""
    args = ["--setup.task.vision", "False", "--anneal.n_train_items", "64",
            "--anneal.warmup_steps", "4", "--anneal.anneal_steps", "4", "--anneal.batch_size", "16",
            "--anneal.curate_items", "16", "--anneal.curation_samples", "2",
            "--rl.group_size", "2", "--rl.prompts_per_step", "4", "--rl.max_new_tokens_think", "24",
            "--rl.max_new_tokens_auto", "24", "--rl.max_new_tokens_no_think", "8",
            "--eval.n_items", "8", "--eval.max_new_tokens_think", "24",
            "--eval.max_new_tokens_auto", "24", "--eval.max_new_tokens_no_think", "8",
            "--steps", "3", "--eval_every", "3", "--eval_items_during", "4",
            "--out_dir", str(tmp_path / "run"), "--tensorboard", "False"]
    env = dict(os.environ, OMP_NUM_THREADS="1", R4B_NO_PROGRESS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(_port()), "-m", "r4b.pretrain_bpo", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    recs = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2, 3]
    assert all(r["skipped_steps"] == 0 for r in recs)
    assert (tmp_path / "run" / "report" / "report.json").exists()


def _port():
    from r4b.models.parallel import free_port
    return free_port()


def test_bf16_compute_with_fp32_master_moves_the_weights_fp32_moves_at_lr_1e_6(rt):
    """Mixed precision at an RL learning rate: one BPO update with bf16 compute weights over
    fp32 master weights and moments changes as many master elements as the all-fp32 update of
    the same micro-batches, and in the same direction (bf16 master weights would round most
    1e-6 steps away)."""
    from r4b.training import full_state_dict, shard_model

    model, tmpl, tok, items, cfg = _parts(lr=1e-6)
    fp32 = BPOTrainer(cfg, policy=model, engine=build_engine(model, tmpl, tok, max_seqlen=256),
                      template=tmpl, rt=rt)
    _, _, mbs = _prepare(fp32, items)
    for mb in mbs:
        mb.advantages = torch.where(mb.advantages == 0, torch.ones_like(mb.advantages), mb.advantages)
    start = {k: v.detach().clone() for k, v in model.named_parameters()}

    def copy_start(m):
        with torch.no_grad():
            for k, p in m.named_parameters():
                p.copy_(start[k])

    deltas = {}
    for name, compute in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        policy = build_model(model.cfg, init_weights=False, master_dtype=torch.float32)
        copy_start(policy)
        shard_model(policy, rt, compute_dtype=compute)
        trainer = BPOTrainer(cfg, policy=policy, engine=fp32.engine, template=tmpl, rt=rt)
        m = trainer.update(mbs)
        assert m["skipped_steps"] == 0, name
        after = full_state_dict(policy)
        assert all(v.dtype == torch.float32 for v in after.values() if v.is_floating_point())
        deltas[name] = torch.cat([(after[k].float() - start[k].float()).flatten() for k in start
                                  if start[k].is_floating_point()])
    # The contrast: bf16 parameters and moments with no master copy.
    pure = build_model(dataclasses.replace(model.cfg, params_dtype="bfloat16"), init_weights=False)
    copy_start(pure)
    BPOTrainer(cfg, policy=pure, engine=fp32.engine, template=tmpl, rt=rt).update(mbs)
    moved_pure = sum(int((p.detach().float() != start[k].to(torch.bfloat16).float()).sum())
                     for k, p in pure.named_parameters())
    d32, d16 = deltas["fp32"], deltas["bf16"]
    moved32, moved16 = int((d32 != 0).sum()), int((d16 != 0).sum())
    assert moved32 > 0.5 * d32.numel()
    assert moved16 >= 0.95 * moved32, (moved16, moved32, d32.numel())
    assert moved_pure < 0.2 * moved32, (moved_pure, moved32)
    both = (d32 != 0) & (d16 != 0)
    agree = float((torch.sign(d32[both]) == torch.sign(d16[both])).float().mean())
    cos = float(torch.nn.functional.cosine_similarity(d32, d16, dim=0))
    print(f"\nmoved: fp32 {moved32}/{d32.numel()}, bf16 compute {moved16}, pure bf16 "
          f"{moved_pure}; sign agreement "
          f"{agree:.4f}; cosine {cos:.4f}")
    assert agree >= 0.9 and cos >= 0.9, (agree, cos)
    # Each element moves by at most ~lr on AdamW's first step, in both runs.
    assert float(d16.abs().max()) <= 1.5e-6 and float(d32.abs().max()) <= 1.5e-6


def _tied(batch, tied_groups):
    """``batch`` with every rollout of ``tied_groups`` rewarded 1 and the others 0 / 1 by mode."""
    out = []
    for s in batch:
        r = 1.0 if s.group in tied_groups else float(s.mode == 1)
        out.append(dataclasses.replace(s, reward=r))
    return out


@pytest.mark.parametrize("bonus", [0.0, 0.5])
def test_tie_bonus_moves_only_routing_tokens_of_tied_groups_towards_no_think(rt, bonus):
    model, tmpl, tok, items, cfg = _parts(routing="token", tie_bonus=bonus)
    trainer = BPOTrainer(cfg, policy=model, engine=build_engine(model, tmpl, tok, max_seqlen=256),
                         template=tmpl, rt=rt)
    gen = torch.Generator().manual_seed(3)
    batch = trainer.rollout(items, 0, gen)
    groups = sorted({s.group for s in batch})
    batch = _tied(batch, set(groups[:2]))  # two tied groups, two where thinking wins
    ga, keep = trainer.advantages(batch)
    b = trainer.tie_bonus(batch, ga)
    want = [(bonus if s.mode == 0 else -bonus) if s.group in groups[:2] else 0.0 for s in batch]
    assert b.tolist() == pytest.approx(want)
    weights = trainer.loss_weights(batch, keep)
    mbs, _ = trainer.microbatches(batch, ga.advantages, weights, keep, b)
    plain, _ = trainer.microbatches(batch, ga.advantages, weights, keep)
    n_routing = 0
    for mb, ref in zip(mbs, plain):
        r = mb.routing_rows
        n_routing += int(r.sum())
        assert torch.equal(mb.advantages[~r], ref.advantages[~r]), "non-routing rows changed"
        delta = (mb.advantages - ref.advantages)[r]
        assert set(delta.abs().tolist()) <= {0.0, bonus}
    assert n_routing == len(batch)

    # Only the tied groups: with the bonus one step raises log pi(no-think routing token) and
    # lowers log pi(think routing token); without it a batch of ties leaves the weights alone.
    only_ties = [s for s in batch if s.group in groups[:2]]
    ga, keep = trainer.advantages(only_ties)
    mbs, _ = trainer.microbatches(only_ties, ga.advantages, trainer.loss_weights(only_ties, keep),
                                  keep, trainer.tie_bonus(only_ties, ga))
    trainer.score_old_and_ref(mbs)
    before = [p.detach().clone() for p in model.parameters()]
    trainer.update(mbs)
    if bonus == 0:
        assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
        return
    for mb in mbs:
        new = trainer._logprobs(model, mb)
        r = mb.routing_rows
        up = (new - mb.old_lp)[r]
        no_think = (mb.modes[r] == 0)
        assert (up[no_think] > 0).all() and (up[~no_think] < 0).all(), up


def test_tie_bonus_needs_token_routing_and_resolves_its_default():
    assert RLConfig().effective_tie_bonus == 0.1
    assert RLConfig(algo="grpo").effective_tie_bonus == 0.0
    assert RLConfig(routing="prompt").effective_tie_bonus == 0.0
    assert RLConfig(filter_zero_variance=True).effective_tie_bonus == 0.0
    assert RLConfig(tie_bonus=0.0, routing="prompt").effective_tie_bonus == 0.0
    for kw, field in (({"algo": "grpo"}, "'grpo'"), ({"routing": "prompt"}, "'prompt'"),
                      ({"filter_zero_variance": True}, "True")):
        with pytest.raises(ValueError, match=r"rl\.tie_bonus = 0\.3 needs .*" + field):
            RLConfig(tie_bonus=0.3, **kw)
    with pytest.raises(ValueError, match="rl.tie_bonus"):
        RLConfig(tie_bonus=-1.0)
    from r4b.config import parse_cli
    job = parse_cli(BPOJob, ["--rl.algo", "grpo"])  # the default (None) survives overrides
    assert job.rl.tie_bonus is None and job.rl.effective_tie_bonus == 0.0
