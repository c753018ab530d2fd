"""Hostile input and failures, second pass: each numbered finding reproduced and handled.

1 data parallelism on mixed text / image data (every rank runs the same collectives whatever
its micro-batches hold); 2 resuming a run directory with another job's options, and reusing
an annealing run of another job; 3 a launch that fails its checks leaves ``job.json`` as it
was; 4 reports, history and exports that name the checkpoint they come from, written
atomically; 5 degenerate steps that warn; 6 the run lock released on a clean exit, one error
line per job, a file as ``out_dir``; 8 messages that say which tower or layout they are about.
(7, evaluation, is tests/test_evaluate*.py.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import real_r4b as R  # noqa: E402

# The real path at cut depth (tests/test_real_path.py's budgets), one BPO step.
ANNEAL = ["--anneal.warmup_steps", "1", "--anneal.anneal_steps", "1", "--anneal.batch_size", "2",
          "--anneal.curate_items", "2", "--anneal.curation_samples", "1",
          "--anneal.curation_max_new_tokens", "3", "--anneal.vision_align_steps", "0",
          "--anneal.optim.warmup_steps", "1"]
# Think rollouts 40 tokens, no-think ones 3, one sequence per micro-batch: with the lengths of
# mixed_parquet's rows the DP=2 plan puts a text-only micro-batch on one rank beside an image
# micro-batch on the other, in both of each rank's micro-batches.
RL = ["--rl.prompts_per_step", "2", "--rl.group_size", "1", "--rl.max_new_tokens_think", "40",
      "--rl.max_new_tokens_no_think", "3", "--rl.max_new_tokens_auto", "4", "--rl.lr", "1e-6",
      "--rl.tokens_per_microbatch", "16"]
EVAL = ["--eval.n_items", "1", "--eval.max_new_tokens_think", "3",
        "--eval.max_new_tokens_no_think", "3", "--eval.max_new_tokens_auto", "3"]
JOB = ["--steps", "1", "--eval_every", "100", "--eval_items_during", "1", "--ckpt_every", "100",
       "--tensorboard", "False", "--setup.model.params_dtype", "float32"]


def mixed_parquet(folder: Path) -> Path:
    """Three rows: an eval row, a text-only training row and an image training row whose
    prompts are about as long (the text row is padded with words), so that a DP=2 plan gives
    each rank one of them: annealing's batch of two puts the text row on one rank and the
    image row on the other, and BPO's four rollouts alternate text and image micro-batches
    across the ranks."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8)).save(folder / "a.png")
    long_q = "Add the numbers " + " ".join(["one"] * 305) + ": what is 10 - 3?"
    table = pa.table({"id": ["e0", "t0", "i0"],
                      "question": ["What is 1 + 1?", long_q, "What is 5 * 5?"],
                      "answer": ["2", "7", "25"], "reasoning": [None, None, None],
                      "images": [[], [], ["a.png"]]})
    out = folder / "mixed.parquet"
    pq.write_table(table, out)
    return out


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    tok = R.make_tokenizer(root / "tok")
    data = mixed_parquet(root / "data")
    ckpts = {tied: R.make_checkpoint(root / f"ckpt-{'tied' if tied else 'untied'}",
                                     widths="small", tied=tied) for tied in (True, False)}
    return root, tok, data, ckpts


def bpo_cmd(assets, out: Path, *extra: str, tied: bool = True, nproc: int = 2) -> list[str]:
    from r4b.models.parallel import free_port

    root, tok, data, ckpts = assets
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
            f"--master-port={free_port()}", "-m", "r4b.pretrain_bpo",
            "--setup.model.hf_path", str(ckpts[tied]), "--setup.model.tokenizer_path", str(tok),
            "--data", str(data), "--out_dir", str(out), "--setup.model.preset", "tiny",
            *JOB, *ANNEAL, *RL, *EVAL, *extra]


