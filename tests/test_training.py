"""Sharded training (FSDP2 over gloo): fp32 master weights and moments, optimizer state split over
DP, the same steps as an unsharded model, sharded checkpoints that resume on another DP size,
activation recomputation with identical gradients, and mixed precision at RL learning rates.

The multi-process cases run this file as a torchrun worker (``python -m torch.distributed.run
... tests/test_training.py <scenario> <out>``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve()


# ---------------------------------------------------------------- shared pieces
def _parts(seed: int = 0, dtype: str = "float32"):
    from r4b.components import ModelChoice, Setup, make_template, make_tokenizer, model_config
    from r4b.data import TaskConfig

    task = TaskConfig(vision=False)
    setup = Setup(task=task, seed=seed, model=ModelChoice(params_dtype=dtype))
    tok = make_tokenizer(setup.model)
    cfg = model_config(setup.model, tok, task)
    tmpl = make_template(tok, cfg)
    items = task.make(seed, 24, split="train")
    return cfg, tmpl, items


def _examples(tmpl, items):
    from r4b.sft import Example

    out = []
    for it in items:
        ex = tmpl.sft_example(it.question, it.answer, it.reasoning, it.n_images)
        out.append(Example(ex.input_ids, ex.prompt_len, [], 1))
    return out


def _model(cfg, rt, *, shard: bool, recompute: str = "none"):
    from r4b.models import build_model
    from r4b.training import TrainingConfig, shard_model

    torch.manual_seed(0)
    model = build_model(cfg, device=rt.device, master_dtype=torch.float32)
    if shard:
        shard_model(model, rt, TrainingConfig(recompute=recompute))
    return model


def _steps(model, opt, examples, rt, steps: range):
    from r4b.sft import batch_indices, sft_step

    out = []
    for s in steps:
        batch = [examples[i] for i in batch_indices(len(examples), 8, s, 0)]
        m = sft_step(model, opt, batch, rt, lr=1e-3, grad_clip=1.0, tokens_per_microbatch=64)
        out.append([m["loss"], m["grad_norm"]])
    return out


def _lone_step(model, opt, examples, rt):
    """A step on one example: under DP=2 the second rank runs an empty micro-batch, which must
    join the collectives and add nothing to the gradients."""
    from r4b.sft import sft_step

    m = sft_step(model, opt, examples[:1], rt, lr=1e-3, grad_clip=1.0, tokens_per_microbatch=64)
    return [m["loss"], m["grad_norm"]]


def _opt_bytes(opt) -> int:
    from r4b.training import _local

    return sum(_local(v).numel() * _local(v).element_size() for st in opt.state.values()
               for v in st.values() if isinstance(v, torch.Tensor) and v.dim() > 0)


def _full(model) -> dict[str, torch.Tensor]:
    from r4b.training import full_state_dict

    return {k: v.detach().cpu().clone() for k, v in full_state_dict(model).items()}


# ---------------------------------------------------------------- worker
def _worker(scenario: str, out: Path) -> None:
    from r4b.checkpoint import load_checkpoint, save_checkpoint
    from r4b.runtime import init_runtime
    from r4b.sft import OptimConfig, make_optimizer

    rt = init_runtime(1)
    cfg, tmpl, items = _parts()
    ex = _examples(tmpl, items)
    res: dict = {"dp": rt.dp_size}
    if scenario == "train":
        model = _model(cfg, rt, shard=True)
        opt = make_optimizer(model, OptimConfig())
        res["losses"] = _steps(model, opt, ex, rt, range(3))
        res["opt_bytes"] = _opt_bytes(opt)
        res["param_bytes"] = sum(p.to_local().numel() * 4 for p in model.parameters())
        save_checkpoint(out / "ckpt", 3, model=model, optimizer=opt)
        res["after3"] = {k: v.tolist() for k, v in list(_full(model).items())[:3]}
        res["more"] = _steps(model, opt, ex, rt, range(3, 5))
        res["lone"] = _lone_step(model, opt, ex, rt)
    elif scenario == "resume":
        model = _model(cfg, rt, shard=True)
        opt = make_optimizer(model, OptimConfig())
        loaded = load_checkpoint(out / "ckpt", model=model, optimizer=opt)
        res["step"] = loaded.step
        res["more"] = _steps(model, opt, ex, rt, range(3, 5))
    if rt.rank == 0:
        (out / f"{scenario}-dp{rt.dp_size}.json").write_text(json.dumps(res))
    torch.distributed.destroy_process_group()


def _torchrun(n: int, scenario: str, out: Path) -> dict:
    from r4b.models.parallel import free_port

    env = {**os.environ, "OMP_NUM_THREADS": "1", "R4B_NO_PROGRESS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={n}",
           f"--master-port={free_port()}", str(HERE), scenario, str(out)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    return json.loads((out / f"{scenario}-dp{n}.json").read_text())


# ---------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """DP=2 sharded training + checkpoint, resumed on DP=1 and on DP=2, and the same steps
    on one process without sharding."""
    out = tmp_path_factory.mktemp("sharded")
    train2 = _torchrun(2, "train", out)
    resume1 = _torchrun(1, "resume", out)
    resume2 = _torchrun(2, "resume", out)
    from r4b.runtime import init_runtime
    from r4b.sft import OptimConfig, make_optimizer

    rt = init_runtime(1)
    cfg, tmpl, items = _parts()
    model = _model(cfg, rt, shard=False)
    opt = make_optimizer(model, OptimConfig())
    plain = _steps(model, opt, _examples(tmpl, items), rt, range(5))
    plain.append(_lone_step(model, opt, _examples(tmpl, items), rt))
    return out, train2, resume1, resume2, plain, _opt_bytes(opt)


def test_sharded_steps_match_unsharded(runs):
    _, train2, _, _, plain, _ = runs
    got = train2["losses"] + train2["more"] + [train2["lone"]]
    assert len(got) == len(plain) == 6
    for (l, n), (lw, nw) in zip(got, plain):
        assert abs(l - lw) <= 1e-5 * max(1.0, abs(lw)), (got, plain)
        assert abs(n - nw) <= 1e-4 * max(1.0, abs(nw)), (got, plain)


def test_optimizer_state_is_split_over_dp(runs):
    _, train2, _, _, _, dp1_bytes = runs
    ratio = train2["opt_bytes"] / dp1_bytes
    assert 0.45 <= ratio <= 0.55, ratio
    # fp32 moments: two fp32 tensors per parameter element
    assert train2["opt_bytes"] == 2 * train2["param_bytes"]


def test_checkpoint_holds_one_copy_and_resumes_on_any_dp(runs):
    out, train2, resume1, resume2, _, _ = runs
    from r4b.checkpoint import checkpoint_bytes, latest_checkpoint

    ck = latest_checkpoint(out / "ckpt")
    sizes = checkpoint_bytes(ck)
    params = 2 * train2["param_bytes"]  # both DP ranks' shards = one copy of the model
    assert abs(sizes["model"] - params) <= 0.02 * params + 64 * 1024, (sizes, params)
    assert abs(sizes["optim"] - 2 * params) <= 0.02 * params + 64 * 1024, (sizes, params)
    assert resume1["step"] == resume2["step"] == 3
    for (l, n), (lw, nw) in zip(resume1["more"] + resume2["more"], train2["more"] * 2):
        assert abs(l - lw) <= 1e-5 * max(1.0, abs(lw)) and abs(n - nw) <= 1e-4 * max(1.0, nw)
    assert resume2["more"] == train2["more"]  # same layout: bit-exact resume


def test_export_of_a_dp2_checkpoint_loads_in_transformers_with_the_same_logits(runs, tmp_path):
    transformers = pytest.importorskip("transformers")
    from r4b.checkpoint import latest_checkpoint, load_checkpoint
    from r4b.components import Setup
    from r4b.config import config_to_dict
    from r4b.data import TaskConfig
    from r4b.export import ExportCLI, export
    from r4b.models import build_model
    from r4b.runtime import init_runtime

    out = runs[0]
    run = tmp_path / "run"
    run.mkdir()
    (run / "job.json").write_text(json.dumps({"setup": config_to_dict(Setup(task=TaskConfig(vision=False)))}))
    rt = init_runtime(1)
    hf_dir = export(ExportCLI(run_dir=str(run), out_dir=str(tmp_path / "hf"),
                              checkpoint=str(latest_checkpoint(out / "ckpt"))), rt)
    cfg, _, _ = _parts()
    ours = build_model(cfg, init_weights=False)
    load_checkpoint(latest_checkpoint(out / "ckpt"), model=ours, restore_rng_state=False)
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    ids = torch.randint(0, 100, (2, 17), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = ours(input_ids=ids), ref(input_ids=ids).logits
    assert (a - b).abs().max().item() <= 1e-4


# ---------------------------------------------------------------- recomputation
def _real_layer(kind: str):
    """One decoder layer (or vision block) at r4b-4b's real widths, fp32, random weights."""
    from r4b.models import get_preset
    from r4b.models.lm import DecoderLayer
    from r4b.models.parallel import megatron_config, parallel_info
    from r4b.models.vision import VisionEncoderLayer, _tp_group

    torch.manual_seed(0)
    cfg = get_preset("r4b-4b")
    info = parallel_info()
    mc = megatron_config(torch.float32, tp_size=1)
    if kind == "lm":
        return DecoderLayer(cfg.lm, config=mc, tp_group=info.tp_group, tp_size=1), cfg
    return VisionEncoderLayer(cfg.vision, mc, _tp_group()), cfg


