"""Evaluation per mode: ``torchrun --nproc-per-node N -m r4b.evaluate``.

Any checkpoint on any benchmark files, per mode (auto, think, no_think):

* ``--run_dir RUN``: the latest checkpoint of a run of ``r4b.pretrain_bpo`` / ``r4b.anneal``
  (or ``--checkpoint`` one of its folders), with the run's model, tokenizer, response budgets,
  reader settings and tensor-parallel size as defaults; every ``--setup.*`` / ``--eval.*`` flag
  overrides them.  The checkpoint loads at any TP size (``--setup.tp_size``): written at
  another, its TP shards are merged and re-split on load.
* ``--setup.model.hf_path DIR`` (no run directory): a transformers checkpoint (LLaVA-OneVision /
  R-4B / Qwen3 layouts, the flags of the main job: ``--setup.model.tokenizer_path``,
  ``--setup.model.num_layers``, ...).

``--data FILE`` names a benchmark (JSON Lines / Parquet, read by :mod:`r4b.data.readers`;
repeat it for several, named by the file's stem or ``NAME=FILE``); without it the run's own eval
set is used (``eval.data``, the first 10% of the run's data file, or the embedded task's eval
split).  Items are split over the data-parallel ranks (TP ranks of one replica share theirs),
the model sits on ``rt.device``, either rollout engine runs (``--setup.rollout.engine``, the KV
budget ``--setup.rollout.kv_budget_tokens``), and a progress line reports long evaluations.

Output (``--out_dir``, default ``<run_dir>/eval`` or ``runs/eval``), written by rank 0:

* ``report.json``: per benchmark a report as :mod:`r4b.report` describes (mode → level →
  accuracy, mean response tokens, think rate, well-formed share, ``n``; the oracle router) plus
  per-topic rows, and overall the same keyed by benchmark (the oracle routes each benchmark to
  its better forced mode) with the unweighted mean over benchmarks; what was evaluated (model,
  checkpoint and step, layout, decoding) beside them;
* ``report.md``: a benchmark × mode table (accuracy and tokens per mode, auto think rate,
  oracle), then each benchmark's levels, topics and oracle; ``benchmarks.png``: accuracy
  against mean response tokens per mode and benchmark;
* ``responses.jsonl``: every response (benchmark, item, mode, text, tokens, score).

With greedy decoding (the default) the numbers do not depend on the layout: DP=2, TP=2 and
one process give the same reports on the same items.
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import tyro

from .components import Setup
from .config import parse_cli, require_range
from .data import ReaderConfig
from .log import get_logger, progress, setup_logging
from .report import benchmark_mean, summarize, summarize_by, write_eval_report
from .rewards import verify
from .rollout.engine import EmbeddedEngine, RolloutRequest
from .rollout.sampling import SamplingParams

log = get_logger(__name__)

EVAL_MODES = ("auto", "think", "no_think")


@dataclass(kw_only=True)
class EvalConfig:
    """What to evaluate and how to decode."""

    n_items: int = 200
    """Eval items drawn from the embedded task's eval split, all distinct (never seen in
    training; asking for more than the split holds is an error).  A data file's eval set is
    used whole (``r4b.evaluate``: see ``items_per_benchmark``)."""
    data: str | None = None
    """JSON Lines / Parquet file of eval items for the training job (read like ``data``, all
    of it for training then); None: the first 10% of ``data``'s rows, or the embedded task's
    eval split.  The job's log says which set is used."""
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

    def largest_budget(self) -> int:
        """The largest response budget of the modes evaluated."""
        return max(getattr(self, f"max_new_tokens_{m}") for m in self.modes)


