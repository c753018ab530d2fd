"""Hostile input and failures: each numbered finding of the reliability audit, reproduced and
handled.

1 duplicate ids; 2 a kill inside a re-save of the same step; 3 a second job on one run
directory, and workers outliving a killed launcher; 4 a frozen rank; 5 bad weights (NaN,
truncated files, flipped bytes, differing replicas); 6 options that failed late; 7 recipes
that were not type-checked; 9 the planner's int64 sums and progress lines in log files.
(8, the readers, is tests/test_readers.py; the verifier's part of 9 is tests/test_rewards.py.)
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

HERE = Path(__file__).resolve()


def _tiny(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _step(model, opt, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    loss = model(torch.randn(8, 4, generator=g)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


# ---------------------------------------------------------------- 1. duplicate ids
def test_1_duplicate_ids_never_reach_the_rewards(tmp_path):
    from r4b.data import read_samples

    rows = [{"id": "a", "question": "1+1?", "answer": "2"}, {"id": "b", "question": "2+2?", "answer": "4"},
            {"id": "a", "question": "3+3?", "answer": "6"}]
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"row 3.*'a'.*row 1|row 1.*row 3"):
        read_samples(f)
    # and the trainer refuses a rollout batch that holds one item twice
    from r4b.components import Setup, make_template, make_tokenizer, model_config
    from r4b.data import TaskConfig
    from r4b.models import build_model
    from r4b.rl.bpo import BPOTrainer
    from r4b.rl.config import RLConfig
    from r4b.components import build_engine
    from r4b.runtime import init_runtime

    task = TaskConfig(vision=False)
    setup = Setup(task=task)
    tok = make_tokenizer(setup.model)
    cfg = model_config(setup.model, tok, task)
    model = build_model(cfg)
    tmpl = make_template(tok, cfg)
    items = task.make(0, 2, split="train")
    trainer = BPOTrainer(RLConfig(), policy=model, engine=build_engine(model, tmpl, tok, max_seqlen=128),
                         template=tmpl, rt=init_runtime(1))
    with pytest.raises(ValueError, match="more than once"):
        trainer.rollout([items[0], items[1], items[0]], 0, torch.Generator().manual_seed(0))


# ---------------------------------------------------------------- 2. kill inside a re-save
@pytest.mark.parametrize("point", ["after model", "after optim", "before rename", "after rename",
                                   "after latest"])
def test_2_kill_inside_a_resave_of_the_same_step_keeps_a_loadable_checkpoint(tmp_path, monkeypatch,
                                                                               point):
    """Annealing saves step ``warmup_steps`` twice.  Killing the second save at any point leaves
    ``latest`` (or its fallback) loadable; before, the first copy was removed before the second
    was renamed in and a kill between the two left every restart failing."""
    import r4b.checkpoint as ck

    model, opt = _tiny()
    ck.save_checkpoint(tmp_path, 300, model=model, optimizer=opt, state={"v": 1})
    first = {k: v.clone() for k, v in model.state_dict().items()}
    _step(model, opt)
    second = {k: v.clone() for k, v in model.state_dict().items()}

    def die(name):
        if name == point:
            raise KeyboardInterrupt(f"killed {name}")

    monkeypatch.setattr(ck, "_crash_point", die)
    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint(tmp_path, 300, model=model, optimizer=opt, state={"v": 2})
    monkeypatch.setattr(ck, "_crash_point", lambda name: None)
    m2, o2 = _tiny(5)
    loaded = ck.load_checkpoint(tmp_path, model=m2, optimizer=o2)
    assert loaded.step == 300
    want = second if loaded.state["v"] == 2 else first
    assert loaded.state["v"] == (2 if point == "after latest" else 1)  # latest is the commit point
    for k, v in m2.state_dict().items():
        assert torch.equal(v, want[k]), k
    # the next save still works and prunes
    ck.save_checkpoint(tmp_path, 301, model=model, optimizer=opt)
    assert ck.latest_checkpoint(tmp_path).name == "step_00000301"


def test_2_dangling_latest_falls_back_with_a_warning(tmp_path, caplog):
    from r4b.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint

    model, opt = _tiny()
    save_checkpoint(tmp_path, 1, model=model, optimizer=opt)
    (tmp_path / "latest").write_text("step_00000009\n")
    with caplog.at_level(logging.WARNING, logger="r4b"):
        assert latest_checkpoint(tmp_path).name == "step_00000001"
    assert "not a complete checkpoint" in caplog.text
    assert load_checkpoint(tmp_path, model=_tiny(3)[0]).step == 1


# ---------------------------------------------------------------- 3. one job per run directory
_HOLDER = textwrap.dedent("""
    import sys, time
    from r4b.rundir import lock_run_dir
    lock = lock_run_dir(sys.argv[1])
    print("locked", flush=True)
    time.sleep(120)
