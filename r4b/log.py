"""Logging conventions for all of r4b.

* One setup: :func:`setup_logging` configures the ``r4b`` logger tree once per process.
  Rank 0 prints INFO to the console; other ranks print WARNING and above, prefixed by rank.
* Long loops use :func:`progress` — a tqdm bar on rank 0, silent elsewhere.
* Metrics go through :class:`MetricsWriter`: one JSON object per line (``step`` first),
  written by rank 0 only, flushed per line, optionally mirrored to TensorBoard.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterable

_CONFIGURED = False


def get_rank() -> int:
    """Global rank from torch.distributed if initialised, else from the RANK env var."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except ImportError:  # pragma: no cover
        pass
    return int(os.environ.get("RANK", "0"))


def setup_logging(level: str | int = "INFO", *, rank: int | None = None, force: bool = False) -> None:
    """Configure the ``r4b`` and ``r4b_kernels`` loggers (idempotent unless ``force``)."""
    global _CONFIGURED
    if _CONFIGURED and not force:
        return
    rank = get_rank() if rank is None else rank
    if isinstance(level, str):
        level = logging.getLevelName(level.upper())
    prefix = "" if rank == 0 else f"[rank{rank}] "
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(
        f"%(asctime)s {prefix}%(levelname).1s %(name)s: %(message)s", datefmt="%H:%M:%S"))
    for name in ("r4b", "r4b_kernels"):
        lg = logging.getLogger(name)
        lg.handlers[:] = [handler]
        lg.setLevel(level if rank == 0 else max(level, logging.WARNING))
        lg.propagate = False
    _CONFIGURED = True


def get_logger(name: str) -> logging.Logger:
    """Logger under the ``r4b`` tree; ``name`` is usually ``__name__``."""
    return logging.getLogger(name if name.startswith("r4b") else f"r4b.{name}")


class LogProgress:
    """Progress for non-terminal output (a log file, CI): one INFO line at most every
    ``interval`` seconds and one at the end, instead of a redrawn bar."""

    def __init__(self, total: int | None, desc: str | None, initial: int = 0,
                 interval: float = 60.0, enabled: bool = True):
        self.total, self.desc, self.n, self.interval = total, desc or "progress", initial, interval
        self.enabled, self._postfix, self._start_n = enabled, "", initial
        self._start = self._last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if self.enabled and now - self._last >= self.interval:
            self._last = now
            self._emit()

    def set_postfix(self, **kw) -> None:
        self._postfix = " ".join(f"{k}={v}" for k, v in kw.items())

    def _emit(self) -> None:
        done = self.n - self._start_n
        rate = (time.monotonic() - self._start) / done if done else float("nan")
        of = f"/{self.total}" if self.total is not None else ""
        get_logger("r4b.progress").info("%s: %d%s (%.2f s/it) %s", self.desc, self.n, of, rate,
                                        self._postfix)

    def close(self) -> None:
        if self.enabled and self.n > self._start_n:
            self._emit()
        self.enabled = False


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str | None = None,
             **kwargs):
    """A tqdm progress bar on rank 0 when stderr is a terminal; on other output (log files)
    a :class:`LogProgress` line at most every ``R4B_PROGRESS_INTERVAL`` seconds (default
    60); silent on other ranks and with ``R4B_NO_PROGRESS=1``."""
    disable = get_rank() != 0 or os.environ.get("R4B_NO_PROGRESS", "0") not in ("", "0")
    if iterable is None and not sys.stderr.isatty():
        interval = float(os.environ.get("R4B_PROGRESS_INTERVAL", "60"))
        return LogProgress(total, desc, kwargs.get("initial", 0), interval, enabled=not disable)
    from tqdm.auto import tqdm

    kwargs.setdefault("mininterval", 1.0)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, total=total, desc=desc, disable=disable, **kwargs)


def _jsonable(v: Any):
    if hasattr(v, "item") and getattr(v, "numel", lambda: 1)() == 1:
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep the information as a string
    return v


class MetricsWriter:
    """Append-only JSON-lines metrics file (rank 0 only), optionally mirrored to TensorBoard.

    Each :meth:`write` emits ``{"step": step, "time": unix_seconds, **metrics}``.  Existing
    files are appended to, so a resumed run continues its log; pass ``truncate_after_step``
    to drop lines logged after the resumed checkpoint.
    """

    def __init__(self, path: str | os.PathLike | None, *, tensorboard_dir: str | None = None,
                 truncate_after_step: int | None = None):
        self.enabled = path is not None and get_rank() == 0
        self.path = Path(path) if path is not None else None
        self._fh = None
        self._tb = None
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if truncate_after_step is not None and self.path.exists():
            keep = [ln for ln in self.path.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("step", -1) <= truncate_after_step]
            self.path.write_text("".join(ln + "\n" for ln in keep))
        self._fh = open(self.path, "a", buffering=1)
        if tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ImportError("TensorBoard logging needs the 'tensorboard' package: "
                                  "pip install 'r4b[test]' or pip install tensorboard") from e
            self._tb = SummaryWriter(tensorboard_dir)

    def write(self, step: int, **metrics: Any) -> None:
        if not self.enabled:
            return
        rec = {"step": int(step), "time": round(time.time(), 3)}
        rec.update({k: _jsonable(v) for k, v in metrics.items()})
        self._fh.write(json.dumps(rec) + "\n")
        if self._tb is not None:
            for k, v in rec.items():
                if k not in ("step", "time") and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Read a JSON-lines metrics file written by :class:`MetricsWriter`."""
    return [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]
