"""The embedded task: synthetic visual arithmetic, generated locally and deterministically.

Each item shows ``n_digits`` digits (default 4) drawn from a built-in 5×7 bitmap font into a
fixed square tile (default 1×32×32, digits in a 2×2 grid read row by row), each glyph at a
random offset inside its cell, with random ink intensity and Gaussian pixel noise. Questions
come in four levels of graded difficulty; every item carries a verifiable answer and a correct
step-by-step reasoning whose first line transcribes the digits::

    level  question                                   reasoning (digits 3 5 7 2)      answer
    1      first digit?                               3 5 7 2                          3
    2      sum of first two?                          3 5 7 2 / 3+5=8                  8
    3      sum of all?                                ... / 3+5=8 / 8+7=15 / 15+2=17   17
    4      product of first two plus rest mod 10?     ... / 3*5=15 / 15+7=22 /
                                                      22+2=24 / 24%10=4                4

Arithmetic steps per level: 0, 1, n-1, n. Level 1 is answerable at a glance; levels 3-4 chain
intermediate results, which a tiny model learns with the scratchpad and struggles with as a
direct answer, so thinking pays off on hard items only. Every step is a one-digit fact
(digit×digit, number+digit, last digit), so the scratchpad is learnable.

The text-only variant (``vision=False``) writes the digits into the question
(``"3 5 7 2: sum of all?"``) and has no image; everything else is identical.

Determinism: item ``i`` of ``make_task(seed, ...)`` depends only on ``(seed, i)`` and the
config, so a shorter task is a prefix of a longer one. Train and eval never overlap: the
content ``(level, digits)`` is assigned to 'train' or 'eval' by a fixed hash that does not
depend on the seed, so any train set and any eval set (any seeds) are disjoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from ..config import require_choice, require_range


# ---------------------------------------------------------------- the shared record
@dataclass(eq=False)
class Sample:
    """One query with its reference: the record type of the embedded task and the readers."""

    uid: str
    """Unique identifier (task: ``arith-s{seed}-{split}-{i}``; readers: given or file:row)."""
    question: str
    """Question text (may contain inline ``<image>`` markers, one per image)."""
    answer: str
    """Reference answer, as text."""
    reasoning: str | None = None
    """Correct step-by-step reasoning, when known."""
    images: list[np.ndarray] = field(default_factory=list)
    """Images, each float32 ``[C, H, W]`` with values in [0, 1]."""
    level: int | None = None
    """Difficulty level (embedded task) or None."""
    topic: str = "general"
    """Topic label ('arithmetic' for the embedded task)."""
    verifiable: bool = True
    """True when the rule-based verifier (``r4b.rewards``) can check the answer."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Extra fields (task: digits, steps, variant; readers: unknown columns)."""
    source: str | None = None
    """Where the item came from (readers: ``<file>: row <n>``), for error messages."""

    @property
    def image(self) -> np.ndarray | None:
        """The first image, or None."""
        return self.images[0] if self.images else None

    @property
    def n_images(self) -> int:
        """Number of images."""
        return len(self.images)


TaskItem = Sample
"""The embedded task's items are :class:`Sample` records."""


# ---------------------------------------------------------------- font and rendering
_GLYPH_ROWS = {
    0: (".###.", "#...#", "#..##", "#.#.#", "##..#", "#...#", ".###."),
    1: ("..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###."),
    2: (".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####"),
    3: ("#####", "...#.", "..#..", "...#.", "....#", "#...#", ".###."),
    4: ("...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#."),
    5: ("#####", "#....", "####.", "....#", "....#", "#...#", ".###."),
    6: ("..##.", ".#...", "#....", "####.", "#...#", "#...#", ".###."),
    7: ("#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#..."),
    8: (".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###."),
    9: (".###.", "#...#", "#...#", ".####", "....#", "...#.", ".##.."),
}
#: The built-in 5×7 digit font: bool array ``[10, 7, 5]`` (digit, row, column).
GLYPHS: np.ndarray = np.array([[[c == "#" for c in row] for row in _GLYPH_ROWS[d]]
                               for d in range(10)], dtype=bool)