""")


def test_3_second_job_on_a_run_directory_stops_and_a_crashed_one_is_taken_over(tmp_path):
    from r4b.rundir import RunDirBusy, lock_run_dir

    p = subprocess.Popen([sys.executable, "-c", _HOLDER, str(tmp_path)], stdout=subprocess.PIPE,
                         text=True)
    try:
        assert p.stdout.readline().strip() == "locked"
        t0 = time.monotonic()
        with pytest.raises(RunDirBusy, match=rf"in use by another job \(pid {p.pid}"):
            lock_run_dir(tmp_path)
        assert time.monotonic() - t0 < 5
        p.send_signal(signal.SIGKILL)  # crash: the lock file stays behind
        p.wait(timeout=30)
        assert (tmp_path / ".lock").exists()
        with lock_run_dir(tmp_path):  # the successor takes over
            info = json.loads((tmp_path / ".lock").read_text())
            assert info["pid"] == os.getpid()
    finally:
        p.kill()


_LONG_JOB = textwrap.dedent("""
    import os, time
    from r4b.runtime import init_runtime
    rt = init_runtime(1)
    # one write per line: two ranks share the pipe, and print() writes its pieces apart
    os.write(1, f"pid {rt.rank} {os.getpid()}\\n".encode())
    while True:
        time.sleep(0.5)
""")


def test_3_workers_exit_when_the_launcher_is_killed(tmp_path):
    from r4b.models.parallel import free_port

    script = tmp_path / "job.py"
    script.write_text(_LONG_JOB)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MASTER_", "RANK", "WORLD_SIZE", "LOCAL_", "TORCHELASTIC"))}
    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                                 f"--master-port={free_port()}", str(script)],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                env={**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    pids = []
    lines: queue.Queue = queue.Queue()
    # A reader thread, not select() on the pipe: lines already buffered by the reader would
    # never wake select() again.
    threading.Thread(target=lambda: [lines.put(ln) for ln in launcher.stdout] + [lines.put("")],
                     daemon=True).start()
    try:
        deadline = time.monotonic() + 180
        while len(pids) < 2:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError("the workers did not start within 180 s") from None
            assert line, "the job ended before printing its pids"
            if line.startswith("pid"):
                pids.append(int(line.split()[2]))
        launcher.send_signal(signal.SIGKILL)  # no chance to forward a signal
        launcher.wait(timeout=30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.2)
        assert not any(_alive(p) for p in pids), "workers outlived their launcher"
    finally:
        launcher.kill()
        for p in pids:
            if _alive(p):
                os.kill(p, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


# ---------------------------------------------------------------- 4. a frozen rank
_FROZEN = textwrap.dedent("""
    import os, signal, sys
    import torch
    sys.path.insert(0, sys.argv[1])
    from test_training import _examples, _model, _parts
    from r4b.runtime import init_runtime, run_entry
    from r4b.sft import OptimConfig, make_optimizer, sft_step
    rt = init_runtime(1, timeouts={"rollout": 60.0, "update": 8.0})
    cfg, tmpl, items = _parts()
    ex = _examples(tmpl, items)
    model = _model(cfg, rt, shard=True)
    opt = make_optimizer(model, OptimConfig())

    def job(_, rt):
        for step in range(6):
            if step == 2 and rt.rank == 1:
                os.kill(os.getpid(), signal.SIGSTOP)  # frozen, not dead
            sft_step(model, opt, ex[:8], rt, lr=1e-3, grad_clip=1.0, tokens_per_microbatch=64)
            print("step", step, rt.rank, flush=True)

    sys.exit(run_entry(job, None, rt))