def eval_records(engine: EmbeddedEngine, template, items: Sequence, cfg: EvalConfig, *,
                 seed: int = 0, generator: torch.Generator | None = None,
                 desc: str | None = None) -> list[dict]:
    """One record per (item, mode): ``{idx, uid, mode, level, topic, correct, tokens,
    thought, well_formed, finished, response}`` (``idx``: the item's index in ``items``).  With
    ``desc``, a progress bar (a log line every ``R4B_PROGRESS_INTERVAL`` seconds off a
    terminal) counts the responses."""
    reqs = [RolloutRequest(prompt_ids=template.item_prompt_ids(it, m), mode=m,
                           images=list(it.images) or None, uid=k)
            for m in cfg.modes for k, it in enumerate(items)]
    gen = generator or torch.Generator(device="cpu").manual_seed(seed)
    out = []
    bar = progress(total=len(reqs), desc=desc, leave=False) if desc else None
    for s in range(0, len(reqs), cfg.batch_size):
        batch = reqs[s:s + cfg.batch_size]
        for r in engine.generate(batch, cfg.sampling(), gen):
            it = items[r.request.uid]
            mode = r.request.mode
            parsed = template.parse_response(r.response_ids, mode)
            text = template.assistant_text_of(r.response_ids, mode)
            correct = verify(text, it.answer) if r.finished else 0.0
            out.append({"idx": r.request.uid, "uid": it.uid, "mode": mode, "level": it.level,
                        "topic": it.topic, "correct": float(correct),
                        "tokens": len(r.response_ids),
                        "thought": float(parsed.mode_chosen == "think"),
                        "well_formed": bool(parsed.well_formed and r.finished),
                        "finished": bool(r.finished), "response": text})
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.close()
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


# ---------------------------------------------------------------- benchmarks
@dataclass
class Benchmark:
    """One benchmark: its name (the report's key), file and items."""

    name: str
    file: str | None
    items: list


_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


def parse_benchmark(spec: str) -> tuple[str, str]:
    """``(name, file)`` of a ``--data`` entry: ``NAME=FILE`` or ``FILE`` (named by its stem);
    ``ValueError`` naming the entry when the name is not a plain word or the file is missing."""
    name, sep, path = spec.partition("=")
    if not sep or not _NAME_RE.match(name):
        name, path = Path(spec).stem, spec
    if not _NAME_RE.match(name):
        raise ValueError(f"--data {spec!r}: benchmark name {name!r} must be letters, digits and "
                         f"_ . + - (write NAME=FILE)")
    if not Path(path).is_file():
        raise ValueError(f"--data {spec!r}: {path!r} is not a file")
    return name, path


def benchmark_records(engine, template, benches: Sequence[Benchmark], cfg: EvalConfig, *,
                      rt=None, seed: int = 0) -> list[dict]:
    """Every (benchmark, item, mode) record, in that order on every rank: the items of all
    benchmarks are dealt round-robin over the data-parallel ranks (each TP group shares its
    replica's), generated, and gathered."""
    flat = [(b, k) for b, bench in enumerate(benches) for k in range(len(bench.items))]
    dp_rank, dp_size = (rt.dp_rank, rt.dp_size) if rt is not None else (0, 1)
    mine = flat[dp_rank::dp_size]
    items = [benches[b].items[k] for b, k in mine]
    gen = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + dp_rank)
    desc = f"eval {len(flat)} items x {len(cfg.modes)} modes" + \
        (f" (rank 0's {len(mine)} items of DP={dp_size})" if dp_size > 1 else "")
    if rt is None:
        records = eval_records(engine, template, items, cfg, generator=gen, desc=desc)
    else:
        with rt.phase("rollout"):
            records = eval_records(engine, template, items, cfg, generator=gen, desc=desc)
    for r in records:
        b, k = mine[r["idx"]]
        r["benchmark"], r["idx"] = benches[b].name, k
    if dp_size > 1:
        from .runtime import all_gather_objects

        with rt.phase("rollout"):
            records = [r for part in all_gather_objects(records, rt) for r in part]
    order = {bench.name: b for b, bench in enumerate(benches)}
    modes = {m: i for i, m in enumerate(cfg.modes)}
    records.sort(key=lambda r: (order[r["benchmark"]], r["idx"], modes[r["mode"]]))
    return records


def benchmark_result(benches: Sequence[Benchmark], records: list[dict], **about) -> dict:
    """The ``report.json`` structure (module docstring) of ``records`` (from
    :func:`benchmark_records`); ``about`` (``model``, ``layout``, ``decoding``) goes in as is."""
    out: dict = dict(about)
    out["benchmarks"] = {}
    for bench in benches:
        recs = [r for r in records if r["benchmark"] == bench.name]
        out["benchmarks"][bench.name] = {"file": bench.file, "n_items": len(bench.items),
                                         "report": summarize(recs),
                                         "topics": summarize_by(recs, "topic")}
    overall = summarize(records, key="benchmark")
    out["overall"] = {"n_items": sum(len(b.items) for b in benches), "report": overall,
                      "benchmark_mean": benchmark_mean(overall)}
    return out


