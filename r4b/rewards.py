"""Rule-based answer verifier: the BPO reward (1.0 for a correct final answer, else 0.0).

Where the answer is (:func:`extract_answer`):

1. Only text after the **last** ``</think>`` counts. A response that opened ``<think>`` and
   never closed it has **no answer** (reward 0): its reasoning is not an answer. Text without
   any think tags is read whole. ``<|im_end|>`` / ``<|endoftext|>`` markers are dropped.
   Pass RL rollouts with their forced mode prefix (``ChatTemplate.assistant_text_of``), or
   ``strict_think=True``: a forced-thinking rollout cut off mid-reasoning contains no think
   tags of its own and would otherwise be read whole.
2. In that answer text: the content of the last complete ``\\boxed{...}`` (nested braces
   allowed); an unterminated last ``\\boxed{`` means no answer. Without ``\\boxed``: the text
   itself if it is one number, else the last number in it (integers, decimals, ``a/b``,
   ``\\frac{a}{b}``), else the stripped text (for non-numeric answers such as a choice).

How answers compare (:func:`verify`): when both the extracted answer and the reference parse
as numbers (:func:`normalize_number`), they are compared **exactly** as
:class:`fractions.Fraction` values, so ``1/2 == 0.5 == 0.50 == \\frac{1}{2}`` and
``1,000 == 1000``, but ``0.333 != 1/3`` (no float tolerance: a tolerance would reward
near-misses of rational answers, and all of our references are exact). Otherwise both are
compared as normalised text (case-folded, whitespace collapsed, ``$``, a trailing period and
one pair of surrounding parentheses removed). A numeric reference never matches a
non-numeric answer.

Safety and bounds: model output is never evaluated as code (no ``eval``/``exec``, no
symbolic-math parser); only regular expressions with linear-time patterns, string scans and
``Fraction`` from validated digit strings. Answer texts longer than
:data:`MAX_ANSWER_CHARS` are rejected, and numbers with more than :data:`MAX_DIGITS` digits
are not numbers (so a 10^6-digit string returns at once, well within a second).
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Sequence

MAX_ANSWER_CHARS = 100_000
"""Longest answer text (after ``</think>``) that is examined; longer means no answer."""
MAX_DIGITS = 256
"""Most digits (all parts of one number together) that :func:`normalize_number` accepts."""
MAX_BOXED_CHARS = 10_000
"""Longest ``\\boxed{...}`` content accepted."""

_THINK_START, _THINK_END = "<think>", "</think>"
_END_MARKERS = ("<|im_end|>", "<|endoftext|>")
_MINUSES = str.maketrans({"\u2212": "-", "\u2012": "-", "\u2013": "-", "\uFE63": "-",
                          "\uFF0D": "-", "\u00A0": " ", "\u202F": " ", "\u2009": " "})

_INT = r"(?:\d{1,3}(?:,\d{3})+|\d+)"
_NUM = rf"(?:[+-]?{_INT}(?:\.\d+)?|[+-]?\.\d+)"
_FRAC_TEX = r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}"
_FRAC_TEX_SHORT = r"\\[dt]?frac\s*(\d)(\d)"
_NUMBER_RE = re.compile(rf"^({_NUM})$")
_RATIO_RE = re.compile(rf"^({_NUM})\s*/\s*({_NUM})$")
_TEX_RE = re.compile(rf"^([+-]?)\s*(?:{_FRAC_TEX}|{_FRAC_TEX_SHORT})$")
# Last-number search: a fraction form or a plain number, not glued to letters/digits before
# it, and not the mantissa of an exponent form like 1e3.
_FIND_RE = re.compile(
    rf"(?:-\s*)?{_FRAC_TEX}|(?:-\s*)?{_FRAC_TEX_SHORT}"
    rf"|(?<![\w.]){_NUM}(?:\s*/\s*{_INT})?(?![eE][+-]?\d)(?![\d])")


def _strip_wrappers(s: str) -> str:
    s = s.strip()
    for _ in range(4):  # peel $...$, \(...\), \[...\], \text{...}, {...} a few levels deep
        before = s
        if len(s) >= 2 and s[0] == "$" and s[-1] == "$":
            s = s.strip("$").strip()
        if s.startswith("\\(") and s.endswith("\\)") or s.startswith("\\[") and s.endswith("\\]"):
            s = s[2:-2].strip()
        if s.startswith("\\text{") and s.endswith("}"):
            s = s[6:-1].strip()
        if s.startswith("{") and s.endswith("}"):
            s = s[1:-1].strip()
        if s == before:
            break
    return s


def _digits(s: str) -> int:
    return sum(ch.isdigit() for ch in s)


def _plain(s: str) -> Fraction | None:
    if not _NUMBER_RE.match(s):
        return None
    return Fraction(s.replace(",", ""))


def normalize_number(s: str) -> Fraction | None:
    """The exact value of a number written as text, or None when ``s`` is not one number.

    Accepted: optional sign (``-``, ``+``, Unicode minus), integers with optional thousands
    separators (``1,000``), decimals (``0.50``, ``.5``), ratios ``a/b``, ``\\frac{a}{b}``
    (also ``\\dfrac``, ``\\tfrac``, ``\\frac12``), optionally inside ``$...$``, ``\\(...\\)``,
    ``\\text{...}`` or braces, with a trailing period. Not accepted: exponents, percentages,
    units, mixed numbers, a zero denominator, more than :data:`MAX_DIGITS` digits.
    """
    if not isinstance(s, str):
        raise TypeError(f"s must be a str, got {type(s).__name__}")
    if len(s) > 4 * MAX_DIGITS + 64 or _digits(s) > MAX_DIGITS:
        return None
    t = _strip_wrappers(s.translate(_MINUSES))
    if t.endswith(".") and not t.endswith(".."):
        t = t[:-1].rstrip()
    t = re.sub(r"^([+-])\s+", r"\1", t)
    v = _plain(t)
    if v is not None:
        return v
    m = _RATIO_RE.match(t)
    if m:
        num, den = _plain(m.group(1)), _plain(m.group(2))
        return None if num is None or den is None or den == 0 else num / den
    m = _TEX_RE.match(t)
    if m:
        sign = -1 if m.group(1) == "-" else 1
        a, b = (m.group(2), m.group(3)) if m.group(2) is not None else (m.group(4), m.group(5))
        num, den = normalize_number(a), normalize_number(b)
        if num is None or den is None or den == 0:
            return None
        return sign * num / den
    return None


def _last_boxed(s: str) -> str | None:
    """Content of the last ``\\boxed{`` in ``s`` if it is closed; None otherwise."""
    k = max(s.rfind("\\boxed{"), s.rfind("\\fbox{"))
    if k < 0:
        return None
    start = s.index("{", k) + 1
    depth = 1
    end = min(len(s), start + MAX_BOXED_CHARS + 1)
    for j in range(start, end):
        ch = s[j]
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return s[start:j]
    return None


def _answer_region(text: str, strict_think: bool) -> str | None:
    close = text.rfind(_THINK_END)
    if close >= 0:
        region = text[close + len(_THINK_END):]
    elif strict_think or _THINK_START in text:
        return None
    else:
        region = text
    for m in _END_MARKERS:
        region = region.replace(m, "")
    return region


def extract_answer(text: str, *, strict_think: bool = False) -> str | None:
    """The final answer of a response as text, or None when it has none (rules above).

    ``strict_think=True`` requires a ``</think>``: text without one has no answer.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    region = _answer_region(text, strict_think)
    if region is None or len(region) > MAX_ANSWER_CHARS:
        return None
    region = region.translate(_MINUSES)
    if "\\boxed{" in region or "\\fbox{" in region:
        boxed = _last_boxed(region)
        return None if boxed is None or not boxed.strip() else boxed.strip()
    stripped = region.strip()
    if not stripped:
        return None
    if normalize_number(stripped) is not None:
        return stripped
    last = None
    for last in _FIND_RE.finditer(stripped):
        pass
    if last is not None:
        return last.group(0).strip()
    return stripped


def _norm_text(s: str) -> str:
    t = " ".join(_strip_wrappers(s).split()).casefold()
    if t.endswith("."):
        t = t[:-1].rstrip()
    if len(t) >= 2 and t[0] == "(" and t[-1] == ")":
        t = t[1:-1].strip()
    return t


def answers_match(answer: str, reference: str) -> bool:
    """Whether an extracted answer equals a reference (exact numbers, else normalised text)."""
    ref_box = _last_boxed(reference) if "\\boxed{" in reference else None
    reference = ref_box if ref_box is not None else reference
    ref_num = normalize_number(reference)
    if ref_num is not None:
        got = normalize_number(answer)
        return got is not None and got == ref_num
    return _norm_text(answer) == _norm_text(reference) != ""


def verify(response_text: str, reference_answer: str, *, strict_think: bool = False) -> float:
    """1.0 when the response's final answer equals ``reference_answer``, else 0.0."""
    if not isinstance(response_text, str):
        raise TypeError(f"response_text must be a str, got {type(response_text).__name__}")
    if not isinstance(reference_answer, str) or not reference_answer.strip():
        raise ValueError(f"reference_answer must be a non-empty str, got {reference_answer!r}")
    ans = extract_answer(response_text, strict_think=strict_think)
    if ans is None:
        return 0.0
    return 1.0 if answers_match(ans, reference_answer) else 0.0


def reward_fn(responses: Sequence[str], references: Sequence[str], *,
              strict_think: bool = False) -> list[float]:
    """:func:`verify` over a batch: ``responses[i]`` against ``references[i]``."""
    if len(responses) != len(references):
        raise ValueError(f"responses and references must have the same length, got "
                         f"{len(responses)} and {len(references)}")
    out = []
    for i, (r, ref) in enumerate(zip(responses, references)):
        try:
            out.append(verify(r, ref, strict_think=strict_think))
        except (TypeError, ValueError) as e:
            raise type(e)(f"item {i}: {e}") from e
    return out