""")


def test_4_a_frozen_rank_ends_the_job_with_a_message_naming_it(tmp_path):
    from r4b.models.parallel import free_port

    script = tmp_path / "frozen.py"
    script.write_text(_FROZEN)
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                        f"--master-port={free_port()}", str(script), str(HERE.parent)],
                       capture_output=True, text=True, timeout=240,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "R4B_NO_PROGRESS": "1"})
    took = time.monotonic() - t0
    assert r.returncode != 0
    assert "rank(s) [1] stopped answering" in r.stderr, r.stderr[-3000:]
    assert "during update" in r.stderr
    assert took < 200, took


# ---------------------------------------------------------------- 5. bad weights
def test_5_nan_weights_are_refused_on_load(tmp_path):
    from r4b.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

    model, opt = _tiny()
    with torch.no_grad():
        model[0].weight.fill_(float("nan"))
    save_checkpoint(tmp_path, 1, model=model, optimizer=opt)
    with pytest.raises(CheckpointError, match=r"non-finite values in \['0.weight'\]"):
        load_checkpoint(tmp_path / "step_00000001", model=_tiny()[0])
    load_checkpoint(tmp_path / "step_00000001", model=_tiny()[0], check_finite=False)


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_5_a_damaged_file_is_named_and_an_older_checkpoint_is_used(tmp_path, damage, caplog):
    from r4b.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

    model, opt = _tiny()
    save_checkpoint(tmp_path, 1, model=model, optimizer=opt)
    good = {k: v.clone() for k, v in model.state_dict().items()}
    _step(model, opt)
    save_checkpoint(tmp_path, 2, model=model, optimizer=opt)
    f = tmp_path / "step_00000002" / "model-tp00-dp000.safetensors"
    data = bytearray(f.read_bytes())
    if damage == "truncate":
        f.write_bytes(bytes(data[: len(data) // 2]))
    else:
        data[-5] ^= 0xFF
        f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=str(f.name)):
        load_checkpoint(tmp_path / "step_00000002", model=_tiny(2)[0])
    m3 = _tiny(4)[0]
    with caplog.at_level(logging.WARNING, logger="r4b"):
        loaded = load_checkpoint(tmp_path, model=m3)  # the root: falls back
    assert loaded.step == 1 and "step_00000002" in caplog.text and f.name in caplog.text
    for k, v in m3.state_dict().items():
        assert torch.equal(v, good[k])


_REPLICAS = textwrap.dedent("""
    import sys, torch
    from r4b.checkpoint import CheckpointError, _check_replicas, _layout, save_checkpoint
    from r4b.runtime import init_runtime
    rt = init_runtime(1)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    save_checkpoint(sys.argv[1], 1, model=model)
    _check_replicas(model, _layout(), sys.argv[1])          # equal replicas pass
    if rt.rank == 1:
        with torch.no_grad():
            model.weight[0, 0] += 1.0
    try:
        _check_replicas(model, _layout(), sys.argv[1])
        print("undetected", rt.rank)
    except CheckpointError as e:
        print("detected", rt.rank, e)
    torch.distributed.destroy_process_group()  # not at interpreter exit: gloo aborts there
