"""``r4b.evaluate`` as users run it: any checkpoint on benchmark files, at any layout.

* A random LLaVA-OneVision checkpoint saved by transformers (small widths, Qwen3's vocabulary
  and tokens, 2 + 2 layers; no run directory) on two benchmark files (JSON Lines text rows
  with topics; Parquet rows with one and two real PNG images) under ``torchrun
  --nproc-per-node 2`` at DP=2 and at TP=2: both reports and every response equal a
  one-process run on the same items (greedy).
* A TP=2 training run of ``r4b.pretrain_bpo`` (tiny preset, cut to a step) is re-evaluated by
  ``torchrun --nproc-per-node 2 -m r4b.evaluate --run_dir RUN`` at its TP size and by one
  process at TP=1 (its checkpoint's shards merged and re-split): both reproduce the run's own
  final report and give the same responses.
* Evaluation edges: the embedded task's eval items are distinct and too many is an error;
  ``eval.data`` names the eval set of a training job; long evaluations report progress.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import real_r4b as R  # noqa: E402

BUDGETS = ["--eval.max_new_tokens_think", "4", "--eval.max_new_tokens_no_think", "3",
           "--eval.max_new_tokens_auto", "4"]


def _launch(args: list[str], nproc: int) -> str:
    from r4b.models.parallel import free_port

    # not the rendezvous of a process group this pytest process may hold
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                        "MASTER_PORT") and not k.startswith("TORCHELASTIC_")}
    env.update(OMP_NUM_THREADS="1", R4B_NO_PROGRESS="1")
    head = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
            f"--master-port={free_port()}"] if nproc > 1 else [sys.executable]
    r = subprocess.run([*head, *args], env=env, capture_output=True, text=True, timeout=600,
                       cwd=str(Path(__file__).resolve().parents[1]))
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-6000:]
    return log


def _out(folder: Path) -> tuple[dict, list[dict]]:
    report = json.loads((folder / "report.json").read_text())
    responses = [json.loads(x) for x in (folder / "responses.jsonl").read_text().splitlines()]
    return report, responses


@pytest.fixture
def r4b_logs():
    """Messages of r4b.evaluate / components / progress at INFO and above during the test
    (on those loggers themselves: the entry points reset the handlers of ``r4b``)."""
    lines: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda rec: lines.append(rec.getMessage())
    loggers = [logging.getLogger(f"r4b.{n}") for n in ("evaluate", "components", "progress")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.INFO)
    yield lines
    for lg, level in zip(loggers, levels):
        lg.removeHandler(handler)
        lg.setLevel(level)


# ---------------------------------------------------------------- a plain checkpoint
@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("plain")
    tok = R.make_tokenizer(root / "tok")
    ckpt = R.make_checkpoint(root / "ckpt", widths="small")
    rows = [{"question": "What is 2 + 2?", "answer": "4", "topic": "arithmetic"},
            {"question": "Which is prime, 4 or 7?", "answer": "7", "topic": "primes"},
            {"question": "What is 3 * 3?", "answer": "9", "topic": "arithmetic"},
            {"question": "Pick one: (A) 1 (B) 2", "answer": "B", "topic": "choice"}]
    text = root / "text.jsonl"
    text.write_text("".join(json.dumps(r) + "\n" for r in rows))
    imgs = root / "img"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    for name, (h, w) in {"a.png": (200, 300), "b.png": (96, 128), "c.png": (300, 240)}.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(imgs / name)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({
        "question": ["How many shapes?", "Which picture is brighter?", "What is 6 + 1?"],
        "answer": ["3", "B", "7"], "images": [["a.png"], ["b.png", "c.png"], []]}),
        imgs / "bench.parquet")
    model = ["--setup.model.hf_path", str(ckpt), "--setup.model.tokenizer_path", str(tok),
             "--setup.model.params_dtype", "float32"]
    data = ["--data", str(text), "--data", f"pics={imgs / 'bench.parquet'}"]
    args = ["-m", "r4b.evaluate", *model, *data, *BUDGETS]
    outs = {}
    for name, nproc, extra in (("one", 1, []), ("dp2", 2, []), ("tp2", 2, ["--setup.tp_size", "2"])):
        outs[name] = (_launch([*args, *extra, "--out_dir", str(root / name)], nproc), root / name)
    return outs


def test_plain_checkpoint_reports_equal_across_layouts(plain):
    one, one_resp = _out(plain["one"][1])
    assert list(one["benchmarks"]) == ["text", "pics"]
    assert one["benchmarks"]["text"]["n_items"] == 4 and one["benchmarks"]["pics"]["n_items"] == 3
    assert one["overall"]["n_items"] == 7
    assert len(one_resp) == 7 * 3
    # different items give different responses, so equal responses below mean equal work
    assert len({r["response"] for r in one_resp if r["mode"] == "think"}) > 1
    for name, dp, tp in (("dp2", 2, 1), ("tp2", 1, 2)):
        other, resp = _out(plain[name][1])
        assert other["layout"]["dp_size"] == dp and other["layout"]["tp_size"] == tp, name
        assert other["benchmarks"] == one["benchmarks"], name
        assert other["overall"] == one["overall"], name
        assert resp == one_resp, name


def test_plain_checkpoint_report_contents(plain):
    rep, resp = _out(plain["one"][1])
    text = rep["benchmarks"]["text"]
    for mode in ("auto", "think", "no_think"):
        m = text["report"][mode]["all"]
        assert m["n"] == 4 and m["mean_tokens"] == np.mean(
            [r["tokens"] for r in resp if r["benchmark"] == "text" and r["mode"] == mode])
        assert set(text["topics"][mode]) == {"arithmetic", "primes", "choice"}
        assert text["topics"][mode]["arithmetic"]["n"] == 2
    assert list(text["report"]["auto"]) == ["all"]  # rows without a level count in "all" only
    assert text["report"]["oracle"]["all"]["mode"] in ("think", "no_think")
    overall = rep["overall"]["report"]
    assert set(overall["auto"]) == {"text", "pics", "all"}  # overall rows are benchmarks
    assert overall["auto"]["all"]["n"] == 7
    assert set(overall["oracle"]) == {"text", "pics", "all"}
    assert rep["model"]["hf_path"].endswith("ckpt") and rep["decoding"]["greedy"] is True
    md = (plain["one"][1] / "report.md").read_text()
    assert "| benchmark | n | no-think acc | no-think tokens | think acc |" in md
    assert "| text | 4 |" in md and "| pics | 3 |" in md and "mean over benchmarks" in md
    assert (plain["one"][1] / "benchmarks.png").stat().st_size > 1000


# ---------------------------------------------------------------- a TP=2 training run
RUN = ["--setup.task.vision", "False", "--anneal.n_train_items", "16", "--anneal.warmup_steps",
       "1", "--anneal.anneal_steps", "1", "--anneal.batch_size", "4", "--anneal.curate_items", "4",
       "--anneal.curation_samples", "1", "--anneal.optim.warmup_steps", "1",
       "--rl.group_size", "1", "--rl.prompts_per_step", "2", "--rl.max_new_tokens_think", "8",
       "--rl.max_new_tokens_no_think", "4", "--rl.max_new_tokens_auto", "8",
       "--eval.n_items", "8", "--eval.max_new_tokens_think", "8", "--eval.max_new_tokens_auto",
       "8", "--eval.max_new_tokens_no_think", "4", "--steps", "1", "--eval_every", "1",
       "--eval_items_during", "2", "--ckpt_every", "1", "--tensorboard", "False"]


def test_tp2_training_run_reevaluated_at_any_tp(tmp_path):
    run = tmp_path / "run"
    _launch(["-m", "r4b.pretrain_bpo", "--setup.tp_size", "2", *RUN, "--out_dir", str(run)], 2)
    trained = json.loads((run / "report" / "report.json").read_text())
    # its own TP size (from job.json), then one process at TP=1: the shards are merged
    _launch(["-m", "r4b.evaluate", "--run_dir", str(run), "--out_dir", str(tmp_path / "tp2")], 2)
    log1 = _launch(["-m", "r4b.evaluate", "--run_dir", str(run), "--setup.tp_size", "1",
                    "--out_dir", str(tmp_path / "tp1")], 1)
    assert "written at tensor-parallel size 2: merging its shards for TP=1" in log1
    tp2, resp2 = _out(tmp_path / "tp2")
    tp1, resp1 = _out(tmp_path / "tp1")
    assert tp2["model"]["trained_tp_size"] == 2 and tp2["model"]["step"] == 1
    assert tp2["layout"]["tp_size"] == 2 and tp1["layout"]["tp_size"] == 1
    assert resp1 == resp2 and len(resp1) == 8 * 3
    for rep in (tp1, tp2):
        ev = rep["benchmarks"]["eval"]
        assert ev["n_items"] == 8 and rep["decoding"]["max_new_tokens_think"] == 8  # the run's
        for key in ("auto", "think", "no_think", "oracle"):
            assert ev["report"][key] == trained[key], key


def test_run_tp_size_that_does_not_fit_the_launch_is_a_clear_error(tmp_path, r4b_logs):
    from r4b.evaluate import main

    run = tmp_path / "run"
    run.mkdir()
    (run / "job.json").write_text(json.dumps({"setup": {"tp_size": 2}}))
    assert main(["--run_dir", str(run)]) == 1
    text = "\n".join(r4b_logs)
    assert "setup.tp_size 2 (the run's) does not divide the 1 process(es)" in text
    assert "pass --setup.tp_size with a divisor of 1" in text


# ---------------------------------------------------------------- evaluation edges
def test_embedded_eval_items_are_distinct_and_too_many_is_an_error():
    from r4b.components import Setup, load_items
    from r4b.data import TaskConfig

    setup = Setup(task=TaskConfig(n_digits=3, vision=False))  # 4 levels x ~200 eval contents
    _, evals = load_items(setup, None, n_train=0, n_eval=700)
    contents = {(it.level, tuple(it.meta["digits"])) for it in evals}
    assert len(evals) == 700 and len(contents) == 700
    _, fewer = load_items(setup, None, n_train=0, n_eval=120)  # redrawn duplicates, not a permutation
    assert len({(it.level, tuple(it.meta["digits"])) for it in fewer}) == 120
    with pytest.raises(ValueError, match=r"eval.n_items 2000: 500 distinct items of level 1 .* "
                                         r"holds \d+ at task.n_digits 3"):
        load_items(setup, None, n_train=0, n_eval=2000)


def test_eval_data_names_the_eval_set_and_the_log_says_which(tmp_path, r4b_logs):
    from r4b.components import Setup, load_items
    from r4b.pretrain_bpo import BPOJob

    train_f, eval_f = tmp_path / "train.jsonl", tmp_path / "bench.jsonl"
    train_f.write_text("".join(json.dumps({"question": f"q{i}", "answer": str(i)}) + "\n"
                               for i in range(20)))
    eval_f.write_text("".join(json.dumps({"question": f"e{i}", "answer": str(i)}) + "\n"
                              for i in range(3)))
    train, evals = load_items(Setup(), str(train_f), n_train=0, n_eval=200,
                              eval_data=str(eval_f))
    assert [it.question for it in evals] == ["e0", "e1", "e2"] and len(train) == 20
    assert any(f"eval set: 3 rows of {eval_f} (eval.data" in x for x in r4b_logs), r4b_logs
    r4b_logs.clear()
    train, evals = load_items(Setup(), str(train_f), n_train=0, n_eval=200)
    assert len(evals) == 2 and len(train) == 18
    assert any("eval set: the first 2 of 20 rows" in x for x in r4b_logs), r4b_logs
    # the training job's option
    from r4b.config import config_from_dict

    job = config_from_dict(BPOJob, {"eval": {"data": str(eval_f)}, "data": str(train_f)})
    assert job.eval.data == str(eval_f)
    with pytest.raises(ValueError, match="eval.data .*missing.jsonl.* is not a file"):
        load_items(Setup(), str(train_f), n_train=0, n_eval=1,
                   eval_data=str(tmp_path / "missing.jsonl"))


def test_long_evaluation_reports_progress(monkeypatch, r4b_logs):
    import torch

    from r4b.components import (Setup, build_engine, make_template, make_tokenizer,
                                model_config)
    from r4b.data import TaskConfig, make_task
    from r4b.evaluate import EvalConfig, eval_records
    from r4b.models import build_model

    setup = Setup(task=TaskConfig(vision=False))
    tok = make_tokenizer(setup.model)
    cfg = model_config(setup.model, tok, setup.task)
    torch.manual_seed(0)
    model = build_model(cfg)
    template = make_template(tok, cfg)
    engine = build_engine(model, template, tok, max_seqlen=64)
    items = make_task(0, 6, config=setup.task)
    ev = EvalConfig(n_items=6, batch_size=4, max_new_tokens_think=2, max_new_tokens_auto=2,
                    max_new_tokens_no_think=2)
    monkeypatch.setenv("R4B_PROGRESS_INTERVAL", "0")
    monkeypatch.delenv("R4B_NO_PROGRESS", raising=False)
    recs = eval_records(engine, template, items, ev, desc="eval 6 items")
    lines = r4b_logs
    assert len(recs) == 18
    assert any(line.startswith("eval 6 items: 4/18") for line in lines), lines
    assert any(line.startswith("eval 6 items: 18/18") for line in lines), lines


def test_benchmark_names_and_files():
    from r4b.evaluate import parse_benchmark

    here = str(Path(__file__))
    assert parse_benchmark(here) == ("test_evaluate", here)
    assert parse_benchmark(f"mathvista={here}") == ("mathvista", here)
    with pytest.raises(ValueError, match="is not a file"):
        parse_benchmark("mv=/nonexistent/file.jsonl")
    with pytest.raises(ValueError, match="must be letters"):
        parse_benchmark(str(Path(here).parent / "ü ber.jsonl"))


def test_summaries_without_levels_route_the_whole_set():
    from r4b.report import summarize, summarize_by

    recs = [{"mode": m, "level": None, "topic": t, "correct": c, "tokens": n, "thought": th}
            for m, c, n, th in (("think", 1.0, 40, 1.0), ("no_think", 0.0, 5, 0.0),
                                ("auto", 1.0, 30, 1.0))
            for t in ("geometry", "algebra")]
    rep = summarize(recs)
    assert list(rep["think"]) == ["all"] and rep["think"]["all"]["n"] == 2
    assert rep["oracle"]["all"]["mode"] == "think" and rep["oracle"]["all"]["accuracy"] == 1.0
    assert rep["oracle"]["all"]["auto_token_ratio"] == 30 / 40
    topics = summarize_by(recs, "topic")
    assert list(topics["auto"]) == ["algebra", "geometry"] and topics["auto"]["algebra"]["n"] == 1
