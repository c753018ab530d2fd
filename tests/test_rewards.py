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


# ------------------------------------------------------------ math answers: canonical forms
# Each class lists forms of one answer: every pair must match, in both directions.
EQUIVALENT = [
    ["\\sqrt{2}", "\\sqrt 2", "\\sqrt2", "√2", "2^{1/2}", "\\frac{\\sqrt{8}}{2}",
     "\\sqrt{2}^{1}"],
    ["2\\pi", "2 \\pi", "2π", "\\pi \\cdot 2", "\\frac{4\\pi}{2}", "$2\\pi$"],
    ["x = 5", "5", "x=5", "y = 5", "x_1 = 5", "5.0", "\\boxed{5}"],
    ["x = -2", "-2", "x=-2", "\u22122"],
    ["50\\%", "50%", "50", "\\boxed{50\\%}"],
    ["(1, 2)", "(1,2)", "\\left( 1, 2 \\right)", "(1, \\frac{4}{2})", "(1.0, 2)", "$(1, 2)$"],
    ["[1, 2)", "[1,2)", "\\left[1, 2\\right)", "x \\in [1, 2)"],
    ["10^3", "10^{3}", "1000", "1,000", "1{,}000", "10 ^ 3", "1 \\times 10^{3}"],
    ["\\frac{\\sqrt{3}}{2}", "\\dfrac{\\sqrt3}{2}", "\\sqrt{3}/2", "\\frac{1}{2}\\sqrt{3}",
     "\\frac{\\sqrt{12}}{4}", "\\frac{3}{\\sqrt{12}}"],
    ["10000", "\\boxed{10{,}000}", "10,000", "10{,}000", "10^4", "1\\,0000"],
    ["-\\frac{1}{2}", "-0.5", "-1/2", "\\frac{-1}{2}", "-.5", "-\\tfrac12", "-2^{-1}"],
    ["\\text{B}", "B", "(B)", "b", "\\textbf{(B)}", "\\mathrm{B}", "B."],
    ["2^3", "8", "2^{3}", "(2)^3", "\\sqrt{64}", "4^{3/2}"],
    ["\\infty", "∞", "+\\infty"],
    ["\\{1, 2\\}", "\\{2, 1\\}", "\\{1, 1, 2\\}", "{1, 2}"],
    ["(-\\infty, 0) \\cup (1, \\infty)", "(1, \\infty) \\cup (-\\infty, 0)"],
    ["1 + \\sqrt{2}", "\\sqrt{2} + 1", "\\frac{1}{\\sqrt{2} - 1}", "(1+\\sqrt2)^2 - 2 - \\sqrt2"],
    ["\\frac{1+\\sqrt{5}}{2}", "\\frac{1}{2} + \\frac{\\sqrt{5}}{2}", "0.5 + 0.5\\sqrt{5}"],
    ["\\frac{\\pi}{2} - 1", "\\frac{\\pi - 2}{2}", "-1 + \\pi/2"],
    ["\\frac{\\pi^2}{6}", "\\pi^2/6", "\\frac{1}{6}\\pi^2"],
    ["2\\sqrt{6}", "\\sqrt{24}", "\\sqrt{2}\\sqrt{12}", "\\sqrt{2} \\cdot 2\\sqrt{3}"],
    ["0.001", "10^{-3}", "\\frac{1}{1000}", "1 \\times 10^{-3}", "10^-3"],
    ["2.5 \\times 10^{3}", "2500", "2.5 \\cdot 10^3"],
    ["30^\\circ", "30", "30^{\\circ}", "30°"],
    ["\\$18.90", "18.9", "18.90"],
    ["\\sqrt[3]{27}", "3", "27^{1/3}"],
    ["x^2 + 1", "x^2+1", "y = x^2 + 1"],  # text: spaces next to symbols do not count
]


@pytest.mark.parametrize("forms", EQUIVALENT, ids=[c[0] for c in EQUIVALENT])
def test_equivalent_forms_match_each_other(forms):
    for a in forms:
        for b in forms:
            assert rw.answers_match(a, b), (a, b)
            assert verify(f"</think>\n\n\\boxed{{{a}}}", b) == 1.0, (a, b)


