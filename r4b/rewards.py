"""Rule-based answer verifier: the BPO reward (1.0 for a correct final answer, else 0.0).

Where the answer is (:func:`extract_answer`)
--------------------------------------------
1. The response ends at the first end-of-turn marker (``<|im_end|>``, ``<|endoftext|>``):
   nothing after it counts, so ``1<|im_end|>2`` answers ``1``.
2. Only text after the **last** ``</think>`` counts, and a ``<think>`` reopened after it ends
   the answer there (the reopened reasoning is not answer). A response that opened
   ``<think>`` and never closed it has **no answer** (reward 0). Text without any think tags
   is read whole. Pass RL rollouts with their forced mode prefix
   (``ChatTemplate.assistant_text_of``), or ``strict_think=True``: a forced-thinking rollout
   cut off mid-reasoning contains no think tags of its own and would otherwise be read whole.
3. In that answer text, the first rule that applies:

   a. the content of the last complete ``\\boxed{...}`` / ``\\fbox{...}`` (nested braces
      allowed); an unterminated last ``\\boxed{`` means no answer;
   b. the whole text, when all of it reads as a mathematical answer (a value, a tuple, an
      interval or a set of them, optionally as ``x = ...``; rules below);
   c. the last *math run*: a maximal stretch of numbers, operators, brackets and math
      commands (``\\frac``, ``\\sqrt``, ``\\pi``, ``^``, ...), e.g. ``2^3``, ``2\\sqrt{3}``,
      ``(1, 2)``, with a dangling dash, bold marks (``**8**``) and unmatched outer brackets
      trimmed. The run is the answer as a whole: the ``3`` of ``2^3`` or the ``2`` of
      ``\\sqrt{2}`` is never taken alone, nor the last interval of ``(0, 1) \\cup (2, 3)``
      or the radical of ``2 \\pm \\sqrt{3}``. A run glued to letters (``x2``, ``x^2``,
      ``f(3)``, ``2x``, ``1e3``) or that is the argument of a function (the ``8`` of
      ``\\log_2 8``, the ``30`` of ``\\sin 30``) is not an answer. Runs are separated by
      words, ``=``, and commas outside brackets, so ``3+5=8`` answers ``8`` and
      ``values 3, 5, 7`` answers ``7``;
   d. the stripped text (for non-numeric answers such as a choice).

   Rule c searches the last ``4 * MAX_EXPR_CHARS`` characters (a longer run could only be
   compared as text anyway), and a run cut by that window is not used.

   :func:`verify` also accepts the whole answer text of rule 3 (when no ``\\boxed`` decided
   it) if the reference is text rather than a mathematical form, so that rule c, which reads
   ``2`` out of ``\\ln 2``, never fails a response that is exactly the reference.

Multiple choice (:func:`extract_choice`, used by :func:`verify`)
--------------------------------------------------------------
When the reference names a choice letter (:func:`choice_reference`: an uppercase ``A``-``Z``,
optionally as ``(B)``, ``\\boxed{B}`` or ``\\text{B}``), the letter is read from the answer
part of the response (step 2 above: after the last ``</think>``; a letter only in the
reasoning is never read), whitespace runs collapsed, by the first rule that applies:

a. inside the last complete ``\\boxed{...}`` when there is one (then only there);
b. the **last** cue: ``answer`` or ``correct`` / ``right`` / ``best`` / ``final`` ``option`` /
   ``choice``, optionally followed by ``is`` / ``would be`` / ``should be`` / ``will be``,
   a colon, up to two of ``**`` ``__`` ``$`` ``\\text{`` ``\\textbf{`` ``\\mathrm{`` and the
   word ``option``, then the letter: ``The answer is (B).``, ``Answer: C``, ``the correct
   option is D``, ``**Answer:** **B**``, ``Final answer: $\\text{C}$``;
c. a letter opening the answer: ``(B) 6``, ``B. 6``, ``B) 6``, ``B: six``;
d. a lone letter on the last non-empty line: ``B``, ``(B)``, ``**B**``, ``B.``.

A letter is uppercase, or a lowercase one in brackets (``(b)``), and not glued to a word
(``The answer is Because`` names none; ``The answer is a triangle`` neither). When a letter
is read, the reward is whether it equals the reference's; when none is, the rules below apply
(so ``b`` still matches ``B`` as text). Free-form references are unaffected.

How answers compare (:func:`answers_match`)
-------------------------------------------
Both the extracted answer and the reference (the content of its ``\\boxed{}`` if it has one)
are brought to a canonical form, and they match when the forms are equal (so matching is an
equivalence: reflexive, symmetric, transitive). Before anything else: ``$...$``, ``\\(...\\)``,
``\\[...\\]``, enclosing braces, ``\\text{}``/``\\mathrm{}``/``\\textbf{}``-style wrappers,
``\\left``/``\\right``, TeX spacing (``\\,`` ``\\!`` ``\\;``), ``\\$``, a trailing period and
the degree sign (``30^\\circ`` is ``30``) are removed; ``\\dfrac``/``\\tfrac`` are ``\\frac``;
``{,}`` is a comma; a leading ``name =`` or ``name \\in`` is dropped (``x = 5`` is ``5``; the
variable's name is not compared); a trailing ``%`` or ``\\%`` is dropped (``50\\%`` ==
``50%`` == ``50``; ``0.5`` does **not** match ``50\\%``: the percentage is compared by its
number, as a unit would be, and accepting both ``50`` and ``0.5`` would not be transitive).
Then the first form that applies:

* **Set** ``\\{a, b\\}`` or ``{a, b}``: its elements' forms, order and repetition ignored.
* **Tuple / interval** ``(a, b)``, ``[a, b)``, ...: the two brackets and the elements' forms
  in order, so ``(1, 2) != (2, 1)`` and ``[1, 2) != (1, 2)``. A bare list ``a, b`` is a
  sequence without brackets (not equal to ``(a, b)``). A comma directly followed by three
  digits belongs to a number (``1,000`` is one thousand, so ``(1,000)`` is a number too).
* **Union** ``A \\cup B``: its parts' forms, order ignored.
* **Infinity** ``\\infty``, ``∞``, with an optional sign.
* **Exact value**, computed by the bounded parser of this module (never by evaluating text
  as code): numbers (integers, decimals, ``1,000`` and ``1{,}000`` separators), ``+ - * / ^``,
  ``\\cdot``, ``\\times``, ``\\div``, ``\\frac``, ``\\sqrt``, ``\\sqrt[n]``, ``√``, ``\\pi``,
  ``π``, parentheses and braces, implicit multiplication (``2\\sqrt{3}``, ``3\\pi``,
  ``(1+\\sqrt{2})(1-\\sqrt{2})``). The value is held exactly as a sum of terms
  ``c * sqrt(m) * pi^k`` (``c`` a :class:`fractions.Fraction`, ``m`` a square-free integer,
  ``k`` an integer); such a form is unique, so equal forms mean equal values and
  ``\\frac{\\sqrt{3}}{2} == \\dfrac{\\sqrt3}{2} == \\sqrt{3}/2``, ``\\sqrt{8} == 2\\sqrt{2}``,
  ``2^3 == 8``, ``10^3 == 10^{3} == 1000``, ``10^{-3} == 0.001``, ``1/2 == 0.5 ==
  \\frac12``. There is **no float tolerance** (``0.333 != 1/3``, ``3.14 != \\pi``): a
  tolerance would reward near-misses of exact answers. Reading rules: ``2^10`` is ``2^{10}``
  (a plain-text exponent is the whole number); ``\\sqrt2``/``\\frac12`` take one digit, as
  TeX does (``\\sqrt 10`` is not comparable); ``√10`` is ``\\sqrt{10}``.
  Not comparable (so compared as text): variables; ``2^3^2``; ``1/2\\pi`` (is it
  ``\\pi/2`` or ``1/(2\\pi)``?); ``2\\frac{1}{2}`` (mixed number or product?); roots that
  are not exact (``\\sqrt[3]{2}``) or of negative or irrational values; division by a sum
  other than ``a + b\\sqrt{m}``-like pairs (two terms with the same power of ``\\pi``);
  factorials, ``e``, logarithms, trigonometry; and **arithmetic between plain rational
  numbers**: ``3+5``, ``2\\cdot 4``, ``6 \\div 2``, ``2(4)`` are not ``8``. Fractions
  ``a/b``, powers ``a^n`` and ``a \\times 10^{n}`` are ways of writing a number; a sum or
  product of two rational numbers is a computation left undone, and rewarding it would pay
  a policy for restating the question (``3+5``) instead of answering it. Sums and products
  that involve a radical or ``\\pi`` are evaluated (``1+\\sqrt{2}``, ``\\frac{\\pi}{2}-1``).
* **Text** otherwise: case-folded, whitespace collapsed (and dropped next to symbols, so
  ``x^2 + 1 == x^2+1``), one pair of enclosing parentheses removed, so choices compare by
  letter: ``(B) == B == \\text{B} == b``, ``\\text{(C)} == C``. A value never equals a
  text, and an empty text matches nothing.

Safety and bounds: model output is never evaluated as code (no ``eval``/``exec``, no
``sympy``/``parse_expr``, no other symbolic-math parser); only regular expressions with
linear-time patterns, string scans, a recursive-descent parser with hard caps, and integer /
``Fraction`` arithmetic on validated digit strings. Answer texts longer than
:data:`MAX_ANSWER_CHARS` are rejected (so are such references: they match nothing); texts
longer than :data:`MAX_EXPR_CHARS` are only compared as text (and keep their enclosing
braces and parentheses); numbers with more than :data:`MAX_DIGITS` digits, nesting deeper
than :data:`MAX_NESTING`, integer exponents beyond :data:`MAX_EXPONENT` (``10^{100000}``)
and values whose numerator, denominator or radicand would exceed :data:`MAX_VALUE_BITS` bits
are not comparable as values (they still match identical text). The work of one call is
linear in the input length, and the parser's work is bounded by those caps.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction
from typing import Sequence

MAX_ANSWER_CHARS = 100_000
"""Longest answer text (after ``</think>``) that is examined; longer means no answer."""
MAX_DIGITS = 256
"""Most digits (all parts of one number together) that one number may have."""
MAX_BOXED_CHARS = 10_000
"""Longest ``\\boxed{...}`` content accepted."""
MAX_EXPR_CHARS = 1_000
"""Longest answer (after cleaning) that is parsed for an exact value; longer is text only."""
MAX_NESTING = 32
"""Deepest nesting (brackets, ``\\frac``, ``\\sqrt``, signs, exponents) the parser follows."""
MAX_EXPONENT = 4096
"""Largest magnitude of an integer exponent that is evaluated."""
MAX_VALUE_BITS = 4096
"""Largest numerator, denominator or radicand, in bits, of an exact value."""

_MAX_TERMS = 16  # terms c*sqrt(m)*pi^k in one value: bounds the cost of one product
_MAX_PI_POWER = 16
_MAX_ROOT_INDEX = 16
_MAX_POLY_EXPONENT = 32  # integer power of a sum: repeated squaring of up to _MAX_TERMS terms
_MAX_ELEMENTS = 64  # elements of one tuple / set
_MAX_LIST_DEPTH = 3  # tuples of tuples ...
_TRIAL_LIMIT = 1000  # trial division bound when extracting square factors
_RUN_WINDOW_CHARS = 4 * MAX_EXPR_CHARS  # tail of an answer searched for its last math run

_THINK_START, _THINK_END = "<think>", "</think>"
_END_MARKERS = ("<|im_end|>", "<|endoftext|>")
_MINUSES = str.maketrans({"\u2212": "-", "\u2012": "-", "\u2013": "-", "\uFE63": "-",
                          "\uFF0D": "-", "\u00A0": " ", "\u202F": " ", "\u2009": " "})


# ------------------------------------------------------------ plain numbers (normalize_number)
_INT = r"(?:\d{1,3}(?:,\d{3})+|\d+)"
_NUM = rf"(?:[+-]?{_INT}(?:\.\d+)?|[+-]?\.\d+)"
_FRAC_TEX = r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}"
_FRAC_TEX_SHORT = r"\\[dt]?frac\s*(\d)(\d)"
_NUMBER_RE = re.compile(rf"^({_NUM})$")
_RATIO_RE = re.compile(rf"^({_NUM})\s*/\s*({_NUM})$")
_TEX_RE = re.compile(rf"^([+-]?)\s*(?:{_FRAC_TEX}|{_FRAC_TEX_SHORT})$")


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
    separators (``1,000``, ``1{,}000``), decimals (``0.50``, ``.5``), ratios ``a/b``,
    ``\\frac{a}{b}`` (also ``\\dfrac``, ``\\tfrac``, ``\\frac12``), optionally inside
    ``$...$``, ``\\(...\\)``, ``\\text{...}`` or braces, with a trailing period. Not accepted:
    exponents, radicals, percentages, units, mixed numbers, a zero denominator, more than
    :data:`MAX_DIGITS` digits. (:func:`answers_match` compares richer forms; this function
    is the literal-number reading only.)
    """
    if not isinstance(s, str):
        raise TypeError(f"s must be a str, got {type(s).__name__}")
    if len(s) > 4 * MAX_DIGITS + 64 or _digits(s) > MAX_DIGITS:
        return None
    t = _strip_wrappers(s.translate(_MINUSES).replace("{,}", ","))
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


