"""The README's GPU recipe on a CPU at cut depth.

A random R-4B-shaped checkpoint saved by transformers (Qwen3 text + SigLIP vision +
LLaVA-OneVision projector and ``image_newline``; 2 + 2 layers, Qwen3-4B's vocabulary of 151936,
384-px tiles of 14-px patches), a local tokenizer with R-4B's special tokens at Qwen3's ids and
a Qwen3-style chat template, and a Parquet file of real-size images (several sizes, two-image
prompts, a grayscale image, text-only rows) go through ``torchrun --nproc-per-node 2 -m
r4b.pretrain_bpo`` at TP=1 (DP=2, sharded) and at TP=2: annealing plus two BPO steps.  The first
SFT loss is the loss transformers computes for the same batch with the same weights; TP=2 and
TP=1 report the same loss and gradient norm.

Widths: the torchrun runs use small hidden widths (a 1.5k-token image prompt at r4b-4b's widths
costs ~80 s of one core per forward + backward, several minutes per step here); the same loss
parity at r4b-4b's real widths (hidden 2560, SigLIP 1152) is checked in one process, and the
whole recipe at real widths is the ``exhaustive`` test at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import real_r4b as R  # noqa: E402

transformers = pytest.importorskip("transformers")

ANNEAL = ["--anneal.warmup_steps", "1", "--anneal.anneal_steps", "1", "--anneal.batch_size", "2",
          "--anneal.curate_items", "2", "--anneal.curation_samples", "1",
          "--anneal.curation_max_new_tokens", "3", "--anneal.vision_align_steps", "0",
          "--anneal.optim.warmup_steps", "1"]
RL = ["--rl.prompts_per_step", "2", "--rl.group_size", "1", "--rl.max_new_tokens_think", "4",
      "--rl.max_new_tokens_no_think", "3", "--rl.max_new_tokens_auto", "4", "--rl.lr", "1e-6"]
EVAL = ["--eval.n_items", "1", "--eval.max_new_tokens_think", "3",
        "--eval.max_new_tokens_no_think", "3", "--eval.max_new_tokens_auto", "3"]
JOB = ["--steps", "2", "--eval_every", "100", "--eval_items_during", "1", "--ckpt_every", "100",
       "--tensorboard", "False", "--setup.model.params_dtype", "float32"]


def _assets(root: Path, widths: str):
    tok = R.make_tokenizer(root / "tok")
    ckpt = R.make_checkpoint(root / "ckpt", original_format=True, widths=widths)
    data = R.write_images_parquet(root / "data")
    return root, tok, ckpt, data


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return _assets(tmp_path_factory.mktemp("small"), "small")


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    return _assets(tmp_path_factory.mktemp("real"), "real")


RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "r4b-4b.toml"


def _run(assets, tp: int, name: str, *, preset: str = "auto") -> dict:
    """README's GPU command (``--config recipes/r4b-4b.toml``) on CPU: cut depth, budgets and
    steps overridden down, float32."""
    from r4b.models.parallel import free_port

    root, tok, ckpt, data = assets
    out = root / name
    env = {**os.environ, "OMP_NUM_THREADS": "1", "R4B_NO_PROGRESS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
           f"--master-port={free_port()}", "-m", "r4b.pretrain_bpo", "--config", str(RECIPE),
           "--setup.model.hf_path", str(ckpt), "--setup.model.tokenizer_path", str(tok),
           "--setup.tp_size", str(tp), "--data", str(data), "--out_dir", str(out),
           "--setup.model.preset", preset, *JOB, *ANNEAL, *RL, *EVAL]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1500)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-6000:]
    anneal = [json.loads(x) for x in (out / "anneal" / "metrics.jsonl").read_text().splitlines()]
    bpo = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    report = json.loads((out / "report" / "report.json").read_text())
    # the checkpoints are large (model + optimizer at real widths): drop them now
    for d in (out / "ckpt", out / "anneal" / "ckpt"):
        shutil.rmtree(d, ignore_errors=True)
    return {"anneal": anneal, "bpo": bpo, "report": report, "log": log}


@pytest.fixture(scope="module")
def runs(small):
    return {1: _run(small, 1, "tp1"), 2: _run(small, 2, "tp2")}


def _transformers_first_loss(assets, preset: str = "auto") -> float:
    """The first warm-up SFT batch's loss, computed by transformers: summed token
    cross-entropy over the response tokens of the batch, divided by their number."""
    from r4b.anneal import direct_examples
    from r4b.components import (ModelChoice, image_processor, load_items, make_template,
                                make_tokenizer, model_config, Setup)
    from r4b.data import TaskConfig
    from r4b.models.multimodal import ImageBatch
    from r4b.sft import batch_indices

    root, tok_dir, ckpt, data = assets
    choice = ModelChoice(hf_path=str(ckpt), tokenizer_path=str(tok_dir), params_dtype="float32",
                         preset=preset)
    tok = make_tokenizer(choice)
    cfg = model_config(choice, tok, TaskConfig())
    template = make_template(tok, cfg, choice)
    train, _ = load_items(Setup(model=choice), str(data), n_train=0, n_eval=0)
    warm = direct_examples(train, template, both_forms=True)
    batch = [warm[i] for i in batch_indices(len(warm), 2, 0, 0)]
    ref = transformers.LlavaOnevisionForConditionalGeneration.from_pretrained(
        str(ckpt), dtype=torch.float32).eval()
    process = image_processor(cfg)
    total, n = 0.0, 0
    with torch.no_grad():
        for ex in batch:
            ids = torch.tensor([ex.ids])
            kw = {}
            if ex.images:
                imgs = ImageBatch.collate(process(ex.images))
                kw = dict(pixel_values=imgs.pixel_values, image_sizes=imgs.image_sizes,
                          batch_num_images=torch.tensor([len(ex.images)]))
            logits = ref(input_ids=ids, **kw).logits[0].float()
            P = ex.prompt_len
            total += float(torch.nn.functional.cross_entropy(logits[P - 1:-1], ids[0, P:],
                                                             reduction="sum"))
            n += len(ex.ids) - P
    return total / n


def _check_run(tp, r):
    phases = [m["phase"] for m in r["anneal"]]
    assert phases == ["warmup", "anneal"], (tp, phases)
    assert [m["step"] for m in r["bpo"]] == [1, 2], tp
    assert "transformers-original layout" in r["log"]
    assert set(r["report"]) >= {"auto", "think", "no_think"}
    for m in r["anneal"] + r["bpo"]:
        assert m.get("skipped", 0) == 0 and m.get("skipped_steps", 0) == 0, (tp, m)


def test_recipe_runs_at_tp1_and_tp2(runs):
    for tp, r in runs.items():
        _check_run(tp, r)


def test_first_sft_loss_is_transformers_loss_not_ln_v(small, runs):
    want = _transformers_first_loss(small)
    ln_v = torch.log(torch.tensor(float(R.VOCAB))).item()
    assert abs(want - ln_v) > 0.2  # a loaded checkpoint, not a freshly initialised model
    for tp, r in runs.items():
        got = r["anneal"][0]["loss"]
        assert abs(got - want) <= 2e-4 * abs(want), (tp, got, want)


def test_tp2_matches_tp1_loss_and_grad_norm(runs):
    a, b = runs[1]["anneal"][0], runs[2]["anneal"][0]
    assert abs(a["loss"] - b["loss"]) <= 1e-4 * abs(a["loss"])
    assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-4 * abs(a["grad_norm"]), (a, b)


def test_real_widths_loss_matches_transformers(real):
    """At r4b-4b's widths: r4b's loss on a 384x384-image SFT example (1485 image tokens)
    equals transformers' on the same checkpoint."""
    from r4b.packing import forward_rows, pack
    from r4b.components import (ModelChoice, build_policy, image_processor, load_items,
                                make_template, make_tokenizer, model_config, Setup)
    from r4b.data import TaskConfig
    from r4b.models.multimodal import ImageBatch
    from r4b.runtime import init_runtime
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    root, tok_dir, ckpt, data = real
    choice = ModelChoice(hf_path=str(ckpt), tokenizer_path=str(tok_dir), params_dtype="float32",
                         preset="r4b-4b")
    tok = make_tokenizer(choice)
    cfg = model_config(choice, tok, TaskConfig())
    assert (cfg.lm.hidden_size, cfg.vision.hidden_size, cfg.lm.vocab_size) == (2560, 1152, 151936)
    template = make_template(tok, cfg, choice)
    train, evals = load_items(Setup(model=choice), str(data), n_train=0, n_eval=0)
    it = evals[0]  # row 0: a 384x384 image
    assert [im.shape for im in it.images] == [(3, 384, 384)]
    ex = template.item_sft_example(it, it.reasoning)
    model = build_policy(choice, cfg, init_runtime(1), seed=0)
    mb = pack([ex.input_ids], [ex.prompt_len], [list(it.images)], [[0]],
              process=image_processor(cfg))[0]
    with torch.no_grad():
        logits = forward_rows(model, mb, return_hidden=False, gather_logits=False).float()
        ours = float(vocab_parallel_cross_entropy(logits, mb.targets).sum())
    del model
    ref = transformers.LlavaOnevisionForConditionalGeneration.from_pretrained(
        str(ckpt), dtype=torch.float32).eval()
    imgs = ImageBatch.collate(image_processor(cfg)(it.images))
    ids = torch.tensor([ex.input_ids])
    with torch.no_grad():
        lg = ref(input_ids=ids, pixel_values=imgs.pixel_values, image_sizes=imgs.image_sizes,
                 batch_num_images=torch.tensor([1])).logits[0].float()
    P = ex.prompt_len
    want = float(torch.nn.functional.cross_entropy(lg[P - 1:-1], ids[0, P:], reduction="sum"))
    assert int((ids == cfg.image_token_id).sum()) == 1485
    assert abs(ours - want) <= 1e-4 * abs(want), (ours, want)


@pytest.mark.exhaustive
def test_recipe_at_real_widths(real):
    """The whole recipe at r4b-4b's widths (2 + 2 layers), TP=2: minutes of CPU per step
    (``pytest -m exhaustive tests/test_real_path.py``)."""
    r = _run(real, 2, "real-tp2", preset="r4b-4b")
    _check_run(2, r)
    want = _transformers_first_loss(real, preset="r4b-4b")
    assert abs(r["anneal"][0]["loss"] - want) <= 2e-4 * abs(want)
