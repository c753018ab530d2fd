"""The main job: ``torchrun --nproc-per-node N -m r4b.pretrain_bpo``.

With no arguments: the tiny preset on the embedded visual-arithmetic task — reuse the
annealed checkpoint in ``<out_dir>/anneal`` or run annealing (``r4b.anneal``), then BPO, then
the evaluation report (``<out_dir>/report``: ``report.json``, ``report.md``, think-rate and
accuracy plots over training steps).  Rerunning the same command resumes from the latest
checkpoint.  ``--rl.algo grpo`` runs the plain-GRPO ablation; ``--rl.routing prompt`` the
paper's routing; ``--help`` lists every option.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from .anneal import AnnealConfig, AnnealJob, anneal_budget, anneal_items, run_anneal
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .components import (Setup, build_engine, build_trainable, engine_max_seqlen, make_template,
                         make_tokenizer, model_config, preflight, prompt_budget)
from .data import ReaderConfig
from .config import parse_cli, require_range
from .evaluate import EvalConfig, evaluate, log_report
from .log import MetricsWriter, get_logger, progress, setup_logging
from .report import write_report
from .rl.bpo import BPOTrainer, frozen_copy
from .rl.config import RLConfig
from .runtime import Runtime, init_runtime, run_entry
from .rundir import JobChanged, check_resume, check_reused, lock_run_dir, write_job_record
from .sft import batch_indices

log = get_logger(__name__)

DEGENERATE_STEPS = 3
"""Warn after this many consecutive steps in which every group had zero reward variance."""


@dataclass(kw_only=True)
class BPOJob:
    """``torchrun -m r4b.pretrain_bpo``: annealing (reused or run), BPO, evaluation."""

    setup: Setup = field(default_factory=Setup)
    """Model, task, seed and tensor-parallel size."""
    anneal: AnnealConfig = field(default_factory=AnnealConfig)
    """Stage one (used when no annealed checkpoint exists yet)."""
    rl: RLConfig = field(default_factory=RLConfig)
    """Stage two: BPO / GRPO."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Final evaluation (the eval split of the task)."""
    steps: int = 60
    """BPO optimizer steps (rollout batches)."""
    eval_every: int = 20
    """Evaluate on ``eval_items_during`` items every this many steps (history for the plots)."""
    eval_items_during: int = 100
    """Eval items used for the history points during training."""
    ckpt_every: int = 20
    """Checkpoint every this many steps."""
    out_dir: str = "runs/bpo"
    """Run directory: checkpoints, metrics (JSON lines + TensorBoard), report."""
    anneal_dir: str | None = None
    """Annealing run to reuse or create (default ``<out_dir>/anneal``)."""
    data: str | None = None
    """JSON Lines / Parquet data file; None uses the embedded task."""
    reader: ReaderConfig = field(default_factory=ReaderConfig)
    """How the data file is read: limits, skipping bad rows, image paths."""
    tensorboard: bool = True
    """Also write TensorBoard scalars to ``<out_dir>/tb`` (needs the tensorboard package)."""
    resume_changed: tuple[str, ...] = ()
    """Options a resume may change from the run's first start (names or dotted prefixes, e.g.
    ``steps eval``); only those of :data:`r4b.rundir.SAFE_CHANGES` can be named.  Without
    them a resume whose options differ from ``job.json``'s stops, listing each difference."""

    def __post_init__(self):
        require_range("steps", self.steps, 0)
        require_range("eval_every", self.eval_every, 1)
        require_range("eval_items_during", self.eval_items_during, 1)
        require_range("ckpt_every", self.ckpt_every, 1)
        if not isinstance(self.tensorboard, bool):
            raise TypeError(f"tensorboard must be true or false, got {self.tensorboard!r}")
        if self.data is not None and not Path(self.data).is_file():
            raise ValueError(f"data {self.data!r} is not a file")
        for name in ("out_dir", "anneal_dir"):
            require_dir_path(name, getattr(self, name))


def require_dir_path(name: str, value: str | None) -> None:
    """``ValueError`` naming the option when ``value`` exists and is not a directory."""
    if value is not None and Path(value).exists() and not Path(value).is_dir():
        raise ValueError(f"{name} {value!r} is a file; expected a run directory (a folder, "
                         f"created when missing)")


def anneal_job_of(job: BPOJob) -> AnnealJob:
    return AnnealJob(setup=job.setup, anneal=job.anneal, eval=job.eval, data=job.data,
                     reader=job.reader, resume_changed=job.resume_changed,
                     out_dir=job.anneal_dir or str(Path(job.out_dir) / "anneal"))