def run(cmd: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MASTER_", "RANK", "WORLD_SIZE", "LOCAL_", "TORCHELASTIC"))}
    env.update(OMP_NUM_THREADS="1", R4B_NO_PROGRESS="1")
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------- 1. DP on mixed data
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_1_dp2_anneals_and_trains_bpo_on_text_and_image_microbatches(assets, tmp_path, tied):
    """FSDP over DP=2 at TP=1 on the real path: annealing and a BPO step where one rank's
    micro-batch is text-only while the other's holds an image.  Before, the text-only rank
    reduce-scattered no gradient for ``image_newline`` and the job died in its first warm-up
    step with a gloo collective mismatch."""
    out = tmp_path / "run"
    r = run(bpo_cmd(assets, out, tied=tied))
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-5000:]
    assert "mismatch" not in log
    anneal = [json.loads(x) for x in (out / "anneal" / "metrics.jsonl").read_text().splitlines()]
    bpo = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["phase"] for m in anneal] == ["warmup", "anneal"]
    assert [m["step"] for m in bpo] == [1]
    assert bpo[0]["groups"] == 2 and bpo[0]["kept_rollouts"] == 4
    for m in anneal + bpo:
        assert np.isfinite(m["grad_norm"]) and m["grad_norm"] > 0, m
    cfg = R.read_config(assets[3][tied])
    assert cfg["text_config"]["tie_word_embeddings"] is tied


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_1_every_microbatch_gives_the_same_parameters_a_gradient(assets, tied):
    """The invariant FSDP needs, in one process: whatever a micro-batch holds (text only or
    an image), its backward gives the same parameters a gradient (zero where unused), tied or
    untied, in R-4B's AnyRes layout.  Before, a text-only micro-batch left ``image_newline``
    without one."""
    from PIL import Image

    from r4b.components import ModelChoice, image_processor, make_tokenizer, model_config
    from r4b.data import TaskConfig
    from r4b.models import build_model
    from r4b.models.multimodal import ImageBatch
    from r4b.runtime import init_runtime

    root, tok_dir, data, ckpts = assets
    init_runtime(1)
    choice = ModelChoice(hf_path=str(ckpts[tied]), tokenizer_path=str(tok_dir),
                         params_dtype="float32")
    cfg = model_config(choice, make_tokenizer(choice), TaskConfig())
    assert cfg.image_layout == "anyres" and cfg.lm.tie_word_embeddings is tied
    torch.manual_seed(0)
    model = build_model(cfg)

    def with_grad(with_image: bool) -> set[str]:
        model.zero_grad(set_to_none=True)
        ids = torch.randint(0, 100, (12,))
        images = None
        if with_image:
            images = ImageBatch.collate(image_processor(cfg)([Image.open(data.parent / "a.png")]))
            n = sum(model.image_token_counts(images))
            ids = torch.cat([ids, torch.full((n,), cfg.image_token_id)])
        cu = torch.tensor([0, ids.numel()], dtype=torch.int32)
        h = model(input_ids=ids, cu_seqlens=cu, images=images, return_hidden=True)
        (h @ model.lm_head_weight().t()).float().logsumexp(-1).sum().backward()
        return {n for n, p in model.named_parameters() if p.grad is not None}

    text, image = with_grad(False), with_grad(True)
    assert "image_newline" in image and "projector.linear_1.weight" in image
    assert text == image, sorted(text ^ image)


# ---------------------------------------------------------------- 2-3. job identity
def _tiny_job(out: Path, **kw):
    """A seconds-long BPO job on the embedded text task (annealing included)."""
    import dataclasses

    from r4b.anneal import AnnealConfig
    from r4b.components import Setup
    from r4b.data import TaskConfig
    from r4b.evaluate import EvalConfig
    from r4b.pretrain_bpo import BPOJob
    from r4b.rl.config import RLConfig
    from r4b.sft import OptimConfig

    job = BPOJob(setup=Setup(task=TaskConfig(vision=False)),
                 anneal=AnnealConfig(n_train_items=16, warmup_steps=1, anneal_steps=1, batch_size=4,
                                     curate_items=4, curation_samples=1,
                                     optim=OptimConfig(warmup_steps=1)),
                 rl=RLConfig(group_size=1, prompts_per_step=2, max_new_tokens_think=8,
                             max_new_tokens_no_think=4, max_new_tokens_auto=8),
                 eval=EvalConfig(n_items=2, max_new_tokens_think=8, max_new_tokens_auto=8,
                                 max_new_tokens_no_think=4),
                 steps=1, eval_every=1, eval_items_during=2, ckpt_every=1, out_dir=str(out),
                 tensorboard=False)
    return dataclasses.replace(job, **kw)


@pytest.fixture
def finished(tmp_path):
    """A finished one-step BPO run (``out``) and its ``job.json`` bytes."""
    from r4b.pretrain_bpo import run_bpo
    from r4b.runtime import init_runtime

    out = tmp_path / "run"
    job = _tiny_job(out)
    run_bpo(job, init_runtime(1))
    return job, out, (out / "job.json").read_bytes()