# ------------------------------------------------------------ tokens
# One tokenizer serves both the math-run search over whole answers (up to MAX_ANSWER_CHARS)
# and the parser. Every alternative is linear: the thousands form backtracks at most one
# group, because after dropping a group the next character is a comma, which (?![0-9])
# accepts.
_TOKEN_RE = re.compile(
    r"(?P<num>[0-9]{1,3}(?:,[0-9]{3})+(?:\.[0-9]+)?(?![0-9])|[0-9]+(?:\.[0-9]+)?|\.[0-9]+)"
    r"|(?P<cmd>\\(?:[A-Za-z]+|.?))"
    r"|(?P<sp>\s+)"
    r"|(?P<glyph>[π√∞×·÷°])"
    r"|(?P<word>[^\W\d_]+)"
    r"|(?P<sym>.)", re.S)

_TIMES = frozenset({"*", "\\cdot", "\\times", "×", "·"})
_DIVIDES = frozenset({"\\div", "÷"})
_OPERATORS = _TIMES | _DIVIDES | {"+", "-", "/", "^"}
_OPENERS = frozenset({"(", "[", "{", "\\{"})
_CLOSERS = frozenset({")", "]", "}", "\\}"})
_PI_TOKENS = frozenset({"\\pi", "π"})
_INF_TOKENS = frozenset({"\\infty", "∞"})
# Tokens that start a factor which may follow another factor without an operator.
_IMPLICIT_STARTERS = frozenset({"\\pi", "π", "\\sqrt", "√", "\\frac", "("})
_RUN_STARTERS = _IMPLICIT_STARTERS | _INF_TOKENS | {"\\dfrac", "\\tfrac"}
# Other tokens a math run may contain (postfix marks and layout commands).
_RUN_EXTRA = frozenset({"%", "\\%", "°", "\\circ", "\\left", "\\right", "\\,", "\\!", "\\;",
                        "\\:", "\\displaystyle"})
