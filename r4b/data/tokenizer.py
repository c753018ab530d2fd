"""Tokenizers behind one small protocol: a built-in one for the embedded task, and a wrapper
over a local Hugging Face tokenizer directory (Qwen3-style special tokens).

Everything downstream of the chat template works on token ids, so a tokenizer here is only:
``encode(text) -> list[int]`` (special-token strings such as ``<think>`` become their single
ids; no BOS/EOS is added), ``decode(ids) -> str`` (special tokens are kept as text, so
``decode(encode(s)) == s``), ``vocab_size``, and the ids of the special tokens the template
needs. End of turn is ``<|im_end|>``; ``<|endoftext|>`` is the end-of-text token.
"""

from __future__ import annotations

import os
import re
import string
from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable

from ..log import get_logger

log = get_logger(__name__)

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
THINK_START = "<think>"
THINK_END = "</think>"
IMAGE = "<image>"
ENDOFTEXT = "<|endoftext|>"
PAD = "<pad>"

#: The special-token strings the chat template relies on (all single tokens).
TEMPLATE_SPECIALS: tuple[str, ...] = (IM_START, IM_END, THINK_START, THINK_END, IMAGE, ENDOFTEXT)

TOKENIZER_FILE_PREFIXES = ("tokenizer", "special_tokens", "vocab", "merges", "added_tokens",
                           "chat_template", "preprocessor_config", "processor_config")
"""Files of a Hugging Face tokenizer / processor directory that travel with a checkpoint (what
transformers' and vLLM's tokenizers and image processors read)."""


def copy_tokenizer_files(src: str | os.PathLike, dst: str | os.PathLike, *,
                         with_code: bool = False) -> list[str]:
    """Copy the tokenizer / processor files of ``src`` (:data:`TOKENIZER_FILE_PREFIXES`; its
    ``*.py`` files too with ``with_code``, for ``trust_remote_code``) into ``dst``; returns
    the names copied."""
    import shutil

    copied = []
    for f in sorted(Path(src).iterdir()):
        if f.is_file() and (f.name.startswith(TOKENIZER_FILE_PREFIXES)
                            or (with_code and f.suffix == ".py")):
            shutil.copy2(f, Path(dst) / f.name)
            copied.append(f.name)
    return copied


@runtime_checkable
class Tokenizer(Protocol):
    """What the chat template and the trainer need from a tokenizer."""

    vocab_size: int
    """Number of token ids (embedding rows needed); ids are in ``[0, vocab_size)``."""
    im_start_id: int
    im_end_id: int
    """End of turn: a response ends with this id."""
    think_start_id: int
    think_end_id: int
    image_token_id: int
    pad_id: int
    eos_id: int

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; special-token strings map to their single ids."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``, special tokens included verbatim."""
        ...


# ---------------------------------------------------------------- built-in tokenizer
#: Whole words of the embedded task's prompts, one token each (keeps prompts short for a
#: tiny model); every other character is its own token, digits always single characters.
BUILTIN_WORDS: tuple[str, ...] = (
    "user", "assistant", "first", "second", "digits", "digit", "sum", "of", "all", "two",
    "product", "plus", "rest", "mod", "the", "what", "is", "answer",
)


class BuiltinTokenizer:
    """Deterministic character-level tokenizer (with a few whole-word tokens) for the
    embedded task; vocabulary of about 130 ids, fixed by construction (nothing is trained).

    Layout: ``<pad>`` = 0, then the special tokens (``<|endoftext|>``, ``<|im_start|>``,
    ``<|im_end|>``, ``<think>``, ``</think>``, ``<image>``), then ``"\\n\\n"`` (one token, as
    in Qwen's vocabulary, so that after ``<think>`` the very first token decides the mode:
    ``"\\n"`` starts reasoning, ``"\\n\\n"`` starts the empty think block), ``"\\n"``, tab,
    the printable ASCII characters, and :data:`BUILTIN_WORDS`.

    ``encode`` is greedy longest-match from left to right (special tokens, then words, then
    ``"\\n\\n"``, then single characters); characters outside the vocabulary raise
    ``ValueError`` naming the character and its position (nothing is mapped to an unknown
    token silently).
    """

    def __init__(self):
        specials = [PAD, ENDOFTEXT, IM_START, IM_END, THINK_START, THINK_END, IMAGE]
        chars = ["\n\n", "\n", "\t"] + [c for c in string.printable if c not in "\n\t\r\x0b\x0c"]
        self._tokens: list[str] = specials + chars + list(BUILTIN_WORDS)
        if len(set(self._tokens)) != len(self._tokens):  # pragma: no cover - construction bug
            raise AssertionError("BuiltinTokenizer vocabulary has duplicates")
        self._ids = {t: i for i, t in enumerate(self._tokens)}
        self.special_tokens: tuple[str, ...] = tuple(specials)
        multi = sorted((t for t in self._tokens if len(t) > 1), key=len, reverse=True)
        self._pattern = re.compile("|".join(re.escape(t) for t in multi) + "|.", re.DOTALL)
        self.vocab_size = len(self._tokens)
        self.pad_id = self._ids[PAD]
        self.eos_id = self._ids[ENDOFTEXT]
        self.im_start_id = self._ids[IM_START]
        self.im_end_id = self._ids[IM_END]
        self.think_start_id = self._ids[THINK_START]
        self.think_end_id = self._ids[THINK_END]
        self.image_token_id = self._ids[IMAGE]
        self.chat_template: str | None = None  # prompts use r4b's canonical text

    def encode(self, text: str) -> list[int]:
        """Greedy longest-match token ids of ``text`` (see the class docstring)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids = []
        for m in self._pattern.finditer(text):
            tid = self._ids.get(m.group())
            if tid is None:
                raise ValueError(f"BuiltinTokenizer cannot encode character {m.group()!r} at "
                                 f"position {m.start()} of text {text[:60]!r}...; it knows "
                                 "printable ASCII, newline and tab only")
            ids.append(tid)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Concatenated token strings of ``ids`` (special tokens included)."""
        out = []
        for k, i in enumerate(ids):
            i = int(i)
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"ids[{k}] = {i} is outside the vocabulary [0, {self.vocab_size})")
            out.append(self._tokens[i])
        return "".join(out)

    def token_to_id(self, token: str) -> int:
        """Id of one vocabulary entry (``KeyError`` naming it if absent)."""
        try:
            return self._ids[token]
        except KeyError:
            raise KeyError(f"token {token!r} is not in the BuiltinTokenizer vocabulary") from None

    def id_to_token(self, tid: int) -> str:
        """Vocabulary entry of one id."""
        if not 0 <= int(tid) < self.vocab_size:
            raise ValueError(f"tid = {tid} is outside the vocabulary [0, {self.vocab_size})")
        return self._tokens[int(tid)]

    def __repr__(self) -> str:
        return f"BuiltinTokenizer(vocab_size={self.vocab_size})"


