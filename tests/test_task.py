"""The embedded visual-arithmetic task: determinism, difficulty structure, correct answers,
images that carry the digits, disjoint train/eval splits."""

import numpy as np
import pytest

from r4b.data import (BuiltinTokenizer, ChatTemplate, TaskConfig, make_task, render_digits,
                      split_of, train_eval_split)
from r4b.data.task import GLYPHS, layout
from r4b.rewards import verify


def _expected(level, d):
    """Independent recomputation of the answer from the digits."""
    if level == 1:
        return d[0]
    if level == 2:
        return d[0] + d[1]
    if level == 3:
        return sum(d)
    return (d[0] * d[1] + sum(d[2:])) % 10


def _read_digits(img: np.ndarray, n_digits: int) -> list[int]:
    """Nearest-glyph reader: threshold the tile, then find the one digit whose scaled glyph
    matches the ink of each cell exactly at some offset."""
    lay = layout(n_digits, img.shape[-1])
    ink = img.mean(0) > 0.35
    out = []
    for k in range(n_digits):
        r, c = divmod(k, lay.cols)
        cell = ink[r * lay.cell_h:(r + 1) * lay.cell_h, c * lay.cell_w:(c + 1) * lay.cell_w]
        hits = []
        for d in range(10):
            g = np.kron(GLYPHS[d], np.ones((lay.scale, lay.scale), dtype=bool))
            for y in range(lay.cell_h - g.shape[0] + 1):
                for x in range(lay.cell_w - g.shape[1] + 1):
                    canvas = np.zeros_like(cell)
                    canvas[y:y + g.shape[0], x:x + g.shape[1]] = g
                    if (canvas == cell).all():
                        hits.append(d)
        assert len(hits) == 1, f"cell {k}: matches {hits}"
        out.append(hits[0])
    return out


def test_determinism_and_prefix_stability():
    a, b = make_task(3, 12), make_task(3, 12)
    for x, y in zip(a, b):
        assert (x.uid, x.question, x.answer, x.reasoning, x.level) == \
            (y.uid, y.question, y.answer, y.reasoning, y.level)
        assert x.image.dtype == np.float32 and np.array_equal(x.image, y.image)
    short = make_task(3, 5)
    assert all(np.array_equal(s.image, t.image) and s.answer == t.answer for s, t in zip(short, a))
    c = make_task(4, 12)
    assert [x.meta["digits"] for x in a] != [x.meta["digits"] for x in c]
    assert not any(np.array_equal(x.image, y.image) for x, y in zip(a, c))


@pytest.mark.parametrize("n_digits", [3, 4, 5])
def test_answers_and_levels(n_digits):
    items = make_task(11, 200, n_digits=n_digits)
    by_level = {}
    for it in items:
        d = it.meta["digits"]
        assert len(d) == n_digits and all(0 <= x <= 9 for x in d)
        assert it.answer == str(_expected(it.level, d))
        assert it.topic == "arithmetic" and it.verifiable
        lines = it.reasoning.split("\n")
        assert lines[0] == " ".join(map(str, d))  # transcription first
        for ln in lines[1:]:  # every step is true arithmetic
            lhs, rhs = ln.split("=")
            a, op, b = next((lhs.split(o)[0], o, lhs.split(o)[1]) for o in "+*%" if o in lhs)
            ops = {"+": lambda u, v: u + v, "*": lambda u, v: u * v, "%": lambda u, v: u % v}
            val = ops[op](int(a), int(b))
            assert val == int(rhs)
        if it.level > 1:
            assert lines[-1].split("=")[1] == it.answer
        assert verify(f"<think>\n{it.reasoning}\n</think>\n\n{it.answer}", it.answer) == 1.0
        by_level.setdefault(it.level, set()).add(len(lines) - 1)
    steps = [by_level[lv].pop() for lv in (1, 2, 3, 4)]
    assert all(len(by_level[lv]) == 0 for lv in by_level)  # one step count per level
    assert steps == [0, 1, n_digits - 1, n_digits]
    assert steps == sorted(set(steps))  # strictly growing with level
    assert {it.level for it in items[:4]} == {1, 2, 3, 4}  # balanced cycling


