"""Readers for user data: JSON Lines and Parquet rows into :class:`~r4b.data.task.Sample`.

The input is untrusted: each limit is checked as early as the format allows (file sizes before
reading, image sizes on the header before decoding, line lengths while reading), and every
problem with one row is a :class:`RowError` naming the file, the 1-based row and the field.

Row schema (one JSON object per line, or one Parquet row)::

    {"images": [...]?, "question": str, "answer": str | number, "reasoning": str | null ?,
     "topic": str ?, "verifiable": bool ?, "uid" | "id": str | int ?}

Fields
------
* ``question``: a string with a non-blank character, at most ``max_text_chars`` characters;
  ``<image>`` markers, when present, must be one per image.
* ``answer``: text; ints and finite floats are accepted and written with ``str``/``repr``
  (``0.1`` stays ``"0.1"``); booleans are rejected; at most ``max_text_chars`` characters.
* ``reasoning`` (default None): a string or null, at most ``max_reasoning_chars`` characters.
* ``topic`` (default "general"): a non-empty string, at most ``max_text_chars`` characters.
* ``verifiable`` (default True: the rule-based verifier judges the answer; set false for
  open-ended queries): true or false.
* ``uid`` or ``id``: a string or an integer (not a bool or float); ``uid`` wins when both are
  given, and ``id`` is then kept in ``Sample.meta``. A row without one gets
  ``"<file name>:<row>"``. Ids are unique within a file, generated ones included: a second
  row with an id already used is a row error naming both rows and the id.
* Text fields (question, answer, reasoning, topic, uid/id) must not contain control characters
  other than tab, newline and carriage return (U+0000-U+0008, U+000B, U+000C, U+000E-U+001F,
  U+007F) nor lone surrogates (U+D800-U+DFFF).
* Other keys are kept in ``Sample.meta``, except image data: a column holding image structs
  or encoded image bytes that is not read as the images is a row error naming it.

Layouts of other tools
----------------------
* **Column names** (``ReaderConfig.columns``, r4b field -> the file's column):
  ``read_parquet(path, columns={"question": "problem", "answer": "solution"})``, or
  ``--reader.columns question problem answer solution`` on the command line. Errors name the
  file's column. A mapped column the Parquet file lacks is a :class:`DataFileError`; a row
  holding both a mapped column and one named as its field is a row error.
* **Image columns.** Without a mapping, images come from ``images`` (a list), ``image`` or
  ``decoded_image`` (one entry or a list: Hugging Face ``datasets`` names; MathVista's
  ``decoded_image``). When a row has several of them, the one holding image data (structs,
  bytes) is read and path strings beside it (MathVista's ``image``) go to ``meta``; two
  holding image data are a row error asking for ``columns={"images": ...}``.
* **Chat rows**: ``messages``, a list of ``{role, content}`` turns: one ``user`` turn, then
  optionally one ``assistant`` turn (the reference; without it the row needs ``answer``).
  ``content`` is a string or a list of ``{type: "text", text}`` / ``{type: "image"}`` parts;
  text parts are joined by newlines, each image part becomes an ``<image>`` marker in its
  place (so their count must equal the row's images, which come from its image column). An
  assistant text ``<think>R</think>A`` gives reasoning ``R`` and answer ``A``. System turns,
  several exchanges, and ``question`` / ``reasoning`` beside ``messages`` are row errors.

Images
------
An image column holds a list (or absent / null for none) of entries; each entry is a file
path, a Hugging Face ``datasets`` image struct ``{"bytes": binary | null, "path": str |
null}``, encoded image bytes, or an array. Bytes (in a struct or raw: PNG, JPEG, BMP, GIF,
WEBP or ``.npy``) are decoded in memory by the same bounded decoders as files, at most
``max_image_bytes`` long; a struct's ``path`` is read (as a path, below) only when its
``bytes`` is null; a struct with both null is an error.
Every image comes out float32 ``[C, H, W]`` in [0, 1], C in {1, 3}, of any size (a processor
downstream resizes or tiles it; ``image_shape`` optionally requires one shape).

* Paths are resolved against the data file's folder; relative or absolute, after resolving
  symlinks they must stay inside that folder unless ``allow_paths_outside_data_dir``. The file
  must be a regular file of 1 to ``max_image_bytes`` bytes (checked before reading).
* ``.npy``: the header is read first (``allow_pickle=False``): a numeric dtype, layout
  ``[H, W]`` or channel-first ``[C, H, W]``, ``H * W <= max_image_pixels``, and a file long
  enough for the data; only then is the data read.
* ``.png .jpg .jpeg .bmp .gif .webp``: decoded by Pillow (imported only then; a clear
  ``ImportError`` when missing), whose only decoders allowed, whatever the suffix, are PNG,
  JPEG, BMP, GIF and WEBP. The size in the header is checked against ``max_image_pixels``
  before any pixel is decoded. Pillow's own bound, ``PIL.Image.MAX_IMAGE_PIXELS``, applies as
  well (its ``DecompressionBombWarning`` and ``DecompressionBombError`` become row errors), so
  images above it need that raised too. Then the EXIF orientation is applied
  (``ImageOps.exif_transpose``); animations give their first frame. Modes: ``1``/``L`` → one
  channel / 255; ``I;16`` (16-bit grayscale) → one channel / 65535; ``I`` → one channel,
  values in [0, 65535], / 65535; ``F`` → one channel, values in [0, 1]; with alpha (``LA``,
  ``RGBA``, ``PA``, palette or ``L``/``RGB`` with a transparent colour) → **composited on
  white**, ``c * a + (1 - a)`` in float (what a viewer shows; the colour under transparent
  pixels is often junk), gray stays one channel; everything else (``RGB``, ``P``, ``CMYK``,
  ``YCbCr``, ...) → Pillow's conversion to RGB / 255. ICC profiles are not applied.
* Arrays (nested lists): layout ``[H, W]`` or ``[C, H, W]``, ``H * W <= max_image_pixels``;
  float values finite and in [0, 1], integer values in [0, 255] (divided by 255); booleans
  rejected.

JSON Lines
----------
Read as bytes, one row per line (the row number is the line number; blank lines are ignored).
A UTF-8 byte-order mark at the start and CRLF line ends are fine. Each line: at most
``max_line_bytes`` bytes, valid UTF-8, valid JSON, integer literals of at most
``max_int_digits`` digits, containers nested at most ``max_json_depth`` deep (the row object is
depth 1), no key twice in one object, and the row an object.

Parquet
-------
Read through pyarrow one row group at a time; the file needs ``question`` and ``answer``
columns, or ``messages`` (after ``columns`` is applied). A file pyarrow cannot open (empty, truncated, bad footer) raises one
:class:`DataFileError` naming it. A row group that fails to decode is one row error naming its
rows (``rows 3-4 (row group 2 of 3)``), skipped as a whole with ``skip_bad_rows``. Columns of
a wrong type (``answer`` as a list, ``id`` as a float) are row errors of that field.

Errors
------
* A bad row raises :class:`RowError` (a :class:`DataFileError`, a ``ValueError``):
  ``"<file>: row <n>: field '<field>': <what is wrong, with the value or the constraint>"``.
  Fields are the row's keys, ``images[k]`` for one image, or ``'<utf-8>'``, ``'<json>'``,
  ``'<row>'`` for the line as a whole.
* ``skip_bad_rows=True`` skips such rows instead: :class:`ReadStats` counts them (in total and
  per reason) and keeps the first :data:`MAX_REPORTED_ERRORS` messages; one warning log line
  summarises them. Nothing is dropped silently.
* A read never returns fewer than ``min_rows`` (default 1) samples: it raises
  :class:`DataFileError` naming the file, the counts and the first errors instead.
* A missing file raises ``FileNotFoundError``; an unknown suffix ``ValueError``.

Limits
------
The fields of :class:`ReaderConfig`, passed as ``config=`` or as keywords
(``read_jsonl(path, skip_bad_rows=True)``; keywords override ``config``); defaults::

    max_image_bytes      256 MiB      image file size, before reading
    max_image_pixels     2**26        H * W (8192 x 8192), on the header, before decoding
    max_line_bytes       64 MiB       one JSON Lines line
    max_json_depth       32           container nesting in a row
    max_int_digits       4300         digits of a JSON integer literal
    max_text_chars       100_000      question, answer, topic, uid/id
    max_reasoning_chars  400_000      reasoning
    min_rows             1            usable rows a read must return
    columns              {}           r4b field -> the file's column
    allow_paths_outside_data_dir  False
    skip_bad_rows        False
"""