def test_2_resume_with_other_options_stops_listing_each_difference(finished):
    import dataclasses

    from r4b.pretrain_bpo import run_bpo
    from r4b.rundir import JobChanged
    from r4b.runtime import init_runtime

    job, out, before = finished
    changed = dataclasses.replace(job, rl=dataclasses.replace(job.rl, lr=3e-6, group_size=2),
                                  setup=dataclasses.replace(job.setup, seed=5), steps=2)
    with pytest.raises(JobChanged) as e:
        run_bpo(changed, init_runtime(1))
    msg = str(e.value)
    for needle in ("rl.lr: 0.0001 -> 3e-06", "rl.group_size: 1 -> 2", "setup.seed: 0 -> 5",
                   "cannot change on resume", "steps: 1 -> 2", "--resume_changed steps"):
        assert needle in msg, msg
    assert (out / "job.json").read_bytes() == before  # the first start's options are kept
    # a safe change, when named, is accepted and recorded
    with pytest.raises(JobChanged, match=r"rl\.lr"):
        run_bpo(dataclasses.replace(changed, resume_changed=("rl.lr",)), init_runtime(1))
    run_bpo(dataclasses.replace(job, steps=2, resume_changed=("steps",)), init_runtime(1))
    rec = json.loads((out / "job.json").read_text())
    assert rec["steps"] == 2 and rec["changes"][-1]["changed"] == {"steps": [1, 2]}
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_2_an_edited_data_file_is_another_job(tmp_path):
    from r4b.rundir import JobChanged, check_resume, write_job_record

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"question": "1+1?", "answer": "2"}) + "\n")
    job = _tiny_job(tmp_path / "run", data=str(data))
    (tmp_path / "run").mkdir()
    write_job_record(tmp_path / "run", check_resume(tmp_path / "run", job, resuming=False))
    assert check_resume(tmp_path / "run", job, resuming=True)["changes"] == []
    data.write_text(json.dumps({"question": "1+2?", "answer": "3"}) + "\n")
    with pytest.raises(JobChanged, match=r"data_sha256: '[0-9a-f]{64}' -> '[0-9a-f]{64}'"):
        check_resume(tmp_path / "run", job, resuming=True)


def test_2_a_reused_annealing_run_of_another_job_is_refused(finished, tmp_path):
    import dataclasses

    from r4b.pretrain_bpo import run_bpo
    from r4b.rundir import JobChanged
    from r4b.runtime import init_runtime

    job, out, _ = finished
    other = _tiny_job(tmp_path / "other", anneal_dir=str(out / "anneal"),
                      setup=dataclasses.replace(job.setup, seed=3))
    with pytest.raises(JobChanged, match=r"annealing run .* made by another job: setup\.seed: 0 -> 3"):
        run_bpo(other, init_runtime(1))
    other = _tiny_job(tmp_path / "other2", anneal_dir=str(out / "anneal"),
                      setup=dataclasses.replace(job.setup, task=dataclasses.replace(
                          job.setup.task, n_digits=job.setup.task.n_digits + 1)))
    with pytest.raises(JobChanged, match=r"setup\.task\.n_digits"):
        run_bpo(other, init_runtime(1))


def test_3_a_launch_that_fails_its_checks_leaves_job_json_as_it_was(finished, tmp_path):
    import dataclasses

    from r4b.pretrain_bpo import run_bpo
    from r4b.rundir import JobChanged
    from r4b.runtime import init_runtime

    job, out, before = finished
    with pytest.raises(JobChanged, match=r"setup\.tp_size: 1 -> 2"):
        run_bpo(dataclasses.replace(job, setup=dataclasses.replace(job.setup, tp_size=2)),
                init_runtime(1))
    assert (out / "job.json").read_bytes() == before
    # a first launch that fails a later check writes no job.json at all
    fresh = tmp_path / "fresh"
    with pytest.raises(ValueError, match="leaves no training item"):
        run_bpo(_tiny_job(fresh, rl=dataclasses.replace(job.rl, levels=(99,))), init_runtime(1))
    assert not (fresh / "job.json").exists()


