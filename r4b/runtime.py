"""Process layout of a training job: data-parallel × tensor-parallel ranks, and the collective
helpers the trainers use (gradient all-reduce, TP-aware grad norm, global finiteness).

Launch with ``torchrun --nproc-per-node N``; ``N`` must be a multiple of ``tp_size``.  On CPU the
backend is gloo, on GPU nccl with one device per local rank.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.distributed as dist

from .errors import JobError
from .log import get_logger
from .models.parallel import _parallel_state, init_model_parallel

log = get_logger(__name__)


@dataclass
class Runtime:
    """This rank's place in the job."""

    rank: int
    world_size: int
    dp_rank: int
    dp_size: int
    tp_rank: int
    tp_size: int
    device: torch.device
    dp_group: Any = None
    tp_group: Any = None
    health_group: Any = None
    """A gloo group over all ranks for health checks (monitored barriers name silent ranks)."""
    timeouts: dict[str, float] = field(default_factory=dict)
    """Seconds a rank waits for its peers, per phase (see :meth:`phase`)."""
    _phase: str | None = field(default=None, init=False, repr=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Collectives inside wait at most ``timeouts[name]`` seconds for a peer (rollouts wait
        long: ranks generate at their own pace; updates exchange every layer and wait short).
        An error inside names the phase and, after a health check, the ranks that stopped
        answering."""
        prev = self._phase
        self._phase = name
        self._set_timeout(self.timeouts.get(name))
        try:
            yield
        except Exception as e:  # a peer that died or hangs surfaces as a collective error
            if isinstance(e, (KeyboardInterrupt, SystemExit)) or getattr(e, "_r4b_diagnosed", False):
                raise
            silent = self.silent_ranks()
            if silent:
                err = PeerError(f"rank {self.rank}: during {name}, rank(s) {silent} stopped "
                                f"answering ({type(e).__name__}: {str(e)[:300]})")
                err._r4b_diagnosed = True
                raise err from e
            e._r4b_diagnosed = True
            raise
        finally:
            self._phase = prev
            self._set_timeout(self.timeouts.get(prev) if prev else None)

    def _set_timeout(self, seconds: float | None) -> None:
        if seconds is None or self.world_size == 1 or not dist.is_initialized():
            return
        from torch.distributed.distributed_c10d import _set_pg_timeout

        td = datetime.timedelta(seconds=seconds)
        groups: list = [None]
        for g in (self.dp_group, self.tp_group):
            if g is not None and all(g is not h for h in groups):
                groups.append(g)
        for g in groups:
            try:
                _set_pg_timeout(td, g)
            except (RuntimeError, ValueError, AttributeError):  # backends without per-group timeouts
                pass

    def silent_ranks(self, timeout_s: float = 20.0) -> list[int]:
        """Ranks that do not reach a monitored barrier within ``timeout_s`` (empty: all
        answer).  Collective: every live rank calls it when a collective failed."""
        if self.world_size == 1 or self.health_group is None:
            return []
        try:
            dist.monitored_barrier(self.health_group, timeout=datetime.timedelta(seconds=timeout_s),
                                   wait_all_ranks=True)
            return []
        except RuntimeError as e:
            found: set[int] = set()
            for group in re.findall(r"Ranks? ([\d, ]+) failed", str(e)):
                found.update(int(x) for x in group.replace(",", " ").split())
            return sorted(found - {self.rank}) or ["unknown"]


class PeerError(JobError, RuntimeError):
    """A peer rank died or stopped answering; the message names it and the phase."""


def die_with_parent() -> None:
    """Ask the kernel to end this process when its parent (torchrun's agent) dies, so workers
    never outlive a killed launcher (Linux; elsewhere a no-op).  Exits at once when the parent
    is already gone."""
    import ctypes
    import signal
    import sys

    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:  # pragma: no cover - libc without prctl
        return
    if os.getppid() != parent or parent == 1:
        log.error("the launcher (pid %d) is gone; exiting", parent)
        os._exit(1)


def init_runtime(tp_size: int = 1, *, device: str = "auto",
                 timeouts: dict[str, float] | None = None) -> Runtime:
    """Initialise torch.distributed and megatron's model-parallel groups (TP only; PP runs
    through megatron's schedules on GPU) and return this rank's :class:`Runtime`.  On CPU the
    node's cores are split evenly among its processes.  Under torchrun the worker ends when its
    launcher dies.  ``timeouts``: seconds per phase (``"rollout"``, ``"update"``); the process
    group's default is the longest."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":  # share the machine's cores among the processes of this node
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ:
        die_with_parent()
    timeouts = dict(timeouts or {})
    init_model_parallel(tp_size, 1, backend="nccl" if device == "cuda" else "gloo",
                        timeout_s=max(timeouts.values()) if timeouts else None)
    ps = _parallel_state()
    dev = torch.device(device, int(os.environ.get("LOCAL_RANK", "0"))) if device == "cuda" \
        else torch.device("cpu")
    health = None
    if dist.get_world_size() > 1:
        health = dist.new_group(backend="gloo")  # its own connections: usable after a timeout
    rt = Runtime(rank=dist.get_rank(), world_size=dist.get_world_size(),
                 dp_rank=ps.get_data_parallel_rank(), dp_size=ps.get_data_parallel_world_size(),
                 tp_rank=ps.get_tensor_model_parallel_rank(),
                 tp_size=ps.get_tensor_model_parallel_world_size(), device=dev,
                 dp_group=ps.get_data_parallel_group(), tp_group=ps.get_tensor_model_parallel_group(),
                 health_group=health, timeouts=timeouts)
    log.info("runtime: world=%d dp=%d tp=%d device=%s", rt.world_size, rt.dp_size, rt.tp_size, dev)
    return rt


def all_reduce_grads(model: torch.nn.Module, rt: Runtime) -> None:
    """Sum gradients over the data-parallel group (losses are globally normalised, so the sum
    is the gradient of the global loss).  One flat buffer per dtype keeps it to few calls."""
    if rt.dp_size == 1:
        return
    # Every rank must reduce the same tensors: a rank with no micro-batch (or one whose step
    # is being skipped) contributes zeros.
    for p in model.parameters():
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for gs in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in gs])
        dist.all_reduce(flat, group=rt.dp_group)
        off = 0
        for g in gs:
            g.copy_(flat[off:off + g.numel()].view_as(g))
            off += g.numel()