@pytest.mark.parametrize("n_digits,size,channels", [(4, 32, 1), (4, 32, 3), (4, 18, 1),
                                                    (3, 16, 1), (5, 40, 1), (9, 48, 3)])
def test_images_carry_the_digits(n_digits, size, channels):
    items = make_task(5, 30, n_digits=n_digits, image_size=size, channels=channels)
    for it in items:
        img = it.image
        assert img.shape == (channels, size, size) and img.dtype == np.float32
        assert 0.0 <= img.min() and img.max() <= 1.0
        assert _read_digits(img, n_digits) == it.meta["digits"]


def test_glyphs_are_distinct_and_jitter_varies():
    flat = GLYPHS.reshape(10, -1)
    assert len({row.tobytes() for row in flat}) == 10
    rng = np.random.default_rng(0)
    tiles = [render_digits([1, 2, 3, 4], rng, noise_std=0.0) for _ in range(8)]
    assert len({t.tobytes() for t in tiles}) > 1  # offsets / ink differ between draws
    with pytest.raises(ValueError, match="digits\\[1\\]"):
        render_digits([1, 12, 3], rng)
    with pytest.raises(ValueError, match="image_size = 12 is too small"):
        render_digits([1, 2, 3, 4], rng, image_size=12)


def test_text_variant_same_items():
    img, txt = make_task(9, 16), make_task(9, 16, vision=False)
    for a, b in zip(img, txt):
        assert b.images == [] and b.image is None and b.n_images == 0
        assert b.question == " ".join(map(str, b.meta["digits"])) + ": " + a.question
        assert b.meta["variant"] == "text" and a.meta["variant"] == "image"
        assert (a.answer, a.reasoning, a.level) == (b.answer, b.reasoning, b.level)


def test_train_eval_never_overlap():
    cfg = TaskConfig(eval_fraction=0.2)
    train, evals = train_eval_split(0, 600, 200, config=cfg)
    other_train = make_task(123, 600, split="train", config=cfg)
    key = lambda it: (it.level, tuple(it.meta["digits"]))  # noqa: E731
    ev = {key(x) for x in evals}
    assert not ev & {key(x) for x in train} and not ev & {key(x) for x in other_train}
    assert all(split_of(it.level, it.meta["digits"], 0.2) == "eval" for it in evals)
    assert len({it.uid for it in train + evals}) == 800
    share = np.mean([split_of(lv, [a, b, 0, 1], 0.2) == "eval"
                     for lv in (1, 2, 3, 4) for a in range(10) for b in range(10)])
    assert 0.1 < share < 0.3


def test_task_fits_the_template_and_budgets():
    tok = BuiltinTokenizer()
    tpl = ChatTemplate(tok, tokens_per_image=4)
    for it in make_task(2, 40, n_digits=4):
        ex = tpl.sft_example(it.question, it.answer, it.reasoning, it.n_images)
        assert len(ex.input_ids) - ex.prompt_len <= 64  # hardest thinking answer stays short
        direct = tpl.response_ids(it.answer, None, "no_think")
        assert len(direct) <= 4


def test_config_validation():
    with pytest.raises(ValueError, match="task.n_digits"):
        TaskConfig(n_digits=2)
    with pytest.raises(ValueError, match="task.levels"):
        TaskConfig(levels=(1, 1))
    with pytest.raises(ValueError, match="task.levels"):
        TaskConfig(levels=(5,))
    with pytest.raises(ValueError, match="task.channels"):
        TaskConfig(channels=2)
    with pytest.raises(ValueError, match="task.image_size"):
        TaskConfig(n_digits=9, image_size=16)
    with pytest.raises(ValueError, match="split"):
        make_task(0, 3, split="test")
    assert TaskConfig(levels=[3, 4]).make(0, 4)[1].level == 4