# Near-misses: must not match, in either direction.
DIFFERENT = [
    ("\\sqrt{2}", "2"), ("\\sqrt{2}", "\\sqrt{3}"), ("\\sqrt{2}", "1.414"), ("√2", "2"),
    ("2^3", "3"), ("2^3", "2"), ("2^3", "6"), ("2^{3}", "3"), ("10^3", "10^4"), ("10^3", "3"),
    ("10^3", "10"), ("10^{-3}", "10^{3}"), ("(1, 2)", "(2, 1)"), ("(1, 2)", "[1, 2)"),
    ("(1, 2)", "[1, 2]"), ("[1, 2)", "[1, 2]"), ("(1, 2)", "1, 2"), ("(1, 2)", "(1, 2, 3)"),
    ("(1, 2)", "2"), ("(1, 2)", "12"), ("x = 5", "x = 6"), ("x = 5", "6"), ("2\\pi", "2"),
    ("2\\pi", "\\pi"), ("2\\pi", "6.28"), ("\\pi", "3.14"), ("\\pi", "\\frac{22}{7}"),
    ("2\\sqrt{3}", "\\sqrt{6}"), ("2\\sqrt{3}", "2"), ("2\\sqrt{3}", "3"),
    ("\\frac{\\pi}{2}", "\\frac{\\pi}{3}"), ("\\frac{\\sqrt{3}}{2}", "\\frac{\\sqrt{2}}{2}"),
    ("\\frac{\\sqrt{3}}{2}", "\\frac{3}{2}"), ("-\\frac{1}{2}", "0.5"), ("-\\frac{1}{2}", "-2"),
    ("50\\%", "0.5"), ("50\\%", "5"), ("5\\%", "0.05"), ("\\infty", "-\\infty"),
    ("\\infty", "0"), ("\\{1, 2\\}", "\\{1, 3\\}"), ("\\{1, 2\\}", "(1, 2)"),
    ("\\{1, 2\\}", "\\{1, 2, 3\\}"), ("10{,}000", "10"), ("10,000", "10"), ("1,000", "1"),
    ("\\text{B}", "C"), ("(B)", "(C)"), ("B", "8"), ("1 + \\sqrt{2}", "1"),
    ("1 + \\sqrt{2}", "\\sqrt{2}"), ("1/3", "0.333"), ("1/3", "0.3333333333333333333"),
    ("(0, 1) \\cup (2, 3)", "(2, 3)"), ("(0, 1) \\cup (2, 3)", "(0, 3)"),
    # arithmetic left undone between plain numbers is not its result
    ("3+5", "8"), ("2 \\cdot 4", "8"), ("2 \\times 4", "8"), ("6 \\div 2", "3"), ("2(4)", "8"),
    ("7*7", "49"), ("\\frac{3+5}{2}", "4"), ("-3 + 5", "2"),
    # ambiguous readings are not guessed
    ("2\\frac{1}{2}", "2.5"), ("2\\frac{1}{2}", "1"), ("1/2\\pi", "\\pi/2"),
    ("1/2\\pi", "\\frac{1}{2\\pi}"), ("\\sqrt 10", "\\sqrt{10}"), ("2^3^2", "512"),
    ("2^3^2", "64"), ("\\frac123", "1.5"),
    # no exact value: no guess
    ("\\sqrt{-4}", "2"), ("\\sqrt{-4}", "-2"), ("0^0", "1"), ("1/0", "0"), ("\\sqrt[3]{2}", "1"),
    ("x^2 + 1", "2"), ("x^2 + 1", "1"),
]


@pytest.mark.parametrize("a,b", DIFFERENT)
def test_near_misses_do_not_match(a, b):
    assert not rw.answers_match(a, b), (a, b)
    assert not rw.answers_match(b, a), (b, a)
    assert verify(f"</think>\n\n\\boxed{{{a}}}", b) == 0.0
    assert verify(f"</think>\n\n{b}", a) == 0.0


