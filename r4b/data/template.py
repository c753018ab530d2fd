"""The one chat template of r4b, for training and inference, at the token-id level.

Canonical text of one exchange (Qwen3 chat format, LLaVA-OneVision image placeholders)::

    <|im_start|>user\\n<image>\\n{question}<|im_end|>\\n<|im_start|>assistant\\n{assistant}

where ``{assistant}`` is one of the two answer forms

    thinking:      <think>\\n{reasoning}\\n</think>\\n\\n{answer}<|im_end|>
    non-thinking:  <think>\\n\\n</think>\\n\\n{answer}<|im_end|>

**Modes.** The prompt ends with the assistant opening plus a *mode prefix*:

    ============  =====================  ==========================================
    mode          prefix                 user-facing ``thinking_mode``
    ============  =====================  ==========================================
    ``auto``      ``<think>``            ``"auto"``: the model chooses
    ``think``     ``<think>\\n``          ``"long"``: forced thinking
    ``no_think``  ``<think>\\n\\n</think>`` ``"short"``: forced non-thinking
    ============  =====================  ==========================================

The *response* is everything after the prompt, ending with ``<|im_end|>``; so the same
assistant text splits differently by mode (for ``no_think`` the response is
``\\n\\n{answer}<|im_end|>``, since the empty think block is already in the prompt). For every
mode, ``prompt_ids(q, n, m) + response_ids(a, r, m) == encode(full canonical text)`` with each
``<image>`` expanded to ``tokens_per_image`` ids (tested with both tokenizers), and
``prompt_ids(q, n, m) == prompt_ids(q, n, "auto") + forced_ids(m)``.

**Routing.** After ``<think>`` the text ``"\\n\\n"`` opens the empty block (non-thinking) and a
single ``"\\n"`` followed by reasoning opens thinking. In Qwen's vocabulary and in the built-in
one ``"\\n\\n"`` is one token, so the first response token of an auto prompt picks the mode
(:attr:`ChatTemplate.routing_offset` is 0 and :attr:`ChatTemplate.routing_ids` holds the two
ids); reasoning and answers are stripped so they never start with whitespace.

**Checkpoint chat templates.** With ``chat_template="tokenizer"`` (or ``"auto"`` and a tokenizer
that carries one, e.g. R-4B's or Qwen3's), prompts are rendered by the tokenizer's own template
(``apply_chat_template`` with ``add_generation_prompt=True`` and the mode argument the template
reads: R-4B's ``thinking_mode`` = ``auto`` / ``long`` / ``short``, Qwen3's ``enable_thinking``).
What the template renders after the assistant opening is reconciled with the mode prefix above,
and construction fails when they disagree: the rendered text may stop short of the prefix (Qwen3
renders nothing for thinking; the prefix is appended) or run past it by whitespace that starts
the canonical response (Qwen3's ``<think>\\n\\n</think>\\n\\n`` for non-thinking is cut after
``</think>``); anything else is an error naming the mode and both texts.  Responses keep the
canonical forms, so rollouts, SFT targets and the verifier read the same text either way.

**SFT loss rule** (:func:`sft_loss_mask`). Annealing examples use the *auto* prompt (ending in
``<think>``) and put the whole assistant answer after it in the loss: the routing token
(``"\\n"`` vs ``"\\n\\n"``), the reasoning, the ``"\\n"`` before ``</think>``, ``</think>``, the
blank line, the answer and the closing ``<|im_end|>``. That is how the model learns to choose
a mode in auto mode and to close the block and stop. Every prompt token (user turn, image
placeholders, assistant opening, ``<think>``) is out of the loss. ``loss_mask[t] == 1`` means
token ``input_ids[t]`` is a training target (predicted from positions ``< t``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple, Sequence

from ..config import require_range
from .tokenizer import (ENDOFTEXT, IM_END, IM_START, IMAGE, TEMPLATE_SPECIALS, THINK_END,
                        THINK_START, Tokenizer)

Mode = Literal["auto", "think", "no_think"]
MODES: tuple[str, ...] = ("auto", "think", "no_think")
#: User-facing ``thinking_mode`` → template mode.
THINKING_MODES: dict[str, str] = {"auto": "auto", "long": "think", "short": "no_think"}
#: Text the prompt ends with, after the assistant opening, per mode.
MODE_PREFIX: dict[str, str] = {"auto": THINK_START, "think": THINK_START + "\n",
                               "no_think": THINK_START + "\n\n" + THINK_END}
USER_OPEN = IM_START + "user\n"
#: Where prompts come from: r4b's canonical text, the tokenizer's own chat template, or the
#: tokenizer's template when it has one.
CHAT_TEMPLATES: tuple[str, ...] = ("builtin", "tokenizer", "auto")
#: How a mode reaches a tokenizer template: found in its source ('auto'), R-4B's
#: ``thinking_mode``, Qwen3's ``enable_thinking``, or not at all.
MODE_ARGUMENTS: tuple[str, ...] = ("auto", "thinking_mode", "enable_thinking", "none")
MODE_KWARGS: dict[str, dict[str, dict]] = {
    "thinking_mode": {m: {"thinking_mode": tm} for tm, m in
                      (("auto", "auto"), ("long", "think"), ("short", "no_think"))},
    "enable_thinking": {"auto": {"enable_thinking": True}, "think": {"enable_thinking": True},
                        "no_think": {"enable_thinking": False}},
    "none": {m: {} for m in ("auto", "think", "no_think")},
}


def _mode_argument(source: str, requested: str) -> str:
    """The mode argument a template reads: ``requested`` unless 'auto', else the first of
    ``thinking_mode`` / ``enable_thinking`` that its Jinja source mentions ('none' otherwise)."""
    if requested != "auto":
        return requested
    for name in ("thinking_mode", "enable_thinking"):
        if name in source:
            return name
    return "none"
ASSISTANT_OPEN = IM_END + "\n" + IM_START + "assistant\n"


def resolve_mode(mode: str) -> str:
    """Template mode of a user-facing ``thinking_mode`` ('auto' | 'long' | 'short') or of a
    template mode name ('auto' | 'think' | 'no_think')."""
    if mode in MODES:
        return mode
    if mode in THINKING_MODES:
        return THINKING_MODES[mode]
    raise ValueError(f"mode must be one of {MODES} or a thinking_mode "
                     f"{tuple(THINKING_MODES)}, got {mode!r}")


def sft_loss_mask(n_tokens: int, prompt_len: int) -> list[int]:
    """The SFT loss rule: 0 for the ``prompt_len`` prompt tokens, 1 for every later token.

    With the auto prompt (ending in ``<think>``) the trained tokens are exactly the answer
    side: routing token, reasoning, ``</think>`` and the blank lines, answer, ``<|im_end|>``.
    """
    require_range("n_tokens", n_tokens, 1)
    require_range("prompt_len", prompt_len, 1, n_tokens - 1)
    return [0] * prompt_len + [1] * (n_tokens - prompt_len)


class SFTExample(NamedTuple):
    """One annealing example (see :meth:`ChatTemplate.sft_example`)."""

    input_ids: list[int]
    prompt_len: int
    """Number of leading prompt tokens (out of the loss)."""
    loss_mask: list[int]
    """Per token of ``input_ids``: 1 when it is a training target (:func:`sft_loss_mask`)."""
    mode: str
    """Answer form: 'think' or 'no_think'."""


@dataclass(frozen=True)
class ParsedResponse:
    """What a model produced, read against the template."""

    mode_chosen: str | None
    """'think' (``<think>`` then one newline), 'no_think' (``<think>`` then a blank line), or
    None when the text does not start a think block that way."""
    reasoning: str | None
    """Reasoning text (stripped): '' for non-thinking; the partial text when the block never
    closed; None when there is no think block."""
    answer: str | None
    """Answer text after the last ``</think>`` (end-of-turn markers removed, stripped); None when no
    ``</think>`` was produced (an unterminated think block has no answer)."""
    well_formed: bool
    """True iff the text is exactly one of the two canonical answer forms (non-empty
    reasoning for thinking, non-empty answer, no stray special tokens) and ends the turn."""
    finished: bool
    """True when the text ends with ``<|im_end|>`` (or ``<|endoftext|>``)."""


def parse_assistant(text: str) -> ParsedResponse:
    """Parse a full assistant text that starts at ``<think>`` (prefix included).

    Mode rule (the text form of the routing token): after ``<think>``, ``"\\n\\n"`` means
    non-thinking, a single ``"\\n"`` followed by a non-newline means thinking, anything else
    is no mode (None).
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    s = text
    finished = False
    for end in (IM_END, ENDOFTEXT):
        if s.endswith(end):
            s = s[: -len(end)]
            finished = True
            break
    last_close = s.rfind(THINK_END)
    answer = None
    if last_close >= 0:
        answer = s[last_close + len(THINK_END):].replace(IM_END, "").replace(ENDOFTEXT, "").strip()
    if not s.startswith(THINK_START):
        return ParsedResponse(None, None, answer, False, finished)
    body = s[len(THINK_START):]
    close = body.find(THINK_END)
    inner = body if close < 0 else body[:close]
    rest = None if close < 0 else body[close + len(THINK_END):]
    if body.startswith("\n\n"):
        mode = "no_think"
        reasoning = inner.strip()
        ok = inner == "\n\n"
    elif body.startswith("\n"):
        mode = "think"
        reasoning = inner.strip()
        ok = (len(inner) >= 3 and inner.endswith("\n") and not inner[1].isspace()
              and reasoning != "")
    else:
        return ParsedResponse(None, None, answer, False, finished)
    ok = (ok and finished and rest is not None and rest.startswith("\n\n")
          and answer is not None and answer != "" and not rest[2:3].isspace()
          and not any(t in inner or t in rest for t in TEMPLATE_SPECIALS))
    # A stray end-of-turn marker inside the text means the turn did not end where it claims.
    ok = ok and IM_END not in s and ENDOFTEXT not in s
    return ParsedResponse(mode, reasoning, answer, bool(ok), finished)


