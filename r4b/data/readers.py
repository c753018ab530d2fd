"""Readers for user data: JSON Lines and Parquet rows into :class:`~r4b.data.task.Sample`.

Row schema (one JSON object per line, or one Parquet row)::

    {"images": [...]?, "question": str, "answer": str | number, "reasoning": str | null ?,
     "topic": str ?, "verifiable": bool ?, "uid" | "id": str | int ?}

* ``images``: a list (or absent / null for none). Each entry is a file path or an array.
  Paths: ``.npy`` arrays (loaded with ``allow_pickle=False``) or PNG/JPEG images (through
  Pillow, imported only then; a clear ``ImportError`` when missing). Relative paths are
  resolved against the directory of the data file. Arrays: nested lists.
  Array layout is ``[H, W]`` or channel-first ``[C, H, W]`` with C in {1, 3}; float values
  must lie in [0, 1], integer values in [0, 255] (divided by 255). Every image comes out
  float32 ``[C, H, W]`` in [0, 1].
* ``answer``: text; ints and finite floats are accepted and written with ``str``/``repr``
  (``0.1`` stays ``"0.1"``); booleans are rejected.
* ``reasoning`` (default None), ``topic`` (default "general"), ``verifiable`` (default True:
  the rule-based verifier judges the answer; set false for open-ended queries).
* Other keys are kept in ``Sample.meta``.

A bad row raises ``ValueError`` naming the file, the 1-based row number and the field.
``skip_bad_rows=True`` skips such rows instead, counting them in the returned
:class:`ReadStats` and logging a warning with the first errors; nothing is dropped silently.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..log import get_logger
from .task import Sample

log = get_logger(__name__)

try:  # optional: Parquet input
    import pyarrow.parquet as _pq

    HAVE_PYARROW = True
except ImportError:  # pragma: no cover - pyarrow is in the test extra
    _pq = None
    HAVE_PYARROW = False

_KNOWN = ("images", "question", "answer", "reasoning", "topic", "verifiable", "uid", "id")
_PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


class RowError(ValueError):
    """A bad data row; the message names the file, the row and the field."""


@dataclass
class ReadStats:
    """What a read did."""

    path: str
    rows_total: int = 0
    rows_read: int = 0
    rows_skipped: int = 0
    errors: list[str] = field(default_factory=list)
    """Messages of the first skipped rows (at most 20)."""


def _err(path, row: int, fld: str, msg: str) -> RowError:
    return RowError(f"{path}: row {row}: field {fld!r}: {msg}")


def _as_image(arr: np.ndarray, where: str) -> np.ndarray:
    if arr.dtype == object or arr.dtype.kind not in "biuf":
        raise ValueError(f"{where}: must be a numeric array, got dtype {arr.dtype}")
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or arr.shape[0] not in (1, 3) or arr.shape[1] < 1 or arr.shape[2] < 1:
        raise ValueError(f"{where}: must have shape [H, W] or [C, H, W] with C in (1, 3), "
                         f"got {tuple(arr.shape)}")
    if arr.dtype.kind == "b":
        raise ValueError(f"{where}: boolean arrays are not images; use 0/1 floats")
    if arr.dtype.kind in "iu":
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > 255:
            raise ValueError(f"{where}: integer pixels must be in [0, 255], got [{lo}, {hi}]")
        return (arr.astype(np.float32) / 255.0)
    out = arr.astype(np.float32)
    if not np.isfinite(out).all():
        raise ValueError(f"{where}: has non-finite values")
    lo, hi = float(out.min()), float(out.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(f"{where}: float pixels must be in [0, 1], got [{lo:g}, {hi:g}]")
    return out


def load_image(entry: Any, base_dir: str | os.PathLike, where: str = "image") -> np.ndarray:
    """One image entry (path or nested list) as float32 ``[C, H, W]`` in [0, 1]."""
    if isinstance(entry, (str, os.PathLike)):
        p = Path(entry)
        if not p.is_absolute():
            p = Path(base_dir) / p
        if not p.is_file():
            raise ValueError(f"{where}: image file {str(p)!r} does not exist")
        suffix = p.suffix.lower()
        if suffix == ".npy":
            try:
                arr = np.load(p, allow_pickle=False)
            except ValueError as e:
                raise ValueError(f"{where}: cannot load {str(p)!r} as a .npy array: {e}") from e
            return _as_image(arr, f"{where} ({p.name})")
        if suffix in _PIL_SUFFIXES:
            try:
                from PIL import Image
            except ImportError as e:
                raise ImportError(f"{where}: reading {suffix} images needs Pillow "
                                  "(pip install pillow); .npy arrays need nothing") from e
            with Image.open(p) as im:
                gray = im.mode in ("L", "1", "I", "I;16", "F")
                im = im.convert("L" if gray else "RGB")
                arr = np.asarray(im)
            arr = arr[None] if arr.ndim == 2 else np.transpose(arr, (2, 0, 1))
            return _as_image(np.ascontiguousarray(arr), f"{where} ({p.name})")
        raise ValueError(f"{where}: unsupported image file type {suffix!r} of {str(p)!r} "
                         f"(expected .npy or one of {_PIL_SUFFIXES})")
    if isinstance(entry, (list, tuple, np.ndarray)):
        try:
            arr = np.asarray(entry)
        except ValueError as e:  # ragged nested lists
            raise ValueError(f"{where}: not a rectangular array: {e}") from e
        return _as_image(arr, where)
    raise ValueError(f"{where}: must be a file path or a nested list, got {type(entry).__name__}")


def row_to_sample(row: dict, *, path: str | os.PathLike, row_number: int,
                  image_shape: tuple[int, int, int] | None = None) -> Sample:
    """Validate one row (see the module docstring) and build its :class:`Sample`.

    ``image_shape`` (C, H, W), when given, is required of every image.
    """
    if not isinstance(row, dict):
        raise RowError(f"{path}: row {row_number}: must be an object, got {type(row).__name__}")
    q = row.get("question")
    if not isinstance(q, str) or not q.strip():
        raise _err(path, row_number, "question", f"must be a non-empty string, got {q!r:.60}")
    a = row.get("answer")
    if isinstance(a, bool) or a is None:
        raise _err(path, row_number, "answer", f"must be a string or a number, got {a!r}")
    if isinstance(a, int):
        a = str(a)
    elif isinstance(a, float):
        if not math.isfinite(a):
            raise _err(path, row_number, "answer", f"must be finite, got {a!r}")
        a = repr(a)
    elif not isinstance(a, str):
        raise _err(path, row_number, "answer", f"must be a string or a number, got "
                   f"{type(a).__name__}")
    if not a.strip():
        raise _err(path, row_number, "answer", "must be non-empty")
    r = row.get("reasoning")
    if r is not None and not isinstance(r, str):
        raise _err(path, row_number, "reasoning",
                   f"must be a string or null, got {type(r).__name__}")
    topic = row.get("topic")
    topic = "general" if topic is None else topic
    if not isinstance(topic, str) or not topic:
        raise _err(path, row_number, "topic", f"must be a non-empty string, got {topic!r}")
    ver = row.get("verifiable")
    ver = True if ver is None else ver
    if not isinstance(ver, bool):
        raise _err(path, row_number, "verifiable", f"must be true or false, got {ver!r}")
    imgs_in = row.get("images")
    imgs_in = [] if imgs_in is None else imgs_in
    if isinstance(imgs_in, np.ndarray) and imgs_in.dtype == object:
        imgs_in = list(imgs_in)
    if not isinstance(imgs_in, (list, tuple)):
        raise _err(path, row_number, "images", f"must be a list of paths or arrays, got "
                   f"{type(imgs_in).__name__}")
    base = Path(path).parent
    images = []
    for k, entry in enumerate(imgs_in):
        try:
            img = load_image(entry, base, where=f"images[{k}]")
        except ValueError as e:
            raise _err(path, row_number, "images", str(e)) from e
        if image_shape is not None and tuple(img.shape) != tuple(image_shape):
            raise _err(path, row_number, "images", f"images[{k}] has shape {tuple(img.shape)}, "
                       f"expected {tuple(image_shape)}")
        images.append(img)
    inline = q.count("<image>")
    if inline and inline != len(images):
        raise _err(path, row_number, "question", f"has {inline} '<image>' markers but the row "
                   f"has {len(images)} images")
    uid = row.get("uid", row.get("id"))
    uid = f"{Path(path).name}:{row_number}" if uid is None else str(uid)
    meta = {k: v for k, v in row.items() if k not in _KNOWN}
    return Sample(uid=uid, question=q, answer=a, reasoning=r, images=images, level=None,
                  topic=topic, verifiable=ver, meta=meta)


def _collect(rows: Iterator[tuple[int, Any]], path: str, skip_bad_rows: bool,
             image_shape) -> tuple[list[Sample], ReadStats]:
    stats = ReadStats(path=path)
    out = []
    for row_number, row in rows:
        stats.rows_total += 1
        try:
            if isinstance(row, RowError):
                raise row
            out.append(row_to_sample(row, path=path, row_number=row_number,
                                     image_shape=image_shape))
        except RowError as e:
            if not skip_bad_rows:
                raise
            stats.rows_skipped += 1
            if len(stats.errors) < 20:
                stats.errors.append(str(e))
    stats.rows_read = len(out)
    if stats.rows_skipped:
        log.warning("%s: skipped %d of %d rows (skip_bad_rows=True); first: %s", path,
                    stats.rows_skipped, stats.rows_total, stats.errors[0])
    return out, stats


def read_jsonl(path: str | os.PathLike, *, skip_bad_rows: bool = False,
               image_shape: tuple[int, int, int] | None = None) -> tuple[list[Sample], ReadStats]:
    """Read a JSON Lines file (blank lines ignored) into samples and read statistics."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"path {str(path)!r} is not an existing file")

    def rows():
        with open(p, encoding="utf-8") as fh:
            for n, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    yield n, json.loads(line)
                except json.JSONDecodeError as e:
                    yield n, RowError(f"{p}: row {n}: field '<json>': invalid JSON: {e}")

    return _collect(rows(), str(p), skip_bad_rows, image_shape)


