"""Bi-mode annealing (stage one of R-4B): ``python -m r4b.anneal`` (also under torchrun).

With no arguments it runs the embedded default end to end:

1. generate the visual-arithmetic task (train and eval splits, disjoint by content);
1b. **align the vision tower** (embedded task only): tower and projector learn to put the
   digit of each image cell into its image token, read through the language model's frozen
   output embedding — a stand-in for the pretrained, LLaVA-aligned SigLIP that R-4B starts
   from (trained from scratch through the language model alone, the tiny tower does not learn
   to read in the time budget);
2. **warm up** the tiny model on both answer forms of every item, each under its forced
   prefix (a stand-in for the pretrained base model the paper starts from: it learns to read
   the digits and both forms, but not yet which mode to pick);
3. **curate** with the paper's heuristics: for each verifiable item sample N (default 8)
   direct answers with the rollout engine — if all N are wrong the item becomes a *thinking*
   sample, else a *non-thinking* one; open-ended items go through a pluggable judge;
4. **anneal**: SFT on the curated mix with the *auto* prompt (the model learns to pick the
   mode), plus a share of items in the opposite form with that form's forced prefix as prompt
   (so both forced modes stay usable on every kind of item);
5. print per-mode accuracy by difficulty level and write ``report.json`` / ``report.md``.

Checkpoints (safetensors, atomic) are written every ``ckpt_every`` steps and at phase ends;
rerunning the same command resumes exactly where it stopped.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol, Sequence

import numpy as np
import torch

from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .components import (Setup, build_engine, build_policy, engine_max_seqlen, load_items,
                         make_template, make_tokenizer, model_config, preflight, prompt_budget)
from .config import parse_cli, require_choice, require_range
from .data import ReaderConfig, Sample
from .evaluate import EvalConfig, evaluate, log_report
from .log import MetricsWriter, get_logger, setup_logging
from .report import write_report
from .rewards import verify
from .rollout.engine import EmbeddedEngine, RolloutRequest
from .rollout.sampling import SamplingParams
from .runtime import Runtime, broadcast_object, init_runtime, run_entry
from .rundir import check_resume, lock_run_dir, write_job_record
from .sft import Example, OptimConfig, make_optimizer, train_sft
from .training import shard_model

log = get_logger(__name__)


class Judge(Protocol):
    """Decides whether an open-ended (non-verifiable) query needs reasoning."""

    def __call__(self, sample: Sample) -> bool: ...


def reference_reasoning_judge(sample: Sample) -> bool:
    """Default judge for open-ended items: needs reasoning iff the row carries a non-empty
    reference reasoning.  Plug a model-based judge in through :func:`curate` for real data."""
    return bool(sample.reasoning and sample.reasoning.strip())


@dataclass(kw_only=True)
class AnnealConfig:
    """Stage one: warm-up, curation, annealing."""

    n_train_items: int = 4000
    """Training items generated from the embedded task (ignored with ``data``)."""
    vision_align_steps: int = 200
    """Steps aligning the vision tower + projector to the digit tokens (embedded task with
    images only; 0 skips it)."""
    warmup_steps: int = 300
    """SFT steps of the warm-up before curation (0 skips the warm-up)."""
    warmup_forms: Literal["both", "direct"] = "both"
    """Warm-up data: every item in both forms under their forced prefixes ('both'), or direct
    answers only ('direct')."""
    anneal_steps: int = 500
    """SFT steps on the curated bi-mode mix."""
    batch_size: int = 64
    """Sequences per optimizer step (global, across data-parallel ranks)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and learning-rate schedule (each phase runs its own cosine schedule)."""
    curate_items: int = 1200
    """Items curated (the annealing set's size)."""
    curation_samples: int = 8
    """N: direct answers sampled per verifiable item; all N wrong → thinking sample."""
    curation_temperature: float = 1.0
    """Sampling temperature of the curation rollouts."""
    curation_max_new_tokens: int = 24
    """Response budget of each curation rollout (direct answers, forced non-thinking)."""
    forced_mode_fraction: float = 0.5
    """Share of curated items that also get an example in the other form, with that form's
    forced prefix as prompt (keeps forced thinking / non-thinking usable on every level)."""
    tokens_per_microbatch: int = 4096
    """Token budget of one packed micro-batch."""
    share_prefix: bool = True
    """Pack the examples of one item that are in the same batch (its answer forms under their
    forced prefixes) as one unit: their common prompt and the images once, then each example's
    rest; the loss and gradients are those of one sequence per example (to rounding).  Logged
    as ``pack/tokens`` vs ``pack/dense_tokens``.  False: one sequence per example."""
    ckpt_every: int = 100
    """Checkpoint every this many optimizer steps (and at every phase end)."""

    def __post_init__(self):
        require_range("anneal.n_train_items", self.n_train_items, 1)
        require_range("anneal.vision_align_steps", self.vision_align_steps, 0)
        require_range("anneal.warmup_steps", self.warmup_steps, 0)
        require_choice("anneal.warmup_forms", self.warmup_forms, ("both", "direct"))
        require_range("anneal.anneal_steps", self.anneal_steps, 1)
        require_range("anneal.batch_size", self.batch_size, 1)
        require_range("anneal.curate_items", self.curate_items, 1)
        require_range("anneal.curation_samples", self.curation_samples, 1)
        require_range("anneal.curation_temperature", self.curation_temperature, 0.0, lo_open=True)
        require_range("anneal.curation_max_new_tokens", self.curation_max_new_tokens, 1)
        require_range("anneal.forced_mode_fraction", self.forced_mode_fraction, 0.0, 1.0)
        require_range("anneal.tokens_per_microbatch", self.tokens_per_microbatch, 16)
        require_range("anneal.ckpt_every", self.ckpt_every, 1)


@dataclass(kw_only=True)
class AnnealJob:
    """``python -m r4b.anneal``: bi-mode annealing on the embedded task or a data file."""

    setup: Setup = field(default_factory=Setup)
    """Model, task, seed and tensor-parallel size."""
    anneal: AnnealConfig = field(default_factory=AnnealConfig)
    """Warm-up, curation and annealing."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation after annealing."""
    data: str | None = None
    """JSON Lines / Parquet file of ``{images, question, answer, reasoning?, topic?,
    verifiable?}`` rows; None uses the embedded task."""
    reader: ReaderConfig = field(default_factory=ReaderConfig)
    """How the data file is read: limits, skipping bad rows, image paths."""
    out_dir: str = "runs/anneal"
    """Run directory: checkpoints, curated set, metrics, report."""
    resume_changed: tuple[str, ...] = ()
    """Options a resume may change from the run's first start (names or dotted prefixes);
    only those of :data:`r4b.rundir.SAFE_CHANGES` can be named."""

    def __post_init__(self):
        if self.data is not None and not Path(self.data).is_file():
            raise ValueError(f"data {self.data!r} is not a file")
        if Path(self.out_dir).exists() and not Path(self.out_dir).is_dir():
            raise ValueError(f"out_dir {self.out_dir!r} is a file; expected a run directory "
                             f"(a folder, created when missing)")


# ---------------------------------------------------------------- vision alignment
def cell_token_labels(items: Sequence[Sample], tokenizer, tokens_per_image: int) -> torch.Tensor | None:
    """Token id of the digit each image token shows ``[N, tokens_per_image]``, for embedded-task
    items whose tiles have one patch per digit cell; None when that layout does not hold."""
    digits = [it.meta.get("digits") for it in items]
    if not items or any(d is None or len(d) != tokens_per_image or not it.images
                        for d, it in zip(digits, items)):
        return None
    ids = [tokenizer.encode(str(d)) for d in range(10)]
    if any(len(i) != 1 for i in ids):
        return None
    table = torch.tensor([i[0] for i in ids], device="cpu")
    return table[torch.tensor(digits, device="cpu")]


def align_vision(model, items: Sequence[Sample], labels: torch.Tensor, *, steps: int,
                 batch_size: int, lr: float, seed: int) -> float:
    """Train tower + projector so that ``lm_head(projector(tower(image)))`` names each cell's
    digit (the LM head is frozen).  Deterministic; every rank runs the same steps, so no
    communication is needed.  Returns the last loss."""
    params = list(model.vision_tower.parameters()) + list(model.projector.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    head = model.lm_head_weight().detach()
    dev = head.device
    images = torch.from_numpy(np.stack([it.images[0] for it in items])).to(dev)
    labels = labels.to(dev)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    loss = torch.zeros((), device=dev)
    for _ in range(steps):
        idx = torch.randint(0, len(items), (batch_size,), generator=gen, device="cpu").to(dev)
        feats = model.projector(model.vision_tower(images[idx]))
        logits = (feats @ head.T).float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 labels[idx].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    for p in params:
        p.grad = None
    return float(loss.detach())


# ---------------------------------------------------------------- curation
def curate(items: Sequence[Sample], engine: EmbeddedEngine, template, *, n_samples: int,
           temperature: float, seed: int, judge: Judge = reference_reasoning_judge,
           batch_size: int = 512, max_new_tokens: int = 24) -> tuple[list[bool], dict]:
    """The paper's heuristics: ``needs_thinking[i]`` per item, plus statistics.

    Verifiable items: sample ``n_samples`` direct answers (forced non-thinking prompt); all
    wrong → thinking.  Open-ended items: ``judge(item)``.
    """
    needs = [False] * len(items)
    verif = [i for i, it in enumerate(items) if it.verifiable]
    for i, it in enumerate(items):
        if not it.verifiable:
            needs[i] = bool(judge(it))
    reqs = [RolloutRequest(prompt_ids=template.item_prompt_ids(items[i], "no_think"),
                           mode="no_think", uid=i, images=list(items[i].images) or None)
            for i in verif for _ in range(n_samples)]
    params = SamplingParams(temperature=temperature, max_new_tokens_no_think=max_new_tokens)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    n_right = {i: 0 for i in verif}
    for s in range(0, len(reqs), batch_size):
        for r in engine.generate(reqs[s:s + batch_size], params, gen):
            i = r.request.uid
            text = template.assistant_text_of(r.response_ids, "no_think")
            n_right[i] += int(r.finished and verify(text, items[i].answer) == 1.0)
    for i in verif:
        needs[i] = n_right[i] == 0
    stats: dict = {"n_items": len(items), "thinking_fraction": float(np.mean(needs)) if needs else 0.0,
                   "per_level": {}, "per_topic": {}}
    for key, name in (("level", "per_level"), ("topic", "per_topic")):
        vals = sorted({getattr(it, key) for it in items}, key=str)
        for v in vals:
            sel = [needs[i] for i, it in enumerate(items) if getattr(it, key) == v]
            stats[name][str(v)] = {"n": len(sel), "thinking_fraction": float(np.mean(sel))}
    return needs, stats


def thinking_mismatch(items: Sequence[Sample], needs: Sequence[bool]) -> str | None:
    """Why the curated thinking fraction differs from the one the annealing set trains on, or
    None: items curated as needing thinking but without a reference ``reasoning`` are trained
    as direct answers (:func:`annealing_examples`)."""
    n_need = sum(bool(x) for x in needs)
    missing = sum(1 for it, x in zip(items, needs)
                  if x and not (it.reasoning and it.reasoning.strip()))
    if not missing:
        return None
    n = max(1, len(items))
    return (f"curation marks {n_need} of {len(items)} items as needing thinking (fraction "
            f"{n_need / n:.3f}), but {missing} of them have no reference reasoning and are "
            f"trained as direct answers: the annealing set thinks on {(n_need - missing) / n:.3f} "
            f"of the items; give those rows a 'reasoning' field for the mix curation asked for")


def annealing_examples(items: Sequence[Sample], needs: Sequence[bool], template, *,
                       forced_mode_fraction: float, seed: int) -> list[Example]:
    """The bi-mode SFT set: each item in its curated form under the auto prompt, plus a
    ``forced_mode_fraction`` share in the other form under that form's forced prompt."""
    rng = np.random.default_rng([seed, 17])
    out = []
    for it, think in zip(items, needs):
        has_r = bool(it.reasoning and it.reasoning.strip())
        form = "think" if (think and has_r) else "no_think"
        ex = template.item_sft_example(it, it.reasoning if form == "think" else None)
        out.append(Example(ex.input_ids, ex.prompt_len, list(it.images), int(form == "think"),
                           item=it.uid))
        other = "no_think" if form == "think" else "think"
        if rng.random() < forced_mode_fraction and (other == "no_think" or has_r):
            ex = template.item_sft_example(it, it.reasoning if other == "think" else None,
                                           prompt_mode=other)
            out.append(Example(ex.input_ids, ex.prompt_len, list(it.images), int(other == "think"),
                               item=it.uid))
    return out


def direct_examples(items: Sequence[Sample], template, *, both_forms: bool = False) -> list[Example]:
    """Warm-up set: direct answers under the forced non-thinking prompt, and with
    ``both_forms`` also thinking answers under the forced thinking prompt (items with a
    reference reasoning).  Forced prompts keep the routing token out of the loss."""
    out = []
    for it in items:
        ex = template.item_sft_example(it, None, prompt_mode="no_think")
        out.append(Example(ex.input_ids, ex.prompt_len, list(it.images), 0, item=it.uid))
        if both_forms and it.reasoning and it.reasoning.strip():
            ex = template.item_sft_example(it, it.reasoning, prompt_mode="think")
            out.append(Example(ex.input_ids, ex.prompt_len, list(it.images), 1, item=it.uid))
    return out


# ---------------------------------------------------------------- the stage
@dataclass
class AnnealResult:
    model: torch.nn.Module
    report: dict
    curation: dict
    seconds: float


def anneal_items(job: AnnealJob) -> tuple[list[Sample], list[Sample]]:
    """(train, eval) items of an annealing job."""
    return load_items(job.setup, job.data, n_train=job.anneal.n_train_items,
                      n_eval=job.eval.n_items, reader=job.reader, eval_data=job.eval.data)


def anneal_budget(job: AnnealJob) -> int:
    """The largest response budget of the annealing stage (curation and evaluation)."""
    ev = job.eval
    return max(job.anneal.curation_max_new_tokens, ev.max_new_tokens_think,
               ev.max_new_tokens_no_think, ev.max_new_tokens_auto)


def anneal_engine(job: AnnealJob, model, template, tokenizer, items: Sequence[Sample]):
    """The rollout engine of the annealing stage, sized for curation and evaluation."""
    budget = anneal_budget(job)
    max_seqlen = engine_max_seqlen(job.setup.rollout, model.cfg,
                                   longest_prompt=prompt_budget(items, template),
                                   largest_budget=budget)
    return build_engine(model, template, tokenizer, max_seqlen=max_seqlen,
                        rollout=job.setup.rollout)


def run_anneal(job: AnnealJob, rt: Runtime, *, judge: Judge = reference_reasoning_judge) -> AnnealResult:
    """Run (or resume) the whole annealing stage, holding ``job.out_dir`` for this job;
    returns the annealed model and its report."""
    with lock_run_dir(job.out_dir, rt):
        return _run_anneal(job, rt, judge)


def _run_anneal(job: AnnealJob, rt: Runtime, judge: Judge) -> AnnealResult:
    t_start = time.perf_counter()
    cfg, setup = job.anneal, job.setup
    out = Path(job.out_dir)
    ckpt_dir = out / "ckpt"
    record = check_resume(out, job, rt, resuming=latest_checkpoint(ckpt_dir) is not None,
                          what="annealing run")
    tok = make_tokenizer(setup.model)
    mcfg = model_config(setup.model, tok, setup.task, tp_size=setup.tp_size)
    template = make_template(tok, mcfg, setup.model)
    train, evals = anneal_items(job)
    skip = job.reader.skip_bad_rows
    train = preflight(setup, template, mcfg, train, largest_budget=anneal_budget(job),
                      skip_bad=skip, what="training items")
    evals = preflight(setup, template, mcfg, evals, largest_budget=anneal_budget(job),
                      skip_bad=skip, what="eval items")
    model = build_policy(setup.model, mcfg, rt, seed=setup.seed)
    resume = latest_checkpoint(ckpt_dir) is not None
    # 1. vision alignment (before the first SFT step only; every rank runs the same steps on
    # its full copy of the tower, before the model is sharded)
    if not resume and cfg.vision_align_steps and getattr(model, "has_vision", False):
        labels = cell_token_labels(train, tok, mcfg.tokens_per_image)
        if labels is None:
            log.info("vision alignment skipped: items carry no per-cell digit labels")
        else:
            loss = align_vision(model, train, labels, steps=cfg.vision_align_steps,
                                batch_size=cfg.batch_size, lr=cfg.optim.lr, seed=setup.seed + 3)
            log.info("vision alignment: %d steps, final loss %.4f", cfg.vision_align_steps, loss)
    shard_model(model, rt, setup.training)
    engine = anneal_engine(job, model, template, tok, train[:cfg.curate_items] + evals)
    optimizer = make_optimizer(model, cfg.optim)
    state = {"phase": "warmup", "step": 0}
    if resume:
        with rt.phase("checkpoint"):
            loaded = load_checkpoint(ckpt_dir, model=model, optimizer=optimizer)
        state = loaded.state["anneal"]
        log.info("resuming annealing from %s (phase %s, step %d)", loaded.path, state["phase"],
                 state["step"])
    write_job_record(out, record, rt)  # every check passed: the run is this job
    metrics = MetricsWriter(out / "metrics.jsonl", truncate_after_step=_global_step(state, cfg))

    def saver(phase):
        def on_step(step, m):
            metrics.write(_global_step({"phase": phase, "step": step}, cfg), phase=phase, **m)
            if step % cfg.ckpt_every == 0:
                with rt.phase("checkpoint"):
                    save_checkpoint(ckpt_dir, _global_step({"phase": phase, "step": step}, cfg),
                                    model=model, optimizer=optimizer,
                                    state={"anneal": {"phase": phase, "step": step}})
        return on_step

    # 1b. warm-up
    if state["phase"] == "warmup":
        if cfg.warmup_steps:
            log.info("warm-up: %d SFT steps (%s forms)", cfg.warmup_steps, cfg.warmup_forms)
            warm = direct_examples(train, template, both_forms=cfg.warmup_forms == "both")
            train_sft(model, optimizer, warm, rt, steps=cfg.warmup_steps,
                      start_step=state["step"], batch_size=cfg.batch_size, optim=cfg.optim,
                      seed=setup.seed, tokens_per_microbatch=cfg.tokens_per_microbatch,
                      on_step=saver("warmup"), progress_desc="warm-up",
                      share_prefix=cfg.share_prefix)
        state = {"phase": "curate", "step": 0}
        optimizer = make_optimizer(model, cfg.optim)  # the anneal phase starts a fresh schedule
        with rt.phase("checkpoint"):
            save_checkpoint(ckpt_dir, _global_step(state, cfg), model=model, optimizer=optimizer,
                            state={"anneal": state})

    # 2. curation (deterministic; its result is stored so a resume reuses it)
    cur_path = out / "curation.json"
    pool = train[:cfg.curate_items]
    if state["phase"] == "curate" or not cur_path.exists():
        log.info("curating %d items with %d direct samples each", len(pool), cfg.curation_samples)
        needs, stats = curate(pool, engine, template, n_samples=cfg.curation_samples,
                              temperature=cfg.curation_temperature, seed=setup.seed + 1,
                              judge=judge, max_new_tokens=cfg.curation_max_new_tokens)
        needs = broadcast_object(needs, rt)  # identical on every rank (DP ranks agree on data)
        if rt.is_main:
            out.mkdir(parents=True, exist_ok=True)
            tmp = cur_path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"needs_thinking": needs, "stats": stats}) + "\n")
            tmp.replace(cur_path)
        state = {"phase": "anneal", "step": 0}
    else:
        saved = json.loads(cur_path.read_text())
        needs, stats = saved["needs_thinking"], saved["stats"]
    log.info("curated thinking fraction %.3f; per level: %s", stats["thinking_fraction"],
             {k: round(v["thinking_fraction"], 3) for k, v in stats["per_level"].items()})
    mismatch = thinking_mismatch(pool, needs)
    if mismatch is not None:
        log.warning("%s", mismatch)

    # 3. annealing on the bi-mode mix
    if state["phase"] == "anneal":
        examples = annealing_examples(pool, needs, template,
                                      forced_mode_fraction=cfg.forced_mode_fraction, seed=setup.seed)
        log.info("annealing: %d SFT steps on %d examples (%.2f thinking)", cfg.anneal_steps,
                 len(examples), float(np.mean([e.mode for e in examples])))
        train_sft(model, optimizer, examples, rt, steps=cfg.anneal_steps, start_step=state["step"],
                  batch_size=cfg.batch_size, optim=cfg.optim, seed=setup.seed + 2,
                  tokens_per_microbatch=cfg.tokens_per_microbatch, on_step=saver("anneal"),
                  progress_desc="anneal", share_prefix=cfg.share_prefix)
        state = {"phase": "done", "step": 0}
        with rt.phase("checkpoint"):
            save_checkpoint(ckpt_dir, _global_step(state, cfg), model=model, optimizer=optimizer,
                            state={"anneal": state})
    metrics.close()

    # 4. evaluation per mode and level
    report = evaluate(engine, template, evals, job.eval, seed=setup.seed, rt=rt)
    if rt.is_main:
        write_report(report, out / "report", title="r4b annealing")
        (out / "curation_stats.json").write_text(json.dumps(stats, indent=1) + "\n")
    log_report(report, "after annealing (eval split)")
    return AnnealResult(model=model, report=report, curation=stats,
                        seconds=time.perf_counter() - t_start)


def _global_step(state: dict, cfg: AnnealConfig) -> int:
    """Monotone step counter across phases (for checkpoints and metrics)."""
    phase, step = state["phase"], state["step"]
    if phase == "warmup":
        return step
    if phase == "curate":
        return cfg.warmup_steps
    if phase == "anneal":
        return cfg.warmup_steps + step
    return cfg.warmup_steps + cfg.anneal_steps + 1


def main(argv: Sequence[str] | None = None) -> int:
    setup_logging()
    job = parse_cli(AnnealJob, argv, prog="python -m r4b.anneal",
                    description="Bi-mode annealing (R-4B stage one).")
    rt = init_runtime(job.setup.tp_size, timeouts=job.setup.timeouts())

    def run(job, rt):
        res = run_anneal(job, rt)
        log.info("annealing done in %.1f s", res.seconds)

    return run_entry(run, job, rt)


if __name__ == "__main__":
    sys.exit(main())
