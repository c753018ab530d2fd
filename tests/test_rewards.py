"""Rule-based verifier: answer extraction, exact number normalisation, adversarial inputs,
bounded work on huge inputs, and no evaluation of model output."""

import ast
import inspect
import os
import time
from fractions import Fraction

import pytest

import r4b.rewards as rw
from r4b.rewards import extract_answer, normalize_number, reward_fn, verify


@pytest.mark.parametrize("s,value", [
    ("1/2", Fraction(1, 2)), ("0.5", Fraction(1, 2)), ("0.50", Fraction(1, 2)),
    (".5", Fraction(1, 2)), ("\\frac{1}{2}", Fraction(1, 2)), ("\\dfrac{1}{2}", Fraction(1, 2)),
    ("\\frac12", Fraction(1, 2)), ("-\\frac{3}{4}", Fraction(-3, 4)),
    ("\\frac{-3}{4}", Fraction(-3, 4)), ("1,000", Fraction(1000)),
    ("1,234,567.5", Fraction(2469135, 2)),
    ("-3", Fraction(-3)), ("\u22123", Fraction(-3)), ("+7", Fraction(7)), ("- 3", Fraction(-3)),
    (" 17 ", Fraction(17)), ("17.", Fraction(17)), ("17.0", Fraction(17)), ("$17$", Fraction(17)),
    ("\\(2/4\\)", Fraction(1, 2)), ("{42}", Fraction(42)), ("\\text{8}", Fraction(8)),
    ("6 / 8", Fraction(3, 4)), ("0", Fraction(0)), ("007", Fraction(7)),
])
def test_normalize_number_accepts(s, value):
    assert normalize_number(s) == value


@pytest.mark.parametrize("s", [
    "", "abc", "1e3", "50%", "1/0", "\\frac{1}{0}", "1,00", "12,34", "1 2", "3 5 7 2", "1..2",
    "--3", "0x1F", "inf", "nan", "1_000", "2^10", "1+1", "__import__('os')", "9" * 300,
    "1/" + "9" * 300,
])
def test_normalize_number_rejects(s):
    assert normalize_number(s) is None


