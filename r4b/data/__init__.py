"""Data: the chat template and its modes, tokenizers, the embedded task, and file readers.

* :mod:`r4b.data.tokenizer` — the :class:`Tokenizer` protocol, :class:`BuiltinTokenizer`
  (embedded task) and :class:`HFTokenizer` (a local Hugging Face directory, e.g. Qwen3's).
* :mod:`r4b.data.template` — :class:`ChatTemplate`: prompts per mode (auto / think /
  no_think), responses, SFT examples with their loss mask, and parsing of model outputs.
* :mod:`r4b.data.task` — the embedded visual-arithmetic task (:func:`make_task`,
  :func:`train_eval_split`) and the shared :class:`Sample` record.
* :mod:`r4b.data.readers` — JSON Lines / Parquet readers into :class:`Sample`, bounded by a
  :class:`ReaderConfig` (bad rows: :class:`RowError`; unusable files: :class:`DataFileError`).
"""

from .readers import (DataFileError, ReaderConfig, ReadStats, RowError, load_image, read_jsonl,
                      read_parquet, read_samples)
from .task import (LEVELS, QUESTIONS, Sample, TaskConfig, TaskItem, make_task, render_digits,
                   solve, split_of, train_eval_split)
from .template import (MODE_PREFIX, MODES, THINKING_MODES, ChatTemplate, ParsedResponse,
                       SFTExample, parse_assistant, resolve_mode, sft_loss_mask)
from .tokenizer import BuiltinTokenizer, HFTokenizer, Tokenizer

__all__ = [
    "BuiltinTokenizer", "ChatTemplate", "DataFileError", "HFTokenizer", "LEVELS", "MODES",
    "MODE_PREFIX", "ParsedResponse", "QUESTIONS", "ReadStats", "ReaderConfig", "RowError",
    "SFTExample", "Sample", "THINKING_MODES", "TaskConfig", "TaskItem", "Tokenizer", "load_image",
    "make_task", "parse_assistant", "read_jsonl", "read_parquet", "read_samples", "render_digits",
    "resolve_mode", "sft_loss_mask", "solve", "split_of", "train_eval_split",
]
