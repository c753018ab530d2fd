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
        """Clear the holder details and unlock: the next job finds a lock released cleanly
        (only a job that died holding it leaves its details behind)."""
        if self._fd is not None:
            import fcntl

            os.ftruncate(self._fd, 0)
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


# ---------------------------------------------------------------- job identity
JOB_FILE = "job.json"
NOT_COMPARED = ("out_dir", "resume_changed")
"""Options that never make a run another job: where it lives, and the list of accepted changes."""
SAFE_CHANGES = ("steps", "eval_every", "eval_items_during", "ckpt_every", "tensorboard", "eval",
                "anneal.ckpt_every", "setup.timeout_rollout_s", "setup.timeout_update_s",
                "setup.timeout_checkpoint_s", "dp_size", "rl.share_prefix", "anneal.share_prefix",
                "setup.rollout.share_prompts")
"""Options a resume may change when ``--resume_changed`` names them (a name or a dotted prefix:
``eval`` accepts every ``eval.*`` option): how long the run goes on, how often it evaluates and
checkpoints, evaluation, timeouts, the data-parallel size (checkpoints reshard) and the packed
layouts (``share_prefix``, ``share_prompts``: exact either way, and absent from run
directories made before them).  Every
other option defines what is trained (model, data and its content, task, seed, algorithm and
its hyper-parameters, tensor-parallel size) and a run directory keeps it for life."""


class JobChanged(JobError, ValueError):
    """A run directory is resumed (or reused) with options of another job."""


def file_sha256(path: str | os.PathLike) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def job_record(job, *, dp_size: int) -> dict:
    """What ``job.json`` holds for ``job``: its options (as ``config_to_dict``), plus an
    ``identity`` entry with the data file's content hash and the data-parallel size."""
    from .config import config_to_dict

    rec = json.loads(json.dumps(config_to_dict(job)))  # tuples as lists, as read back
    data = rec.get("data")
    rec["identity"] = {"data_sha256": file_sha256(data) if data else None, "dp_size": dp_size}
    return rec


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def _compared(rec: dict) -> dict:
    flat = {k: v for k, v in _flat({k: v for k, v in rec.items() if k != "changes"}).items()
            if k.split(".")[0] not in NOT_COMPARED}
    ident = {k.removeprefix("identity."): flat.pop(k) for k in list(flat) if k.startswith("identity.")}
    flat.update(ident)
    return flat


def _covers(name: str, key: str) -> bool:
    return key == name or key.startswith(name + ".")


def _safe(key: str) -> bool:
    return any(_covers(s, key) for s in SAFE_CHANGES)


def job_differences(old: dict, new: dict) -> dict[str, tuple]:
    """Options whose value differs between two ``job.json`` records: ``{name: (old, new)}``
    (a name missing on one side counts as ``None`` there)."""
    a, b = _compared(old), _compared(new)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def _describe(diffs: dict[str, tuple]) -> str:
    return "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in diffs.items())


def check_resume(run_dir: str | os.PathLike, job, rt=None, *, resuming: bool,
                 what: str = "run") -> dict:
    """Check that ``job`` is the job that made ``run_dir`` and return the ``job.json`` record
    to write once the launch has passed its checks (:func:`write_job_record`).

    When ``resuming`` (the directory holds a checkpoint) and ``job.json`` exists, every
    option that differs must be named in ``job.resume_changed`` and be one of
    :data:`SAFE_CHANGES`; else :class:`JobChanged` lists each difference (old -> new) on every
    rank.  Accepted changes are appended to the record's ``changes`` history.  Collective
    (rank 0 reads and hashes, the outcome is broadcast)."""
    err, rec = None, None
    if rt is None or rt.is_main:
        try:
            rec, err = _check(Path(run_dir), job, rt, resuming=resuming, what=what)
        except OSError as e:
            err = f"{run_dir}: cannot read {JOB_FILE} or the data file ({e})"
    if rt is not None and rt.world_size > 1:
        err, rec = broadcast_object((err, rec), rt)
    if err is not None:
        raise JobChanged(err)
    return rec