# ---------------------------------------------------------------- 4. stale reports and exports
def test_4_report_and_history_name_their_checkpoint_and_a_kill_leaves_the_old_report(
        finished, monkeypatch):
    import dataclasses

    import r4b.report as report_mod
    from r4b.pretrain_bpo import run_bpo
    from r4b.rundir import JobChanged
    from r4b.runtime import init_runtime

    job, out, _ = finished
    src = json.loads((out / "report" / "source.json").read_text())
    assert src["step"] == 1 and src["checkpoint"].endswith("step_00000001")
    assert "after 1 steps" in (out / "report" / "report.md").read_text()
    hist = json.loads((out / "history.json").read_text())
    assert hist["step"] == 1 and hist["checkpoint"].endswith("step_00000001")
    old_report = (out / "report" / "report.json").read_bytes()

    # killed after the step-2 checkpoint, inside the report (a plot): the old report stays whole
    def killed(*a, **k):
        raise KeyboardInterrupt("killed while plotting")

    monkeypatch.setattr(report_mod, "plot_history", killed)
    longer = dataclasses.replace(job, steps=2, resume_changed=("steps",))
    with pytest.raises(KeyboardInterrupt):
        run_bpo(longer, init_runtime(1))
    assert (out / "report" / "report.json").read_bytes() == old_report
    assert json.loads((out / "report" / "source.json").read_text())["step"] == 1  # says it is old
    assert json.loads((out / "history.json").read_text())["step"] == 2  # saved with the checkpoint
    monkeypatch.undo()
    run_bpo(longer, init_runtime(1))  # the rerun evaluates step 2 and says so
    assert json.loads((out / "report" / "source.json").read_text())["step"] == 2
    assert not list(out.glob(".report*"))
    # fewer steps than the checkpoint's: an error, not a report titled with the wrong step
    with pytest.raises(JobChanged, match=r"steps 1 is below the step of .*step_00000002 \(2\)"):
        run_bpo(dataclasses.replace(job, resume_changed=("steps",)), init_runtime(1))


def test_4_export_refuses_a_full_folder_and_replaces_it_whole(finished, tmp_path):
    from r4b.export import ExportCLI, export
    from r4b.runtime import init_runtime

    job, out, _ = finished
    dest = tmp_path / "hf"
    dest.mkdir()
    for junk in ("model-00002-of-00002.safetensors", "model.safetensors.index.json",
                 "tokenizer.json"):
        (dest / junk).write_text("from another export")
    with pytest.raises(ValueError, match=r"is not empty; pass --replace True"):
        export(ExportCLI(run_dir=str(out), out_dir=str(dest)), init_runtime(1))
    assert sorted(p.name for p in dest.iterdir())[0] == "model-00002-of-00002.safetensors"
    export(ExportCLI(run_dir=str(out), out_dir=str(dest), replace=True), init_runtime(1))
    names = sorted(p.name for p in dest.iterdir())
    assert "model-00002-of-00002.safetensors" not in names and "tokenizer.json" not in names
    assert {"config.json", "model.safetensors", "generation_config.json",
            "r4b_export.json"} <= set(names)
    meta = json.loads((dest / "r4b_export.json").read_text())
    assert meta["step"] == 1 and meta["checkpoint"].endswith("step_00000001")
    assert not list(tmp_path.glob(".hf*"))


def test_4_export_writes_generation_config_from_the_special_tokens(assets, tmp_path):
    from r4b.components import ModelChoice, make_tokenizer
    from r4b.export import generation_config

    tok = make_tokenizer(ModelChoice(hf_path=str(assets[3][True]), tokenizer_path=str(assets[1])))
    cfg = generation_config(tok)
    assert cfg["eos_token_id"] == [R.SPECIALS["<|im_end|>"], R.SPECIALS["<|endoftext|>"]]
    assert cfg["pad_token_id"] == tok.pad_id
    import transformers

    (tmp_path / "generation_config.json").write_text(json.dumps(cfg))
    g = transformers.GenerationConfig.from_pretrained(str(tmp_path))
    assert g.eos_token_id == cfg["eos_token_id"]


# ---------------------------------------------------------------- 5. degenerate training
def test_5_zero_variance_steps_and_a_short_training_set_warn(tmp_path, monkeypatch, caplog):
    import logging

    import r4b.rl.bpo as bpo
    from r4b.pretrain_bpo import DEGENERATE_STEPS, run_bpo
    from r4b.runtime import init_runtime

    monkeypatch.setattr(bpo, "verify", lambda text, answer: 0.0)  # reward 0 everywhere
    job = _tiny_job(tmp_path / "run", steps=DEGENERATE_STEPS, ckpt_every=100, eval_every=100)
    job.anneal.n_train_items = 16
    job.rl.prompts_per_step = 40  # more than the 16 training items
    with caplog.at_level(logging.WARNING, logger="r4b"):
        run_bpo(job, init_runtime(1))
    text = caplog.text
    assert "rl.prompts_per_step is 40 but the training set has 16 items" in text
    assert f"every group had the same reward for all its rollouts (zero variance) in the last " \
           f"{DEGENERATE_STEPS} steps" in text


