"""The memory planner: its parameter counts are the model's, its peak prediction matches the
peak measured on a real update step (TP 1 and 2, recomputation on and off) within 15%, and the
command prints the r4b-4b table."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve()
WIDE = dict(vocab_size=8192, hidden_size=512, intermediate_size=1536, num_layers=4, num_heads=8,
            num_kv_heads=2, head_dim=64, max_position_embeddings=4096, tie_word_embeddings=True)
TOKENS, SCORED = 2048, 64


def _cfg(vision: bool = False):
    from r4b.models import LMConfig, ModelConfig
    from r4b.models.vision import VisionConfig

    v = VisionConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                     patch_size=4, image_size=16, feature_layer=2) if vision else None
    return ModelConfig(lm=LMConfig(**WIDE), vision=v, image_token_id=8191 if vision else None,
                       image_newline=vision)


def _compare(rt) -> list[dict]:
    from r4b.plan import Workload, measure_update_peak, predict

    out = []
    for rc in ("none", "full"):
        m = measure_update_peak(_cfg(), rt, recompute=rc, tokens=TOKENS, scored=SCORED)
        p = predict(_cfg(), tp=rt.tp_size, dp=rt.dp_size, dtype=torch.float32, recompute=rc,
                    work=Workload(tokens_per_microbatch=TOKENS, scored_per_microbatch=SCORED,
                                  loss_impl="torch"), phase="update")
        out.append({"tp": rt.tp_size, "recompute": rc, "measured": m["peak"],
                    "predicted": p["update_peak"]})
    return out


def _worker(out: Path) -> None:
    from r4b.runtime import init_runtime

    rt = init_runtime(2)
    res = _compare(rt)
    if rt.rank == 0:
        out.write_text(json.dumps(res))
    torch.distributed.destroy_process_group()


def _check(rows):
    for r in rows:
        ratio = r["predicted"] / r["measured"]
        print(f"\n[plan] TP={r['tp']} recompute={r['recompute']}: measured "
              f"{r['measured'] / 2**20:.0f} MiB, predicted {r['predicted'] / 2**20:.0f} MiB "
              f"({ratio:.3f})")
        assert 0.85 <= ratio <= 1.15, r
    none, full = rows
    assert full["measured"] < none["measured"]  # recomputation shows in the peak


def test_prediction_matches_measured_peak_tp1():
    from r4b.runtime import init_runtime

    _check(_compare(init_runtime(1)))


def test_prediction_matches_measured_peak_tp2(tmp_path):
    from r4b.models.parallel import free_port

    out = tmp_path / "tp2.json"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                        f"--master-port={free_port()}", str(HERE), str(out)],
                       capture_output=True, text=True, timeout=900,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-4000:]
    _check(json.loads(out.read_text()))


@pytest.mark.parametrize("vision", [False, True])
def test_parameter_counts_are_the_models(vision):
    from r4b.models import build_model
    from r4b.plan import param_counts

    cfg = _cfg(vision)
    model = build_model(cfg, init_weights=False)
    assert param_counts(cfg, 1)["total"] == sum(p.numel() for p in model.parameters())


def test_plan_command_prints_the_r4b_4b_table(capsys):
    from r4b.plan import main

    assert main(["--kv_budget_tokens", "300000"]) == 0
    out = capsys.readouterr().out
    assert "| 1 | 8 | full |" in out and "| 2 | 4 | none |" in out and "fits:" in out
    assert "KiB per token" in out


# ---------------------------------------------------------------- packing layouts
P, R, G, PROMPTS = 1500, 1024, 8, 32  # N = 2g = 16 rollouts of 2,524 tokens per group


def _layout(share, *, budget, p=P, r=R, g=G, tiles=4, per_prompt=None, dp=8):
    from r4b.plan import step_layout

    return step_layout(prompts=PROMPTS, group_size=g, prompt_tokens=p, response_tokens=r,
                       tokens_per_microbatch=budget, image_tiles_per_microbatch=tiles, dp=dp,
                       share_prefix=share, image_tiles_per_prompt=per_prompt)


def test_shared_tokens_are_the_formulas():
    n = 2 * G
    # a group fits one unit (32,768 >= 1,500 + 16 x 1,024): N (P + R) / (P + N R) fewer tokens
    d, s = _layout(False, budget=32768), _layout(True, budget=32768)
    assert d["tokens_per_step"] == PROMPTS * n * (P + R) and d["units_per_group"] == n
    assert (s["units_per_group"], s["rollouts_per_unit"]) == (1, n)
    assert s["tokens_per_step"] == PROMPTS * (P + n * R)
    assert d["tokens_per_step"] / s["tokens_per_step"] == pytest.approx(n * (P + R) / (P + n * R))
    assert s["tokens_per_rank"] == s["tokens_per_step"] / 8
    # 16,384 tokens hold the prompt and (16,384 - 1,500) // 1,024 = 14 responses: two units
    s = _layout(True, budget=16384)
    assert (s["units_per_group"], s["rollouts_per_unit"]) == (2, 14)
    assert s["tokens_per_group"] == 2 * P + n * R
    # the response budget of the r4b-4b recipe: one response per unit, the layouts coincide
    d, s = _layout(False, budget=16384, r=8192), _layout(True, budget=16384, r=8192)
    assert s["rollouts_per_unit"] == 1 and s["tokens_per_step"] == d["tokens_per_step"]
    # tiles: one image set per unit instead of per rollout
    d, s = _layout(False, budget=16384, per_prompt=2), _layout(True, budget=16384, per_prompt=2)
    assert d["tiles_per_step"] == PROMPTS * n * 2 and s["tiles_per_step"] == PROMPTS * 2 * 2
    assert d["tiles_per_microbatch"] == (16384 // (P + R)) * 2  # six rollouts
    assert s["tiles_per_microbatch"] == (16384 // (P + 2 * R)) * 2  # four remainder units
    assert s["scored_per_microbatch"] == int(16384 * 14 * R / (P + 14 * R))
    assert d["scored_per_microbatch"] == int(16384 * R / (P + R))


@pytest.mark.parametrize("p,r,g,budget", [(7, 5, 4, 40), (7, 5, 4, 200), (9, 30, 3, 30),
                                          (3, 4, 8, 17), (12, 1, 2, 13)])
def test_layout_counts_are_the_packers(p, r, g, budget):
    """The planner's units and tokens are what r4b.packing.group_units makes of such a group,
    and its micro-batch bounds hold for the trainer's micro-batch plan."""
    from r4b.packing import group_units, plan

    n = 2 * g
    prompt = list(range(100, 100 + p))
    seqs = [prompt + [1000 + 10 * j + t for t in range(r)] for j in range(n)] * 3  # 3 groups
    groups = [k // n for k in range(3 * n)]
    units, st = group_units(seqs, [p] * len(seqs), groups, [[]] * len(seqs), budget=budget)
    for share in (False, True):
        lay = _layout(share, budget=budget, p=p, r=r, g=g, dp=1, per_prompt=1)
        per_group = lay["tokens_per_group"]
        if share:
            assert len(units) == 3 * lay["units_per_group"]
            assert st["shared_tokens"] == 3 * per_group
            assert max(len(u.seqs) for u in units) == lay["rollouts_per_unit"]
            mbs, _ = plan([u.length for u in units], dp_rank=0, dp_size=1,
                          tokens_per_microbatch=budget)
            assert max(sum(units[i].length for i in mb) for mb in mbs) <= lay["microbatch_tokens"]
            assert max(len(mb) for mb in mbs) <= lay["tiles_per_microbatch"]  # one tile a prompt
            assert max(sum(len(units[i].seqs) * r for i in mb) for mb in mbs) <= \
                lay["scored_per_microbatch"] + r  # int() of a fractional fill
        else:
            assert st["dense_tokens"] == 3 * per_group == 3 * n * (p + r)


def test_without_sharing_the_table_is_the_dense_formula():
    """``--share_prefix False`` is the planner of one sequence per rollout: every number of the
    table comes from micro-batches of max(budget, P + R) tokens, R / (P + R) of them scored."""
    from r4b.plan import PlanCLI, Workload, plan_table, predict
    from r4b.models import get_preset

    cli = PlanCLI(response_tokens=R, tokens_per_microbatch=32768, kl=True, share_prefix=False,
                  share_prompts=False)
    cfg = get_preset("r4b-4b")
    rows = plan_table(cli)
    seq = P + R
    for row in rows:
        per_rank = PROMPTS * 2 * G / row["dp"]
        work = Workload(tokens_per_microbatch=max(32768, seq),
                        scored_per_microbatch=int(max(32768, seq) * R / seq),
                        image_tiles_per_microbatch=4, rollout_rows=int(per_rank),
                        rollout_tokens_per_row=seq, kl=True)
        want = predict(cfg, tp=row["tp"], dp=row["dp"], dtype=torch.bfloat16,
                       recompute=row["recompute"], work=work)
        assert {k: row[k] for k in want} == want
    shared = plan_table(dataclasses.replace(cli, share_prefix=True))
    assert all(a["rollout_peak"] == b["rollout_peak"] for a, b in zip(rows, shared))
    assert all(a["loss"] > b["loss"] for a, b in zip(shared, rows))  # more scored rows


def test_layout_table_kv_and_the_command(capsys):
    from r4b.plan import PlanCLI, layout_table, main

    cli = PlanCLI(response_tokens=R, tokens_per_microbatch=32768, kl=True, gpus=2)
    rows = layout_table(cli)
    n = 2 * G
    for row in rows:
        kv = 2 * 36 * (8 // row["tp"]) * 128 * 2  # Qwen3-4B: 36 layers, 8 KV heads, bf16
        assert row["passes"] == 3  # old and reference log-probs, the update
        assert row["kv_per_step"] == 3 * row["tokens_per_rank"] * kv
    d, s = rows[0], rows[1]
    assert (d["share_prefix"], s["share_prefix"]) == (False, True)
    assert d["kv_per_step"] / s["kv_per_step"] == pytest.approx(n * (P + R) / (P + n * R))
    assert s["activations_per_step"] < d["activations_per_step"]
    assert s["activations_none"] <= d["activations_none"]  # fewer image sets per micro-batch
    assert main(["--response_tokens", str(R), "--tokens_per_microbatch", "32768", "--gpus", "2"]) == 0
    out = capsys.readouterr().out
    assert "| 1 | 2 | shared | 1 (16) |" in out and "| 1 | 2 | one per rollout | 16 (1) |" in out
    assert f"{PROMPTS * (P + n * R):,} tokens per step against {PROMPTS * n * (P + R):,}" in out
    with pytest.raises(ValueError, match="image_tiles_per_prompt"):
        PlanCLI(image_tiles_per_prompt=-1)


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))


@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize("p,r,budget", [(30, 8, 70), (30, 8, 200), (5, 40, 100), (12, 3, 15),
                                        (30, 8, None)])
def test_rollout_wave_is_the_engines_first_wave(share, p, r, budget):
    """The planner's wave (rows, prompt tokens held once) against ``EmbeddedEngine._waves`` on
    3 groups of 4 rollouts whose prompts share nothing across groups."""
    from r4b.models import build_model, get_preset
    from r4b.plan import rollout_wave
    from r4b.rollout.engine import EmbeddedEngine, RolloutRequest

    model = build_model(get_preset("tiny", vision=False))
    eng = EmbeddedEngine(model, stop_ids=[1], kv_budget_tokens=budget, share_prompts=share)
    reqs = [RolloutRequest(prompt_ids=[10 + g] + [3] * (p - 1), mode="think", group_id=g)
            for g in range(3) for _ in range(4)]
    waves = eng._waves(reqs, [r] * len(reqs), [None] * len(reqs))
    rows, held = rollout_wave(len(reqs), 4, p, r, budget, share_prompts=share)
    assert rows == max(len(w) for w in waves) == len(waves[0])
    groups = {reqs[i].group_id for i in waves[0]}
    assert held == (len(groups) * p if share else 0)