COMPETITION_ANSWERS = [
    "\\frac{3}{4}", "2\\sqrt{3}", "\\pi/2", "3\\pi", "-7", "0.125", "x = -2", "(0, 1)", "[0, 1)",
    "\\{1, 2\\}", "10^{-3}", "\\infty", "\\text{(C)}", "5\\%", "1{,}234", "\\frac{1+\\sqrt{5}}{2}",
    "2^{10}", "\\sqrt[3]{2}", "(-\\infty, 0]", "\\frac{\\pi}{6}", "4\\sqrt{2}-2", "\\dfrac{7}{2}",
    "90^\\circ", "\\$18.90", "(1, -1, 2)", "\\frac{9}{4}\\pi", "y = 2x + 1", "\\sqrt{10}",
    "\\frac{1}{\\sqrt{3}}", "1 - \\frac{\\sqrt{2}}{2}", "\\pi^2/6", "2^{100}", "10^{100000}",
    "(-\\infty, 0) \\cup (1, \\infty)", "12 \\text{ cm}", "\\ln 2", "3!", "\\text{Monday}",
    "\\binom{5}{2}", "0", "-\\frac{1}{2}", "1,000,000", "\\emptyset", "e^{2}",
]


@pytest.mark.parametrize("x", COMPETITION_ANSWERS)
@pytest.mark.parametrize("wrap", ["{}", "</think>\n\n{}", "<think>\nr\n</think>\n\n\\boxed{{{}}}",
                                  "</think>\n\n${}$", "</think>\n\nThe answer is $\\boxed{{{}}}$."])
def test_answer_matches_itself(x, wrap):
    assert verify(wrap.format(x), x) == 1.0


@pytest.mark.parametrize("x", [
    "\\frac{3}{4}", "2\\sqrt{3}", "\\pi/2", "3\\pi", "-7", "0.125", "(0, 1)", "[0, 1)",
    "\\{1, 2\\}", "10^{-3}", "\\infty", "5\\%", "1{,}234", "\\frac{1+\\sqrt{5}}{2}", "2^{10}",
    "(-\\infty, 0]",
    "4\\sqrt{2}-2", "\\dfrac{7}{2}", "(1, -1, 2)", "\\frac{9}{4}\\pi", "\\frac{1}{\\sqrt{3}}",
    "1 - \\frac{\\sqrt{2}}{2}", "\\pi^2/6", "(-\\infty, 0) \\cup (1, \\infty)", "\\sqrt[3]{2}",
])
def test_math_answer_in_prose_matches_itself(x):
    # without \boxed, a mathematical answer at the end of a sentence is found as a whole
    assert verify(f"</think>\n\nSo the answer is ${x}$.", x) == 1.0
    assert verify(f"</think>\n\nSo the answer is {x}", x) == 1.0


@pytest.mark.parametrize("text,answer", [
    ("so we get 2^3", "2^3"), ("so we get 2^{3}.", "2^{3}"), ("hence \\sqrt{2}.", "\\sqrt{2}"),
    ("hence \\sqrt 2", "\\sqrt 2"), ("The answer is $2\\sqrt{3}$.", "2\\sqrt{3}"),
    ("the point (1, 2).", "(1, 2)"), ("on [0, 1) only", "[0, 1)"), ("**8**", "8"),
    ("so x = -2", "-2"), ("That is 10{,}000 apples", "10{,}000"), ("it is 50\\% off", "50\\%"),
    ("we get 10^{100000}", "10^{100000}"), ("roots 2 \\pm \\sqrt{3}", "2 \\pm \\sqrt{3}"),
    ("set (0, 1) \\cup (2, 3)", "(0, 1) \\cup (2, 3)"), ("\\log 8 = 3", "3"),
    ("x = 5", "x = 5"), ("(1, 2)", "(1, 2)"), ("3 \\pi", "3 \\pi"),
    ("the answer is 2x", "the answer is 2x"), ("f(3)", "f(3)"), ("we get \\log_2 8", None),
    ("x - 5", "x - 5"), ("is -4", "-4"), ("(so it is 3)", "3"),
])
def test_extract_math_run(text, answer):
    got = extract_answer(text)
    assert got == (text if answer is None else answer)