def _check(run_dir: Path, job, rt, *, resuming: bool, what: str) -> tuple[dict, str | None]:
    new = job_record(job, dp_size=1 if rt is None else rt.dp_size)
    path = run_dir / JOB_FILE
    if not resuming or not path.is_file():
        if resuming:
            log.warning("%s holds a checkpoint but no %s: options of the first start unknown, "
                        "not compared", run_dir, JOB_FILE)
        new["changes"] = []
        return new, None
    old = json.loads(path.read_text())
    diffs = job_differences(old, new)
    accepted = tuple(getattr(job, "resume_changed", ()) or ())
    unsafe = {k: v for k, v in diffs.items() if not _safe(k)}
    unnamed = {k: v for k, v in diffs.items() if _safe(k) and not any(_covers(n, k) for n in accepted)}
    bad_names = [n for n in accepted if not _safe(n)]
    problems = []
    if unsafe:
        problems.append(f"these options define what the {what} trains and cannot change on "
                        f"resume: {_describe(unsafe)} (start a new out_dir, or rerun with the "
                        f"old values)")
    if unnamed:
        problems.append(f"these options changed: {_describe(unnamed)} (accept them with "
                        f"--resume_changed {' '.join(unnamed)})")
    if bad_names:
        problems.append(f"resume_changed names {bad_names}, which cannot change on resume "
                        f"(accepted: {', '.join(SAFE_CHANGES)})")
    if problems:
        return new, (f"{path}: this launch is not the job that made the {what}: "
                     + "; ".join(problems))
    new["changes"] = list(old.get("changes", []))
    if diffs:
        new["changes"].append({"time": datetime.datetime.now().isoformat(timespec="seconds"),
                               "changed": {k: list(v) for k, v in diffs.items()}})
        log.warning("resuming %s with accepted changes: %s", run_dir, _describe(diffs))
    return new, None


def check_reused(run_dir: str | os.PathLike, job, rt=None, *, what: str) -> None:
    """Refuse to reuse the finished run in ``run_dir`` (an annealing run) for ``job`` when an
    option that defines what it trained differs (:data:`SAFE_CHANGES` are ignored: the run is
    done).  Collective, like :func:`check_resume`."""
    err = None
    if rt is None or rt.is_main:
        path = Path(run_dir) / JOB_FILE
        if not path.is_file():
            log.warning("%s holds no %s: its options cannot be compared with this job's",
                        run_dir, JOB_FILE)
        else:
            try:
                diffs = job_differences(json.loads(path.read_text()),
                                        job_record(job, dp_size=1 if rt is None else rt.dp_size))
            except OSError as e:
                diffs, err = {}, f"{run_dir}: cannot read {JOB_FILE} or the data file ({e})"
            unsafe = {k: v for k, v in diffs.items() if not _safe(k)}
            if unsafe:
                err = (f"{path}: the {what} in {run_dir} was made by another job: "
                       f"{_describe(unsafe)}; choose another anneal_dir (or remove it to "
                       f"anneal again), or rerun with its options")
    if rt is not None and rt.world_size > 1:
        err = broadcast_object(err, rt)
    if err is not None:
        raise JobChanged(err)


def write_job_record(run_dir: str | os.PathLike, record: dict, rt=None) -> None:
    """Write ``job.json`` atomically (rank 0): after the launch passed its checks only, so a
    launch that fails them leaves the record of the run as it was."""
    if rt is not None and not rt.is_main:
        return
    path = Path(run_dir) / JOB_FILE
    tmp = path.with_name(f".{JOB_FILE}.tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(path)


def replace_dir(new: str | os.PathLike, final: str | os.PathLike) -> None:
    """Put the finished folder ``new`` in the place of ``final`` (absent or a folder), whole:
    the old folder is renamed aside, ``new`` renamed in, then the old one removed.  A kill in
    between leaves either folder complete (the old one under ``.<name>.old``)."""
    import shutil

    new, final = Path(new), Path(final)
    old = final.parent / f".{final.name}.old"
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        final.rename(old)
    new.rename(final)
    if old.exists():
        shutil.rmtree(old)
