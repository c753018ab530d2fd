"""Prefix-shared annealing SFT (``--anneal.share_prefix``): the examples of one item in a batch
(both answer forms under their forced prefixes, or the auto prompt and a forced one) are one
packed unit: their common prompt and the images once, then each example's rest.

Exactness against one sequence per example (fp32, relative 1e-5): the loss, the grad norm and
every parameter's gradient of one SFT step, on multimodal items (one and two images) in both
forms, with a budget that keeps each item in one unit and one that splits items over units and
micro-batches.  Then the token counts the step logs, checked against a count by hand, and the
switch on the annealing config.
"""

from __future__ import annotations

import dataclasses
import os
import random
import sys
from pathlib import Path

import pytest
import torch

from r4b.anneal import AnnealConfig, AnnealJob, annealing_examples, direct_examples
from r4b.config import parse_cli
from r4b.data import TaskConfig
from r4b.runtime import init_runtime
from r4b.sft import Example, item_groups, sft_step

sys.path.insert(0, str(Path(__file__).parent))
from prefix_sharing_case import CaptureGrads, build, compare  # noqa: E402

TASK = TaskConfig(image_size=18)


@pytest.fixture(scope="module")
def rt():
    return init_runtime(1)


def _examples(tmpl, *, seed: int, kind: str) -> list[Example]:
    """Three items (the second with two images), each in both forms, in a shuffled order so an
    item's examples are not neighbours in the batch."""
    items = TASK.make(seed, 3, split="train")
    items[1] = dataclasses.replace(items[1], images=[items[1].images[0], items[2].images[0]])
    assert all(it.reasoning for it in items) and all(it.images for it in items)
    if kind == "both_forms":  # the warm-up: forced no-think and forced think prompts
        ex = direct_examples(items, tmpl, both_forms=True)
    else:  # the annealing mix: auto prompt, and the other form under its forced prompt
        ex = annealing_examples(items, [i % 2 == 0 for i in range(len(items))], tmpl,
                                forced_mode_fraction=1.0, seed=seed)
    assert len(ex) == 2 * len(items)
    random.Random(seed).shuffle(ex)
    return ex


def _step(rt, examples, *, share: bool, budget: int, seed: int) -> dict:
    model, _, _ = build(TASK, seed)
    images_seen = []
    model.vision_tower.register_forward_hook(lambda m, args, out: images_seen.append(out.shape[0]))
    opt = CaptureGrads(model.parameters())
    m = sft_step(model, opt, examples, rt, lr=1e-3, grad_clip=0.0, tokens_per_microbatch=budget,
                 share_prefix=share)
    names = [n for n, _ in model.named_parameters()]
    return {"old": {}, "ref": {}, "loss": m["loss"], "grad_norm": m["grad_norm"],
            "grads": dict(zip(names, opt.grads)), "metrics": m, "images": sum(images_seen)}


def _common(a: list[int], b: list[int], limit: int) -> int:
    n = 0
    while n < limit and a[n] == b[n]:
        n += 1
    return n


@pytest.mark.parametrize("kind,budget", [("both_forms", 4096), ("auto_and_forced", 4096),
                                         ("both_forms", 48)])
def test_shared_step_equals_one_sequence_per_example(rt, kind, budget):
    seed = 11 + budget
    _, tmpl, _ = build(TASK, seed)
    ex = _examples(tmpl, seed=seed, kind=kind)
    a = _step(rt, ex, share=True, budget=budget, seed=seed)
    b = _step(rt, ex, share=False, budget=budget, seed=seed)
    assert compare(a, b) == []
    assert a["metrics"]["target_tokens"] == b["metrics"]["target_tokens"]
    ma, mb = a["metrics"], b["metrics"]
    dense = sum(len(e.ids) for e in ex)
    assert mb["pack/tokens"] == mb["pack/dense_tokens"] == dense == ma["pack/dense_tokens"]
    # by hand: an item is one unit (its common prompt prefix once, then both examples' rests)
    # when that fits the budget, else two units each with the prefix
    by_item: dict[str, list[Example]] = {}
    for e in ex:
        by_item.setdefault(e.item, []).append(e)
    tokens = lost = images = split = 0
    for x, y in by_item.values():
        c = _common(x.ids, y.ids, min(x.prompt_len, y.prompt_len))
        assert c >= 1 and x.images is not y.images and len(x.images) == len(y.images)
        if kind == "auto_and_forced":  # the auto prompt is all shared: its last row scores too
            assert c == min(x.prompt_len, y.prompt_len)
        one = len(x.ids) + len(y.ids) - c
        units = 1 if one <= budget else 2
        split += units == 2
        tokens += one + (units - 1) * c
        lost += (units - 1) * c
        images += units * len(x.images)
    assert ma["pack/tokens"] == tokens and ma["pack/prefix_copies_lost"] == lost
    assert ma["pack/unshared_groups"] == 0
    assert b["images"] == sum(len(e.images) for e in ex) and a["images"] == images
    if budget > 1000:
        assert split == 0 and tokens < dense
    else:  # the budget splits items over two units, each with the prefix: still exact
        assert 0 < split < len(by_item)
    assert a["loss"] > 0 and a["grad_norm"] > 0


def test_sharing_needs_an_item_with_two_examples(rt):
    """Examples without an item (or each of its own item) are one sequence each either way."""
    seed = 5
    _, tmpl, _ = build(TASK, seed)
    ex = _examples(tmpl, seed=seed, kind="both_forms")
    solo = [dataclasses.replace(e, item=None) for e in ex]
    assert len(set(item_groups(solo))) == len(solo)
    assert item_groups(ex) == item_groups([dataclasses.replace(e, item=f"x{e.item}") for e in ex])
    m = _step(rt, solo, share=True, budget=4096, seed=seed)["metrics"]
    assert m["pack/tokens"] == m["pack/dense_tokens"] == sum(len(e.ids) for e in ex)


def test_the_examples_carry_their_item_and_the_switch_is_a_flag():
    _, tmpl, _ = build(TASK, 0)
    items = TASK.make(0, 4, split="train")
    warm = direct_examples(items, tmpl, both_forms=True)
    assert [e.item for e in warm] == [it.uid for it in items for _ in range(2)]
    mix = annealing_examples(items, [True] * 4, tmpl, forced_mode_fraction=1.0, seed=0)
    assert {e.item for e in mix} == {it.uid for it in items}
    assert AnnealConfig().share_prefix is True
    job = parse_cli(AnnealJob, ["--anneal.share_prefix", "False"], prog="r4b.anneal")
    assert job.anneal.share_prefix is False