@pytest.mark.parametrize("resp,ref,want", [
    # exponents, radicands and function arguments are never the answer on their own
    ("so we get 2^3", "3", 0.0), ("so we get 2^3", "2", 0.0), ("so we get 2^3", "8", 1.0),
    ("hence \\sqrt{2}", "2", 0.0), ("hence \\sqrt{2}", "\\sqrt{2}", 1.0),
    ("we get 10^{100000}", "100000", 0.0), ("we get 10^{100000}", "10", 0.0),
    ("we get \\log_2 8", "8", 0.0), ("we get \\log_2 8", "2", 0.0), ("\\sin 30", "30", 0.0),
    ("the roots are 2 \\pm \\sqrt{3}", "\\sqrt{3}", 0.0),
    ("(0, 1) \\cup (2, 3)", "(2, 3)", 0.0), ("the answer is 2x", "2", 0.0),
    ("x^2", "2", 0.0), ("f(3)", "3", 0.0), ("5cm", "5", 0.0), ("5 cm", "5", 1.0),
    ("x ^3", "3", 0.0), ("n / 2", "2", 0.0), ("x + 1", "1", 0.0), ("x = \\pm 3", "3", 0.0),
    ("so 2^", "2", 0.0), ("the answer is 12 - done", "12", 1.0), ("is -4", "-4", 1.0),
    ("\\lfloor 3.5 \\rfloor", "3.5", 0.0), ("so it is 2\\sqrt{3}", "\\sqrt{3}", 0.0),
    # a text reference matches a response that is exactly it, though rule c reads a number
    ("\\ln 2", "\\ln 2", 1.0), ("\\ln 2", "2", 0.0), ("12 \\text{ cm}", "12 cm", 1.0),
    # end of turn and reopened thinking
    ("</think>\n\n1<|im_end|>2", "1", 1.0), ("</think>\n\n1<|im_end|>2", "12", 0.0),
    ("</think>\n\n1<|endoftext|>2", "2", 0.0), ("1<|im_end|>\n</think>\n\n2", "2", 0.0),
    ("</think>\n\n5\n<think>\nor 6", "6", 0.0), ("</think>\n\n5\n<think>\nor 6", "5", 1.0),
    ("</think>\n\n<think>\n6", "6", 0.0), ("</think>\n\n<think>\n\\boxed{6}", "6", 0.0),
    ("<think>\n1\n</think>\n\n\\boxed{50\\%}", "50%", 1.0),
    ("<think>\n1\n</think>\n\n\\boxed{50\\%}", "50", 1.0),
    ("<think>\n1\n</think>\n\n\\boxed{50\\%}", "0.5", 0.0),
])
def test_verify_math(resp, ref, want):
    assert verify(resp, ref) == want


def test_caps_make_values_incomparable_not_wrong():
    assert verify("(" * 10 + "5" + ")" * 10, "5") == 1.0
    assert verify("(" * (rw.MAX_NESTING + 8) + "5" + ")" * (rw.MAX_NESTING + 8), "5") == 0.0
    assert verify(f"1^{{{rw.MAX_EXPONENT}}}", "1") == 1.0
    assert verify(f"1^{{{rw.MAX_EXPONENT + 1}}}", "1") == 0.0
    bits = rw.MAX_VALUE_BITS
    assert verify(f"\\frac{{2^{{{bits - 1}}}}}{{2^{{{bits - 2}}}}}", "2") == 1.0
    assert verify(f"\\frac{{2^{{{bits}}}}}{{2^{{{bits - 1}}}}}", "2") == 0.0
    assert verify("2^{100}", str(2 ** 100)) == 1.0
    assert verify("\\pi^{16}", "\\pi^{8}\\pi^{8}") == 1.0
    assert verify("\\pi^{17}", "\\pi^{16}\\pi") == 0.0  # past the power-of-pi cap
    # a run cut by the search window may have begun before it: its tail "3}" is not the answer
    assert verify("2^{" + " " * 5000 + "3}", "3") == 0.0
    assert verify("the answer is 2^{" + " " * 5000 + "3} or 7", "7") == 1.0
    # past the caps only identical text matches
    assert verify("10^{100000}", "10^{100000}") == 1.0
    assert verify("10^{100000}", "10^{99999} \\cdot 10") == 0.0
    long = "1+" * rw.MAX_EXPR_CHARS + "\\sqrt{2}"
    assert verify(f"\\boxed{{{long}}}", long) == 1.0
    assert verify(f"\\boxed{{{long}}}", "\\sqrt{2}+" + "1+" * (rw.MAX_EXPR_CHARS - 1) + "1") == 0.0


