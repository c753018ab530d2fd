"""Evaluation per mode and difficulty level: ``python -m r4b.evaluate --checkpoint DIR``.

For each mode (auto, think, no_think) and level: accuracy (rule-based verifier), mean
response tokens, and — in auto mode — the think rate.  Writes ``report.json`` (mode → level
→ ``accuracy``, ``mean_tokens``, ``think_rate``), ``report.md`` and, when the run directory
holds the training history (``eval_history.jsonl``), PNG plots of think rate and accuracy
per level over training steps.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .config import parse_cli, require_range
from .log import get_logger, setup_logging
from .report import summarize, write_report
from .rewards import verify
from .rollout.engine import EmbeddedEngine, RolloutRequest
from .rollout.sampling import SamplingParams

log = get_logger(__name__)

EVAL_MODES = ("auto", "think", "no_think")


@dataclass(kw_only=True)
class EvalConfig:
    """What to evaluate and how to decode."""

    n_items: int = 200
    """Eval items (the task's eval split: never seen in training)."""
    greedy: bool = True
    """Greedy decoding (True) or sampling at ``temperature``."""
    temperature: float = 1.0
    """Sampling temperature when not greedy."""
    max_new_tokens_think: int = 80
    """Response budget in thinking mode."""
    max_new_tokens_no_think: int = 16
    """Response budget in non-thinking mode."""
    max_new_tokens_auto: int = 80
    """Response budget in auto mode."""
    batch_size: int = 256
    """Requests per engine call."""
    modes: tuple[str, ...] = EVAL_MODES
    """Modes to evaluate."""

    def __post_init__(self):
        require_range("eval.n_items", self.n_items, 1)
        require_range("eval.batch_size", self.batch_size, 1)
        require_range("eval.temperature", self.temperature, 0.0, lo_open=True)
        for m in ("think", "no_think", "auto"):
            require_range(f"eval.max_new_tokens_{m}", getattr(self, f"max_new_tokens_{m}"), 1)
        if not isinstance(self.greedy, bool):
            raise TypeError(f"eval.greedy must be true or false, got {self.greedy!r}")
        self.modes = tuple(self.modes)
        if not self.modes:
            raise ValueError(f"eval.modes must name at least one of {EVAL_MODES}, got ()")
        for m in self.modes:
            if m not in EVAL_MODES:
                raise ValueError(f"eval.modes entries must be in {EVAL_MODES}, got {m!r}")
        if len(set(self.modes)) != len(self.modes):
            raise ValueError(f"eval.modes must not repeat a mode, got {self.modes}")

    def sampling(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, greedy=self.greedy,
                              max_new_tokens_think=self.max_new_tokens_think,
                              max_new_tokens_no_think=self.max_new_tokens_no_think,
                              max_new_tokens_auto=self.max_new_tokens_auto)


def eval_records(engine: EmbeddedEngine, template, items: Sequence, cfg: EvalConfig, *,
                 seed: int = 0) -> list[dict]:
    """One record per (item, mode): ``{mode, level, correct, tokens, thought, well_formed}``."""
    reqs = [RolloutRequest(prompt_ids=template.item_prompt_ids(it, m), mode=m,
                           images=list(it.images) or None, uid=k)
            for m in cfg.modes for k, it in enumerate(items)]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    for s in range(0, len(reqs), cfg.batch_size):
        for r in engine.generate(reqs[s:s + cfg.batch_size], cfg.sampling(), gen):
            it = items[r.request.uid]
            mode = r.request.mode
            parsed = template.parse_response(r.response_ids, mode)
            text = template.assistant_text_of(r.response_ids, mode)
            correct = verify(text, it.answer) if r.finished else 0.0
            out.append({"mode": mode, "level": it.level, "correct": float(correct),
                        "tokens": len(r.response_ids),
                        "thought": float(parsed.mode_chosen == "think"),
                        "well_formed": bool(parsed.well_formed and r.finished)})
    return out


def evaluate(engine: EmbeddedEngine, template, items: Sequence, cfg: EvalConfig, *, seed: int = 0,
             rt=None) -> dict:
    """The report structure (see :func:`r4b.report.summarize`) for ``items``.

    With a :class:`r4b.runtime.Runtime` the items are split across data-parallel ranks and
    the records gathered, so every rank returns the same report (greedy decoding makes the
    split invisible in the numbers)."""
    if rt is None or rt.dp_size == 1:
        return summarize(eval_records(engine, template, items, cfg, seed=seed))
    from .runtime import all_gather_objects

    from .training import full_params

    # One gather of a sharded model for all of this rank's generate calls (their number
    # differs between ranks when the items do not split evenly).
    with rt.phase("rollout"), full_params(engine.model):
        mine = eval_records(engine, template, items[rt.dp_rank::rt.dp_size], cfg, seed=seed)
    return summarize([r for part in all_gather_objects(mine, rt) for r in part])


def log_report(report: dict, title: str) -> None:
    """Print accuracy / tokens / think rate per mode and level at INFO."""
    lines = [title]
    for mode, levels in report.items():
        cells = "  ".join(f"L{lv}: acc {m['accuracy']:.2f} tok {m['mean_tokens']:.0f}"
                          + (f" think {m['think_rate']:.2f}" if mode == "auto" else "")
                          for lv, m in levels.items() if lv != "all")
        lines.append(f"  {mode:9s} {cells}")
    log.info("\n".join(lines))


@dataclass(kw_only=True)
class EvaluateCLI:
    """``python -m r4b.evaluate``: evaluate a checkpoint written by anneal or pretrain_bpo."""

    run_dir: str = "runs/bpo"
    """Run directory of the job (holds ``job.json`` and ``ckpt/``)."""
    out_dir: str | None = None
    """Where to write the report (default: ``<run_dir>/report``)."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation settings."""


def load_run(run_dir: Path, eval_cfg: EvalConfig, rt=None):
    """(engine, template, eval items, history) of the latest checkpoint of a run directory
    written by ``r4b.pretrain_bpo`` or ``r4b.anneal`` (its ``job.json`` says how to rebuild the
    model and the data), with the model on ``rt.device`` (CPU without a runtime)."""
    from .checkpoint import latest_checkpoint, load_checkpoint
    from .components import (Setup, build_engine, engine_max_seqlen, load_items, make_template,
                             make_tokenizer, model_config, prompt_budget)
    from .config import config_from_dict
    from .models import build_model

    job_file = run_dir / "job.json"
    if not job_file.exists():
        raise FileNotFoundError(f"{run_dir} holds no job.json: not a run directory of "
                                f"r4b.pretrain_bpo or r4b.anneal")
    job = json.loads(job_file.read_text())
    setup = config_from_dict(Setup, job["setup"])
    tok = make_tokenizer(setup.model)
    cfg = model_config(setup.model, tok, setup.task, tp_size=setup.tp_size)
    ck = latest_checkpoint(run_dir / "ckpt")
    if ck is None:
        raise FileNotFoundError(f"{run_dir / 'ckpt'} holds no checkpoint to evaluate")
    device = rt.device if rt is not None else torch.device("cpu")
    model = build_model(cfg, init_weights=False, device=device)
    load_checkpoint(ck, model=model, restore_rng_state=False)
    template = make_template(tok, model.cfg, setup.model)
    _, evals = load_items(setup, job.get("data"), n_train=0, n_eval=eval_cfg.n_items)
    hist_path = run_dir / "history.json"
    history = json.loads(hist_path.read_text()) if hist_path.exists() else \
        json.loads((ck / "meta.json").read_text())["state"].get("history")
    budget = max(eval_cfg.max_new_tokens_think, eval_cfg.max_new_tokens_no_think,
                 eval_cfg.max_new_tokens_auto)
    max_seqlen = engine_max_seqlen(setup.rollout, model.cfg,
                                   longest_prompt=prompt_budget(evals, template),
                                   largest_budget=budget)
    engine = build_engine(model, template, tok, max_seqlen=max_seqlen, rollout=setup.rollout)
    return engine, template, evals, history


def main(argv: Sequence[str] | None = None) -> int:
    setup_logging()
    cli = parse_cli(EvaluateCLI, argv, prog="python -m r4b.evaluate",
                    description="Evaluate an r4b checkpoint per mode and difficulty level.")
    from .runtime import expected_errors

    try:
        engine, template, items, history = load_run(Path(cli.run_dir), cli.eval)
    except (*expected_errors(), FileNotFoundError) as e:
        log.error("%s", e)
        return 1
    report = evaluate(engine, template, items, cli.eval)
    out = Path(cli.out_dir or Path(cli.run_dir) / "report")
    write_report(report, out, history=history)
    log_report(report, f"evaluation of {cli.run_dir}")
    print(json.dumps(report.get("auto", {}).get("all", {})))
    return 0


if __name__ == "__main__":
    sys.exit(main())