def annealed_model(job: BPOJob, rt: Runtime):
    """The annealed model on ``rt.device``: loaded from a finished annealing run, else trained
    now (from ``setup.model.hf_path`` when given)."""
    aj = anneal_job_of(job)
    ck = latest_checkpoint(Path(aj.out_dir) / "ckpt")
    if ck is not None and json.loads((ck / "meta.json").read_text())["state"]["anneal"]["phase"] == "done":
        check_reused(aj.out_dir, aj, rt, what="annealing run")
        tok = make_tokenizer(job.setup.model)
        cfg = model_config(job.setup.model, tok, job.setup.task, tp_size=job.setup.tp_size)
        model = build_trainable(cfg, rt, job.setup.training)
        with rt.phase("checkpoint"):
            load_checkpoint(ck, model=model, restore_rng_state=False)
        log.info("reusing annealed model from %s", ck)
        return model
    return run_anneal(aj, rt).model


def bpo_budget(job: BPOJob) -> int:
    """The largest response budget of the BPO stage (rollouts and evaluation)."""
    rl, ev = job.rl, job.eval
    return max(rl.max_new_tokens_think, rl.max_new_tokens_no_think, rl.max_new_tokens_auto,
               ev.max_new_tokens_think, ev.max_new_tokens_no_think, ev.max_new_tokens_auto)


def bpo_items(job: BPOJob, template, cfg):
    """(train, eval) items of the BPO stage, checked against its limits (the dry pass runs
    before annealing, so a bad row or a budget over the engine's limit fails in seconds)."""
    train, evals = anneal_items(anneal_job_of(job))
    skip = job.reader.skip_bad_rows
    budget = max(bpo_budget(job), anneal_budget(anneal_job_of(job)))
    train = preflight(job.setup, template, cfg, train, largest_budget=budget, skip_bad=skip,
                      what="training items")
    evals = preflight(job.setup, template, cfg, evals, largest_budget=budget, skip_bad=skip,
                      what="eval items")
    if job.rl.levels is not None:
        train = [it for it in train if it.level in job.rl.levels]
        if not train:
            raise ValueError(f"rl.levels {job.rl.levels} leaves no training item")
    return train, evals


def bpo_engine(job: BPOJob, policy, template, tok, items):
    """The rollout engine of the BPO stage, sized for its rollouts and evaluation."""
    budget = bpo_budget(job)
    max_seqlen = engine_max_seqlen(job.setup.rollout, policy.cfg,
                                   longest_prompt=prompt_budget(items, template),
                                   largest_budget=budget)
    return build_engine(policy, template, tok, max_seqlen=max_seqlen, rollout=job.setup.rollout)


def run_bpo(job: BPOJob, rt: Runtime) -> dict:
    """Stage two plus the final report (holding ``job.out_dir`` for this job); returns the
    report."""
    with lock_run_dir(job.out_dir, rt):
        return _run_bpo(job, rt)


