"""One job per run directory.

:func:`lock_run_dir` takes an exclusive ``flock`` on ``<run_dir>/.lock`` from the job's first
rank and keeps it until the process ends.  A second job on the same directory stops at once
with an error naming the holder (pid, host, start time, command); a crashed job's lock is
released by the kernel with its process, so its successor takes over without any clean-up
(the holder details of the crashed job are reported in a log line).  Every rank learns the
outcome, so all of them stop together.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import sys
from pathlib import Path

from .errors import JobError
from .log import get_logger
from .runtime import broadcast_object

log = get_logger(__name__)

LOCK_NAME = ".lock"


class RunDirBusy(JobError, RuntimeError):
    """Another live job holds the run directory."""


class RunLock:
    """An open, ``flock``-ed lock file (released when closed or when the process ends)."""

    def __init__(self, path: Path, fd: int | None):
        self.path, self._fd = path, fd

    def release(self) -> None:
        if self._fd is not None:
            import fcntl

            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def _try_lock(path: Path) -> tuple[int | None, dict | None]:
    """(fd of the held lock, None) or (None, the holder's details)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = json.loads(os.pread(fd, 1 << 16, 0).decode() or "{}")
        except (ValueError, UnicodeDecodeError):
            holder = {}
        os.close(fd)
        return None, holder
    previous = os.pread(fd, 1 << 16, 0).decode(errors="replace").strip()
    if previous:
        log.warning("%s was left by a job that ended without releasing it (%s); taking over",
                    path, previous[:200])
    info = {"pid": os.getpid(), "host": socket.gethostname(),
            "started": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": " ".join(sys.argv)[:500]}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    os.fsync(fd)
    return fd, None


def lock_run_dir(run_dir: str | os.PathLike, rt=None) -> RunLock:
    """Hold ``run_dir`` for this job (collective: every rank calls it; rank 0 locks).

    Raises :class:`RunDirBusy` on every rank when another live job holds it."""
    path = Path(run_dir) / LOCK_NAME
    fd, holder = (None, None)
    if rt is None or rt.is_main:
        fd, holder = _try_lock(path)
    if rt is not None and rt.world_size > 1:
        holder = broadcast_object(holder, rt)
    if holder is not None:
        who = ", ".join(f"{k} {v}" for k, v in holder.items()) or "an unknown process"
        raise RunDirBusy(f"run directory {str(run_dir)!r} is in use by another job ({who}); "
                         f"wait for it, stop it, or choose another out_dir")
    return RunLock(path, fd)