@pytest.mark.parametrize("text,answer", [
    ("<think>\n3+5=8\n</think>\n\n8<|im_end|>", "8"),
    ("<think>\n\n</think>\n\nThe answer is 17.<|im_end|>", "17"),
    ("<think>\nmaybe 3\n</think>\n\nso \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("\\boxed{1} then \\boxed{2}", "2"),  # multiple boxed: the last
    ("\\boxed{\\text{{a}{b}}}", "\\text{{a}{b}}"),  # nested braces
    ("x = \\boxed{3} and \\boxed{4", None),  # last box unterminated
    ("<think>\nreasoning with 42 but never closed", None),  # unterminated think: no answer
    ("<think>\n1\n</think>\n\n2\n</think>\n\n3", "3"),  # after the last </think>
    ("<think>\n1\n</think>\n\n", None),  # empty answer
    ("", None), ("   \n ", None),
    ("B", "B"), ("(C).", "(C)."),
    ("values 3, 5, 7", "7"), ("result: \u22124", "-4"), ("x=1e3", "x=1e3"),
    ("it is 1,000 apples", "1,000"), ("ratio 3/4 here", "3/4"),
    ("\\frac{2}{4} roughly", "\\frac{2}{4}"),
])
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def test_strict_think():
    assert extract_answer("3+5=8\n8+7=15", strict_think=False) == "15"
    assert extract_answer("3+5=8\n8+7=15", strict_think=True) is None
    assert extract_answer("1\n</think>\n\n15", strict_think=True) == "15"
    assert reward_fn(["8+7=15"], ["15"], strict_think=True) == [0.0]


@pytest.mark.parametrize("resp,ref,want", [
    ("</think>\n\n1/2", "0.5", 1.0), ("\\boxed{\\frac{1}{2}}", "0.50", 1.0),
    ("</think>\n\n1,000", "1000", 1.0), ("</think>\n\n-3", "\u22123", 1.0),
    ("</think>\n\n  17  <|im_end|>", "17", 1.0), ("</think>\n\n17", "\\boxed{17}", 1.0),
    ("</think>\n\n0.333", "1/3", 0.0),  # exact, no float tolerance
    ("</think>\n\n0.3333333333333333333", "1/3", 0.0),
    ("</think>\n\n18", "17", 0.0), ("</think>\n\nB", "17", 0.0),
    ("</think>\n\n(B)", "B", 1.0), ("</think>\n\nb.", "B", 1.0), ("</think>\n\nC", "B", 0.0),
    ("<think>\n17", "17", 0.0), ("<think>\n\n</think>\n\n", "17", 0.0),
    ("</think>\n\n__import__('os').system('echo pwned')", "0", 0.0),
    ("</think>\n\n\\boxed{__import__('os').system('x')}", "__import__('os').system('x')", 1.0),
])
def test_verify(resp, ref, want):
    assert verify(resp, ref) == want


def test_no_code_evaluation(monkeypatch):
    calls = []
    monkeypatch.setattr(os, "system", lambda *a: calls.append(a) or 0)
    attacks = ["__import__('os').system('touch /tmp/x')", "\\boxed{exec('1')}",
               "</think>\n\n{{7*7}}", "</think>\n\n${eval('2+2')}$", "</think>\n\n4 if True else 5"]
    # read as text: "4 if True else 5" ends with the number 5; evaluated it would be 4
    assert reward_fn(attacks, ["0", "1", "49", "4", "5"]) == [0.0] * 4 + [1.0]
    assert calls == []
    tree = ast.parse(inspect.getsource(rw))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            assert node.func.id not in ("eval", "exec", "compile", "__import__"), node.func.id
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
            assert not any(n.startswith(("sympy", "latex2sympy")) for n in names), names


@pytest.mark.parametrize("make", [
    lambda: "</think>\n\n" + "9" * 10**6,
    lambda: "9" * (rw.MAX_ANSWER_CHARS - 1),
    lambda: "<think>\n" + "1 " * 10**6 + "\n</think>\n\n" + "7" * 90_000,
    lambda: "</think>\n\n\\boxed{" + "{" * 500_000,
    lambda: "</think>\n\n" + "\\frac{" + " " * 90_000,
    lambda: "</think>\n\n" + "1," * 45_000 + "x",
    lambda: "</think>\n\n" + "-" + " " * 90_000 + "1e",
    lambda: "</think>\n\n" + "123e" * 20_000 + "1",
    lambda: "\\boxed{" + "9" * 10**6 + "}",
])
def test_huge_inputs_are_bounded(make):
    text = make()
    t0 = time.perf_counter()
    r = verify(text, "9")
    dt = time.perf_counter() - t0
    assert r in (0.0, 1.0)
    assert dt < 1.0, f"took {dt:.2f}s"


def test_huge_number_is_not_a_number():
    big = "9" * 5000
    assert normalize_number(big) is None  # past MAX_DIGITS
    assert verify("</think>\n\n" + big, "9") == 0.0
    assert verify("</think>\n\n" + big[:-1] + "8", big) == 0.0
    assert verify("</think>\n\n" + big, big) == 1.0  # identical text still matches
    ok = "9" * rw.MAX_DIGITS
    assert normalize_number(ok) == int(ok)
    assert verify("</think>\n\n" + ok[:-1] + ".0", ok[:-1]) == 1.0


def test_reward_fn_batch_and_errors():
    resps = ["</think>\n\n8<|im_end|>", "<think>\n8", "\\boxed{8.0}", "</think>\n\n9"]
    assert reward_fn(resps, ["8"] * 4) == [1.0, 0.0, 1.0, 0.0]
    assert reward_fn([], []) == []
    with pytest.raises(ValueError, match="same length"):
        reward_fn(["a"], [])
    with pytest.raises(TypeError, match="item 1: response_text must be a str"):
        reward_fn(["8", None], ["8", "8"])
    with pytest.raises(ValueError, match="item 0: reference_answer"):
        reward_fn(["8"], [""])