""")


def test_5_differing_dp_replicas_are_detected(tmp_path):
    from r4b.models.parallel import free_port

    script = tmp_path / "rep.py"
    script.write_text(_REPLICAS)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                        f"--master-port={free_port()}", str(script), str(tmp_path / "ck")],
                       capture_output=True, text=True, timeout=240,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("detected") == 2 and "undetected" not in r.stdout


def test_5_evaluating_nan_weights_exits_nonzero(tmp_path):
    """Before, evaluating a checkpoint full of NaN exited 0 with an all-zero report."""
    from r4b.checkpoint import latest_checkpoint
    from r4b.evaluate import main

    run = tmp_path / "run"
    _tiny_bpo_run(run)
    ck = latest_checkpoint(run / "ckpt")
    from safetensors.torch import load_file, save_file

    f = next(ck.glob("model-*.safetensors"))
    sd = load_file(str(f))
    name = next(k for k in sd if k.endswith("embed_tokens.weight"))
    sd[name] = torch.full_like(sd[name], float("nan"))
    import safetensors

    with safetensors.safe_open(str(f), "pt") as h:
        meta = h.metadata()
    save_file(sd, str(f), metadata=meta)
    manifest = json.loads((ck / "manifest.json").read_text())
    import hashlib

    manifest["files"][f.name] = {"bytes": f.stat().st_size,
                                 "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}
    (ck / "manifest.json").write_text(json.dumps(manifest))
    assert main(["--run_dir", str(run), "--eval.n_items", "2"]) == 1


def _tiny_bpo_run(out: Path):
    from r4b.anneal import AnnealConfig
    from r4b.components import Setup
    from r4b.data import TaskConfig
    from r4b.evaluate import EvalConfig
    from r4b.pretrain_bpo import BPOJob, run_bpo
    from r4b.rl.config import RLConfig
    from r4b.runtime import init_runtime
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
    run_bpo(job, init_runtime(1))
    return job


# ---------------------------------------------------------------- 6. options that failed late
@pytest.mark.parametrize("argv,needle", [
    (["--rl.lr", "inf"], "rl.lr must be a finite number"),
    (["--setup.seed", str(2**62)], "setup.seed must be in"),
    (["--eval.temperature", "0"], "eval.temperature must be in"),
    (["--eval.max_new_tokens_think", "0"], "eval.max_new_tokens_think must be in"),
    (["--setup.model.params_dtype", "float16"], "float16"),
    (["--setup.timeout_update_s", "0"], "setup.timeout_update_s"),
    (["--data", "/no/such/file.parquet"], "is not a file"),
])
def test_6_bad_options_fail_at_parse_time(argv, needle, capsys):
    from r4b.config import parse_cli
    from r4b.pretrain_bpo import BPOJob

    t0 = time.monotonic()
    with pytest.raises(SystemExit):
        parse_cli(BPOJob, argv)
    err = capsys.readouterr()
    assert needle in err.out + err.err
    assert time.monotonic() - t0 < 20


def test_6_empty_eval_modes_and_a_float_step_count_fail_before_any_work(tmp_path, capsys):
    from r4b.config import parse_cli
    from r4b.pretrain_bpo import BPOJob

    recipe = tmp_path / "r.toml"
    recipe.write_text("steps = 3.0\n")
    with pytest.raises(SystemExit, match=r"steps must be an integer, got float 3.0"):
        parse_cli(BPOJob, ["--config", str(recipe)])
    recipe.write_text("[eval]\nmodes = []\n")
    with pytest.raises(SystemExit, match=r"eval.modes must name at least one"):
        parse_cli(BPOJob, ["--config", str(recipe)])


def test_6_a_response_budget_over_the_engine_limit_fails_before_annealing(tmp_path):
    from r4b.components import RolloutConfig, Setup
    from r4b.data import TaskConfig
    from r4b.preflight import PreflightError
    from r4b.pretrain_bpo import BPOJob, run_bpo
    from r4b.rl.config import RLConfig
    from r4b.runtime import init_runtime

    job = BPOJob(setup=Setup(task=TaskConfig(vision=False), rollout=RolloutConfig(max_seqlen=128)),
                 rl=RLConfig(max_new_tokens_think=1000), out_dir=str(tmp_path / "run"))
    t0 = time.monotonic()
    with pytest.raises(PreflightError, match=r"response budget 1000 .* exceeds the rollout engine's 128"):
        run_bpo(job, init_runtime(1))
    assert time.monotonic() - t0 < 60
    assert not (tmp_path / "run" / "anneal" / "ckpt").exists()  # no annealing happened


# ---------------------------------------------------------------- 7. recipes are type-checked
@pytest.mark.parametrize("toml,needle", [
    ('tensorboard = "no"\n', "tensorboard must be true or false, got str 'no'"),
    ("rl = 5\n", "rl must be a table of RLConfig fields, got int 5"),
    ('[rl]\neps_high = "0.3"\n', "rl.eps_high must be a number, got str '0.3'"),
    ('[rl]\nalgo = "ppo"\n', "rl.algo must be one of ('bpo', 'grpo'), got 'ppo'"),
    ("[setup]\ntp_size = 1.5\n", "setup.tp_size must be an integer"),
    ("[rl]\nlr = nan\n", "rl.lr must be a finite number"),
])
def test_7_recipes_get_the_command_line_checks(tmp_path, toml, needle):
    from r4b.config import parse_cli
    from r4b.pretrain_bpo import BPOJob

    recipe = tmp_path / "r.toml"
    recipe.write_text(toml)
    with pytest.raises(SystemExit) as e:
        parse_cli(BPOJob, ["--config", str(recipe)])
    assert needle in str(e.value), str(e.value)


def test_7_config_is_in_the_help(capsys):
    from r4b.config import parse_cli
    from r4b.pretrain_bpo import BPOJob

    with pytest.raises(SystemExit):
        parse_cli(BPOJob, ["--help"])
    assert "--config FILE" in capsys.readouterr().out


# ---------------------------------------------------------------- 9. planner sums, progress
def test_9_planner_refuses_lengths_whose_sums_would_wrap():
    from r4b.packing import plan_microbatches

    for impl in ("cpp", "numpy", "python"):
        with pytest.raises(ValueError, match=r"seq_lens must be <= 2\*\*40"):
            plan_microbatches(np.array([2**62] * 3, dtype=np.int64), num_ranks=1,
                              tokens_per_microbatch=2**63 - 1, impl=impl)


def test_9_progress_in_a_log_file_is_a_line_a_minute_not_a_line_a_step(monkeypatch, caplog):
    import r4b.log as L

    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    monkeypatch.setenv("R4B_PROGRESS_INTERVAL", "3600")
    monkeypatch.delenv("R4B_NO_PROGRESS", raising=False)
    with caplog.at_level(logging.INFO, logger="r4b"):
        bar = L.progress(total=500, desc="bpo")
        for _ in range(500):
            bar.update(1)
        bar.close()
    lines = [r for r in caplog.records if r.name == "r4b.progress"]
    assert len(lines) == 1 and "bpo: 500/500" in lines[0].getMessage()


def test_nonfinite_sft_step_logs_why(caplog):
    from r4b.runtime import init_runtime
    from r4b.sft import OptimConfig, make_optimizer, sft_step
    from test_training import _examples, _model, _parts

    rt = init_runtime(1)
    cfg, tmpl, items = _parts()
    model = _model(cfg, rt, shard=False)
    with torch.no_grad():
        next(model.parameters()).view(-1)[:10] = float("inf")
    opt = make_optimizer(model, OptimConfig())
    with caplog.at_level(logging.WARNING, logger="r4b"):
        m = sft_step(model, opt, _examples(tmpl, items)[:4], rt, lr=1e-3, grad_clip=1.0,
                     tokens_per_microbatch=64)
    assert m["skipped"] == 1 and "SFT step skipped: non-finite" in caplog.text