from __future__ import annotations

import codecs
import dataclasses
import io
import json
import math
import os
import re
import stat
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..config import require_range
from ..log import get_logger
from .task import Sample

log = get_logger(__name__)

try:  # optional: Parquet input
    import pyarrow as _pa
    import pyarrow.parquet as _pq

    HAVE_PYARROW = True
except ImportError:  # pragma: no cover - pyarrow is in the test extra
    _pa = _pq = None
    HAVE_PYARROW = False

_KNOWN = ("images", "question", "answer", "reasoning", "topic", "verifiable", "uid", "id")
_MAPPABLE = _KNOWN + ("messages",)
"""The r4b fields that ``ReaderConfig.columns`` may map to a file's column."""
_IMAGE_COLUMNS = ("images", "image", "decoded_image")
"""Columns read as images when ``columns`` maps none (Hugging Face ``datasets`` names)."""
_IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM",
                b"\x93NUMPY")
"""Leading bytes of the image encodings read from bytes (WEBP: ``RIFF....WEBP``)."""
_PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
_PIL_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP")
"""The only Pillow decoders that run, whatever a file's suffix says."""
_BAD_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff]")

MAX_REPORTED_ERRORS = 20
"""How many skipped rows' messages :class:`ReadStats` keeps."""


# ---------------------------------------------------------------- options
@dataclass(kw_only=True)
class ReaderConfig:
    """Limits and error handling of the readers (see the module docstring)."""

    skip_bad_rows: bool = False
    """Skip bad rows (counted in :class:`ReadStats`, one warning line) instead of raising."""
    min_rows: int = 1
    """Fewest usable rows a read returns; fewer raise :class:`DataFileError`."""
    image_shape: tuple[int, int, int] | None = None
    """``(C, H, W)`` required of every image, or None for any size."""
    allow_paths_outside_data_dir: bool = False
    """Allow image paths that resolve (symlinks followed) outside the data file's folder."""
    max_image_bytes: int = 256 * 2 ** 20
    """Largest image file in bytes, checked before reading (256 MiB: an uncompressed 8192²
    RGB PNG is 192 MiB, a 4K float32 RGB ``.npy`` 95 MiB)."""
    max_image_pixels: int = 2 ** 26
    """Largest image in pixels (H * W), checked on the header before decoding (2**26: an
    8192×8192 image; 8K UHD is 33 M, 4K 8.3 M; float32 RGB at the cap is 768 MiB)."""
    max_line_bytes: int = 64 * 2 ** 20
    """Longest JSON Lines line in bytes, newline excluded (64 MiB)."""
    max_json_depth: int = 32
    """Deepest nesting of JSON containers in a row (the row object is 1; an inline image in
    ``images`` reaches 5)."""
    max_int_digits: int = 4300
    """Most digits of a JSON integer literal (Python's own int-str default); longer ones are
    refused before conversion, whose cost grows quadratically."""
    max_text_chars: int = 100_000
    """Longest question, answer, topic and uid/id in characters."""
    max_reasoning_chars: int = 400_000
    """Longest reasoning in characters (about 100k tokens)."""
    columns: dict[str, str] = field(default_factory=dict)
    """The file's column for an r4b field, where the file names it otherwise: ``{"question":
    "problem", "answer": "solution", "images": "decoded_image"}``; on the command line
    ``--reader.columns question problem answer solution``.  Fields: question, answer,
    reasoning, topic, verifiable, uid, id, images, messages.  A mapped column the file lacks
    is an error; unmapped fields keep their own names (images also come from ``image`` or
    ``decoded_image``)."""

    def __post_init__(self):
        cols = self.columns
        if not isinstance(cols, dict):
            raise ValueError(f"reader.columns must map r4b fields to column names, got "
                             f"{type(cols).__name__} {cols!r:.80}")
        for k, v in cols.items():
            if k not in _MAPPABLE:
                raise ValueError(f"reader.columns: {k!r} is not an r4b field; fields: "
                                 f"{list(_MAPPABLE)}")
            if not isinstance(v, str) or not v:
                raise ValueError(f"reader.columns[{k!r}] must be a non-empty column name, got "
                                 f"{v!r:.80}")
        shared = sorted({v for v in cols.values() if list(cols.values()).count(v) > 1})
        if shared:
            raise ValueError(f"reader.columns maps several fields to the column(s) {shared}: "
                             f"{cols}")
        self.columns = dict(cols)
        for name in ("skip_bad_rows", "allow_paths_outside_data_dir"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ValueError(f"reader.{name} must be True or False, got {value!r}")
        for name, lo, hi in (("min_rows", 1, None), ("max_image_bytes", 1, 2 ** 40),
                             ("max_image_pixels", 1, 2 ** 32), ("max_line_bytes", 64, 2 ** 32),
                             ("max_json_depth", 1, 256), ("max_int_digits", 1, 1_000_000),
                             ("max_text_chars", 1, 2 ** 31),
                             ("max_reasoning_chars", 1, 2 ** 31)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"reader.{name} must be an integer, got {value!r}")
            require_range(f"reader.{name}", value, lo, hi)
        if self.image_shape is not None:
            shape = self.image_shape
            ok = (isinstance(shape, (tuple, list)) and len(shape) == 3
                  and all(isinstance(x, int) and not isinstance(x, bool) for x in shape)
                  and shape[0] in (1, 3) and min(shape[1:]) >= 1)
            if not ok:
                raise ValueError(f"reader.image_shape must be None or (C, H, W) with C in (1, 3) "
                                 f"and H, W >= 1, got {shape!r}")
            self.image_shape = tuple(shape)


_OPTION_NAMES = tuple(f.name for f in dataclasses.fields(ReaderConfig))


def _config(config: ReaderConfig | None, options: dict) -> ReaderConfig:
    """``config`` (default :class:`ReaderConfig`()) with ``options`` replacing its fields."""
    if config is not None and not isinstance(config, ReaderConfig):
        raise TypeError(f"config must be a ReaderConfig, got {type(config).__name__}")
    unknown = sorted(set(options) - set(_OPTION_NAMES))
    if unknown:
        raise TypeError(f"unknown reader options {unknown}; known: {list(_OPTION_NAMES)}")
    base = config if config is not None else ReaderConfig()
    return dataclasses.replace(base, **options) if options else base


# ---------------------------------------------------------------- errors and statistics
class DataFileError(ValueError):
    """A data file that cannot be used: unreadable, or too few usable rows.

    ``stats`` is the :class:`ReadStats` of the read that gave up, when it got that far.
    """

    def __init__(self, message: str, *, stats: ReadStats | None = None):
        super().__init__(message)
        self.stats = stats


class RowError(DataFileError):
    """A bad data row; the message names the file, the row and the field.

    ``reason`` (a field name without its index, or e.g. ``'duplicate id'``) keys the
    per-reason counts of :class:`ReadStats`.
    """

    def __init__(self, message: str, *, path: str | None = None, row: int | None = None,
                 field: str | None = None, reason: str | None = None):
        super().__init__(message)
        self.path, self.row, self.field = path, row, field
        self.reason = reason or (re.sub(r"\[\d+\]$", "", field) if field else "row")


@dataclass
class ReadStats:
    """What a read did."""

    path: str
    rows_total: int = 0
    """Rows seen (non-blank lines / Parquet rows), read or skipped."""
    rows_read: int = 0
    """Rows returned as samples."""
    rows_skipped: int = 0
    """Rows skipped as bad (``skip_bad_rows=True``)."""
    errors: list[str] = field(default_factory=list)
    """Messages of the first skipped rows (at most :data:`MAX_REPORTED_ERRORS`)."""
    skipped_by_reason: dict[str, int] = field(default_factory=dict)
    """Skipped rows per reason: the field (``'question'``, ``'images'``, ...) or one of
    ``'duplicate id'``, ``'invalid JSON'``, ``'not UTF-8'``, ``'line too long'``,
    ``'nested too deep'``, ``'integer too long'``, ``'duplicate key'``, ``'not an object'``,
    ``'unreadable row group'``."""

    def reasons(self) -> str:
        """``'question: 3, images: 1'``: skipped rows per reason, most frequent first."""
        items = sorted(self.skipped_by_reason.items(), key=lambda kv: (-kv[1], kv[0]))
        return ", ".join(f"{k}: {v}" for k, v in items)

    def summary(self) -> str:
        """One line: rows skipped of rows seen, per reason, and the first error."""
        first = f"; first: {self.errors[0]}" if self.errors else ""
        return (f"{self.path}: skipped {self.rows_skipped} of {self.rows_total} rows "
                f"(skip_bad_rows=True; {self.reasons()}){first}")


def _rows(n: int) -> str:
    return f"{n} row" if n == 1 else f"{n} rows"


def _err(path, row: int, fld: str, msg: str, reason: str | None = None) -> RowError:
    return RowError(f"{path}: row {row}: field {fld!r}: {msg}", path=str(path), row=row,
                    field=fld, reason=reason)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


# ---------------------------------------------------------------- images
def _check_layout(shape: tuple[int, ...], cfg: ReaderConfig) -> tuple[int, int, int]:
    """``(C, H, W)`` of an ``[H, W]`` or ``[C, H, W]`` array shape within the pixel bound."""
    if len(shape) == 2:
        shape = (1, *shape)
    if len(shape) != 3 or shape[0] not in (1, 3) or shape[1] < 1 or shape[2] < 1:
        raise ValueError(f"must have shape [H, W] or [C, H, W] with C in (1, 3) and H, W >= 1, "
                         f"got {tuple(shape)}")
    if shape[1] * shape[2] > cfg.max_image_pixels:
        raise ValueError(f"has {shape[1]}x{shape[2]} = {shape[1] * shape[2]} pixels, more than "
                         f"max_image_pixels = {cfg.max_image_pixels}")
    return shape


def _as_image(arr: np.ndarray, cfg: ReaderConfig) -> np.ndarray:
    """A numeric ``[H, W]`` / ``[C, H, W]`` array as float32 ``[C, H, W]`` in [0, 1]."""
    if arr.dtype.hasobject or arr.dtype.kind not in "biuf":
        raise ValueError(f"must be a numeric array, got dtype {arr.dtype}")
    arr = arr.reshape(_check_layout(arr.shape, cfg))
    if arr.dtype.kind == "b":
        raise ValueError("boolean arrays are not images; use 0/1 floats")
    if arr.dtype.kind in "iu":
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > 255:
            raise ValueError(f"integer pixels must be in [0, 255], got [{lo}, {hi}]")
        return arr.astype(np.float32) / 255.0
    out = arr.astype(np.float32)
    if not np.isfinite(out).all():
        raise ValueError("has non-finite values")
    lo, hi = float(out.min()), float(out.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(f"float pixels must be in [0, 1], got [{lo:g}, {hi:g}]")
    return out


def _open_image_file(entry, base_dir: Path, cfg: ReaderConfig):
    """``(path as given, open binary file, size)`` of a contained, regular, bounded file."""
    text = os.fspath(entry)
    if not isinstance(text, str) or not text:
        raise ValueError(f"image path must be a non-empty string, got {text!r}")
    if _BAD_CHARS.search(text):
        raise ValueError(f"image path {text!r} contains a control character")
    p = Path(text)
    if not p.is_absolute():
        p = base_dir / p
    real = Path(os.path.realpath(p))
    if not cfg.allow_paths_outside_data_dir:
        root = Path(os.path.realpath(base_dir))
        if not real.is_relative_to(root):
            raise ValueError(f"image path {text!r} resolves to {str(real)!r}, outside the data "
                             f"file's folder {str(root)!r} (allow_paths_outside_data_dir=True "
                             "permits it)")
    suffix = p.suffix.lower()
    if suffix != ".npy" and suffix not in _PIL_SUFFIXES:
        raise ValueError(f"unsupported image file type {suffix!r} of {str(p)!r} "
                         f"(expected .npy or one of {_PIL_SUFFIXES})")
    try:  # O_NONBLOCK: opening a FIFO must not hang; it is refused below as not a regular file
        fd = os.open(real, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        raise ValueError(f"image file {str(p)!r} does not exist") from None
    except OSError as e:
        raise ValueError(f"cannot open image file {str(p)!r}: {e.strerror}") from None
    st = os.fstat(fd)
    problem = None
    if not stat.S_ISREG(st.st_mode):
        problem = "is not a regular file"
    elif st.st_size == 0:
        problem = "is empty (0 bytes)"
    elif st.st_size > cfg.max_image_bytes:
        problem = f"has {st.st_size} bytes, more than max_image_bytes = {cfg.max_image_bytes}"
    if problem:
        os.close(fd)
        raise ValueError(f"image file {str(p)!r} {problem}")
    fh = os.fdopen(fd, "rb")
    return p, fh, st.st_size


def _read_npy(fh, size: int, cfg: ReaderConfig) -> np.ndarray:
    """The array of an open ``.npy`` file, after its header passed the bounds."""
    fmt = np.lib.format
    try:
        version = fmt.read_magic(fh)
        if version == (1, 0):
            shape, fortran, dtype = fmt.read_array_header_1_0(fh)
        elif version == (2, 0):
            shape, fortran, dtype = fmt.read_array_header_2_0(fh)
        else:
            raise ValueError(f"unsupported .npy format version {version}")
    except (ValueError, OSError, EOFError, SyntaxError) as e:
        raise ValueError(f"not a valid .npy file: {_one_line(e)}") from None
    if dtype.hasobject or dtype.kind not in "biuf":
        raise ValueError(f"must be a numeric array, got dtype {dtype}")
    _check_layout(shape, cfg)
    nbytes = math.prod(shape) * dtype.itemsize
    have = size - fh.tell()
    if have < nbytes:
        raise ValueError(f"is truncated: its header promises {nbytes} data bytes, the file "
                         f"holds {have}")
    arr = np.frombuffer(fh.read(nbytes), dtype=dtype)
    return _as_image(arr.reshape(shape, order="F" if fortran else "C"), cfg)


def _pil():
    try:
        from PIL import Image, ImageOps
    except ImportError as e:
        raise ImportError("reading .png/.jpg/.bmp/.gif/.webp images needs Pillow "
                          "(pip install pillow); .npy arrays need nothing") from e
    return Image, ImageOps


def _pil_pixels(im, Image, ImageOps) -> tuple[str, np.ndarray]:
    """``(kind, array)``: the decoded, upright pixels in one of a few known layouts."""
    im.load()
    im = ImageOps.exif_transpose(im)
    mode = im.mode
    if mode.startswith("I;16"):
        return "u16", np.asarray(im)
    if mode in ("I", "F"):
        return mode, np.asarray(im)
    if mode in ("LA", "La") or (mode in ("1", "L") and "transparency" in im.info):
        return "gray_alpha", np.asarray(im.convert("LA"))
    if mode in ("1", "L"):
        return "u8", np.asarray(im.convert("L"))
    if mode in ("RGBA", "RGBa", "PA") or (mode in ("P", "RGB") and "transparency" in im.info):
        return "rgb_alpha", np.asarray(im.convert("RGBA"))
    return "u8", np.asarray(im.convert("RGB"))


def _read_pil(fh, name: str, cfg: ReaderConfig) -> np.ndarray:
    """An open PNG/JPEG/BMP/GIF/WEBP file as float32 ``[C, H, W]`` in [0, 1]."""
    Image, ImageOps = _pil()
    bombs = (Image.DecompressionBombError, Image.DecompressionBombWarning)
    formats = "/".join(_PIL_FORMATS)
    # Pillow's decoders report malformed input with many exception types (OSError,
    # SyntaxError, ValueError, EOFError, struct.error, ...); each means a bad image file.
    # Pillow warns (DecompressionBombWarning) past MAX_IMAGE_PIXELS and raises past twice
    # that; the warning is made an error here (catch_warnings: one reading thread at a time).
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im = Image.open(fh, formats=_PIL_FORMATS)  # reads the header only
        except bombs as e:
            raise ValueError(f"{name!r} is refused as a decompression bomb by Pillow "
                             f"({_one_line(e)}; PIL.Image.MAX_IMAGE_PIXELS = "
                             f"{Image.MAX_IMAGE_PIXELS})") from None
        except Image.UnidentifiedImageError:
            raise ValueError(f"cannot decode {name!r}: Pillow finds no {formats} image in "
                             "it") from None
        except Exception as e:
            raise ValueError(f"cannot decode {name!r} as {formats}: {type(e).__name__}: "
                             f"{_one_line(e)}") from None
        with im:
            w, h = im.size
            if w < 1 or h < 1:
                raise ValueError(f"{name!r} has size {w}x{h}; images need at least 1x1 pixel")
            if w * h > cfg.max_image_pixels:
                raise ValueError(f"{name!r} has {w}x{h} = {w * h} pixels, more than "
                                 f"max_image_pixels = {cfg.max_image_pixels}")
            try:
                kind, arr = _pil_pixels(im, Image, ImageOps)
            except bombs as e:
                raise ValueError(f"{name!r} is refused as a decompression bomb by Pillow "
                                 f"({_one_line(e)})") from None
            except Exception as e:
                raise ValueError(f"cannot decode {name!r} ({im.format} {im.mode} {w}x{h}): "
                                 f"{type(e).__name__}: {_one_line(e)}") from None
    if kind == "u16":
        out = arr.astype(np.float32) / 65535.0
    elif kind == "I":
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > 65535:
            raise ValueError(f"{name!r}: 32-bit integer pixels must be in [0, 65535], "
                             f"got [{lo}, {hi}]")
        out = arr.astype(np.float32) / 65535.0
    elif kind in ("gray_alpha", "rgb_alpha"):  # straight alpha, composited on white
        c = arr[..., :-1].astype(np.float32) / 255.0
        a = arr[..., -1:].astype(np.float32) / 255.0
        out = np.clip(c * a + (1.0 - a), 0.0, 1.0)
    else:  # "u8" (divided by 255 below) or "F" (checked to lie in [0, 1])
        out = arr
    out = out[None] if out.ndim == 2 else np.transpose(out, (2, 0, 1))
    try:
        return _as_image(np.ascontiguousarray(out), cfg)
    except ValueError as e:
        raise ValueError(f"{name!r}: {e}") from None


def _decode_bytes(data: bytes, name: str, cfg: ReaderConfig) -> np.ndarray:
    """An encoded image held in memory (PNG/JPEG/BMP/GIF/WEBP or ``.npy`` bytes), through the
    same bounded decoders as files."""
    if not data:
        raise ValueError(f"{name} is empty (0 bytes)")
    if len(data) > cfg.max_image_bytes:
        raise ValueError(f"{name} has {len(data)} bytes, more than max_image_bytes = "
                         f"{cfg.max_image_bytes}")
    fh = io.BytesIO(data)
    if data.startswith(b"\x93NUMPY"):
        try:
            return _read_npy(fh, len(data), cfg)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
    return _read_pil(fh, name, cfg)


def _is_image_struct(value: Any) -> bool:
    """A Hugging Face ``datasets`` image struct: ``{"bytes": ..., "path": ...}``."""
    return (isinstance(value, dict) and bool(value) and set(value) <= {"bytes", "path"})


def _holds_image_data(value: Any) -> bool:
    """Whether a row value is image data (an image struct, encoded image bytes, or a list
    holding one): what a column not read as images must not hold."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        head = bytes(value[:12])
        return head.startswith(_IMAGE_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")
    if _is_image_struct(value):
        return True
    if isinstance(value, (list, tuple)):
        return any(_holds_image_data(x) for x in value[:64])
    return False


def _decode_image(entry: Any, base_dir: Path, cfg: ReaderConfig) -> np.ndarray:
    """One image entry as float32 ``[C, H, W]``; ``ValueError`` saying what is wrong."""
    if isinstance(entry, (bytes, bytearray, memoryview)):
        return _decode_bytes(bytes(entry), f"image bytes ({len(entry)} bytes)", cfg)
    if isinstance(entry, dict):
        if not _is_image_struct(entry):
            raise ValueError(f"an image struct has the keys 'bytes' and 'path' (Hugging Face "
                             f"datasets' Image), got keys {sorted(map(str, entry))[:8]}")
        data, where = entry.get("bytes"), entry.get("path")
        if data is not None:
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise ValueError(f"'bytes' of an image struct must be binary, got "
                                 f"{type(data).__name__} (in JSON Lines give a 'path' instead)")
            name = f"image bytes ({len(data)} bytes" + (f" of {where!r})" if where else ")")
            return _decode_bytes(bytes(data), name, cfg)
        if where is not None:
            if not isinstance(where, str):
                raise ValueError(f"'path' of an image struct must be a string, got "
                                 f"{type(where).__name__}")
            return _decode_image(where, base_dir, cfg)
        raise ValueError("an image struct with neither 'bytes' nor 'path' (both null)")
    if isinstance(entry, (str, os.PathLike)):
        p, fh, size = _open_image_file(entry, base_dir, cfg)
        with fh:
            if p.suffix.lower() == ".npy":
                try:
                    return _read_npy(fh, size, cfg)
                except ValueError as e:
                    raise ValueError(f"{str(p)!r}: {e}") from None
            return _read_pil(fh, str(p), cfg)
    if isinstance(entry, (list, tuple, np.ndarray)):
        try:
            arr = np.asarray(entry)
        except (ValueError, TypeError, OverflowError) as e:  # ragged nested lists
            raise ValueError(f"not a rectangular numeric array: {_one_line(e)}") from None
        return _as_image(arr, cfg)
    raise ValueError(f"must be a file path, image bytes, a {{bytes, path}} struct or a nested "
                     f"list, got {type(entry).__name__}")


def load_image(entry: Any, base_dir: str | os.PathLike, where: str = "image", *,
               config: ReaderConfig | None = None, **options) -> np.ndarray:
    """One image entry (path, ``{bytes, path}`` struct, encoded bytes or nested list) as
    float32 ``[C, H, W]`` in [0, 1].

    Paths resolve against (and must stay inside) ``base_dir``; the limits are those of
    ``config`` / ``options`` (:class:`ReaderConfig` fields). Errors are ``ValueError``
    starting with ``where``.
    """
    cfg = _config(config, options)
    try:
        return _decode_image(entry, Path(base_dir), cfg)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from e


# ---------------------------------------------------------------- rows
def _check_text(path, row: int, fld: str, s: str, limit: int, limit_name: str) -> None:
    if len(s) > limit:
        raise _err(path, row, fld, f"has {len(s)} characters, more than {limit_name} = {limit}")
    m = _BAD_CHARS.search(s)
    if m:
        raise _err(path, row, fld, f"contains U+{ord(m.group()):04X} at index {m.start()}; "
                   "control characters other than tab, newline and carriage return, and lone "
                   "surrogates, are not allowed")


def _require_object(row: Any, path, row_number: int) -> dict:
    if not isinstance(row, dict):
        raise _err(path, row_number, "<row>", f"must be an object, got {type(row).__name__}",
                   reason="not an object")
    return row


def _row_uid(row: dict, path, row_number: int, cfg: ReaderConfig,
             names: dict | None = None) -> tuple[str, str, bool]:
    """``(uid, field it came from, generated?)`` of a (normalised) row; ``names``: the file's
    column of each field (:func:`_normalise`)."""
    for field_name in ("uid", "id"):
        value = row.get(field_name)
        if value is not None:
            break
    else:
        return f"{Path(path).name}:{row_number}", "uid", True
    key = (names or {}).get(field_name, field_name)
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise _err(path, row_number, key, f"must be a string or an integer, got "
                   f"{type(value).__name__} {value!r:.60}")
    try:
        uid = str(value)
    except ValueError as e:  # an int past Python's int-str limit
        raise _err(path, row_number, key, f"integer too long: {e}") from None
    if not uid.strip():
        raise _err(path, row_number, key, f"must be non-blank, got {uid!r}")
    _check_text(path, row_number, key, uid, cfg.max_text_chars, "max_text_chars")
    return uid, key, False


@dataclass
class _Fields:
    """A row in r4b's fields: ``values`` by field, ``names`` the file's column (or chat turn)
    of each field for error messages, the image entries, and the rest of the row (meta)."""

    values: dict
    names: dict
    images: list
    meta: dict


def _image_entries(value: Any, column: str, path, row_number: int) -> tuple[list, bool]:
    """``(entries, one entry?)`` of an image column's value: the column named ``images`` holds
    a list (r4b's schema); any other image column one entry (path, bytes, struct, array) or a
    list of paths / bytes / structs."""
    if value is None:
        return [], False
    if isinstance(value, np.ndarray) and value.dtype == object:
        value = list(value)
    if isinstance(value, (list, tuple)):
        if column == "images" or all(x is None or isinstance(x, (str, bytes, bytearray, dict))
                                     for x in value):
            return list(value), False
        return [value], True  # a nested-list array in a one-image column
    if column == "images":
        raise _err(path, row_number, "images", f"must be a list of image entries (paths, "
                   f"structs, bytes or arrays), got {type(value).__name__}")
    if isinstance(value, (str, bytes, bytearray, memoryview, dict, os.PathLike)):
        return [value], True
    raise _err(path, row_number, column, f"must be an image (path, bytes, a {{bytes, path}} "
               f"struct or an array) or a list of them, got {type(value).__name__}")


def _chat_text(content: Any, path, row_number: int, where: str, *, images_ok: bool
               ) -> tuple[str, int]:
    """``(text, image placeholders)`` of a chat turn's content: a string, or a list of
    ``{type: text, text}`` / ``{type: image}`` parts (text parts joined by newlines, each image
    part an ``<image>`` marker in its place)."""
    if isinstance(content, str):
        return content, content.count("<image>")
    if isinstance(content, np.ndarray) and content.dtype == object:
        content = list(content)
    if not isinstance(content, (list, tuple)):
        raise _err(path, row_number, where, f"must be a string or a list of {{type: text | "
                   f"image}} parts, got {type(content).__name__}")
    pieces, n_images = [], 0
    for k, part in enumerate(content):
        at = f"{where}[{k}]"
        if not isinstance(part, dict):
            raise _err(path, row_number, at, f"must be a {{type, text}} part, got "
                       f"{type(part).__name__}")
        kind = part.get("type")
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise _err(path, row_number, at, f"a text part needs a string 'text', got "
                           f"{text!r:.60}")
            pieces.append(text)
        elif kind == "image":
            if not images_ok:
                raise _err(path, row_number, at, "an image part in an assistant turn; images "
                           "belong to the user turn")
            extra = sorted(k2 for k2, v in part.items() if k2 != "type" and v is not None)
            if extra:
                raise _err(path, row_number, at, f"image parts are placeholders: the images "
                           f"come from the row's image column, not from the part's {extra}")
            pieces.append("<image>")
            n_images += 1
        else:
            raise _err(path, row_number, at, f"part type must be 'text' or 'image', got "
                       f"{kind!r:.60}")
    return "\n".join(pieces), n_images


def _from_messages(values: dict, names: dict, path, row_number: int) -> None:
    """Fill question / answer / reasoning from a chat row's ``messages`` (in place)."""
    col = names.get("messages", "messages")
    msgs = values.pop("messages")
    for fld in ("question", "reasoning"):
        if values.get(fld) is not None:
            raise _err(path, row_number, names.get(fld, fld), f"a chat row takes its {fld} from "
                       f"'{col}'; the row has both")
    if isinstance(msgs, np.ndarray) and msgs.dtype == object:
        msgs = list(msgs)
    if not isinstance(msgs, (list, tuple)) or not msgs:
        raise _err(path, row_number, col, f"must be a non-empty list of {{role, content}} turns, "
                   f"got {msgs!r:.60}")
    roles = []
    for k, turn in enumerate(msgs):
        if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
            raise _err(path, row_number, f"{col}[{k}]", f"must be a {{role, content}} turn, got "
                       f"{turn!r:.60}")
        roles.append(turn["role"])
    if roles not in (["user"], ["user", "assistant"]):
        raise _err(path, row_number, col, f"must be one user turn, optionally followed by one "
                   f"assistant turn (the reference answer), got roles {roles} (system prompts "
                   f"and several exchanges are not read)")
    where = f"{col}[0].content"
    values["question"], _ = _chat_text(msgs[0]["content"], path, row_number, where,
                                       images_ok=True)
    names["question"] = where
    if len(msgs) == 2:
        if values.get("answer") is not None:
            raise _err(path, row_number, names.get("answer", "answer"), f"the answer comes from "
                       f"the assistant turn of '{col}'; the row has both")
        where = f"{col}[1].content"
        text, _ = _chat_text(msgs[1]["content"], path, row_number, where, images_ok=False)
        body = text.strip()
        if body.startswith("<think>") and "</think>" in body:
            thought, _, body = body[len("<think>"):].partition("</think>")
            values["reasoning"] = thought.strip() or None
            names["reasoning"] = where
        values["answer"] = body.strip()
        names["answer"] = where


def _normalise(row: dict, path, row_number: int, cfg: ReaderConfig) -> _Fields:
    """The row in r4b's fields: ``columns`` applied, a chat row read, the image column
    chosen; a column holding image data that is not read as images is a row error."""
    cols = cfg.columns
    if cols:
        by_column = {c: f for f, c in cols.items()}
        values = {}
        for k, v in row.items():
            if k in by_column:
                values[by_column[k]] = v
            elif k in cols and k not in by_column:
                raise _err(path, row_number, k, f"reader.columns maps {k!r} to the column "
                           f"{cols[k]!r}, but the row has a {k!r} column too; map or drop one")
            else:
                values[k] = v
        names = {f: c for f, c in cols.items()}
    else:
        values, names = dict(row), {}
    if "images" in cols:
        source = "images"
    else:
        present = [c for c in _IMAGE_COLUMNS if values.get(c) is not None]
        if len(present) > 1:
            data = [c for c in present if _holds_image_data(values[c])]
            if len(data) != 1:
                raise _err(path, row_number, present[0], f"the row has the image columns "
                           f"{present}; say which holds the images with reader.columns "
                           f"(columns={{'images': {present[-1]!r}}}, --reader.columns images "
                           f"{present[-1]})")
            present = data
        source = present[0] if present else None
    images = []
    if source is not None:
        label = names.get("images", source)
        entries, single = _image_entries(values.pop(source, None), label, path, row_number)
        images = [(label if single else f"{label}[{k}]", e) for k, e in enumerate(entries)]
        names["images"] = label
    if values.get("messages") is not None:
        _from_messages(values, names, path, row_number)
    else:
        values.pop("messages", None)
    meta = {k: v for k, v in values.items() if k not in _KNOWN}
    if source not in (None, "images") and values.get("images") is not None:
        meta["images"] = values.pop("images")  # paths beside the image column (MathVista)
    for k, v in meta.items():
        if _holds_image_data(v):
            where = (f"images come from {names['images']!r}" if source is not None
                     else "no column is read as images")
            raise _err(path, row_number, k, f"holds image data but is not read as images "
                       f"({where}); to read it as the images: columns={{'images': {k!r}}} "
                       f"(--reader.columns images {k})")
    return _Fields(values=values, names=names, images=images, meta=meta)


def _build_sample(fields: _Fields, path, row_number: int, cfg: ReaderConfig, uid: str,
                  uid_field: str) -> Sample:
    row, names = fields.values, fields.names

    def nm(f: str) -> str:  # the file's column (or chat turn) of a field, for messages
        return names.get(f, f)

    q = row.get("question")
    if not isinstance(q, str) or not q.strip():
        raise _err(path, row_number, nm("question"), f"must be a non-empty string, got "
                   f"{q!r:.60}")
    _check_text(path, row_number, nm("question"), q, cfg.max_text_chars, "max_text_chars")
    a = row.get("answer")
    if isinstance(a, bool) or a is None:
        raise _err(path, row_number, nm("answer"), f"must be a string or a number, got {a!r}")
    if isinstance(a, int):
        try:
            a = str(a)
        except ValueError as e:  # an int past Python's int-str limit
            raise _err(path, row_number, nm("answer"), f"integer too long: {e}") from None
    elif isinstance(a, float):
        if not math.isfinite(a):
            raise _err(path, row_number, nm("answer"), f"must be finite, got {a!r}")
        a = repr(a)
    elif not isinstance(a, str):
        raise _err(path, row_number, nm("answer"), f"must be a string or a number, got "
                   f"{type(a).__name__}")
    if not a.strip():
        raise _err(path, row_number, nm("answer"), "must be non-empty")
    _check_text(path, row_number, nm("answer"), a, cfg.max_text_chars, "max_text_chars")
    r = row.get("reasoning")
    if r is not None:
        if not isinstance(r, str):
            raise _err(path, row_number, nm("reasoning"),
                       f"must be a string or null, got {type(r).__name__}")
        _check_text(path, row_number, nm("reasoning"), r, cfg.max_reasoning_chars,
                    "max_reasoning_chars")
    topic = row.get("topic")
    topic = "general" if topic is None else topic
    if not isinstance(topic, str) or not topic:
        raise _err(path, row_number, nm("topic"), f"must be a non-empty string, got "
                   f"{topic!r:.60}")
    _check_text(path, row_number, nm("topic"), topic, cfg.max_text_chars, "max_text_chars")
    ver = row.get("verifiable")
    ver = True if ver is None else ver
    if not isinstance(ver, bool):
        raise _err(path, row_number, nm("verifiable"), f"must be true or false, got "
                   f"{ver!r:.60}")
    inline = q.count("<image>")
    if inline and inline != len(fields.images):
        raise _err(path, row_number, nm("question"), f"has {inline} '<image>' markers but the "
                   f"row has {len(fields.images)} images")
    base = Path(path).parent
    images = []
    for where, entry in fields.images:
        if entry is None:
            raise _err(path, row_number, where, "is null; leave a missing image out of the list")
        try:
            img = _decode_image(entry, base, cfg)
        except ValueError as e:
            raise _err(path, row_number, where, str(e)) from e
        if cfg.image_shape is not None and tuple(img.shape) != cfg.image_shape:
            raise _err(path, row_number, where, f"has shape {tuple(img.shape)}, "
                       f"expected {cfg.image_shape}")
        images.append(img)
    meta = dict(fields.meta)
    if row.get("uid") is not None and row.get("id") is not None:  # uid won; id kept
        meta["id"] = row["id"]
    return Sample(uid=uid, question=q, answer=a, reasoning=r, images=images, level=None,
                  topic=topic, verifiable=ver, meta=meta, source=f"{path}: row {row_number}")


def row_to_sample(row: dict, *, path: str | os.PathLike, row_number: int,
                  config: ReaderConfig | None = None, **options) -> Sample:
    """Validate one row (see the module docstring) and build its :class:`Sample`.

    ``config`` / ``options`` are :class:`ReaderConfig` fields (e.g. ``image_shape``). Ids are
    checked for uniqueness by the file readers, not here.
    """
    cfg = _config(config, options)
    fields = _normalise(_require_object(row, path, row_number), path, row_number, cfg)
    uid, uid_field, _ = _row_uid(fields.values, path, row_number, cfg, fields.names)
    return _build_sample(fields, path, row_number, cfg, uid, uid_field)


def _collect(rows: Iterator[tuple[int, Any, int]], path: str, cfg: ReaderConfig
             ) -> tuple[list[Sample], ReadStats]:
    """Samples of ``(row number, row or RowError, rows it covers)``: ids checked unique,
    bad rows raised or skipped, the minimum row count enforced."""
    stats = ReadStats(path=path)
    out: list[Sample] = []
    seen: dict[str, tuple[int, bool]] = {}  # uid -> (row, generated?)
    for row_number, row, n_rows in rows:
        stats.rows_total += n_rows
        try:
            if isinstance(row, RowError):
                raise row
            fields = _normalise(_require_object(row, path, row_number), path, row_number, cfg)
            uid, uid_field, generated = _row_uid(fields.values, path, row_number, cfg,
                                                 fields.names)
            if uid in seen:
                first, first_generated = seen[uid]
                how = (f"row {first} has it as its generated id (rows without 'uid'/'id' get "
                       "'<file name>:<row>')" if first_generated else f"row {first} has it")
                if generated:
                    how += f"; row {row_number} has no 'uid'/'id' and was given it"
                raise _err(path, row_number, uid_field, f"duplicate id {uid!r}: {how}",
                           reason="duplicate id")
            sample = _build_sample(fields, path, row_number, cfg, uid, uid_field)
        except RowError as e:
            if not cfg.skip_bad_rows:
                raise
            stats.rows_skipped += n_rows
            stats.skipped_by_reason[e.reason] = stats.skipped_by_reason.get(e.reason, 0) + n_rows
            if len(stats.errors) < MAX_REPORTED_ERRORS:
                stats.errors.append(str(e))
            continue
        seen[uid] = (row_number, generated)
        out.append(sample)
    stats.rows_read = len(out)
    if stats.rows_read < cfg.min_rows:
        if stats.rows_total == 0:
            detail = "the file has no rows"
        else:
            detail = f"{_rows(stats.rows_total)}, {stats.rows_skipped} skipped"
            if stats.rows_skipped:
                detail += f" ({stats.reasons()}); first errors: " + "; ".join(stats.errors[:3])
        raise DataFileError(f"{path}: {_rows(stats.rows_read).replace('row', 'usable row')}, "
                            f"fewer than min_rows = {cfg.min_rows}: {detail}", stats=stats)
    if stats.rows_skipped:
        log.warning("%s", stats.summary())
    return out, stats


# ---------------------------------------------------------------- JSON Lines
class _HugeInt:
    """Stands in for an integer literal over ``max_int_digits`` (never converted)."""

    __slots__ = ("digits",)

    def __init__(self, digits: int):
        self.digits = digits


class _DuplicateKey(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _json_decoder(cfg: ReaderConfig):
    """``decode(text)``: JSON with repeated keys refused and integer literals over
    ``max_int_digits`` left unconverted as :class:`_HugeInt` (found by :func:`_check_tree`)."""
    limit = cfg.max_int_digits

    def parse_int(s: str):
        digits = len(s) - s.startswith("-")
        return _HugeInt(digits) if digits > limit else int(s)

    def object_pairs(pairs: list) -> dict:
        obj = dict(pairs)
        if len(obj) != len(pairs):
            keys = set()
            for k, _ in pairs:
                if k in keys:
                    raise _DuplicateKey(k)
                keys.add(k)
        return obj

    exact = json.JSONDecoder(parse_int=parse_int, object_pairs_hook=object_pairs).decode
    get_limit = getattr(sys, "get_int_max_str_digits", None)
    py_limit = get_limit() if get_limit is not None else 0
    if not 0 < py_limit <= limit:
        return exact
    # Python's own int-str limit already refuses the long literals, so the built-in integer
    # parsing (several times faster than a hook on int-heavy rows) is safe; a line it refuses
    # is decoded again with the hook to say which field holds the literal.
    fast = json.JSONDecoder(object_pairs_hook=object_pairs).decode

    def decode(text: str):
        try:
            return fast(text)
        except (json.JSONDecodeError, _DuplicateKey):
            raise
        except ValueError:
            return exact(text)

    return decode


def _check_tree(row: dict, cfg: ReaderConfig) -> tuple[str, str, str] | None:
    """``(field, problem, reason)`` for the first container past ``max_json_depth`` or
    integer past ``max_int_digits`` in a parsed row, else None."""
    stack = [(v, 2, k) for k, v in row.items()]  # the row itself is depth 1
    while stack:
        value, depth, top = stack.pop()
        kind = type(value)
        if kind is list or kind is dict:
            if depth > cfg.max_json_depth:
                return (top, f"is nested deeper than max_json_depth = {cfg.max_json_depth}",
                        "nested too deep")
            for x in (value.values() if kind is dict else value):
                tx = type(x)
                if tx is list or tx is dict or tx is _HugeInt:
                    stack.append((x, depth + 1, top))
        elif kind is _HugeInt:
            return (top, f"holds an integer literal of {value.digits} digits, more than "
                    f"max_int_digits = {cfg.max_int_digits}", "integer too long")
    return None


def _parse_line(text: str, decode, cfg: ReaderConfig, path, n: int):
    """The row object of one decoded line, or the :class:`RowError` saying why not."""
    try:
        obj = decode(text)
    except _DuplicateKey as e:
        return _err(path, n, e.key, f"the key {e.key!r} appears twice in one object",
                    reason="duplicate key")
    except RecursionError:
        return _err(path, n, "<json>", f"is nested too deep for the JSON parser "
                    f"(max_json_depth = {cfg.max_json_depth})", reason="nested too deep")
    except ValueError as e:  # JSONDecodeError, or an int past Python's int-str limit
        return _err(path, n, "<json>", f"invalid JSON: {_one_line(e)}", reason="invalid JSON")
    if isinstance(obj, dict):
        bad = _check_tree(obj, cfg)
        if bad is not None:
            return _err(path, n, bad[0], bad[1], reason=bad[2])
    return obj


def _jsonl_rows(p: Path, cfg: ReaderConfig) -> Iterator[tuple[int, Any, int]]:
    decode = _json_decoder(cfg)
    limit = cfg.max_line_bytes
    with open(p, "rb") as fh:
        n = 0
        while True:
            raw = fh.readline(limit + 1)
            if not raw:
                return
            n += 1
            line = raw[:-1] if raw.endswith(b"\n") else raw
            if len(line) > limit:  # drain the rest of the line without holding it
                size = len(raw)
                while not raw.endswith(b"\n"):
                    raw = fh.readline(1 << 20)
                    if not raw:
                        break
                    size += len(raw)
                size -= raw.endswith(b"\n")
                yield n, _err(p, n, "<row>", f"the line has {size} bytes, more than "
                              f"max_line_bytes = {limit}", reason="line too long"), 1
                continue
            if n == 1 and line.startswith(codecs.BOM_UTF8):
                line = line[len(codecs.BOM_UTF8):]
            if not line.strip():
                continue
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as e:
                yield n, _err(p, n, "<utf-8>", f"not valid UTF-8: byte {e.start} of the line is "
                              f"{line[e.start:e.start + 1]!r} ({e.reason})",
                              reason="not UTF-8"), 1
                continue
            yield n, _parse_line(text, decode, cfg, p, n), 1


def read_jsonl(path: str | os.PathLike, *, config: ReaderConfig | None = None, **options
               ) -> tuple[list[Sample], ReadStats]:
    """Read a JSON Lines file into samples and read statistics (see the module docstring).

    ``config`` / ``options``: :class:`ReaderConfig` fields (``skip_bad_rows``, ...).
    """
    cfg = _config(config, options)
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"path {str(path)!r} is not an existing file")
    return _collect(_jsonl_rows(p, cfg), str(p), cfg)


# ---------------------------------------------------------------- Parquet
def _parquet_rows(pf, p: Path) -> Iterator[tuple[int, Any, int]]:
    n = 0
    n_groups = pf.num_row_groups
    for g in range(n_groups):
        count = pf.metadata.row_group(g).num_rows
        if count == 0:
            continue
        try:
            rows = pf.read_row_group(g).to_pylist()
        except (_pa.ArrowException, OSError, ValueError) as e:
            first, last = n + 1, n + count
            where = f"row {first}" if count == 1 else f"rows {first}-{last}"
            yield first, RowError(f"{p}: {where} (row group {g + 1} of {n_groups}): cannot "
                                  f"decode: {type(e).__name__}: {_one_line(e)}", path=str(p),
                                  row=first, reason="unreadable row group"), count
            n += count
            continue
        for row in rows:
            n += 1
            yield n, row, 1


def read_parquet(path: str | os.PathLike, *, config: ReaderConfig | None = None, **options
                 ) -> tuple[list[Sample], ReadStats]:
    """Read a Parquet file (row group by row group, through pyarrow) into samples and stats.

    ``config`` / ``options``: :class:`ReaderConfig` fields (``skip_bad_rows``, ...).
    """
    if not HAVE_PYARROW:
        raise ImportError("reading Parquet needs pyarrow: pip install 'r4b[test]' or "
                          "pip install pyarrow")
    cfg = _config(config, options)
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"path {str(path)!r} is not an existing file")
    try:
        pf = _pq.ParquetFile(p)
        names = pf.schema_arrow.names
    except (_pa.ArrowException, OSError, ValueError) as e:
        raise DataFileError(f"{p}: cannot open as Parquet ({type(e).__name__}: {_one_line(e)}); "
                            "is it truncated, or not a Parquet file?") from e
    try:
        missing = {f: c for f, c in cfg.columns.items() if c not in names}
        if missing:
            raise DataFileError(f"{p}: reader.columns maps {missing}, but the file has no such "
                                f"column; its columns: {names}")
        by_column = {c: f for f, c in cfg.columns.items()}
        fields = {by_column.get(c, c) for c in names}
        if not ({"question", "answer"} <= fields or "messages" in fields):
            raise DataFileError(f"{p}: the file has columns {names}, which must include "
                                "'question' and 'answer', or 'messages' (chat rows); map "
                                "columns of other names with reader.columns (e.g. "
                                "columns={'question': 'problem', 'answer': 'solution'}, "
                                "--reader.columns question problem answer solution)")
        return _collect(_parquet_rows(pf, p), str(p), cfg)
    finally:
        pf.close()


def read_samples(path: str | os.PathLike, *, config: ReaderConfig | None = None, **options
                 ) -> tuple[list[Sample], ReadStats]:
    """Read ``.jsonl`` / ``.json`` (JSON Lines) or ``.parquet`` / ``.pq`` by file suffix."""
    suffix = Path(path).suffix.lower()
    if suffix in (".jsonl", ".json"):
        return read_jsonl(path, config=config, **options)
    if suffix in (".parquet", ".pq"):
        return read_parquet(path, config=config, **options)
    raise ValueError(f"path {str(path)!r}: unsupported data file type {suffix!r} "
                     "(expected .jsonl, .json, .parquet or .pq)")