# ---------------------------------------------------------------- checkpoints at any TP size
def _tp_entries(model) -> dict[int, tuple]:
    """``id(parameter) -> ("lm", HFEntry) | ("split", dim)`` for every TP-split parameter of
    ``model`` (from the tables its transformers export uses); parameters not listed are
    replicated over TP."""
    out: dict[int, tuple] = {}
    for e in model.language_model._hf_table():
        out[id(e.param)] = ("lm", e)
    if getattr(model, "has_vision", False):
        for table in (model.vision_tower._hf_table(), model.projector._hf_table()):
            for e in table.values():
                if e.split_dim is not None:
                    out[id(e.param)] = ("split", e.split_dim)
    return out


def _merge_tp(name: str, shards: list[torch.Tensor], kind: tuple | None, live: torch.Tensor,
              tp_rank: int, tp_size: int, vocab_limit: int) -> torch.Tensor:
    """This rank's slice at ``tp_size`` of the tensor saved as TP ``shards``."""
    from .models.lm import _local_slice

    if kind is None or (kind[0] == "split" and kind[1] is None) or \
            (kind[0] == "lm" and kind[1].split_dim is None):
        return shards[0]
    if kind[0] == "split":
        dim = kind[1]
        full = torch.cat(shards, dim=dim)
        n = live.shape[dim]
        return full.narrow(dim, tp_rank * n, n)
    e = kind[1]
    saved_tp = len(shards)
    if len(e.parts) == 1:
        full = torch.cat(shards, dim=e.split_dim)
        rows = e.parts[0][1]
        if e.split_dim == 0 and full.shape[0] != rows:
            # The vocabulary padded to a multiple of another TP size: the rows past the
            # tokenizer's ids are never read nor sampled.
            if min(rows, full.shape[0]) < vocab_limit:
                raise ValueError(f"{name}: saved with {full.shape[0]} rows, the model has {rows}, "
                                 f"and the tokenizer needs {vocab_limit}")
            pad = full.new_zeros((rows, *full.shape[1:]))
            keep = min(rows, full.shape[0])
            pad[:keep] = full[:keep]
            full = pad
        return _local_slice(e, {e.parts[0][0]: full}, tp_rank, tp_size)
    tensors, off = {}, 0
    for part, rows in e.parts:
        n = rows // saved_tp
        tensors[part] = torch.cat([s[off:off + n] for s in shards], dim=0)
        off += n
    return _local_slice(e, tensors, tp_rank, tp_size)