def read_parquet(path: str | os.PathLike, *, skip_bad_rows: bool = False,
                 image_shape: tuple[int, int, int] | None = None
                 ) -> tuple[list[Sample], ReadStats]:
    """Read a Parquet file (row group by row group, through pyarrow) into samples and stats."""
    if not HAVE_PYARROW:
        raise ImportError("reading Parquet needs pyarrow: pip install 'r4b[test]' or "
                          "pip install pyarrow")
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"path {str(path)!r} is not an existing file")
    pf = _pq.ParquetFile(p)
    if "question" not in pf.schema_arrow.names or "answer" not in pf.schema_arrow.names:
        raise RowError(f"{p}: row 1: field 'question'/'answer': the file has columns "
                       f"{pf.schema_arrow.names}, which must include 'question' and 'answer'")

    def rows():
        n = 0
        for g in range(pf.num_row_groups):
            for row in pf.read_row_group(g).to_pylist():
                n += 1
                yield n, row

    return _collect(rows(), str(p), skip_bad_rows, image_shape)


def read_samples(path: str | os.PathLike, **kwargs) -> tuple[list[Sample], ReadStats]:
    """Read ``.jsonl`` / ``.json`` (JSON Lines) or ``.parquet`` by file suffix."""
    suffix = Path(path).suffix.lower()
    if suffix in (".jsonl", ".json"):
        return read_jsonl(path, **kwargs)
    if suffix in (".parquet", ".pq"):
        return read_parquet(path, **kwargs)
    raise ValueError(f"path {str(path)!r}: unsupported data file type {suffix!r} "
                     "(expected .jsonl, .json, .parquet or .pq)")