GLYPH_H, GLYPH_W = GLYPHS.shape[1:]


@dataclass(frozen=True)
class Layout:
    """Where digits go in a tile: a ``rows × cols`` grid of cells, glyphs scaled by ``scale``."""

    rows: int
    cols: int
    cell_h: int
    cell_w: int
    scale: int

    @property
    def glyph_h(self) -> int:
        return GLYPH_H * self.scale

    @property
    def glyph_w(self) -> int:
        return GLYPH_W * self.scale


def layout(n_digits: int, image_size: int) -> Layout:
    """Grid layout of ``n_digits`` digits in an ``image_size`` square tile (row-major cells,
    ``cols = ceil(sqrt(n))``); the glyph scale leaves at least 1 pixel of jitter per axis."""
    require_range("n_digits", n_digits, 1)
    cols = math.ceil(math.sqrt(n_digits))
    rows = math.ceil(n_digits / cols)
    cell_h, cell_w = image_size // rows, image_size // cols
    scale = min((cell_w - 1) // GLYPH_W, (cell_h - 1) // GLYPH_H)
    if scale < 1:
        raise ValueError(f"image_size = {image_size} is too small for {n_digits} digits: cells of "
                         f"{cell_h}x{cell_w} pixels need at least {GLYPH_H + 1}x{GLYPH_W + 1}")
    return Layout(rows, cols, cell_h, cell_w, scale)


def render_digits(digits, rng: np.random.Generator, *, image_size: int = 32, channels: int = 1,
                  noise_std: float = 0.05) -> np.ndarray:
    """Draw ``digits`` into a float32 ``[channels, image_size, image_size]`` tile in [0, 1].

    Each glyph sits at a uniform random offset inside its cell, with ink intensity drawn from
    [0.7, 1.0] (per channel) on a black background, then Gaussian noise and clipping.
    """
    require_choice("channels", channels, (1, 3))
    require_range("noise_std", noise_std, 0.0, 0.2)
    digits = [int(d) for d in digits]
    for k, d in enumerate(digits):
        require_range(f"digits[{k}]", d, 0, 9)
    lay = layout(len(digits), image_size)
    img = np.zeros((channels, image_size, image_size), dtype=np.float32)
    for k, d in enumerate(digits):
        r, c = divmod(k, lay.cols)
        glyph = np.kron(GLYPHS[d], np.ones((lay.scale, lay.scale), dtype=bool))
        y = r * lay.cell_h + int(rng.integers(0, lay.cell_h - lay.glyph_h + 1))
        x = c * lay.cell_w + int(rng.integers(0, lay.cell_w - lay.glyph_w + 1))
        ink = rng.uniform(0.7, 1.0, size=(channels, 1, 1)).astype(np.float32)
        img[:, y:y + lay.glyph_h, x:x + lay.glyph_w] = glyph[None] * ink
    if noise_std > 0:
        img += rng.normal(0.0, noise_std, size=img.shape).astype(np.float32)
    return np.clip(img, 0.0, 1.0, out=img)


# ---------------------------------------------------------------- questions and answers
LEVELS: tuple[int, ...] = (1, 2, 3, 4)
QUESTIONS: dict[int, str] = {
    1: "first digit?",
    2: "sum of first two?",
    3: "sum of all?",
    4: "product of first two plus rest mod 10?",
}


def solve(level: int, digits) -> tuple[str, str]:
    """``(answer, reasoning)`` of a level-``level`` question about ``digits``.

    The reasoning's first line lists the digits; each further line is one arithmetic step
    ``a op b = c`` (0, 1, n-1 and n steps for levels 1-4).
    """
    require_choice("level", level, LEVELS)
    d = [int(x) for x in digits]
    if len(d) < 3:
        raise ValueError(f"digits must hold at least 3 digits, got {d}")
    lines = [" ".join(map(str, d))]
    if level == 1:
        value = d[0]
    elif level == 2:
        value = d[0] + d[1]
        lines.append(f"{d[0]}+{d[1]}={value}")
    elif level == 3:
        value = d[0]
        for x in d[1:]:
            lines.append(f"{value}+{x}={value + x}")
            value += x
    else:
        value = d[0] * d[1]
        lines.append(f"{d[0]}*{d[1]}={value}")
        for x in d[2:]:
            lines.append(f"{value}+{x}={value + x}")
            value += x
        lines.append(f"{value}%10={value % 10}")
        value %= 10
    return str(value), "\n".join(lines)


def split_of(level: int, digits, eval_fraction: float) -> str:
    """'eval' or 'train' for the content ``(level, digits)``: a fixed hash, seed-independent."""
    key = f"{int(level)}:" + "".join(str(int(x)) for x in digits)
    h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
    return "eval" if h / 2.0 ** 64 < eval_fraction else "train"


# ---------------------------------------------------------------- generation
@dataclass(kw_only=True)
class TaskConfig:
    """The embedded visual-arithmetic task."""

    n_digits: int = 4
    """Digits per item (3..9), laid out in a near-square grid of the tile."""
    levels: tuple[int, ...] = LEVELS
    """Question levels to draw from (subset of 1..4); items cycle through them in order."""
    image_size: int = 32
    """Side of the square image tile in pixels (must match the vision tower)."""
    channels: int = 1
    """Image channels: 1 (grayscale) or 3 (RGB, independent ink per channel)."""
    noise_std: float = 0.05
    """Std of the Gaussian pixel noise added to the rendered tile."""
    vision: bool = True
    """True: digits in the image; False: the text-only variant (digits in the question)."""
    eval_fraction: float = 0.2
    """Share of the (level, digits) content space reserved for the eval split."""

    def __post_init__(self):
        require_range("task.n_digits", self.n_digits, 3, 9)
        self.levels = tuple(int(x) for x in self.levels)
        if not self.levels or len(set(self.levels)) != len(self.levels):
            raise ValueError(f"task.levels must be distinct levels from {LEVELS}, "
                             f"got {self.levels}")
        for lv in self.levels:
            require_choice("task.levels[...]", lv, LEVELS)
        require_range("task.image_size", self.image_size, 8, 1024)
        require_choice("task.channels", self.channels, (1, 3))
        require_range("task.noise_std", self.noise_std, 0.0, 0.2)
        require_range("task.eval_fraction", self.eval_fraction, 0.0, 1.0, lo_open=True,
                      hi_open=True)
        if self.vision:
            try:
                layout(self.n_digits, self.image_size)
            except ValueError as e:
                raise ValueError(f"task.image_size: {e}") from None

    def make(self, seed: int, n_items: int, split: Literal["all", "train", "eval"] = "all"
             ) -> list[Sample]:
        """Shorthand for :func:`make_task` with this config."""
        return make_task(seed, n_items, config=self, split=split)


def make_task(seed: int, n_items: int, *, split: Literal["all", "train", "eval"] = "all",
              config: TaskConfig | None = None, distinct: bool = False,
              **overrides) -> list[Sample]:
    """Generate ``n_items`` task items deterministically from ``seed``.

    Args:
        seed: any non-negative int; item ``i`` uses the random stream ``(seed, i)``.
        n_items: number of items.
        split: 'all' (no restriction), or only contents of the 'train' / 'eval' partition
            (see :func:`split_of`; the partitions never overlap, whatever the seeds).
        config: task settings (default :class:`TaskConfig`()); ``overrides`` replace fields,
            e.g. ``make_task(0, 100, levels=(3, 4), vision=False)``.
        distinct: no two items share their content ``(level, digits)`` (drawn without
            replacement: an evaluation set whose ``n`` counts distinct items).  An item whose
            content was drawn before is redrawn from its own stream, so the set is a prefix of a
            longer one; a level asked for more than half of the contents its split holds is drawn
            as a seeded permutation of all of them instead.  ``ValueError`` when a level is asked
            for more items than its split holds.
    """
    cfg = dataclasses.replace(config or TaskConfig(), **overrides)
    require_range("seed", seed, 0)
    require_range("n_items", n_items, 0)
    require_choice("split", split, ("all", "train", "eval"))
    items = []
    perms = _distinct_permutations(seed, n_items, split, cfg) if distinct else {}
    seen: set[tuple[int, ...]] = set()
    for i in range(n_items):
        rng = np.random.default_rng([int(seed), i])
        level = cfg.levels[i % len(cfg.levels)]
        if level in perms:
            digits = list(perms[level][i // len(cfg.levels)])
        else:
            for _ in range(10_000):
                digits = [int(x) for x in rng.integers(0, 10, size=cfg.n_digits)]
                if (split == "all" or split_of(level, digits, cfg.eval_fraction) == split) \
                        and not (distinct and (level, *digits) in seen):
                    break
            else:  # pragma: no cover - needs an eval_fraction below ~1e-3
                raise RuntimeError(f"could not draw a {split!r} item with eval_fraction "
                                   f"{cfg.eval_fraction}")
            seen.add((level, *digits))
        answer, reasoning = solve(level, digits)
        question = QUESTIONS[level]
        images = []
        if cfg.vision:
            images.append(render_digits(digits, rng, image_size=cfg.image_size,
                                        channels=cfg.channels, noise_std=cfg.noise_std))
        else:
            question = " ".join(map(str, digits)) + ": " + question
        items.append(Sample(uid=f"arith-s{seed}-{split}-{i}", question=question, answer=answer,
                            reasoning=reasoning, images=images, level=level, topic="arithmetic",
                            verifiable=True,
                            meta={"digits": digits, "steps": reasoning.count("="),
                                  "variant": "image" if cfg.vision else "text"}))
    return items


def _distinct_permutations(seed: int, n_items: int, split: str, cfg: TaskConfig
                           ) -> dict[int, list[tuple[int, ...]]]:
    """For :func:`make_task` with ``distinct``: per level asked for more than half of the
    contents its split holds, a seeded permutation of all of them (redrawing duplicates would
    take ever longer there); ``ValueError`` when a level is asked for more than it holds."""
    import itertools

    out = {}
    n_levels = len(cfg.levels)
    share = 1.0 if split == "all" else cfg.eval_fraction if split == "eval" else 1 - cfg.eval_fraction
    for j, level in enumerate(cfg.levels):
        need = len(range(j, n_items, n_levels))
        if need <= share * 10 ** cfg.n_digits / 2:
            continue
        if cfg.n_digits > 6:
            raise ValueError(f"{need} distinct items of level {level} asked from the task's "
                             f"{split!r} split: more than half of the about "
                             f"{share * 10 ** cfg.n_digits:.0f} it holds at task.n_digits "
                             f"{cfg.n_digits}; ask for fewer items")
        contents = [d for d in itertools.product(range(10), repeat=cfg.n_digits)
                    if split == "all" or split_of(level, d, cfg.eval_fraction) == split]
        if need > len(contents):
            raise ValueError(f"{need} distinct items of level {level} asked from the task's "
                             f"{split!r} split, which holds {len(contents)} at task.n_digits "
                             f"{cfg.n_digits} and task.eval_fraction {cfg.eval_fraction} "
                             f"({len(contents) * n_levels} over {n_levels} levels at most); ask "
                             f"for fewer items or raise task.n_digits")
        order = np.random.default_rng([int(seed), 7919, level]).permutation(len(contents))
        out[level] = [contents[k] for k in order[:need]]
    return out


def train_eval_split(seed: int, n_train: int, n_eval: int, *, config: TaskConfig | None = None,
                     **overrides) -> tuple[list[Sample], list[Sample]]:
    """``(train, eval)`` items from disjoint content partitions (see :func:`split_of`);
    the eval set uses a derived seed so its random streams differ from the train set's, and
    holds distinct contents (``make_task(distinct=True)``: every item counts once in ``n``)."""
    cfg = dataclasses.replace(config or TaskConfig(), **overrides)
    train = make_task(seed, n_train, split="train", config=cfg)
    evals = make_task(seed + 1_000_003, n_eval, split="eval", config=cfg, distinct=True)
    return train, evals