# Binary symbols a run continues across (set and sign operators keep "(1, 2) \cup (3, 4)"
# and "2 \pm \sqrt{3}" whole, so that their last piece is not read as the answer).
_RUN_OPERATORS = _OPERATORS | {"\\cup", "\\cap", "\\setminus", "\\pm", "\\mp"}
_RUN_TOKENS = _RUN_OPERATORS | _OPENERS | _CLOSERS | _RUN_STARTERS | _RUN_EXTRA
_ARG_TAKERS = frozenset({"\\sqrt", "\\frac", "\\dfrac", "\\tfrac", "√"})
# Commands whose argument follows them: a run there is an argument (the 8 of \log_2 8), not
# a value.
_FUNCTIONS = frozenset({
    "\\ln", "\\log", "\\lg", "\\exp", "\\sin", "\\cos", "\\tan", "\\sec", "\\csc",
    "\\cot", "\\arcsin", "\\arccos", "\\arctan", "\\sinh", "\\cosh", "\\tanh", "\\binom",
    "\\dbinom", "\\tbinom", "\\choose", "\\lim", "\\max", "\\min", "\\gcd", "\\det",
    "\\deg", "\\sum", "\\prod", "\\int", "\\lfloor", "\\lceil", "\\overline", "\\vec",
    "\\hat", "\\bar", "\\operatorname"})


def _tokenize(t: str) -> list[tuple[str, str, int, int]]:
    return [(m.lastgroup, m.group(), m.start(), m.end()) for m in _TOKEN_RE.finditer(t)]


# ------------------------------------------------------------ exact values
# A value is a dict {(m, k): c} meaning sum(c * sqrt(m) * pi**k) with m >= 1 square-free, k
# an integer and c a nonzero Fraction. The square roots of distinct square-free integers are
# linearly independent over the rationals and pi is transcendental, so this form is unique:
# two values are equal exactly when their dicts are.
class _Incomparable(Exception):
    """The text has no exact value that the parser can compute within its bounds."""


_PI = {(1, 1): Fraction(1)}


def _rational(q: Fraction | int) -> dict:
    return {(1, 0): Fraction(q)} if q else {}


def _is_rational(v: dict) -> bool:
    return all(key == (1, 0) for key in v)


def _rational_of(v: dict) -> Fraction | None:
    return v.get((1, 0), Fraction(0)) if _is_rational(v) else None