def grad_norm(model: torch.nn.Module, rt: Runtime) -> float:
    """Global L2 norm of the gradients: TP-sharded parameters (megatron's
    ``tensor_model_parallel`` attribute) are summed across TP ranks, replicated ones counted once."""
    sharded = torch.zeros((), dtype=torch.float64, device=rt.device)
    replicated = torch.zeros((), dtype=torch.float64, device=rt.device)
    for p in model.parameters():
        if p.grad is None:
            continue
        sq = p.grad.detach().double().pow(2).sum()
        if getattr(p, "tensor_model_parallel", False):
            sharded += sq
        else:
            replicated += sq
    if rt.tp_size > 1:
        dist.all_reduce(sharded, group=rt.tp_group)
    return math.sqrt(float(sharded + replicated))


def clip_grads(model: torch.nn.Module, max_norm: float, rt: Runtime) -> float:
    """Clip gradients to global norm ``max_norm`` (0 = no clipping); returns the norm before."""
    norm = grad_norm(model, rt)
    if max_norm > 0 and math.isfinite(norm) and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(scale)
    return norm


def all_true(flag: bool, rt: Runtime) -> bool:
    """True on every rank iff ``flag`` is True on every rank."""
    if rt.world_size == 1:
        return flag
    t = torch.tensor([0 if flag else 1], dtype=torch.int64, device=rt.device)
    dist.all_reduce(t)
    return int(t) == 0


def all_gather_objects(obj: Any, rt: Runtime, group=None) -> list[Any]:
    """Every DP rank's ``obj`` in DP-rank order (pickle-free callers pass plain data)."""
    if rt.dp_size == 1 and group is None:
        return [obj]
    out: list[Any] = [None] * (dist.get_world_size(group or rt.dp_group))
    dist.all_gather_object(out, obj, group=group or rt.dp_group)
    return out


def broadcast_object(obj: Any, rt: Runtime, src: int = 0) -> Any:
    """``obj`` from global rank ``src`` on every rank."""
    if rt.world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def expected_errors() -> tuple[type, ...]:
    """Errors whose message says everything: an entry point logs them without a traceback."""
    return (JobError,)


def run_entry(fn, job, rt: Runtime, *, also: tuple[type, ...] = ()) -> int:
    """Run an entry point's ``fn(job, rt)``: 0 on success; 1 with one error line (no
    traceback) for errors that name their cause (a busy run directory, a bad data item, an
    unloadable checkpoint, a silent peer, and the entry point's own ``also``); anything else
    propagates with its traceback.

    One report per job, not one per rank: the failing ranks compare their errors
    (:func:`_who_reports`); when they all failed alike, rank 0 alone prints it (the others
    exit with the same code, silently), else each distinct error is printed once, by one of
    the ranks that had it."""
    try:
        fn(job, rt)
        return 0
    except (*expected_errors(), *also) as e:
        if _who_reports(rt, f"{type(e).__name__}: {e}"):
            log.error("%s", e)
        return 1
    except Exception as e:
        if _who_reports(rt, f"{type(e).__name__}: {e}"):
            raise
        return 1


def _who_reports(rt: Runtime, text: str, timeout_s: float = 10.0) -> bool:
    """Whether this rank prints ``text``, its error: the failing ranks gather their errors
    over the health group (waiting at most ``timeout_s`` for the others; a rank still busy
    or already gone means each rank reports its own); the lowest rank with each distinct
    error reports it."""
    if rt.world_size == 1 or rt.health_group is None or not dist.is_initialized():
        return True
    try:
        from torch.distributed.distributed_c10d import _set_pg_timeout

        _set_pg_timeout(datetime.timedelta(seconds=timeout_s), rt.health_group)
        errors: list = [None] * rt.world_size
        dist.all_gather_object(errors, text[:2000], group=rt.health_group)
    except Exception:  # noqa: BLE001 - a peer that is gone or busy: report our own
        return True
    return errors.index(text[:2000]) == rt.rank