def load_any_tp(ckpt: str | os.PathLike, model, *, tp_rank: int, tp_size: int,
                vocab_limit: int) -> dict:
    """Load the model weights of checkpoint folder ``ckpt`` (written by
    :func:`r4b.checkpoint.save_checkpoint` at any TP and DP size) into ``model``, this rank's
    TP shard at ``tp_size``; returns the checkpoint's ``meta.json``.  At the saved TP size this
    is :func:`r4b.checkpoint.load_checkpoint` (weights only); at another, every rank reads
    all TP files (checksums verified), merges each tensor's shards the way the transformers
    export does (fused QKV and gate / up parts kept apart) and keeps its own slice."""
    from .checkpoint import (CheckpointError, Layout, _check_file, _Reader, _state_tensors,
                             load_checkpoint)

    ckpt = Path(ckpt)
    try:
        meta = json.loads((ckpt / "meta.json").read_text())
        manifest = json.loads((ckpt / "manifest.json").read_text())
        saved_tp = int(meta["layout"]["tp_size"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{ckpt}: not a complete checkpoint ({e})") from e
    if saved_tp == tp_size:
        load_checkpoint(ckpt, model=model, restore_rng_state=False)
        return meta
    log.info("%s was written at tensor-parallel size %d: merging its shards for TP=%d", ckpt,
             saved_tp, tp_size)
    _check_file(ckpt / "meta.json", manifest, True)
    readers = [_Reader(ckpt, "model", Layout(tp_rank=s, tp_size=saved_tp), manifest, True)
               for s in range(saved_tp)]
    live = _state_tensors(model)
    names = readers[0].names()
    missing, unexpected = sorted(set(live) - names), sorted(names - set(live))
    if missing or unexpected:
        raise CheckpointError(f"{ckpt}: model keys do not match: missing {missing[:8]}, "
                              f"unexpected {unexpected[:8]}")
    kinds = _tp_entries(model)
    for name, t in live.items():
        shards = []
        for r in readers:
            if name not in r.pieces:
                raise CheckpointError(f"{r.files[0]}: no tensor {name}")
            buf = torch.empty(r.pieces[name][0][1],
                              dtype=torch.float32 if t.is_floating_point() else t.dtype)
            r.read_into(name, buf)
            shards.append(buf)
        try:
            local = _merge_tp(name, shards, kinds.get(id(t)), t, tp_rank, tp_size, vocab_limit)
        except (RuntimeError, IndexError) as e:
            raise CheckpointError(f"{ckpt}: cannot re-split {name} from TP={saved_tp} to "
                                  f"TP={tp_size}: {e}") from e
        if tuple(local.shape) != tuple(t.shape):
            raise CheckpointError(f"{ckpt}: {name} re-split from TP={saved_tp} has shape "
                                  f"{list(local.shape)}, the model's is {list(t.shape)}")
        if t.is_floating_point() and not bool(torch.isfinite(local).all()):
            raise CheckpointError(f"{ckpt}: non-finite values in {name}")
        with torch.no_grad():
            t.copy_(local)
    return meta


# ---------------------------------------------------------------- the entry point
@dataclass(kw_only=True)
class EvaluateCLI:
    """``torchrun --nproc-per-node N -m r4b.evaluate``: a checkpoint per mode on benchmarks."""

    run_dir: str | None = None
    """Run directory of r4b.pretrain_bpo or r4b.anneal (``job.json`` and ``ckpt/``): its
    model, budgets, reader settings and TP size become the defaults of the flags below.  None:
    evaluate ``setup.model.hf_path``."""
    checkpoint: str | None = None
    """A checkpoint folder of the run to evaluate instead of its latest."""
    setup: Setup = field(default_factory=Setup)
    """Model (``setup.model.hf_path`` for a transformers checkpoint), tensor-parallel size (any
    that divides the process count; a run's checkpoint is re-split as needed), rollout engine
    and KV budget."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Modes, response budgets, decoding; the run's eval set when no ``--data`` is given."""
    data: tyro.conf.UseAppendAction[tuple[str, ...]] = ()
    """Benchmark file (JSON Lines / Parquet), repeated for several: ``--data FILE`` (named by
    its stem) or ``--data NAME=FILE``.  None given: the run's eval set (``eval.data``, the
    first 10% of its data file, or the embedded task's eval split)."""
    items_per_benchmark: int | None = None
    """Evaluate the first N items of each benchmark (None: all; a file with fewer is used
    whole, with a warning)."""
    reader: ReaderConfig = field(default_factory=ReaderConfig)
    """How benchmark files are read: column mapping, limits, skipping bad rows, image paths."""
    out_dir: str | None = None
    """Where to write the report (default ``<run_dir>/eval``, or ``runs/eval``)."""

    def __post_init__(self):
        if self.items_per_benchmark is not None:
            require_range("items_per_benchmark", self.items_per_benchmark, 1)


def _flag(argv: Sequence[str], name: str) -> str | None:
    """The value of ``--name VALUE`` / ``--name=VALUE`` in ``argv`` (the last one), or None."""
    value = None
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            value = argv[i + 1]
        elif a.startswith(name + "="):
            value = a.split("=", 1)[1]
    return value


def run_defaults(run_dir: str) -> EvaluateCLI:
    """The :class:`EvaluateCLI` defaults of a run directory: its setup, eval settings and
    reader from ``job.json``."""
    from .config import config_from_dict

    job_file = Path(run_dir) / "job.json"
    if not job_file.is_file():
        raise FileNotFoundError(f"run_dir {run_dir!r} holds no job.json: not a run directory "
                                f"of r4b.pretrain_bpo or r4b.anneal")
    job = json.loads(job_file.read_text())
    try:
        return EvaluateCLI(run_dir=run_dir, setup=config_from_dict(Setup, job["setup"]),
                           eval=config_from_dict(EvalConfig, job.get("eval", {})),
                           reader=config_from_dict(ReaderConfig, job.get("reader", {})))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{job_file}: {e.args[0] if e.args else e}") from None


def _benchmarks(cli: EvaluateCLI, template, cfg) -> list[Benchmark]:
    from .components import load_items, preflight
    from .data import read_samples

    benches: list[Benchmark] = []
    if cli.data:
        for spec in cli.data:
            name, path = parse_benchmark(spec)
            if any(b.name == name for b in benches):
                raise ValueError(f"--data {spec!r}: a benchmark named {name!r} was given before "
                                 f"(write NAME=FILE to tell them apart)")
            items, stats = read_samples(path, config=cli.reader)
            log.info("benchmark %s: %d rows of %s (%d skipped)", name, len(items), path,
                     stats.rows_skipped)
            benches.append(Benchmark(name, path, items))
    else:
        job = {}
        if cli.run_dir is not None:
            job = json.loads((Path(cli.run_dir) / "job.json").read_text())
        data = job.get("data")
        _, items = load_items(cli.setup, data, n_train=0, n_eval=cli.eval.n_items,
                              reader=cli.reader, eval_data=cli.eval.data)
        benches.append(Benchmark("eval", cli.eval.data or data, items))
    for b in benches:
        n = cli.items_per_benchmark
        if n is not None and n > len(b.items):
            log.warning("benchmark %s has %d items; items_per_benchmark %d asks for more: "
                        "evaluating all %d", b.name, len(b.items), n, len(b.items))
        elif n is not None:
            b.items = b.items[:n]
        b.items = preflight(cli.setup, template, cfg, b.items,
                            largest_budget=cli.eval.largest_budget(),
                            skip_bad=cli.reader.skip_bad_rows, what=f"benchmark {b.name} items")
        open_ended = sum(not it.verifiable for it in b.items)
        if open_ended:
            log.warning("benchmark %s: %d of %d items are open-ended (verifiable false); the "
                        "rule-based verifier still scores them against their reference",
                        b.name, open_ended, len(b.items))
    return benches


def _load_model(cli: EvaluateCLI, cfg, tok, rt) -> tuple[torch.nn.Module, dict]:
    from .checkpoint import latest_checkpoint
    from .models import build_model, from_hf

    choice = cli.setup.model
    if cli.run_dir is not None:
        run = Path(cli.run_dir)
        ck = Path(cli.checkpoint) if cli.checkpoint else latest_checkpoint(run / "ckpt")
        if ck is None:
            raise FileNotFoundError(f"{run / 'ckpt'} holds no checkpoint to evaluate")
        model = build_model(cfg, init_weights=False, device=rt.device)
        with rt.phase("checkpoint"):
            meta = load_any_tp(ck, model, tp_rank=rt.tp_rank, tp_size=rt.tp_size,
                               vocab_limit=tok.vocab_size)
        return model, {"run_dir": str(run), "checkpoint": str(ck), "step": meta.get("step"),
                       "trained_tp_size": meta["layout"]["tp_size"]}
    model = from_hf(choice.hf_path, tp_size=rt.tp_size, dtype=cfg.params_dtype,
                    device=rt.device, num_layers=choice.num_layers,
                    vision_num_layers=choice.vision_num_layers)
    if model.cfg != cfg:
        raise ValueError(f"the model loaded from {choice.hf_path!r} does not match its config: "
                         f"{model.cfg} vs {cfg}")
    return model, {"hf_path": choice.hf_path, "tokenizer": choice.tokenizer_dir()}


def run_evaluation(cli: EvaluateCLI, rt) -> dict:
    """Evaluate as ``cli`` says on this rank's share; every rank returns the result, rank 0
    writes it to the output folder."""
    from .components import (build_engine, engine_max_seqlen, make_template, make_tokenizer,
                             model_config, prompt_budget)

    setup = cli.setup
    if cli.run_dir is None and setup.model.hf_path is None:
        raise ValueError("nothing to evaluate: give --run_dir RUN (a run of r4b.pretrain_bpo / "
                         "r4b.anneal) or --setup.model.hf_path DIR (a transformers checkpoint)")
    tok = make_tokenizer(setup.model)
    cfg = model_config(setup.model, tok, setup.task, tp_size=rt.tp_size)
    template = make_template(tok, cfg, setup.model)
    benches = _benchmarks(cli, template, cfg)
    model, about = _load_model(cli, cfg, tok, rt)
    model.eval()
    items = [it for b in benches for it in b.items]
    max_seqlen = engine_max_seqlen(setup.rollout, cfg, longest_prompt=prompt_budget(items, template),
                                   largest_budget=cli.eval.largest_budget())
    engine = build_engine(model, template, tok, max_seqlen=max_seqlen, rollout=setup.rollout)
    records = benchmark_records(engine, template, benches, cli.eval, rt=rt, seed=setup.seed)
    ev = cli.eval
    decoding = {"modes": list(ev.modes), "greedy": ev.greedy,
                **({} if ev.greedy else {"temperature": ev.temperature}),
                **{f"max_new_tokens_{m}": getattr(ev, f"max_new_tokens_{m}") for m in ev.modes}}
    result = benchmark_result(benches, records, model=about,
                              layout={"tp_size": rt.tp_size, "dp_size": rt.dp_size,
                                      "engine": setup.rollout.engine, "device": str(rt.device)},
                              decoding=decoding)
    out = Path(cli.out_dir or (Path(cli.run_dir) / "eval" if cli.run_dir else "runs/eval"))
    if rt.is_main:
        title = "r4b evaluation of " + (f"{about['checkpoint']} (step {about['step']})"
                                        if "checkpoint" in about else about["hf_path"])
        write_eval_report(result, out, title=title)
        lines = "".join(json.dumps({k: r[k] for k in ("benchmark", "idx", "uid", "mode", "correct",
                                                       "tokens", "thought", "finished",
                                                       "response")}) + "\n" for r in records)
        tmp = out / ".responses.jsonl.tmp"
        tmp.write_text(lines)
        tmp.replace(out / "responses.jsonl")
    log_benchmarks(result)
    return result


def log_benchmarks(result: dict) -> None:
    """One INFO line per benchmark and overall: accuracy and tokens per mode, think rate."""
    lines = ["evaluation (accuracy / mean tokens per mode):"]
    rows = [(n, b["report"]) for n, b in result["benchmarks"].items()]
    rows.append(("all", result["overall"]["report"]))
    for name, rep in rows:
        cells = []
        for mode in ("no_think", "think", "auto"):
            m = rep.get(mode, {}).get("all")
            if m is not None:
                cells.append(f"{mode} {m['accuracy']:.3f} / {m['mean_tokens']:.0f}"
                             + (f" (think {m['think_rate']:.2f})" if mode == "auto" else ""))
        o = rep.get("oracle", {}).get("all")
        if o is not None:
            cells.append(f"oracle {o['accuracy']:.3f} / {o['mean_tokens']:.0f}")
        lines.append(f"  {name:16s} " + "  ".join(cells))
    log.info("\n".join(lines))


def main(argv: Sequence[str] | None = None) -> int:
    import torch.distributed as dist

    from .runtime import init_runtime, run_entry

    setup_logging()
    argv = list(sys.argv[1:] if argv is None else argv)
    default = None
    run_dir = _flag(argv, "--run_dir")
    if run_dir is not None and not {"-h", "--help"} & set(argv):
        try:
            default = run_defaults(run_dir)
        except (FileNotFoundError, ValueError) as e:
            log.error("%s", e)
            return 1
    def parse(default):
        return parse_cli(EvaluateCLI, argv, default=default,
                         prog="torchrun --nproc-per-node N -m r4b.evaluate",
                         description="Evaluate a checkpoint (a run's, or a transformers "
                                     "directory) per mode on benchmark files: accuracy, response "
                                     "tokens, think rate and the oracle router per benchmark and "
                                     "overall.")

    cli = parse(default)
    if cli.run_dir is not None and default is None:  # run_dir set by a --config recipe
        try:
            default = run_defaults(cli.run_dir)
        except (FileNotFoundError, ValueError) as e:
            log.error("%s", e)
            return 1
        cli = parse(default)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    tp = cli.setup.tp_size
    if world % tp:
        log.error("setup.tp_size %d%s does not divide the %d process(es) of this launch: pass "
                  "--setup.tp_size with a divisor of %d (a run's checkpoint loads at any TP "
                  "size) or launch a multiple of %d processes", tp,
                  " (the run's)" if default is not None and tp == default.setup.tp_size else "",
                  world, world, tp)
        return 1
    owned = not dist.is_initialized()
    rt = init_runtime(tp, timeouts=cli.setup.timeouts())
    code = run_entry(run_evaluation, cli, rt, also=(FileNotFoundError, ValueError))
    if owned and dist.is_initialized():
        if code == 0 and rt.world_size > 1:
            dist.barrier()
        from .models.parallel import destroy_model_parallel

        destroy_model_parallel()
    return code


if __name__ == "__main__":
    sys.exit(main())