def test_huge_powers_are_refused_before_they_are_computed():
    # each power would have 3.4 million bits: its size is checked first, so the call is quick
    text = "(" + ", ".join(["9" * 250 + "^{4096}"] * 3) + ")"
    t0 = time.process_time()
    assert verify(text, text) == 1.0  # not comparable as values: equal as text
    assert verify(text, "(1, 1, 1)") == 0.0
    assert time.process_time() - t0 < 0.5


def test_answers_match_arguments():
    with pytest.raises(TypeError, match="answer must be a str, got int"):
        rw.answers_match(5, "5")
    with pytest.raises(TypeError, match="reference must be a str, got NoneType"):
        rw.answers_match("5", None)
    assert not rw.answers_match("", "")  # an empty text matches nothing
    assert not rw.answers_match("$$", "$$")
    too_long = "7" * (rw.MAX_ANSWER_CHARS + 1)
    assert not rw.answers_match(too_long, too_long)  # longer than any examined answer


def test_normalize_number_thousands_in_tex():
    assert normalize_number("10{,}000") == 10000
    assert normalize_number("\\sqrt{2}") is None  # not a literal number
    assert normalize_number("2^3") is None


def _adversarial():
    deep = rw.MAX_NESTING * 4
    return [
        "{" * 300_000 + "1" + "}" * 300_000,
        "</think>\n\n" + "{" * 45_000 + "2" + "}" * 45_000,
        "\\boxed{" + "{" * 40_000 + "2" + "}" * 40_000 + "}",
        "</think>\n\n\\boxed{" + "{" * 500_000,
        "\\boxed{" * 30_000,
        "</think>\\boxed{\\frac{1}{2}" + "x" * 90_000,
        "\\sqrt{" * 10_000 + "4" + "}" * 10_000,
        "\\boxed{" + "\\sqrt{" * deep + "16" + "}" * deep + "}",
        "\\sqrt" * 900 + "2",
        "\\boxed{" + "(" * 400 + "2" + ")" * 400 + "}",
        "2^" * 45_000 + "2",
        "\\boxed{" + "2^" * 400 + "2}",
        "\\boxed{" + "2^{" * 40 + "2" + "}" * 40 + "}",
        "2^{2^{2^{2^{2}}}}",
        "10^{100000}", "10^{" + "9" * 200 + "}", "\\boxed{" + "9" * 200 + "^{" + "9" * 200 + "}}",
        "9" * 99_000, "\\boxed{" + "9" * 9_000 + "}", "0." + "3" * 99_000,
        "\\frac{" * 30_000, "\\frac{" * 150 + "1}{2}" * 150,
        "1+" * 45_000 + "1", "-" * 90_000 + "2", "(" * 90_000, ")" * 90_000 + "2",
        "\\boxed{(\\sqrt{2}+\\sqrt{3}+\\sqrt{5}+\\sqrt{7})^{32}}",
        "\\boxed{(\\sqrt{2}+\\sqrt{3}+\\sqrt{5}+\\sqrt{7}+\\sqrt{11})^{32}}",
        "\\boxed{" + "\\cdot".join(["(2^{4000}+\\sqrt{2})"] * 40) + "}",
        "\\boxed{" + "/".join(["(2^{4000}+\\sqrt{3})"] * 40) + "}",
        "\\sqrt{" + "9" * 250 + "}", "\\sqrt{1" + "0" * 255 + "}",
        "\\sqrt[16]{" + "7" * 250 + "}", "\\boxed{" + "1/" * 300 + "1}",
        "(" + ", ".join(["1"] * 30_000) + ")", "(" + ",".join(["(1,"] * 100) + ")" * 100,
        "\\{" * 20_000 + "\\}" * 20_000, "1{,}" * 20_000 + "000",
        "\\text{" * 20_000 + "a" + "}" * 20_000, "$" * 90_000,
        "<think>" * 10_000 + "</think>" * 10_000 + "2",
        "</think>" + "x^" * 40_000 + "2", "\\pi^{10000}", "\\log_" * 15_000 + "2",
        "(" + "\\sqrt{2}+" * 200 + "1)^{32}", "\\boxed{" + "\\frac12" * 300 + "}",
        # each would be seconds of exact arithmetic without the caps on size and term count
        "(" + ", ".join(["9" * 250 + "^{4096}"] * 3) + ")",
        "(" + "+".join(f"\\sqrt{{{p}}}" for p in (2, 3, 5, 7, 11, 13, 17, 19, 23, 29)) + ")^{32}",
    ]