def _run_layer(layer, kind, cfg, x, mode):
    from r4b.memory import saved_activation_bytes
    from r4b.models.attention import make_attn_meta
    from r4b.training import set_recompute

    set_recompute(layer, mode)
    layer.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    holder = {}

    def fwd():
        if kind == "lm":
            T = x.shape[0]
            pos = torch.arange(T, device="cpu")
            cos, sin = _rope(cfg, pos)
            meta = make_attn_meta(torch.tensor([0, T // 2, T], dtype=torch.int32, device="cpu"),
                                  T - T // 2, backend="sdpa")
            y = layer(x, cos, sin, meta=meta)
        else:
            y = layer(x)
        holder["y"] = y
        return y

    saved = saved_activation_bytes(fwd, exclude=list(layer.parameters()))
    (holder["y"].float() * torch.linspace(-1, 1, holder["y"].numel()).view_as(holder["y"])).sum().backward()
    grads = [x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]
    return saved, grads


def _rope(cfg, pos):
    from r4b.models.layers import RotaryEmbedding

    return RotaryEmbedding(cfg.lm.head_dim, cfg.lm.rope_theta)(pos)


@pytest.mark.parametrize("kind", ["lm", "vision"])
def test_recomputation_keeps_gradients_and_drops_saved_activations(kind):
    """At r4b-4b's widths (hidden 2560 / SigLIP 1152), fp32: 'full' keeps >= 10x fewer saved
    activation bytes per token than 'none', 'selective' fewer than 'none'; gradients are
    identical in all three."""
    layer, cfg = _real_layer(kind)
    T = 48
    g = torch.Generator().manual_seed(1)
    if kind == "lm":
        x = torch.randn(T, cfg.lm.hidden_size, generator=g)
    else:
        x = torch.randn(2, T // 2, cfg.vision.hidden_size, generator=g)
    res = {m: _run_layer(layer, kind, cfg, x, m) for m in ("none", "selective", "full")}
    per_token = {m: res[m][0] / T for m in res}
    print(f"\n[recompute] {kind}: saved KiB per token per layer", {m: round(v / 1024, 1) for m, v in per_token.items()})
    assert per_token["full"] * 10 <= per_token["none"], per_token
    assert per_token["selective"] < per_token["none"], per_token
    for m in ("selective", "full"):
        for a, b in zip(res["none"][1], res[m][1]):
            assert torch.equal(a, b), m


if __name__ == "__main__":
    _worker(sys.argv[1], Path(sys.argv[2]))