def _check_text(name: str, value, *, allow_image: bool = False, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise ValueError(f"{name} must be non-empty text, got {value!r}")
    for t in TEMPLATE_SPECIALS:
        if t in value and not (allow_image and t == IMAGE):
            raise ValueError(f"{name} must not contain the special token {t!r}, got "
                             f"{value[:80]!r}")
    return value


class ChatTemplate:
    """Build prompts, responses and SFT examples as token ids, and parse model outputs.

    Args:
        tokenizer: any :class:`~r4b.data.tokenizer.Tokenizer` (built-in or HF).
        tokens_per_image: image placeholder ids per image (the vision tower's output tokens
            per tile); each ``<image>`` in the text becomes this many ``image_token_id``.
    """

    def __init__(self, tokenizer: Tokenizer, tokens_per_image: int, *,
                 chat_template: str = "builtin", mode_argument: str = "auto",
                 image_counter=None):
        require_range("tokens_per_image", tokens_per_image, 1)
        self.image_counter = image_counter
        """``f(images) -> placeholder tokens per image`` of one prompt (the model's image
        layout); None: ``tokens_per_image`` each."""
        if chat_template not in CHAT_TEMPLATES:
            raise ValueError(f"chat_template must be one of {CHAT_TEMPLATES}, got {chat_template!r}")
        if mode_argument not in MODE_ARGUMENTS:
            raise ValueError(f"mode_argument must be one of {MODE_ARGUMENTS}, got {mode_argument!r}")
        self.tok = tokenizer
        self.tokens_per_image = int(tokens_per_image)
        self._forced: dict[str, list[int]] = {}
        for m in MODES:
            ids = tokenizer.encode(MODE_PREFIX[m])
            if not ids or ids[0] != tokenizer.think_start_id:
                raise ValueError(f"tokenizer encodes the {m!r} prefix {MODE_PREFIX[m]!r} as "
                                 f"{ids}, which does not start with think_start_id "
                                 f"{tokenizer.think_start_id}")
            self._forced[m] = ids[1:]
        think, no_think = self._forced["think"], self._forced["no_think"]
        off = next((k for k, (a, b) in enumerate(zip(think, no_think)) if a != b), None)
        if off is None:
            raise ValueError(f"tokenizer cannot tell the modes apart by one token: after "
                             f"<think>, '\\n' encodes as {think} and '\\n\\n</think>' as "
                             f"{no_think}; the template needs '\\n\\n' to be a single token "
                             "(as in Qwen's vocabulary)")
        self.routing_offset: int = off
        """Index, within the tokens after ``<think>``, of the token that decides the mode."""
        self.routing_ids: dict[str, int] = {"think": think[off], "no_think": no_think[off]}
        """Routing token id per mode (Qwen3: '\\n' = 198 vs '\\n\\n' = 271)."""
        source = getattr(tokenizer, "chat_template", None)
        if chat_template == "tokenizer" and not source:
            raise ValueError(f"chat_template='tokenizer' but {tokenizer!r} carries no chat template")
        self.renders = bool(source) and chat_template in ("tokenizer", "auto")
        """True when prompts are rendered by the tokenizer's own chat template."""
        self.mode_argument = _mode_argument(source, mode_argument) if self.renders else "none"
        """How a mode is passed to the tokenizer's template ('thinking_mode', 'enable_thinking'
        or 'none': the template takes no mode and the prefix is appended)."""
        if self.renders:
            for m in MODES:  # fail now, naming the mode, rather than at the first prompt
                self.prompt_text("1+1?", 0, m)

    # ------------------------------------------------------------ text forms
    def prompt_text(self, question: str, n_images: int = 0, mode: str = "auto") -> str:
        """Canonical prompt text with one ``<image>`` per image.

        Images: if ``question`` contains ``<image>`` markers their count must equal
        ``n_images`` and they stay in place; otherwise ``"<image>\\n"`` per image is put
        before the question (LLaVA-OneVision style).
        """
        mode = resolve_mode(mode)
        require_range("n_images", n_images, 0)
        _check_text("question", question, allow_image=True)
        inline = question.count(IMAGE)
        if inline and inline != n_images:
            raise ValueError(f"question has {inline} {IMAGE!r} markers but n_images = {n_images}")
        user = question if inline else (IMAGE + "\n") * n_images + question
        if not self.renders:
            return USER_OPEN + user + ASSISTANT_OPEN + MODE_PREFIX[mode]
        return self._rendered_prompt(user, mode)

    def _rendered_prompt(self, user: str, mode: str) -> str:
        """The tokenizer template's generation prompt for ``user``, ending in ``mode``'s prefix."""
        kwargs = MODE_KWARGS[self.mode_argument][mode]
        text = self.tok.render_chat([{"role": "user", "content": user}], **kwargs)
        opening = IM_START + "assistant\n"
        at = text.rfind(opening)
        if at < 0:
            raise ValueError(f"the tokenizer's chat template renders no assistant opening "
                             f"{opening!r} for mode {mode!r} ({kwargs}): {text[-200:]!r}")
        head, tail = text[:at + len(opening)], text[at + len(opening):]
        prefix = MODE_PREFIX[mode]
        if prefix.startswith(tail):
            return head + prefix  # the template forces less than the mode: append the rest
        if tail.startswith(prefix) and not tail[len(prefix):].strip():
            return head + prefix  # the rest is the whitespace that opens the canonical response
        raise ValueError(f"the tokenizer's chat template renders {tail!r} after the assistant "
                         f"opening for mode {mode!r} ({kwargs}), which disagrees with the mode "
                         f"prefix {prefix!r}")

    def assistant_text(self, answer: str, reasoning: str | None = None) -> str:
        """Canonical assistant text from ``<think>`` through ``<|im_end|>``: the thinking
        form when ``reasoning`` is non-empty, else the non-thinking form."""
        answer = _check_text("answer", answer).strip()
        if reasoning is not None:
            reasoning = _check_text("reasoning", reasoning, allow_empty=True).strip()
        if reasoning:
            return f"{THINK_START}\n{reasoning}\n{THINK_END}\n\n{answer}{IM_END}"
        return f"{THINK_START}\n\n{THINK_END}\n\n{answer}{IM_END}"

    def response_text(self, answer: str, reasoning: str | None = None,
                      mode: str = "auto") -> str:
        """The completion after the prompt of ``mode`` (see the module docstring).

        ``think`` needs a non-empty ``reasoning``; ``no_think`` needs none; ``auto`` takes
        the thinking form iff ``reasoning`` is non-empty.
        """
        mode = resolve_mode(mode)
        has_r = reasoning is not None and isinstance(reasoning, str) and reasoning.strip() != ""
        if mode == "think" and not has_r:
            raise ValueError(f"mode 'think' needs a non-empty reasoning, got {reasoning!r}")
        if mode == "no_think" and has_r:
            raise ValueError("mode 'no_think' takes no reasoning, got "
                             f"{str(reasoning)[:60]!r}")
        full = self.assistant_text(answer, reasoning)
        return full[len(MODE_PREFIX[mode]):]

    # ------------------------------------------------------------ token ids
    def expand_images(self, ids: Sequence[int], image_tokens: Sequence[int] | None = None) -> list[int]:
        """Replace the ``k``-th ``image_token_id`` by ``image_tokens[k]`` copies of it (default:
        ``tokens_per_image`` each)."""
        img = self.tok.image_token_id
        n_img = sum(1 for i in ids if i == img)
        if image_tokens is not None and len(image_tokens) != n_img:
            raise ValueError(f"image_tokens has {len(image_tokens)} entries but the text holds "
                             f"{n_img} {IMAGE!r} markers")
        out: list[int] = []
        k = 0
        for i in ids:
            if i == img:
                n = self.tokens_per_image if image_tokens is None else int(image_tokens[k])
                if n < 1:
                    raise ValueError(f"image_tokens[{k}] must be >= 1, got {n}")
                out.extend([img] * n)
                k += 1
            else:
                out.append(int(i))
        return out

    def prompt_ids(self, question: str, n_images: int = 0, mode: str = "auto", *,
                   image_tokens: Sequence[int] | None = None) -> list[int]:
        """Prompt token ids: user turn (image ``k`` expanded to ``image_tokens[k]``
        placeholders, default ``tokens_per_image``), assistant opening, mode prefix."""
        return self.expand_images(self.tok.encode(self.prompt_text(question, n_images, mode)),
                                  image_tokens)

    def image_tokens_of(self, images) -> list[int] | None:
        """Placeholder tokens per image of one prompt's ``images`` (None: the default)."""
        if not images or self.image_counter is None:
            return None
        return list(self.image_counter(images))

    def item_prompt_ids(self, item, mode: str = "auto") -> list[int]:
        """:meth:`prompt_ids` of a data item (``question`` and ``images``)."""
        return self.prompt_ids(item.question, item.n_images, mode,
                               image_tokens=self.image_tokens_of(item.images))

    def item_sft_example(self, item, reasoning: str | None = None, *,
                         prompt_mode: str = "auto") -> "SFTExample":
        """:meth:`sft_example` of a data item with its answer and the given reasoning."""
        return self.sft_example(item.question, item.answer, reasoning, item.n_images,
                                prompt_mode=prompt_mode,
                                image_tokens=self.image_tokens_of(item.images))

    def forced_ids(self, mode: str) -> list[int]:
        """Ids that follow ``<think>`` in ``mode``'s prefix ([] for auto): the tokens forced
        at the start of the response when routing is done at the token level."""
        return list(self._forced[resolve_mode(mode)])

    def response_ids(self, answer: str, reasoning: str | None = None,
                     mode: str = "auto") -> list[int]:
        """Completion ids after the prompt of ``mode``, ending with ``im_end_id``."""
        return self.tok.encode(self.response_text(answer, reasoning, mode))

    def sft_example(self, question: str, answer: str, reasoning: str | None = None,
                    n_images: int = 0, *, prompt_mode: str = "auto",
                    image_tokens: Sequence[int] | None = None) -> SFTExample:
        """An annealing example: auto prompt + full answer, with :func:`sft_loss_mask`.

        The answer form is thinking iff ``reasoning`` is non-empty. ``prompt_mode`` 'think'
        / 'no_think' (an ablation) moves that form's forced prefix into the prompt, out of
        the loss; it must agree with the answer form.
        """
        prompt_mode = resolve_mode(prompt_mode)
        form = "think" if (reasoning is not None and str(reasoning).strip()) else "no_think"
        if prompt_mode != "auto" and prompt_mode != form:
            raise ValueError(f"prompt_mode {prompt_mode!r} does not match the answer form "
                             f"{form!r} (reasoning {'given' if form == 'think' else 'empty'})")
        p = self.prompt_ids(question, n_images, prompt_mode, image_tokens=image_tokens)
        r = self.response_ids(answer, reasoning, prompt_mode)
        ids = p + r
        return SFTExample(ids, len(p), sft_loss_mask(len(ids), len(p)), form)

    # ------------------------------------------------------------ reading outputs
    def prompt_mode_of(self, prompt_ids: Sequence[int]) -> str | None:
        """The mode whose prefix ``prompt_ids`` ends with, or None."""
        ids = [int(i) for i in prompt_ids]
        for m in ("no_think", "think", "auto"):  # longest prefix first
            pre = [self.tok.think_start_id] + self._forced[m]
            if len(ids) >= len(pre) and ids[-len(pre):] == pre:
                return m
        return None

    def response_as_text(self, response: str | Sequence[int]) -> str:
        """``response`` as text (ids are decoded with special tokens kept)."""
        if isinstance(response, str):
            return response
        return self.tok.decode([int(i) for i in response])

    def assistant_text_of(self, response: str | Sequence[int], prompt_mode: str = "auto") -> str:
        """Full assistant text (mode prefix + response): what the reward verifier reads."""
        return MODE_PREFIX[resolve_mode(prompt_mode)] + self.response_as_text(response)

    def parse_response(self, response: str | Sequence[int],
                       prompt_mode: str = "auto") -> ParsedResponse:
        """Parse a completion (ids or text) produced after a prompt of ``prompt_mode``."""
        return parse_assistant(self.assistant_text_of(response, prompt_mode))

    def classify_mode(self, prompt_ids: Sequence[int], response_ids: Sequence[int]) -> str | None:
        """Mode a completion is in, given its prompt: the rollout engine's mode classifier."""
        pm = self.prompt_mode_of(prompt_ids)
        if pm is None:
            return None
        return self.parse_response(response_ids, pm).mode_chosen