def _bounded(v: dict) -> dict:
    if len(v) > _MAX_TERMS:
        raise _Incomparable
    for (m, k), c in v.items():
        if (abs(k) > _MAX_PI_POWER or m.bit_length() > MAX_VALUE_BITS
                or c.numerator.bit_length() > MAX_VALUE_BITS
                or c.denominator.bit_length() > MAX_VALUE_BITS):
            raise _Incomparable
    return v


def _accumulate(out: dict, key: tuple[int, int], c: Fraction) -> None:
    s = out.get(key, 0) + c
    if s:
        out[key] = s
    else:
        out.pop(key, None)


def _add(a: dict, b: dict) -> dict:
    out = dict(a)
    for key, c in b.items():
        _accumulate(out, key, c)
    return _bounded(out)


def _neg(a: dict) -> dict:
    return {key: -c for key, c in a.items()}


def _mul(a: dict, b: dict) -> dict:
    out: dict = {}
    for (m1, k1), c1 in a.items():
        for (m2, k2), c2 in b.items():
            # sqrt(m1)*sqrt(m2) = g*sqrt(m1/g * m2/g) with g = gcd: square-free stays square-free
            g = math.gcd(m1, m2)
            _accumulate(out, ((m1 // g) * (m2 // g), k1 + k2), c1 * c2 * g)
    return _bounded(out)


def _inv(a: dict) -> dict:
    if not a:
        raise _Incomparable  # division by zero
    if len(a) == 1:
        ((m, k), c), = a.items()
        return _bounded({(m, -k): 1 / (c * m)})  # 1/(c sqrt m) = sqrt(m)/(c m)
    if len(a) == 2:
        ((m1, k1), c1), ((m2, k2), c2) = a.items()
        if k1 == k2:
            # (A + B)(A - B) = A^2 - B^2 is rational for A = c1 sqrt(m1), B = c2 sqrt(m2), and
            # nonzero because m1 != m2 are square-free
            d = c1 * c1 * m1 - c2 * c2 * m2
            if d:
                return _bounded({(m1, -k1): c1 / d, (m2, -k1): -c2 / d})
    raise _Incomparable


def _ipow(base: dict, n: int) -> dict:
    if abs(n) > MAX_EXPONENT:
        raise _Incomparable
    if n == 0:
        if not base:
            raise _Incomparable  # 0^0
        return _rational(1)
    if n < 0:
        base, n = _inv(base), -n
    if not base:
        return {}
    if len(base) == 1:
        ((m, k), c), = base.items()
        # lower bounds on the result's size, checked before the power is computed
        big = max(c.numerator.bit_length(), c.denominator.bit_length())
        if (big - 1) * n > MAX_VALUE_BITS or (m.bit_length() - 1) * (n // 2) > MAX_VALUE_BITS:
            raise _Incomparable
        return _bounded({(m if n % 2 else 1, k * n): c ** n * m ** (n // 2)})
    if n > _MAX_POLY_EXPONENT:
        raise _Incomparable
    out, sq = _rational(1), base
    while True:
        if n & 1:
            out = _mul(out, sq)
        n >>= 1
        if not n:
            return out
        sq = _mul(sq, sq)


def _iroot(n: int, q: int) -> int | None:
    """The integer q-th root of n >= 0 when n is a perfect q-th power, else None."""
    if n < 2:
        return n
    x = 1 << -(-n.bit_length() // q)  # above the root: Newton's iteration decreases from here
    while True:
        y = ((q - 1) * x + n // x ** (q - 1)) // q
        if y >= x:
            break
        x = y
    return x if x ** q == n else None


def _square_split(n: int) -> tuple[int, int]:
    """(s, m) with n = s*s*m and m square-free, for n >= 1; raises when that is not cheap."""
    s = m = 1
    p = 2
    while p <= _TRIAL_LIMIT and p * p <= n:
        if n % p == 0:
            e = 0
            while n % p == 0:
                n //= p
                e += 1
            s *= p ** (e // 2)
            if e % 2:
                m *= p
        p += 1 if p == 2 else 2
    if n > 1:
        r = math.isqrt(n)
        if r * r == n:
            s *= r
        elif p * p > n or n < _TRIAL_LIMIT ** 3:
            # every prime factor left is > the trial bound, so n is a prime or a product of two
            # distinct primes (a square of one was excluded above): square-free
            m *= n
        else:
            raise _Incomparable
    return s, m


def _root(v: dict, q: int) -> dict:
    """The principal q-th root of a value, when it is exact and real."""
    if not v:
        return {}
    if len(v) != 1:
        raise _Incomparable  # no denesting of sqrt(a + b sqrt c)
    ((m, k), c), = v.items()
    if m != 1 or k % q or c < 0:
        raise _Incomparable
    if q == 2:
        s1, m1 = _square_split(c.numerator)
        s2, m2 = _square_split(c.denominator)
        # sqrt(n/d) = s1 sqrt(m1) / (s2 sqrt(m2)) = s1 sqrt(m1 m2) / (s2 m2); m1, m2 coprime
        return _bounded({(m1 * m2, k // 2): Fraction(s1, s2 * m2)})
    r1, r2 = _iroot(c.numerator, q), _iroot(c.denominator, q)
    if r1 is None or r2 is None:
        raise _Incomparable
    return _bounded({(1, k // q): Fraction(r1, r2)})


def _pow(base: dict, exponent: dict) -> dict:
    e = _rational_of(exponent)
    if e is None:
        raise _Incomparable
    if e.denominator == 1:
        return _ipow(base, e.numerator)
    if e.denominator > _MAX_ROOT_INDEX:
        raise _Incomparable
    return _root(_ipow(base, e.numerator), e.denominator)


# ------------------------------------------------------------ parser
class _Parser:
    """Recursive descent over tokens (spaces removed) to an exact value.

    Grammar (``_Incomparable`` on anything else)::

        expr     := term (('+' | '-') term)*
        term     := signed (('*' | '\\cdot' | '\\times' | '/' | '\\div') signed | power)*
        signed   := ('+' | '-')? power                  # one sign: '--3' is not a number
        power    := atom ('^' exponent)?                # '2^3^2' is ambiguous: refused
        exponent := '{' expr '}' | ('+' | '-')? atom
        atom     := NUMBER | '\\pi' | '(' expr ')' | '{' expr '}' | '\\frac' arg arg
                  | '\\sqrt' ('[' expr ']')? arg | '√' atom
        arg      := '{' expr '}' | one digit | '\\pi'   # TeX's undelimited argument
    """

    def __init__(self, tokens: list[tuple[str, str]]):
        self.toks = tokens
        self.i = 0
        self.depth = 0

    def peek(self) -> tuple[str | None, str]:
        return self.toks[self.i] if self.i < len(self.toks) else (None, "")

    def take(self) -> tuple[str | None, str]:
        tok = self.peek()
        if tok[0] is None:
            raise _Incomparable
        self.i += 1
        return tok

    def expect(self, text: str) -> None:
        if self.take()[1] != text:
            raise _Incomparable

    def enter(self) -> None:
        # the depth only needs unwinding on success: an _Incomparable abandons the parser
        self.depth += 1
        if self.depth > MAX_NESTING:
            raise _Incomparable

    def parse(self) -> dict:
        v = self.expr()
        if self.i != len(self.toks):
            raise _Incomparable
        return v

    def expr(self) -> dict:
        self.enter()
        v = self.term()
        while self.peek()[1] in ("+", "-"):
            op = self.take()[1]
            w = self.term()
            if _is_rational(v) and _is_rational(w):
                raise _Incomparable  # 3+5 is a computation, not an answer (module docstring)
            v = _add(v, w if op == "+" else _neg(w))
        self.depth -= 1
        return v

    def term(self) -> dict:
        v, form = self.signed()
        after_slash = False
        while True:
            text = self.peek()[1]
            if text in _TIMES or text in _DIVIDES:
                self.i += 1
                w, wform = self.signed()
                scientific = text in _TIMES and wform == "pow10"  # 2.5 \times 10^{3}
                if _is_rational(v) and _is_rational(w) and not scientific:
                    raise _Incomparable
                v = _mul(v, w if text in _TIMES else _inv(w))
                after_slash = False
            elif text == "/":
                self.i += 1
                w, _ = self.signed()
                v = _mul(v, _inv(w))
                after_slash = True
            elif text in _IMPLICIT_STARTERS:
                # 1/2\pi reads as pi/2 or 1/(2 pi); 2\frac{1}{2} as 5/2 or 1: refuse both
                if after_slash or (form == "numeral" and text == "\\frac"):
                    raise _Incomparable
                w, _ = self.power()
                if _is_rational(v) and _is_rational(w):
                    raise _Incomparable
                v = _mul(v, w)
            else:
                return v
            form = ""

    def signed(self) -> tuple[dict, str]:
        text = self.peek()[1]
        if text not in ("+", "-"):
            return self.power()
        self.i += 1
        if self.peek()[1] in ("+", "-"):
            raise _Incomparable
        self.enter()
        v, form = self.power()
        self.depth -= 1
        return (_neg(v) if text == "-" else v), form

    def power(self) -> tuple[dict, str]:
        v, form = self.atom()
        if self.peek()[1] != "^":
            return v, ("numeral" if form == "ten" else form)
        self.i += 1
        # a second '^' (2^3^2) is left unparsed, which refuses the whole text
        v = _pow(v, self.exponent())
        return v, ("pow10" if form == "ten" else "")

    def exponent(self) -> dict:
        self.enter()
        text = self.peek()[1]
        if text == "{":
            self.i += 1
            v = self.expr()
            self.expect("}")
        else:
            if text in ("+", "-"):
                self.i += 1
            v, _ = self.atom()
            v = _neg(v) if text == "-" else v
        self.depth -= 1
        return v

    def atom(self) -> tuple[dict, str]:
        self.enter()
        kind, text = self.take()
        form = ""
        if kind == "num":
            if _digits(text) > MAX_DIGITS:
                raise _Incomparable
            v = _rational(Fraction(text.replace(",", "")))
            form = "ten" if text == "10" else "numeral"
        elif text in _PI_TOKENS:
            v = _PI
        elif text in ("(", "{"):
            v = self.expr()
            self.expect(")" if text == "(" else "}")
        elif text == "\\frac":
            num = self.arg()
            v = _mul(num, _inv(self.arg()))
        elif text == "\\sqrt":
            q = 2
            if self.peek()[1] == "[":
                self.i += 1
                index = _rational_of(self.expr())
                self.expect("]")
                if index is None or index.denominator != 1 or not 2 <= index <= _MAX_ROOT_INDEX:
                    raise _Incomparable
                q = int(index)
            v = _root(self.arg(), q)
        elif text == "√":
            v = _root(self.atom()[0], 2)
        else:
            raise _Incomparable
        self.depth -= 1
        return v, form

    def arg(self) -> dict:
        kind, text = self.peek()
        if text == "{":
            self.i += 1
            v = self.expr()
            self.expect("}")
            return v
        if text in _PI_TOKENS:
            self.i += 1
            return _PI
        if kind == "num" and text[0].isdigit():
            # TeX takes one character as an undelimited argument: \frac12 is 1/2, and the rest
            # of the digit string stays for what follows
            if len(text) > 1:
                self.toks[self.i] = ("num", text[1:])
            else:
                self.i += 1
            return _rational(int(text[0]))
        raise _Incomparable


# ------------------------------------------------------------ canonical forms
_TEX_SPACE_RE = re.compile(r"\\[,;:!]|\\(?:left|right|displaystyle|textstyle)(?![A-Za-z])")
_TEXT_WRAP_RE = re.compile(r"\\(?:text|textrm|textbf|textit|textnormal|mathrm|mathbf|mathit"
                           r"|mathsf|mbox|operatorname)\s*\{([^{}]*)\}")
_DFRAC_RE = re.compile(r"\\[dt]frac(?![A-Za-z])")
_DEGREE_RE = re.compile(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ(?![A-Za-z])|°|\\degree(?![A-Za-z])")
_ASSIGN_RE = re.compile(r"(?:[A-Za-z]|\\[A-Za-z]+)(?:_\{?[A-Za-z0-9]+\}?)?"
                        r"\s*(?:=(?!=)|\\in(?![A-Za-z]))\s*")
_SPACE_BY_SYMBOL_RE = re.compile(r" (?=\W)|(?<=\W) ")


def _encloses(texts: Sequence[str], openers=_OPENERS, closers=_CLOSERS) -> bool:
    """Whether the first token opens a bracket that the last token closes (any bracket kinds,
    so the interval ``[1, 2)`` encloses)."""
    if len(texts) < 2 or texts[0] not in openers or texts[-1] not in closers:
        return False
    depth = 0
    for j, x in enumerate(texts):
        if x in openers:
            depth += 1
        elif x in closers:
            depth -= 1
            if depth == 0:
                return j == len(texts) - 1
    return False


def _has_top_comma(t: str) -> bool:
    depth = 0
    for ch in t:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            return True
    return False


def _peel(t: str) -> str:
    t = t.strip()
    for _ in range(4):
        before = t
        if t.startswith("$$") and t.endswith("$$") and len(t) >= 4 and t.count("$") == 4:
            t = t[2:-2].strip()
        elif t.startswith("$") and t.endswith("$") and len(t) >= 2 and t.count("$") == 2:
            t = t[1:-1].strip()
        if t[:2] in ("\\(", "\\[") and t[-2:] == {"\\(": "\\)", "\\[": "\\]"}[t[:2]]:
            t = t[2:-2].strip()
        # {1, 2} is a set (handled by _structured); {12} is TeX grouping
        # (bracket scans only up to MAX_EXPR_CHARS: longer texts are compared as text, and a
        # character-by-character scan of them would dominate the cost of a call)
        if (t.startswith("{") and t.endswith("}") and len(t) <= MAX_EXPR_CHARS
                and _encloses(t, {"{"}, {"}"}) and not _has_top_comma(t[1:-1])):
            t = t[1:-1].strip()
        if t == before:
            break
    return t


def _prepare(s: str) -> str:
    """The text of an answer with layout, wrappers, ``name =`` and ``%`` removed."""
    t = _TEX_SPACE_RE.sub("", s.translate(_MINUSES))
    t = t.replace("\\ ", " ").replace("~", " ")
    for _ in range(4):  # innermost wrappers first: [^{}]* cannot cross a brace
        u = _TEXT_WRAP_RE.sub(r"\1", t)
        if u == t:
            break
        t = u
    t = _DFRAC_RE.sub(r"\\frac", t).replace("\\%", "%").replace("{,}", ",")
    t = t.replace("\\$", "")  # a currency sign, not math mode
    t = _peel(_DEGREE_RE.sub("", t))
    if t.endswith(".") and not t.endswith(".."):
        t = t[:-1].rstrip()
    for _ in range(3):  # x = y = 5
        m = _ASSIGN_RE.match(t)
        if m is None or m.end() == len(t):
            break
        t = t[m.end():]
    if t.endswith("%"):
        t = t[:-1].rstrip()
    return t


def _norm_text(t: str) -> str:
    t = _SPACE_BY_SYMBOL_RE.sub("", " ".join(t.split()).casefold())
    if t.endswith("."):
        t = t[:-1]
    if len(t) <= MAX_EXPR_CHARS and _encloses(t, {"("}, {")"}):
        t = t[1:-1].strip()
    return t


def _split_top(toks: list, lo: int, hi: int, t: str, sep: str = ",") -> list[str] | None:
    """The texts between top-level ``sep`` tokens of ``toks[lo:hi]``; None past
    _MAX_ELEMENTS parts."""
    parts, depth, start = [], 0, lo
    for j in range(lo, hi + 1):
        x = toks[j][1] if j < hi else sep
        if x in _OPENERS:
            depth += 1
        elif x in _CLOSERS:
            depth -= 1
        elif x == sep and depth == 0:
            parts.append(t[toks[start][2]:toks[j - 1][3]] if j > start else "")
            start = j + 1
            if len(parts) > _MAX_ELEMENTS:
                return None
    return parts


def _structured(t: str, depth: int = 0) -> tuple | None:
    """The canonical form of a prepared text that is not plain text, else None."""
    if len(t) > MAX_EXPR_CHARS or depth > _MAX_LIST_DEPTH:
        return None
    toks = [tok for tok in _tokenize(t) if tok[0] != "sp"]
    texts = [tok[1] for tok in toks]
    if not texts:
        return None
    if texts[-1] in _INF_TOKENS and (len(texts) == 1 or len(texts) == 2 and texts[0] in ("+", "-")):
        return ("inf", -1 if texts[0] == "-" else 1)
    if _encloses(texts):
        parts = _split_top(toks, 1, len(toks) - 1, t)
        if parts is None:
            return None
        if (texts[0], texts[-1]) in (("\\{", "\\}"), ("{", "}")):
            return ("set", frozenset(_canon(p, depth + 1) for p in parts))
        if len(parts) > 1 and texts[0] in ("(", "[") and texts[-1] in (")", "]"):
            return ("seq", texts[0], texts[-1], tuple(_canon(p, depth + 1) for p in parts))
    parts = _split_top(toks, 0, len(toks), t, "\\cup")
    if parts is None:
        return None
    if len(parts) > 1:
        return ("union", frozenset(_canon(p, depth + 1) for p in parts))
    parts = _split_top(toks, 0, len(toks), t)
    if parts is None:
        return None
    if len(parts) > 1:
        return ("seq", "", "", tuple(_canon(p, depth + 1) for p in parts))
    try:
        v = _Parser([(kind, x) for kind, x, _, _ in toks]).parse()
    except _Incomparable:
        return None
    return ("num", tuple(sorted(v.items())))


def _canon(s: str, depth: int = 0) -> tuple:
    t = _prepare(s)
    key = _structured(t, depth)
    return key if key is not None else ("text", _norm_text(t))


def _is_math(key: tuple) -> bool:
    if key[0] in ("num", "inf"):
        return True
    if key[0] == "seq":
        return all(_is_math(k) for k in key[3])
    if key[0] in ("set", "union"):
        return all(_is_math(k) for k in key[1])
    return False


# ------------------------------------------------------------ extraction
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
    ends = [k for k in (text.find(m) for m in _END_MARKERS) if k >= 0]
    if ends:
        text = text[:min(ends)]
    close = text.rfind(_THINK_END)
    if close >= 0:
        region = text[close + len(_THINK_END):]
        reopened = region.find(_THINK_START)
        return region if reopened < 0 else region[:reopened]
    if strict_think or _THINK_START in text:
        return None
    return text


def _is_value_token(kind: str, text: str) -> bool:
    return kind == "num" or text in _PI_TOKENS or text in _INF_TOKENS


def _last_math_run(s: str) -> str | None:
    """The last math run of ``s`` (module docstring, rule 3c), trimmed, or None."""
    # Only the tail is searched, so the cost per response does not grow with its length. A
    # run touching the cut may have begun before it and is not used: its truncated text
    # could read as a different answer.
    cut = max(0, len(s) - _RUN_WINDOW_CHARS)
    s = s[cut:]
    toks = _tokenize(s)
    cut_tok = 1 if cut and toks and toks[0][0] == "sp" else 0  # the token the cut landed in
    best = None  # (first, last) token indices of the last acceptable run
    run = None  # [first, last, has_value, tainted, opened by a binary +/-] being built
    depth, space, prev_kind, prev_text = 0, False, None, ""
    pending = False  # a function command was seen: the next run is its argument

    def close():
        nonlocal best
        if run is not None and run[2] and not run[3] and not (cut and run[0] == cut_tok):
            best = (run[0], run[1])

    for j, (kind, text, _, _) in enumerate(toks):
        if kind == "sp":
            space = True
            continue
        mathy = kind == "num" or text in _RUN_TOKENS or (text == "," and run is not None
                                                          and depth > 0)
        if mathy:
            last = toks[run[1]] if run is not None else None
            joins = run is not None and (
                not space or depth > 0 or text in _RUN_OPERATORS or last[1] in _RUN_OPERATORS
                or text in _CLOSERS or last[1] in _OPENERS or last[1] in _ARG_TAKERS
                or (text in _RUN_STARTERS and (_is_value_token(last[0], last[1])
                                               or last[1] in _CLOSERS)))
            if joins:
                if run[4] and run[0] == run[1] and space:
                    run[3] = True  # "x + 1": the + continues an expression in a variable
                run[1] = j
            else:
                close()
                # a run glued to a word (x2, x^2, f(3)) is part of that word
                tainted = pending or (not space and prev_kind == "word")
                run = [j, j, False, tainted, text in ("+", "-") and prev_kind == "word"]
                depth = 0
                # \log_2 8, \sin^2 x: the script is not the argument; the next run is
                pending = pending and (prev_text == "_" or text == "^")
            run[2] = run[2] or _is_value_token(kind, text)
            if text in _OPENERS:
                depth += 1
            elif text in _CLOSERS:
                depth = max(depth - 1, 0)
        else:
            if run is not None:
                if kind == "word" and not space:
                    run[3] = True  # 2x, 1e3, 5cm: a number glued to letters
                close()
                run = None
            if text in _FUNCTIONS:
                pending = True
            elif text != "_":
                pending = False
        prev_kind, prev_text, space = kind, text, False
    close()
    if best is None:
        return None
    kept = [tok for tok in toks[best[0]:best[1] + 1] if tok[0] != "sp"]
    lo, hi = 0, len(kept)
    opens = sum(tok[1] in _OPENERS for tok in kept)
    closes = sum(tok[1] in _CLOSERS for tok in kept)
    changed = True
    while changed and lo < hi:
        changed = False
        first, last = kept[lo][1], kept[hi - 1][1]
        # a dash or bold marks around a number ("12 -", "**8**") are layout; a dangling "2^"
        # or "\pm 3" is kept, so that it reads as text rather than as 2 or 3
        if last in ("+", "-", "*") or last in _OPENERS:
            hi -= 1
            opens -= last in _OPENERS
            changed = True
        elif first == "*" or first in _CLOSERS:
            lo += 1
            closes -= first in _CLOSERS
            changed = True
        elif closes > opens and last in _CLOSERS:  # "(so it is 3)" leaves "3)"
            hi -= 1
            closes -= 1
            changed = True
        elif opens > closes and first in _OPENERS:
            lo += 1
            opens -= 1
            changed = True
    if lo >= hi or not any(_is_value_token(kind, x) for kind, x, _, _ in kept[lo:hi]):
        return None
    return s[kept[lo][2]:kept[hi - 1][3]]


def _extract(text: str, strict_think: bool) -> tuple[str | None, str | None]:
    """(the answer, the whole stripped answer text when no ``\\boxed`` decided it)."""
    region = _answer_region(text, strict_think)
    if region is None or len(region) > MAX_ANSWER_CHARS:
        return None, None
    region = region.translate(_MINUSES)
    if "\\boxed{" in region or "\\fbox{" in region:
        boxed = _last_boxed(region)
        return (None if boxed is None or not boxed.strip() else boxed.strip()), None
    stripped = region.strip()
    if not stripped:
        return None, None
    whole = _structured(_prepare(stripped))
    if whole is not None and _is_math(whole):
        return stripped, stripped
    run = _last_math_run(stripped)
    return (run if run is not None else stripped), stripped


def extract_answer(text: str, *, strict_think: bool = False) -> str | None:
    """The final answer of a response as text, or None when it has none (rules above).

    ``strict_think=True`` requires a ``</think>``: text without one has no answer.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    return _extract(text, strict_think)[0]


# ------------------------------------------------------------ multiple choice
# Whitespace runs are collapsed to one space before these patterns run, so every " ?" below
# matches at most one character: the work per start position is bounded by a constant and a
# search is linear in the text (no nested or adjacent unbounded repeats).
_LETTER = r"(?:\(([A-Za-z])\)|\[([A-Za-z])\]|([A-Z]))(?![A-Za-z0-9])"
_CHOICE_CUE_RE = re.compile(
    r"(?i:\banswer|\b(?:correct|right|best|final) (?:option|choice))"
    r"(?: (?i:is|would be|should be|will be))?"
    r" ?(?:[:：] ?)?(?:(?:\*\*|__|\$|\\text\{|\\textbf\{|\\mathrm\{) ?){0,2}"
    r"(?:(?i:option|choice) )?" + _LETTER)
_CHOICE_LEAD_RE = re.compile(r"^(?:\*\*)?(?:\(([A-Z])\)|([A-Z])[.):](?= |$))")
_CHOICE_LINE_RE = re.compile(r"^(?:\*\*|\$)?\(?([A-Z])\)?\.?(?:\*\*|\$)?$")
_CHOICE_REF_RE = re.compile(r"^\(?([A-Z])\)?$")


def _letter_of(m: re.Match) -> str:
    return next(g for g in m.groups() if g is not None).upper()


def choice_reference(reference: str) -> str | None:
    """The choice letter a reference names (``B``, ``(B)``, ``\\boxed{B}``, ``\\text{B}``;
    uppercase A-Z only, so a variable ``x`` is not a choice), else None."""
    if not isinstance(reference, str):
        raise TypeError(f"reference must be a str, got {type(reference).__name__}")
    if len(reference) > 64:
        return None
    boxed = _last_boxed(reference) if "\\boxed{" in reference or "\\fbox{" in reference else None
    t = _prepare(boxed if boxed is not None else reference).strip()
    m = _CHOICE_REF_RE.match(t)
    return m.group(1) if m else None


def extract_choice(text: str, *, strict_think: bool = False) -> str | None:
    """The choice letter a response gives as its answer, or None (module docstring, "Multiple
    choice").  Only the answer part is read (after the last ``</think>``, as
    :func:`extract_answer` does), so a letter that only appears in the reasoning is not read."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    region = _answer_region(text, strict_think)
    if region is None or len(region) > MAX_ANSWER_CHARS or not region.strip():
        return None
    if "\\boxed{" in region or "\\fbox{" in region:
        boxed = _last_boxed(region)
        if boxed is None:
            return None
        region = boxed
    flat = " ".join(region.split())
    last = None
    for last in _CHOICE_CUE_RE.finditer(flat):
        pass
    if last is not None:
        return _letter_of(last)
    m = _CHOICE_LEAD_RE.match(flat)
    if m:
        return _letter_of(m)
    lines = [ln.strip() for ln in region.splitlines() if ln.strip()]
    m = _CHOICE_LINE_RE.match(lines[-1]) if lines and len(lines[-1]) <= 16 else None
    return m.group(1) if m else None


# ------------------------------------------------------------ public comparison
def _key(s: str) -> tuple | None:
    """The canonical form of an answer or reference (the content of its last ``\\boxed{}``
    if it has a complete one); None for an empty one, which matches nothing."""
    if len(s) > MAX_ANSWER_CHARS:
        return None  # longer than any answer that is examined
    boxed = _last_boxed(s) if "\\boxed{" in s or "\\fbox{" in s else None
    key = _canon(boxed if boxed is not None else s)
    return None if key == ("text", "") else key


def answers_match(answer: str, reference: str) -> bool:
    """Whether an extracted answer equals a reference: equal canonical forms (module
    docstring), i.e. exact values; tuples, intervals, sets and unions element-wise; else
    normalised text. A ``\\boxed{}`` on either side is read as its content."""
    if not isinstance(answer, str):
        raise TypeError(f"answer must be a str, got {type(answer).__name__}")
    if not isinstance(reference, str):
        raise TypeError(f"reference must be a str, got {type(reference).__name__}")
    ref_key = _key(reference)
    return ref_key is not None and _key(answer) == ref_key


def verify(response_text: str, reference_answer: str, *, strict_think: bool = False) -> float:
    """1.0 when the response's final answer equals ``reference_answer``, else 0.0.

    A reference that names a choice letter is compared with :func:`extract_choice`'s letter
    when the response gives one. Otherwise the final answer is :func:`extract_answer`'s;
    when no ``\\boxed{}`` decided it and the
    reference is text rather than a mathematical form (``\\ln 2``, ``12 cm``, ``3!``), the
    whole answer text may match it too, so that the math-run rule, which would read ``2``
    out of ``\\ln 2``, never stops a response that is exactly the reference.
    """
    if not isinstance(response_text, str):
        raise TypeError(f"response_text must be a str, got {type(response_text).__name__}")
    if not isinstance(reference_answer, str) or not reference_answer.strip():
        raise ValueError(f"reference_answer must be a non-empty str, got {reference_answer!r}")
    letter = choice_reference(reference_answer)
    if letter is not None:
        given = extract_choice(response_text, strict_think=strict_think)
        if given is not None:
            return float(given == letter)
    ans, whole = _extract(response_text, strict_think)
    if ans is None:
        return 0.0
    ref_key = _key(reference_answer)
    if ref_key is None:
        return 0.0
    if _key(ans) == ref_key:
        return 1.0
    if whole is not None and whole != ans and not _is_math(ref_key) and _canon(whole) == ref_key:
        return 1.0
    return 0.0


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