# ---------------------------------------------------------------- Hugging Face tokenizer
class HFTokenizer:
    """A local Hugging Face tokenizer directory (e.g. Qwen3's) behind the :class:`Tokenizer`
    protocol. Never downloads: ``path`` must be an existing local directory, and it is loaded
    with ``transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)`` on
    construction (``transformers`` is imported only here).

    Args:
        path: directory holding ``tokenizer.json`` / ``tokenizer_config.json``.
        image_token: the image placeholder string (LLaVA-OneVision style ``<image>``).
        add_image_token: Qwen3's own tokenizer has no ``<image>``; when True a missing image
            token is added as a special token (the model's embedding must then have
            ``vocab_size`` rows). When False (default) a missing token is an error.
        eos_token: end-of-text token string (Qwen3: ``<|endoftext|>``).
        pad_token: padding token; None uses the tokenizer's pad token, else ``eos_token``.
    """

    def __init__(self, path: str | os.PathLike, *, image_token: str = IMAGE,
                 add_image_token: bool = False, eos_token: str = ENDOFTEXT,
                 pad_token: str | None = None):
        p = Path(path)
        if not p.is_dir():
            raise FileNotFoundError(
                f"HFTokenizer: path {str(path)!r} is not an existing local directory (tokenizers "
                "are never downloaded; pass the directory that holds tokenizer.json)")
        try:
            from transformers import AutoTokenizer
        except ImportError as e:
            raise ImportError("HFTokenizer needs the 'transformers' package: pip install "
                              "'r4b[test]' or pip install transformers") from e
        self.path = str(p)
        self.hf = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        if add_image_token and self._lookup(image_token) is None:
            self.hf.add_special_tokens({"additional_special_tokens": [image_token]})
            log.info("HFTokenizer: added image token %r as id %d", image_token,
                     self._lookup(image_token))
        self.im_start_id = self._require(IM_START, "im_start")
        self.im_end_id = self._require(IM_END, "im_end")
        self.think_start_id = self._require(THINK_START, "think_start")
        self.think_end_id = self._require(THINK_END, "think_end")
        self.image_token_id = self._require(image_token, "image_token")
        self.eos_id = self._require(eos_token, "eos_token")
        if pad_token is not None:
            self.pad_id = self._require(pad_token, "pad_token")
        else:
            self.pad_id = self.hf.pad_token_id if self.hf.pad_token_id is not None else self.eos_id
        self.vocab_size = len(self.hf)
        self.chat_template: str | None = getattr(self.hf, "chat_template", None) or None
        """The tokenizer's own Jinja chat template (``tokenizer_config.json`` /
        ``chat_template.jinja``), or None."""

    def render_chat(self, messages: list[dict], **kwargs) -> str:
        """Text of ``messages`` through the tokenizer's chat template with the generation
        prompt appended; ``kwargs`` reach the template (``thinking_mode``, ``enable_thinking``)."""
        if not self.chat_template:
            raise ValueError(f"{self!r} carries no chat template")
        return self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                           **kwargs)

    def _lookup(self, token: str) -> int | None:
        ids = self.hf.encode(token, add_special_tokens=False)
        return ids[0] if len(ids) == 1 else None

    def _require(self, token: str, what: str) -> int:
        tid = self._lookup(token)
        if tid is None:
            hint = (" (pass add_image_token=True to add it)" if what == "image_token" else "")
            raise ValueError(f"HFTokenizer({self.path!r}): {what} {token!r} is not a single "
                             f"token of this tokenizer{hint}")
        return tid

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without added BOS/EOS; special strings map to their ids."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return list(self.hf.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` with special tokens kept and no whitespace clean-up."""
        ids = [int(i) for i in ids]
        for k, i in enumerate(ids):
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"ids[{k}] = {i} is outside the vocabulary [0, {self.vocab_size})")
        return self.hf.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size})"
