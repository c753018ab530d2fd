"""Foundation: kernel package isolation, typed config + CLI, logging, checkpoints."""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from typing import Literal

import pytest
import torch

from r4b.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from r4b.config import config_from_dict, parse_cli, require_choice, require_range
from r4b.log import MetricsWriter, read_metrics


# ---------------------------------------------------------------- r4b_kernels isolation
def test_r4b_kernels_imports_without_r4b_megatron_vllm_or_triton():
    """Other projects depend on r4b_kernels alone: with r4b, megatron, vllm and even triton
    made unimportable, it imports, and the torch path of every public function runs."""
    code = textwrap.dedent("""
        import importlib.abc, sys
        # torch first: torch >= 2.15 probes for triton itself while it imports
        import torch
        BLOCK = ("r4b", "megatron", "vllm", "triton")
        for m in [m for m in sys.modules if m.split(".")[0] in BLOCK]:
            del sys.modules[m]
        class Blocker(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] in BLOCK:
                    raise ImportError(f"blocked: {name}")
        sys.meta_path.insert(0, Blocker())
        import r4b_kernels
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCK)
        assert not loaded, loaded
        assert r4b_kernels.HAS_TRITON is False
        T, H, V = 7, 16, 33
        h, w = torch.randn(T, H), torch.randn(V, H)
        tgt = torch.randint(0, V, (T,))
        lp = r4b_kernels.token_logprobs(h, w, tgt, impl="auto")
        lp = lp[0] if isinstance(lp, tuple) else getattr(lp, "logprobs", lp)
        ref = torch.log_softmax(h @ w.T, -1).gather(1, tgt[:, None])[:, 0]
        assert torch.allclose(lp, ref, atol=1e-5), (lp, ref)
        ga = r4b_kernels.grouped_advantage(torch.tensor([1., 0., 1., 1.]),
                                           torch.tensor([3, 3, 9, 9]), impl="auto")
        print("OK")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert "OK" in out.stdout


def test_r4b_kernels_plain_import_does_not_load_r4b_or_megatron():
    code = ("import sys, r4b_kernels; bad=[m for m in sys.modules if m.split('.')[0] in "
            "('r4b','megatron','vllm')]; assert not bad, bad; print('OK')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr


# ---------------------------------------------------------------- config
@dataclasses.dataclass(kw_only=True)
class _Optim:
    lr: float = 1e-3
    """Peak learning rate."""
    schedule: Literal["cosine", "constant"] = "cosine"
    """Learning-rate schedule."""

    def __post_init__(self):
        require_range("optim.lr", self.lr, 0.0, 1.0, lo_open=True)


@dataclasses.dataclass(kw_only=True)
class _Top:
    optim: _Optim = dataclasses.field(default_factory=_Optim)
    """Optimizer."""
    steps: int = 10
    """Number of optimizer steps."""
    algo: str = "bpo"
    """Algorithm."""

    def __post_init__(self):
        require_range("steps", self.steps, 1)
        require_choice("algo", self.algo, ("bpo", "grpo"))


def test_cli_dotted_overrides_and_recipe_layering(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('steps = 7\n[optim]\nlr = 0.01\nschedule = "constant"\n')
    cfg = parse_cli(_Top, ["--config", str(recipe), "--optim.lr", "0.02", "--algo", "grpo"])
    assert cfg == _Top(optim=_Optim(lr=0.02, schedule="constant"), steps=7, algo="grpo")
    assert parse_cli(_Top, []) == _Top()


def test_config_errors_name_field_and_value(tmp_path):
    with pytest.raises(ValueError, match=r"optim\.lr must be in \(0\.0, 1\.0\], got 2\.0"):
        _Optim(lr=2.0)
    with pytest.raises(ValueError, match=r"algo must be one of \('bpo', 'grpo'\), got 'ppo'"):
        _Top(algo="ppo")
    with pytest.raises(KeyError, match=r"optim\.momentum"):
        config_from_dict(_Top, {"optim": {"momentum": 0.9}})
    with pytest.raises(SystemExit):
        parse_cli(_Top, ["--steps", "0"])


# ---------------------------------------------------------------- metrics
def test_metrics_jsonl_append_and_truncate_on_resume(tmp_path):
    path = tmp_path / "m.jsonl"
    with MetricsWriter(path) as w:
        for s in range(1, 5):
            w.write(s, loss=torch.tensor(0.5 * s), bad=float("nan"))
    recs = read_metrics(path)
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    assert recs[1]["loss"] == 1.0 and recs[0]["bad"] == "nan"
    with MetricsWriter(path, truncate_after_step=2) as w:
        w.write(3, loss=9.0)
    assert [(r["step"], r["loss"]) for r in read_metrics(path)] == [(1, 0.5), (2, 1.0), (3, 9.0)]


# ---------------------------------------------------------------- checkpoints
def _train(model, opt, steps, gen):
    losses = []
    for _ in range(steps):
        x = torch.randn(8, 4, generator=gen)
        noise = torch.randn(8, 1)  # global RNG: must be restored exactly on resume
        loss = ((model(x) - noise) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _fresh():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def test_checkpoint_exact_resume(tmp_path):
    model, opt = _fresh()
    full = _train(model, opt, 6, torch.Generator().manual_seed(1))

    model, opt = _fresh()
    gen = torch.Generator().manual_seed(1)
    first = _train(model, opt, 3, gen)
    save_checkpoint(tmp_path, 3, model=model, optimizer=opt, state={"gen": gen.get_state().tolist()})
    _train(model, opt, 2, gen)  # diverge the live objects; the resumed ones must not care

    model2, opt2 = _fresh()
    _train(model2, opt2, 1, torch.Generator().manual_seed(5))
    loaded = load_checkpoint(tmp_path, model=model2, optimizer=opt2)
    gen2 = torch.Generator()
    gen2.set_state(torch.tensor(loaded.state["gen"], dtype=torch.uint8))
    rest = _train(model2, opt2, 3, gen2)
    assert loaded.step == 3
    assert first + rest == full  # bit-exact


def test_checkpoint_kill_during_save_keeps_previous(tmp_path, monkeypatch):
    model, opt = _fresh()
    save_checkpoint(tmp_path, 1, model=model, optimizer=opt)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _train(model, opt, 1, torch.Generator().manual_seed(0))

    import r4b.checkpoint as ck

    real = ck._save_tensors
    calls = {"n": 0}

    def dying(tensors, path, metadata=None):
        calls["n"] += 1
        if calls["n"] == 2:  # die after the model file, before the optimizer file
            raise KeyboardInterrupt("killed")
        return real(tensors, path, metadata)

    monkeypatch.setattr(ck, "_save_tensors", dying)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 2, model=model, optimizer=opt)
    monkeypatch.setattr(ck, "_save_tensors", real)

    assert latest_checkpoint(tmp_path).name == "step_00000001"
    model3, opt3 = _fresh()
    _train(model3, opt3, 2, torch.Generator().manual_seed(3))
    assert load_checkpoint(tmp_path, model=model3, optimizer=opt3).step == 1
    for k, v in model3.state_dict().items():
        assert torch.equal(v, before[k])
    # The next save clears the half-written folder and succeeds.
    save_checkpoint(tmp_path, 2, model=model, optimizer=opt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000001", "step_00000002"]
    assert json.loads((tmp_path / "step_00000002" / "meta.json").read_text())["step"] == 2