def test_adversarial_inputs_are_bounded():
    # CPU time of this process, so that neighbours on a shared machine do not count; the
    # wall-clock bound only catches a stall
    cases = _adversarial()
    results = []
    t0, w0 = time.process_time(), time.perf_counter()
    for text in cases:
        results.append(verify(text, "2"))
        results.append(verify(text, text[:200] or "x"))  # a reference resembling the input
    cpu, wall = time.process_time() - t0, time.perf_counter() - w0
    assert all(type(r) is float and r in (0.0, 1.0) for r in results), results
    assert cpu < 5.0, f"{len(results)} calls on adversarial inputs took {cpu:.2f}s of CPU"
    assert wall < 30.0, f"{len(results)} calls on adversarial inputs took {wall:.2f}s"
    # the few that are answers at all are read as wholes, never as a piece
    assert verify("\\boxed{" + "\\sqrt{" * 3 + "16" + "}" * 3 + "}", "2") == 0.0
    assert verify("2^{2^{2^{2^{2}}}}", "2") == 0.0


def test_adversarial_inputs_as_references_are_bounded():
    t0 = time.process_time()
    for text in _adversarial():
        if text.strip():
            assert verify("</think>\n\n2", text) in (0.0, 1.0)
            assert rw.answers_match(text, text) in (True, False)
    assert time.process_time() - t0 < 5.0


# ------------------------------------------------------------ multiple choice
@pytest.mark.parametrize("response", [
    "The answer is (B).", "Answer: B", "The answer is B", "(B) 6", "B. 6", "B) 6",
    "the correct option is B", "The correct choice is (B)", "**Answer:** **B**",
    "Final answer: $\\text{B}$", "answer is option B", "The answer is (b).",
    "Looking at the chart, the bars grow.\nB", "(B)", "**B**", "\\boxed{B}", "\\boxed{(B) 6}",
    "<think>\nA looks right, or C.\n</think>\n\nThe answer is (B).",
    "Option A is wrong and so is C; the answer is B.",
])
def test_choice_prose_forms_score(response):
    assert rw.extract_choice(response) == "B"
    assert verify(response, "B") == 1.0
    assert verify(response, "(B)") == 1.0
    assert verify(response, "\\boxed{B}") == 1.0
    assert verify(response, "C") == 0.0


@pytest.mark.parametrize("response", [
    "<think>\nThe answer is (B).\n</think>\n\nI cannot tell.",  # only in the reasoning
    "<think>\nAnswer: B\n</think>\n\nThe answer is (C).",  # reasoning B, answer C
    "<think>\nthe correct option is B",  # never closed: no answer
    "The answer is Because of the slope",  # a word, not a letter
    "The answer is a triangle",
    "\\boxed{6} and the answer is B",  # a box decides, and holds no letter
    "Answer: B, no wait, the answer is C.",  # the last cue wins
])
def test_choice_letter_outside_the_answer_does_not_score(response):
    assert verify(response, "B") == 0.0


def test_choice_rules_leave_free_form_references_alone():
    assert verify("(B) 6", "6") == 1.0  # a value reference still reads the value
    assert verify("The answer is 6.", "6") == 1.0
    assert verify("b", "B") == 1.0  # text match as before
    assert rw.choice_reference("x") is None and rw.choice_reference("B") == "B"
    assert rw.choice_reference("\\boxed{(C)}") == "C" and rw.choice_reference("BC") is None
    assert verify("x", "x") == 1.0 and verify("The answer is X", "x") == 0.0


def test_choice_extraction_is_bounded_on_adversarial_text():
    cases = ["answer " * 14000, "answer" + " " * 99000 + "B", "The answer is " + "(" * 99000,
             "correct option " * 6000, "Answer: **" * 9000, "A" * 99000,
             "</think>" + "answer is " * 9000, "(B" * 45000, "\n".join(["B x"] * 30000)]
    t0 = time.process_time()
    for text in cases:
        assert verify(text, "B") in (0.0, 1.0)
        assert rw.extract_choice(text) in (None, *"ABCDEFGHIJKLMNOPQRSTUVWXYZ")
    assert time.process_time() - t0 < 2.0
