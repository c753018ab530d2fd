"""Prefix-shared BPO (``--rl.share_prefix``): a group's prompt and images once per packed unit.

Exactness against one sequence per rollout (fp32, relative 1e-5): per-token old and reference
log-probs, the loss, the grad norm and every parameter's gradient, on multimodal groups (one
and two images, token and prompt routing, ragged responses, a group split over several
micro-batches), at TP=1 (each attention implementation that runs on CPU: the SDPA composition,
the explicit-mask reference and the Triton kernel under the interpreter), TP=2 and FSDP over DP=2 (torchrun, gloo).  Then the
unit builder's rules, and one whole BPO step (rollouts included) both ways.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import r4b.models.attention as attention
from r4b.components import Setup, build_engine, make_tokenizer
from r4b.data import TaskConfig
from r4b.packing import group_units, pack_groups
from r4b.rl.bpo import BPOTrainer
from r4b.rl.config import RLConfig
from r4b.runtime import init_runtime

sys.path.insert(0, str(Path(__file__).parent))
from prefix_sharing_case import CASES, build, compare, run_case  # noqa: E402

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def rt():
    return init_runtime(1)


@pytest.mark.parametrize("case", sorted(CASES))
def test_shared_layout_equals_one_sequence_per_rollout(rt, case):
    a = run_case(rt, share=True, **CASES[case])
    b = run_case(rt, share=False, **CASES[case])
    assert compare(a, b) == []
    st = a["stats"]
    assert st["pack/tokens"] < st["pack/dense_tokens"]
    assert st["pack/rank_vision_tiles"] < b["stats"]["pack/rank_vision_tiles"]
    if case == "split_group":  # the budget splits groups: prefix copies are lost, still exact
        assert st["pack/prefix_copies_lost"] > 0
        assert b["n_mbs"] > 1 and a["n_mbs"] > 1


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_each_attention_implementation_in_the_model_equals_the_dense_path(rt, impl, monkeypatch):
    """The model's prefix-shared attention through the explicit-mask reference and the Triton
    kernel (interpreter on CPU); the other cases run the SDPA composition (the CPU default)."""
    import r4b_kernels

    if impl == "triton":
        pytest.importorskip("triton")
        if not r4b_kernels.TRITON_INTERPRET:
            pytest.skip("the Triton kernel runs on CPU tensors only under TRITON_INTERPRET=1")
    kw = CASES["two_images_prompt_routing"]
    b = run_case(rt, share=False, **kw)
    calls = []
    real = r4b_kernels.prefix_shared_attention

    def spy(*args, **kwargs):
        calls.append(kwargs.get("impl"))
        return real(*args, **kwargs)

    monkeypatch.setitem(attention.PREFIX_IMPL, "sdpa", impl)
    monkeypatch.setattr(r4b_kernels, "prefix_shared_attention", spy)
    a = run_case(rt, share=True, **kw)
    assert calls and set(calls) == {impl}
    assert compare(a, b) == []


def test_the_cpu_default_is_the_sdpa_composition(rt, monkeypatch):
    import r4b_kernels

    calls = []
    real = r4b_kernels.prefix_shared_attention
    monkeypatch.setattr(r4b_kernels, "prefix_shared_attention",
                        lambda *a, **k: calls.append(k.get("impl")) or real(*a, **k))
    run_case(rt, share=True, **CASES["image_token_routing"])
    assert calls and set(calls) == {"sdpa"}


@pytest.mark.parametrize("tp", [2, 1], ids=["tp2", "fsdp_dp2"])
def test_shared_layout_is_exact_under_tp2_and_fsdp_dp2(tp, tmp_path):
    out = tmp_path / "out.json"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                        str(HERE / "prefix_sharing_case.py"), str(tp), str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    res = json.loads(out.read_text())
    assert (res["tp"], res["dp"]) == ((2, 1) if tp == 2 else (1, 2))
    for name, v in res["results"].items():
        assert v["bad"] == {}, (name, v["bad"])
        assert v["loss"] == pytest.approx(v["dense_loss"], rel=1e-5)
        assert v["grad_norm"] == pytest.approx(v["dense_grad_norm"], rel=1e-5)


# ---------------------------------------------------------------- the unit builder
def _seqs(prompt, responses):
    return [list(prompt) + list(r) for r in responses]


def test_units_share_the_common_prompt_and_split_over_the_budget():
    prompt = list(range(10, 30))  # 20 tokens
    toks = _seqs(prompt, [[1] * 12, [2] * 5, [3] * 9, [4] * 3])
    units, st = group_units(toks, [20] * 4, [7] * 4, [[]] * 4, budget=1000)
    assert len(units) == 1 and units[0].shared == 20 and units[0].seqs == (0, 1, 2, 3)
    assert units[0].length == 20 + 12 + 5 + 9 + 3 == st["shared_tokens"]
    assert st["dense_tokens"] == 4 * 20 + 29
    # 20 + 12 + 9 > 40: first-fit decreasing gives {12, 5, 3} and {9}: one prefix copy lost
    units, st = group_units(toks, [20] * 4, [7] * 4, [[]] * 4, budget=40)
    assert sorted(u.seqs for u in units) == [(0, 1, 3), (2,)]
    assert all(u.length <= 40 for u in units) and st["prefix_copies_lost"] == 20


def test_prompt_routing_shares_the_longest_common_prefix_only():
    toks = [[5, 6, 7, 8, 100, 1, 1], [5, 6, 7, 8, 200, 2], [5, 6, 7, 9, 3]]
    units, _ = group_units(toks, [5, 5, 4], [0, 0, 0], [[]] * 3, budget=100)
    assert len(units) == 1 and units[0].shared == 3  # [5, 6, 7]


def test_groups_with_different_images_or_a_placeholder_after_the_prefix_are_not_shared():
    img_a, img_b = np.zeros((4, 4, 3), np.uint8), np.ones((4, 4, 3), np.uint8)
    toks = _seqs([9, 99, 99, 5], [[1, 2], [3]])
    units, st = group_units(toks, [4, 4], [0, 0], [[img_a], [img_b]], budget=100,
                            image_token_id=99)
    assert [u.seqs for u in units] == [(0,), (1,)] and st["unshared_groups"] == 1
    assert [u.shared for u in units] == [4, 4]
    units, _ = group_units(toks, [4, 4], [0, 0], [[img_a], [img_a.copy()]], budget=100,
                           image_token_id=99)
    assert len(units) == 1  # equal content shares, whatever the object
    # a placeholder in a suffix (the common prefix ends inside the image's run)
    toks = [[9, 99, 99, 99, 5, 1], [9, 99, 99, 7, 2]]
    units, st = group_units(toks, [5, 4], [0, 0], [[img_a], [img_a]], budget=100,
                            image_token_id=99)
    assert len(units) == 2 and st["unshared_groups"] == 1


def test_unit_builder_rejects_bad_input_by_name():
    with pytest.raises(ValueError, match=r"prompt_lens\[1\] = 0"):
        group_units([[1, 2], [3, 4]], [1, 0], [0, 0], [[], []], budget=10)
    with pytest.raises(ValueError, match="group_ids has 1 entries"):
        group_units([[1, 2], [3, 4]], [1, 1], [0], [[], []], budget=10)
    with pytest.raises(ValueError, match="budget"):
        group_units([[1, 2]], [1], [0], [[]], budget=0)


def test_packed_rows_predict_each_rollouts_next_token_from_the_same_context():
    """Row r's target is the next token of its rollout, and the row's context (the tokens it
    attends to, in order, with their positions) is exactly the rollout's prefix up to it."""
    prompt = [4, 5, 6]
    toks = _seqs(prompt, [[7, 8], [9], [10, 11, 12]])
    units, _ = group_units(toks, [3, 3, 3], [0, 0, 0], [[]] * 3, budget=100)
    (mb,) = pack_groups(toks, [3, 3, 3], [[]] * 3, units, [[0]])
    lay = mb.prefix_layout
    mask = lay.mask(0)
    ids, pos = mb.input_ids.tolist(), mb.position_ids.tolist()
    for r, j, t, tgt in zip(mb.rows.tolist(), mb.row_seq.tolist(), mb.row_token.tolist(),
                            mb.targets.tolist()):
        seq = toks[mb.seqs[j]]
        v = 3 + t - 1  # position of the predicting token in the rollout
        assert tgt == seq[v + 1] and pos[r] == v
        ctx = [(pos[k], ids[k]) for k in range(len(ids)) if mask[r, k]]
        assert ctx == list(enumerate(seq[:v + 1]))
    assert mb.rows.tolist().count(2) == 3  # the last prompt row predicts for all three


# ---------------------------------------------------------------- a whole step both ways
def test_one_bpo_step_logs_the_same_loss_and_grad_norm_with_and_without_sharing(rt):
    task = TaskConfig(image_size=18)
    metrics = {}
    for share in (True, False):
        model, tmpl, task = build(task, seed=3)
        tok = make_tokenizer(Setup(task=task).model)
        cfg = RLConfig(group_size=2, prompts_per_step=3, max_new_tokens_think=24,
                       max_new_tokens_no_think=8, max_new_tokens_auto=24, share_prefix=share)
        trainer = BPOTrainer(cfg, policy=model,
                             engine=build_engine(model, tmpl, tok, max_seqlen=256),
                             template=tmpl, rt=rt)
        items = task.make(3, 3, split="train")
        metrics[share] = trainer.step(items, 0, torch.Generator().manual_seed(3))
    a, b = metrics[True], metrics[False]
    assert a["pack/tokens"] < b["pack/tokens"] == a["pack/dense_tokens"]
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-9)
    assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    assert a["reward"] == b["reward"]  # the same rollouts
    assert a["old_vs_engine_logprob_maxabs"] < 1e-4