# ---------------------------------------------------------------- 6. noise that hides faults
def test_6_a_cleanly_released_lock_gives_no_warning_on_the_next_run(tmp_path, caplog):
    import logging

    from r4b.rundir import lock_run_dir

    with lock_run_dir(tmp_path):
        pass
    with caplog.at_level(logging.WARNING, logger="r4b"):
        with lock_run_dir(tmp_path):
            pass
    assert "without releasing it" not in caplog.text


_FAILING_JOB = """
import sys
from r4b.errors import JobError
from r4b.log import setup_logging
from r4b.runtime import init_runtime, run_entry

setup_logging()
rt = init_runtime(1)

def fn(job, rt):
    if job == "same":
        raise JobError("the data file holds no rows")
    if job == "unexpected":
        raise FileExistsError("[Errno 17] File exists: 'runs/x'")
    raise JobError(f"rank {rt.rank} saw its own fault")

sys.exit(run_entry(fn, sys.argv[1], rt))
"""


@pytest.mark.parametrize("kind", ["same", "unexpected", "per-rank"])
def test_6_one_error_report_per_job_not_per_rank(tmp_path, kind):
    from r4b.models.parallel import free_port

    script = tmp_path / "job.py"
    script.write_text(_FAILING_JOB)
    r = run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
             f"--master-port={free_port()}", str(script), kind], timeout=180)
    assert r.returncode != 0
    err = r.stderr
    worker_frames = err.count(f'{script}", line')  # the launcher's own traceback names none
    if kind == "same":
        assert err.count("the data file holds no rows") == 1, err[-3000:]
        assert worker_frames == 0, err[-3000:]
    elif kind == "unexpected":  # one traceback, from rank 0
        assert err.count("FileExistsError: [Errno 17]") == 1, err[-3000:]
        assert worker_frames >= 1 and "[rank1]" not in err, err[-3000:]
    else:  # different errors on each rank: both are reported
        assert "rank 0 saw its own fault" in err and "rank 1 saw its own fault" in err


def test_6_a_file_as_out_dir_fails_at_parse_time(tmp_path, capsys):
    from r4b.config import parse_cli
    from r4b.pretrain_bpo import BPOJob

    f = tmp_path / "a-file"
    f.write_text("x")
    for flag in ("--out_dir", "--anneal_dir"):
        with pytest.raises(SystemExit):
            parse_cli(BPOJob, [flag, str(f)])
        out = "".join(ch for ch in "".join(capsys.readouterr()) if ch.isascii() and not ch.isspace())
        assert f"{flag[2:]}{str(f)!r}isafile;expectedarundirectory" in out, out


# ---------------------------------------------------------------- 8. messages that say where
def test_8_a_vision_tower_that_tp_cannot_split_is_named(monkeypatch):
    import r4b.models.vision as vision
    from r4b.models.presets import get_preset

    import dataclasses

    v = dataclasses.replace(get_preset("tiny").vision, num_heads=3, hidden_size=48)
    monkeypatch.setattr(vision, "_group_size_rank", lambda group: (2, 0))
    with pytest.raises(ValueError, match=r"the vision tower's num_heads \(vision\.num_heads\) "
                                         r"must be divisible by the tensor-parallel size 2, got 3"):
        vision.VisionAttention(v, None, None)


def test_8_the_planner_says_which_layouts_it_leaves_out_and_never_prints_0_kib(capsys):
    from r4b.plan import main

    assert main(["--preset", "tiny", "--gpus", "6"]) == 0
    out = capsys.readouterr().out
    assert "TP=3 DP=2 left out:" in out and "is not divisible by 3" in out
    assert "(0 KiB per token)" not in out and " per token)" in out


def test_the_packed_layout_may_change_on_resume():
    """``share_prefix`` changes the packing, not the math: a resume may switch it (and a run
    directory recorded before the option existed resumes with it named)."""
    from r4b.rundir import _safe, job_differences

    old = {"rl": {"lr": 1e-4}, "anneal": {"warmup_steps": 3}}
    new = {"rl": {"lr": 1e-4, "share_prefix": True},
           "anneal": {"warmup_steps": 3, "share_prefix": True}}
    diffs = job_differences(old, new)
    assert diffs == {"anneal.share_prefix": (None, True), "rl.share_prefix": (None, True)}
    assert all(_safe(k) for k in diffs)
    assert _safe("setup.rollout.share_prompts")
    assert not _safe("rl.lr") and not _safe("rl.group_size")