def _run_bpo(job: BPOJob, rt: Runtime) -> dict:
    t0 = time.perf_counter()
    out = Path(job.out_dir)
    ckpt_dir = out / "ckpt"
    record = check_resume(out, job, rt, resuming=latest_checkpoint(ckpt_dir) is not None,
                          what="BPO run")
    setup, cfg = job.setup, job.rl
    tok = make_tokenizer(setup.model)
    mcfg = model_config(setup.model, tok, setup.task, tp_size=setup.tp_size)
    template = make_template(tok, mcfg, setup.model)
    train, evals = bpo_items(job, template, mcfg)
    policy = annealed_model(job, rt)
    ref = None
    if cfg.kl_coef > 0:
        ref = frozen_copy(policy)
    engine = bpo_engine(job, policy, template, tok, train + evals)
    trainer = BPOTrainer(cfg, policy=policy, engine=engine, template=template, rt=rt, ref_model=ref)
    history: list[dict] = []
    start = 0
    if latest_checkpoint(ckpt_dir) is not None:
        with rt.phase("checkpoint"):
            loaded = load_checkpoint(ckpt_dir, model=policy, optimizer=trainer.opt)
        start = loaded.step
        if start > job.steps:
            raise JobChanged(f"steps {job.steps} is below the step of {loaded.path} ({start}): "
                             f"the run is past it (choose steps >= {start}, or evaluate that "
                             f"checkpoint with r4b.evaluate)")
        history = loaded.state.get("history", [])
        trainer.skipped_steps = loaded.state.get("skipped_steps", 0)
        log.info("resuming BPO from %s (step %d)", loaded.path, start)
    write_job_record(out, record, rt)  # every check passed: the run is this job
    tb = str(out / "tb") if job.tensorboard else None
    metrics = MetricsWriter(out / "metrics.jsonl", tensorboard_dir=tb, truncate_after_step=start)
    during = dataclasses.replace(job.eval, n_items=min(job.eval_items_during, len(evals)))
    if start == 0 and not history:
        history.append({"step": 0, "report": evaluate(engine, template, evals[:during.n_items],
                                                      during, rt=rt,
                                                      seed=setup.seed)})
    if cfg.prompts_per_step > len(train) and start < job.steps:
        log.warning("rl.prompts_per_step is %d but the training set has %d items: each step "
                    "uses all %d prompts (%d rollouts instead of %d)", cfg.prompts_per_step,
                    len(train), len(train), len(train) * 2 * cfg.group_size,
                    cfg.prompts_per_step * 2 * cfg.group_size)
    degenerate = 0  # consecutive steps whose groups all had zero reward variance
    bar = progress(total=job.steps, initial=start, desc=f"{cfg.algo}")
    for step in range(start, job.steps):
        items = [train[i] for i in batch_indices(len(train), cfg.prompts_per_step, step, setup.seed + 7)]
        gen = torch.Generator(device="cpu").manual_seed(
            setup.seed * 1_000_003 + step * 101 + rt.dp_rank)
        m = trainer.step(items, step, gen)
        done = step + 1
        if done % job.eval_every == 0 or done == job.steps:
            rep = evaluate(engine, template, evals[:during.n_items], during, seed=setup.seed, rt=rt)
            history.append({"step": done, "report": rep})
            for lv, v in rep.get("auto", {}).items():
                m[f"eval/auto/L{lv}/think_rate"] = v["think_rate"]
                m[f"eval/auto/L{lv}/accuracy"] = v["accuracy"]
        metrics.write(done, **m)
        degenerate = degenerate + 1 if m.get("groups") and \
            m.get("zero_variance_groups") == m["groups"] else 0
        if degenerate and degenerate % DEGENERATE_STEPS == 0:
            log.warning("step %d: every group had the same reward for all its rollouts (zero "
                        "variance) in the last %d steps (reward %.3f): every advantage is 0, so only "
                        "the tie bonus (rl.tie_bonus %s) and the KL / entropy terms move the "
                        "model; the task may be too hard or too easy for it", done, degenerate,
                        m["reward"], cfg.tie_bonus)
        bar.update(1)
        bar.set_postfix(reward=f"{m['reward']:.2f}",
                        think=f"{m.get('auto/think_rate', m.get('think/reward', 0)):.2f}")
        if done % job.ckpt_every == 0 or done == job.steps:
            with rt.phase("checkpoint"):
                path = save_checkpoint(ckpt_dir, done, model=policy, optimizer=trainer.opt,
                                       state={"history": history,
                                              "skipped_steps": trainer.skipped_steps})
            if rt.is_main:
                write_history(out, history, step=done, checkpoint=path)
    bar.close()
    metrics.close()
    ck = latest_checkpoint(ckpt_dir)
    step = start if ck is None else json.loads((ck / "meta.json").read_text())["step"]
    source = {"stage": cfg.algo, "step": step,
              "checkpoint": str(ck) if ck is not None else "the annealed model"}
    report = evaluate(engine, template, evals, job.eval, seed=setup.seed, rt=rt)
    if rt.is_main:
        write_report(report, out / "report", history=history, source=source,
                     title=f"r4b {cfg.algo} evaluation after {step} steps")
        write_history(out, history, step=step, checkpoint=ck)
    log_report(report, f"after {step} {cfg.algo} steps ({source['checkpoint']}; eval split)")
    log.info("main job done in %.1f s; report in %s", time.perf_counter() - t0, out / "report")
    return report


def write_history(out: Path, history: list[dict], *, step: int, checkpoint) -> None:
    """``history.json`` (atomically): the evaluations during training up to ``step``, and the
    checkpoint they belong to."""
    tmp = out / ".history.json.tmp"
    tmp.write_text(json.dumps({"step": step, "checkpoint": None if checkpoint is None
                               else str(checkpoint), "history": history}) + "\n")
    tmp.replace(out / "history.json")


def main(argv: Sequence[str] | None = None) -> int:
    setup_logging()
    job = parse_cli(BPOJob, argv, prog="torchrun --nproc-per-node N -m r4b.pretrain_bpo",
                    description="R-4B stage two: Bi-mode Policy Optimization (with annealing first "
                                "when no annealed checkpoint exists), then the evaluation report.")
    rt = init_runtime(job.setup.tp_size, timeouts=job.setup.timeouts())
    code = run_entry(run_bpo, job, rt)
    if torch.distributed.is_initialized() and code == 0:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
