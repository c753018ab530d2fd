"""Checkpoints: sharded safetensors, one copy of every shard, atomic, verified, exact resume.

Layout of one checkpoint (``<root>/step_00000010/``)::

    model-tp{t}-dp{d}.safetensors   model tensors only this rank holds (see below)
    optim-tp{t}-dp{d}.safetensors   optimizer state of the same tensors
    rng-rank{r}.safetensors         torch CPU (and CUDA) RNG states, Python / NumPy (metadata)
    meta.json                       step, trainer state, layout, optimizer hyper-parameters
    manifest.json                   size and SHA-256 of every file; written last

**One copy per shard.**  A tensor sharded over data parallelism (FSDP2, ``r4b.training``)
is written by every DP rank as its own rows, with their offset; a tensor replicated over DP
(an unsharded model, a 0-d optimizer step) is written by DP rank 0 only; each TP rank writes its
own TP shards.  A TP=1, DP=8 run of r4b-4b therefore writes the model and optimizer once, not
eight times.  Loading reads, for every tensor of this rank, the saved rows its local rows
overlap, so a checkpoint loads onto **any DP size** (and into sharded or unsharded models);
the TP size must match (the files hold TP shards).  Nothing is pickled: tensors go to
safetensors, everything else to JSON.

**Atomicity.**  Every rank writes into ``<root>/.tmp-step_00000010-<nonce>/``; after a barrier
rank 0 writes ``meta.json`` and ``manifest.json``, renames the folder to a name no existing
checkpoint has (``step_00000010``, or ``step_00000010-r1`` when that step was saved before)
and only then atomically replaces ``<root>/latest``; older checkpoints are pruned after that.
What ``latest`` names is never removed or overwritten before its replacement is in place, so a
process killed at any point leaves a loadable checkpoint.  A checkpoint is *complete* when its
``manifest.json`` exists.

**Loading** (:func:`load_checkpoint` on a root folder) tries what ``latest`` names, then older
complete checkpoints, newest first, with a warning naming the file and the problem for each one
skipped: a dangling ``latest``, a missing or truncated file, a checksum mismatch, a header that
does not parse.  All ranks agree on the checkpoint they load.  Loaded weights are checked
finite (``check_finite``), and DP replicas of an unsharded model are checked equal.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import JobError
from .log import get_logger

log = get_logger(__name__)

FORMAT = "r4b-sharded-1"
_STEP_RE = re.compile(r"^step_(\d{8})(?:-r(\d+))?$")


class CheckpointError(JobError, RuntimeError):
    """A checkpoint cannot be loaded; the message names the file and what is wrong."""


# ---------------------------------------------------------------- process layout
def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _rank() -> int:
    d = _dist()
    return d.get_rank() if d else 0


def _barrier() -> None:
    d = _dist()
    if d:
        d.barrier()


@dataclass(frozen=True)
class Layout:
    """This rank's place: TP rank/size, DP rank/size and the DP process group."""

    tp_rank: int = 0
    tp_size: int = 1
    dp_rank: int = 0
    dp_size: int = 1
    rank: int = 0
    world: int = 1
    dp_group: Any = None


def _layout() -> Layout:
    d = _dist()
    if d is None:
        return Layout()
    try:
        from megatron.core import parallel_state as ps

        if ps.model_parallel_is_initialized():
            return Layout(tp_rank=ps.get_tensor_model_parallel_rank(),
                          tp_size=ps.get_tensor_model_parallel_world_size(),
                          dp_rank=ps.get_data_parallel_rank(),
                          dp_size=ps.get_data_parallel_world_size(), rank=d.get_rank(),
                          world=d.get_world_size(), dp_group=ps.get_data_parallel_group())
    except ImportError:  # pragma: no cover - megatron is a dependency
        pass
    return Layout(dp_rank=d.get_rank(), dp_size=d.get_world_size(), rank=d.get_rank(),
                  world=d.get_world_size(), dp_group=None)


def _all_min(flag: bool, lay: Layout) -> bool:
    """True on every rank iff ``flag`` is True on every rank."""
    d = _dist()
    if d is None or lay.world == 1:
        return flag
    dev = torch.device("cuda", torch.cuda.current_device()) if d.get_backend() == "nccl" \
        else torch.device("cpu")
    t = torch.tensor([1 if flag else 0], dtype=torch.int64, device=dev)
    d.all_reduce(t, op=d.ReduceOp.MIN)
    return bool(t.item())


def _gather(obj, lay: Layout) -> list:
    d = _dist()
    if d is None or lay.world == 1:
        return [obj]
    out: list = [None] * lay.world
    d.all_gather_object(out, obj)
    return out


# ---------------------------------------------------------------- tensors and their shards
def _state_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Live parameters and persistent buffers of ``model`` by state-dict name (a tied weight
    appears once)."""
    out = dict(model.named_parameters())
    persistent = set(model.state_dict().keys())
    for name, b in model.named_buffers():
        if name in persistent:
            out[name] = b
    return out


def _piece(t: torch.Tensor) -> tuple[torch.Tensor, int, tuple[int, ...], bool]:
    """``(local rows, their offset along dim 0, global shape, sharded over DP)`` of ``t``."""
    from torch.distributed.tensor import DTensor, Shard

    if isinstance(t, DTensor):
        placements = t.placements
        if any(not isinstance(p, Shard) or p.dim != 0 for p in placements) or len(placements) != 1:
            raise CheckpointError(f"unsupported DTensor placements {placements} (expected "
                                  f"[Shard(0)] over the DP mesh)")
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        _, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, placements)
        return t.to_local(), int(offset[0]) if offset else 0, tuple(t.shape), True
    return t, 0, tuple(t.shape), False


def _writes(lay: Layout, sharded: bool, shape: tuple[int, ...]) -> bool:
    """Whether this rank writes its piece: every rank a DP shard, DP rank 0 a replica."""
    return sharded or lay.dp_rank == 0


def _crash_point(name: str) -> None:
    """Named points inside :func:`save_checkpoint` (tests make them raise to simulate a kill)."""


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None):
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    save_file(tensors, str(path), metadata=metadata)
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, obj) -> None:
    with open(path, "w") as fh:
        json.dump(obj, fh, indent=1, default=str)
        fh.flush()
        os.fsync(fh.fileno())


# ---------------------------------------------------------------- optimizer state
def _param_names(model: torch.nn.Module) -> dict[int, str]:
    return {id(p): n for n, p in model.named_parameters()}


def _optimizer_pieces(model, optimizer) -> dict[str, torch.Tensor]:
    """Optimizer state tensors keyed ``<param name>/<state key>``."""
    names = _param_names(model)
    out = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for k, v in optimizer.state.get(p, {}).items():
                if not isinstance(v, torch.Tensor):
                    raise CheckpointError(f"optimizer state {names.get(id(p), '?')}/{k} is a "
                                          f"{type(v).__name__}, not a tensor")
                out[f"{names[id(p)]}/{k}"] = v
    return out


def _param_groups_json(optimizer) -> list[dict]:
    groups = []
    for g in optimizer.param_groups:
        groups.append({k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()
                       if k != "params" and _jsonable(v)})
    return groups


def _jsonable(v) -> bool:
    try:
        json.dumps(v)
        return True
    except TypeError:
        return isinstance(v, tuple)


# ---------------------------------------------------------------- RNG
def _rng_tensors() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    t = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        t["torch_cuda"] = torch.cuda.get_rng_state()
    py = random.getstate()
    st = np.random.get_state()
    meta = {"python": json.dumps([py[0], list(py[1]), py[2]]),
            "numpy": json.dumps([st[0], st[1].tolist(), int(st[2]), int(st[3]), float(st[4])])}
    return t, meta


def _restore_rng(path: Path) -> None:
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    torch.set_rng_state(tensors["torch_cpu"])
    if "torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["torch_cuda"])
    v, s, g = json.loads(meta["python"])
    random.setstate((v, tuple(s), g))
    a, keys, pos, has_g, cached = json.loads(meta["numpy"])
    np.random.set_state((a, np.array(keys, dtype=np.uint32), pos, has_g, cached))


# ---------------------------------------------------------------- save
def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _checkpoint_key(path: Path) -> tuple[int, int] | None:
    m = _STEP_RE.match(path.name)
    return None if m is None else (int(m.group(1)), int(m.group(2) or 0))


def complete_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under ``root`` (``manifest.json`` present), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(k, p) for p in root.iterdir() if p.is_dir()
             and (k := _checkpoint_key(p)) is not None and (p / "manifest.json").is_file()]
    return [p for _, p in sorted(found)]


def _final_name(root: Path, step: int) -> Path:
    base = root / step_dir_name(step)
    if not base.exists():
        return base
    k = 1
    while (root / f"{step_dir_name(step)}-r{k}").exists():
        k += 1
    return root / f"{step_dir_name(step)}-r{k}"


def save_checkpoint(root: str | os.PathLike, step: int, *, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None = None, state: dict | None = None,
                    keep_last: int | None = 2) -> Path:
    """Write checkpoint ``step`` under ``root`` atomically (collective over all ranks).

    ``state`` is JSON-serialisable trainer state (data cursor, counters, history, ...).
    ``keep_last`` prunes older complete checkpoints after ``latest`` moved (None keeps all).
    """
    root = Path(root)
    lay = _layout()
    nonce = secrets.token_hex(4) if lay.rank == 0 else None
    if lay.world > 1:
        nonce = _broadcast(nonce)
    tmp = root / f".tmp-{step_dir_name(step)}-{nonce}"
    if lay.rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-step_*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    suffix = f"tp{lay.tp_rank:02d}-dp{lay.dp_rank:03d}"
    files = []
    for kind, tensors in (("model", _state_tensors(model)),
                          ("optim", _optimizer_pieces(model, optimizer) if optimizer else None)):
        if tensors is None:
            continue
        out, index = {}, {}
        for name, t in tensors.items():
            local, offset, shape, sharded = _piece(t)
            if _writes(lay, sharded, shape):
                out[name] = local
                index[name] = {"offset": offset, "shape": list(shape)}
        path = tmp / f"{kind}-{suffix}.safetensors"
        _save_tensors(out, path, {"format": FORMAT, "r4b_index": json.dumps(index)})
        files.append(path.name)
        _crash_point(f"after {kind}")
    rng, rng_meta = _rng_tensors()
    rng_path = tmp / f"rng-rank{lay.rank}.safetensors"
    _save_tensors(rng, rng_path, rng_meta)
    files.append(rng_path.name)
    digests = {f: {"bytes": (tmp / f).stat().st_size, "sha256": _sha256(tmp / f)} for f in files}
    all_digests = _gather(digests, lay)
    _barrier()
    final = None
    if lay.rank == 0:
        _write_json(tmp / "meta.json", {
            "format": FORMAT, "step": step, "state": state or {},
            "layout": {"tp_size": lay.tp_size, "dp_size": lay.dp_size, "world_size": lay.world},
            "optimizer": None if optimizer is None else {
                "class": type(optimizer).__name__, "param_groups": _param_groups_json(optimizer)}})
        manifest = {"format": FORMAT, "files": {}}
        for d in all_digests:
            manifest["files"].update(d)
        manifest["files"]["meta.json"] = {"bytes": (tmp / "meta.json").stat().st_size,
                                          "sha256": _sha256(tmp / "meta.json")}
        _write_json(tmp / "manifest.json", manifest)
        _fsync_dir(tmp)
        _crash_point("before rename")
        final = _final_name(root, step)
        os.rename(tmp, final)
        _fsync_dir(root)
        _crash_point("after rename")
        ptr_tmp = root / ".latest.tmp"
        ptr_tmp.write_text(final.name + "\n")
        with open(ptr_tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(ptr_tmp, root / "latest")
        _fsync_dir(root)
        _crash_point("after latest")
        if keep_last is not None:
            done = complete_checkpoints(root)
            for old in done[:-keep_last]:
                if old != final:
                    shutil.rmtree(old, ignore_errors=True)
        log.info("checkpoint step %d written to %s", step, final)
    final = Path(_broadcast(str(final) if final else None)) if lay.world > 1 else final
    _barrier()
    return final


def _broadcast(obj):
    d = _dist()
    if d is None:
        return obj
    box = [obj]
    d.broadcast_object_list(box, src=0)
    return box[0]


# ---------------------------------------------------------------- find
def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The checkpoint ``root/latest`` names when it is complete; otherwise the newest complete
    checkpoint under ``root``, with a warning; None when there is none."""
    root = Path(root)
    ptr = root / "latest"
    if ptr.exists():
        target = root / ptr.read_text().strip()
        if (target / "manifest.json").is_file():
            return target
        done = complete_checkpoints(root)
        if done:
            log.warning("%s names %s, which is not a complete checkpoint; using the newest "
                        "complete one, %s", ptr, target.name, done[-1].name)
            return done[-1]
        log.warning("%s names %s, which is not a complete checkpoint, and %s holds no other",
                    ptr, target.name, root)
        return None
    done = complete_checkpoints(root)
    return done[-1] if done else None


def _candidates(path: Path) -> tuple[list[Path], bool]:
    """Checkpoints to try for ``path`` (a root: latest first, then older complete ones) and
    whether falling back is allowed."""
    if (path / "manifest.json").is_file() or _checkpoint_key(path) is not None:
        return [path], False
    first = latest_checkpoint(path)
    if first is None:
        raise FileNotFoundError(f"{path} holds no complete checkpoint")
    rest = [p for p in reversed(complete_checkpoints(path)) if p != first]
    return [first] + rest, True


# ---------------------------------------------------------------- load
@dataclass
class Loaded:
    step: int
    state: dict
    path: Path


class _Reader:
    """The saved pieces of one kind (model / optim) for this TP rank, with checked files."""

    def __init__(self, ckpt: Path, kind: str, lay: Layout, manifest: dict, verify: bool):
        self.files = sorted(ckpt.glob(f"{kind}-tp{lay.tp_rank:02d}-dp*.safetensors"))
        if not self.files:
            raise CheckpointError(f"{ckpt} holds no {kind}-tp{lay.tp_rank:02d}-dp*.safetensors: "
                                  f"was it written with another tensor-parallel size?")
        self.pieces: dict[str, list[tuple[int, tuple[int, ...], Path]]] = {}
        self._handles: dict[Path, Any] = {}
        for f in self.files:
            _check_file(f, manifest, verify)
            try:
                h = safe_open(str(f), framework="pt")
                meta = h.metadata() or {}
                index = json.loads(meta.get("r4b_index", "{}"))
            except Exception as e:  # safetensors raises its own types for bad headers
                raise CheckpointError(f"cannot read {f}: {e}") from e
            self._handles[f] = h
            for name, info in index.items():
                self.pieces.setdefault(name, []).append((int(info["offset"]),
                                                         tuple(info["shape"]), f))

    def names(self) -> set[str]:
        return set(self.pieces)

    def read_into(self, name: str, live: torch.Tensor) -> None:
        """Copy the saved rows of ``name`` that overlap ``live``'s local rows into it."""
        local, offset, shape, _ = _piece(live)
        pieces = self.pieces[name]
        if pieces[0][1] != shape:
            raise CheckpointError(f"{pieces[0][2]}: {name} has shape {list(pieces[0][1])}, the "
                                  f"model's is {list(shape)}")
        if local.dim() == 0 or not shape:
            with torch.no_grad():
                local.copy_(self._handles[pieces[0][2]].get_tensor(name))
            return
        rows = local.shape[0]
        lo, hi = offset, offset + rows
        covered = 0
        with torch.no_grad():
            for off, _, f in pieces:
                sl = self._handles[f].get_slice(name)
                n = sl.get_shape()[0]
                a, b = max(lo, off), min(hi, off + n)
                if a >= b:
                    continue
                part = sl[a - off:b - off]
                local[a - lo:b - lo].copy_(part)
                covered += b - a
        if covered != rows:
            raise CheckpointError(f"{name}: the saved shards cover {covered} of this rank's "
                                  f"{rows} rows (offset {lo}); the checkpoint is incomplete")


def _check_file(f: Path, manifest: dict, verify: bool) -> None:
    info = manifest.get("files", {}).get(f.name)
    if info is None:
        raise CheckpointError(f"{f} is not listed in {f.parent / 'manifest.json'}")
    size = f.stat().st_size
    if size != info["bytes"]:
        raise CheckpointError(f"{f} has {size} bytes, the manifest says {info['bytes']} "
                              f"(truncated or overwritten)")
    if verify and _sha256(f) != info["sha256"]:
        raise CheckpointError(f"{f}: SHA-256 does not match the manifest (corrupted)")


def _load_one(ckpt: Path, model, optimizer, *, restore_rng_state: bool, strict: bool,
              verify: bool, check_finite: bool) -> Loaded:
    lay = _layout()
    for must in ("manifest.json", "meta.json"):
        if not (ckpt / must).is_file():
            raise CheckpointError(f"{ckpt} has no {must}: not a complete checkpoint")
    try:
        manifest = json.loads((ckpt / "manifest.json").read_text())
        meta_file = ckpt / "meta.json"
        _check_file(meta_file, manifest, verify)
        meta = json.loads(meta_file.read_text())
    except (json.JSONDecodeError, KeyError) as e:
        raise CheckpointError(f"{ckpt}: unreadable manifest.json / meta.json ({e})") from e
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{ckpt}/meta.json: format {meta.get('format')!r}, expected {FORMAT!r}")
    saved_tp = meta["layout"]["tp_size"]
    if saved_tp != lay.tp_size:
        raise CheckpointError(f"{ckpt} was written at tensor-parallel size {saved_tp}; this run "
                              f"has {lay.tp_size}")
    reader = _Reader(ckpt, "model", lay, manifest, verify)
    live = _state_tensors(model)
    missing = sorted(set(live) - reader.names())
    unexpected = sorted(reader.names() - set(live))
    if strict and (missing or unexpected):
        raise CheckpointError(f"{reader.files[0].parent}: model keys do not match: missing "
                              f"{missing[:8]}{'...' if len(missing) > 8 else ''}, unexpected "
                              f"{unexpected[:8]}{'...' if len(unexpected) > 8 else ''}")
    for name, t in live.items():
        if name in reader.pieces:
            reader.read_into(name, t)
    if optimizer is not None:
        if meta.get("optimizer") is None:
            raise CheckpointError(f"{ckpt} holds no optimizer state")
        _load_optimizer(ckpt, model, optimizer, meta["optimizer"], lay, manifest, verify)
    if restore_rng_state:
        rng = ckpt / f"rng-rank{lay.rank}.safetensors"
        if meta["layout"]["world_size"] != lay.world or not rng.exists():
            log.warning("%s was written by %d ranks, this run has %d: RNG states not restored",
                        ckpt, meta["layout"]["world_size"], lay.world)
        else:
            _check_file(rng, manifest, verify)
            _restore_rng(rng)
    if check_finite:
        bad = [n for n, t in live.items() if t.is_floating_point()
               and not bool(torch.isfinite(_piece(t)[0]).all())]
        if bad:
            raise CheckpointError(f"{ckpt}: non-finite values in {bad[:5]} "
                                  f"({len(bad)} tensors); pass check_finite=False to load anyway")
    _check_replicas(model, lay, ckpt)
    return Loaded(step=int(meta["step"]), state=meta.get("state", {}), path=ckpt)


def _load_optimizer(ckpt, model, optimizer, saved: dict, lay, manifest, verify) -> None:
    if saved["class"] != type(optimizer).__name__:
        raise CheckpointError(f"{ckpt}/meta.json: optimizer {saved['class']}, the run uses "
                              f"{type(optimizer).__name__}")
    groups = saved["param_groups"]
    if len(groups) != len(optimizer.param_groups):
        raise CheckpointError(f"{ckpt}/meta.json: {len(groups)} optimizer param groups, the run "
                              f"has {len(optimizer.param_groups)}")
    reader = _Reader(ckpt, "optim", lay, manifest, verify)
    names = _param_names(model)
    by_param: dict[str, list[str]] = {}
    for key in reader.names():
        pname, _, k = key.rpartition("/")
        by_param.setdefault(pname, []).append(k)
    for g, sg in zip(optimizer.param_groups, groups):
        for k, v in sg.items():
            g[k] = tuple(v) if isinstance(g.get(k), tuple) else v
        for p in g["params"]:
            pname = names[id(p)]
            st = optimizer.state.setdefault(p, {})
            for k in by_param.get(pname, []):
                shape = reader.pieces[f"{pname}/{k}"][0][1]
                if k not in st:
                    if shape == tuple(p.shape):
                        st[k] = torch.zeros_like(p.detach())
                    else:
                        dtype = reader._handles[reader.pieces[f"{pname}/{k}"][0][2]] \
                            .get_slice(f"{pname}/{k}").get_dtype()
                        st[k] = torch.zeros(shape, dtype=_st_dtype(dtype), device="cpu")
                reader.read_into(f"{pname}/{k}", st[k])


def _st_dtype(name: str) -> torch.dtype:
    return {"F32": torch.float32, "F64": torch.float64, "BF16": torch.bfloat16,
            "F16": torch.float16, "I64": torch.int64, "I32": torch.int32}[name]


def _check_replicas(model, lay: Layout, ckpt: Path) -> None:
    """DP replicas of tensors that are not DP-sharded must hold identical values."""
    d = _dist()
    if d is None or lay.dp_size == 1 or lay.dp_group is None:
        return
    sums = []
    for t in _state_tensors(model).values():
        local, _, _, sharded = _piece(t)
        if not sharded and t.is_floating_point():
            sums.append(local.detach().double().sum())  # one number per tensor, on its device
    if not sums:
        return
    mine = torch.stack(sums)
    lo, hi = mine.clone(), mine.clone()
    d.all_reduce(lo, op=d.ReduceOp.MIN, group=lay.dp_group)
    d.all_reduce(hi, op=d.ReduceOp.MAX, group=lay.dp_group)
    if not torch.equal(lo, hi):
        raise CheckpointError(f"after loading {ckpt}, data-parallel replicas hold different "
                              f"weights")


def load_checkpoint(path: str | os.PathLike, *, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None = None, restore_rng_state: bool = True,
                    strict: bool = True, verify_checksums: bool = True,
                    check_finite: bool = True) -> Loaded:
    """Load a checkpoint written by :func:`save_checkpoint` into ``model`` (and ``optimizer``),
    resharding over data parallelism as needed (a collective over all ranks).

    ``path`` is a checkpoint folder, or a root folder: then ``latest`` is tried first and older
    complete checkpoints after it, each skipped one with a warning that names the file.
    Raises :class:`CheckpointError` (or ``FileNotFoundError`` when there is nothing to load).
    """
    path = Path(path)
    candidates, fallback = _candidates(path)
    lay = _layout()
    errors = []
    for ck in candidates:
        err = None
        try:
            loaded = _load_one(ck, model, optimizer, restore_rng_state=restore_rng_state,
                               strict=strict, verify=verify_checksums, check_finite=check_finite)
        except (CheckpointError, OSError) as e:
            err, loaded = str(e), None
        if _all_min(err is None, lay):
            if errors:
                log.warning("loaded %s after skipping %d newer checkpoint(s)", ck, len(errors))
            return loaded
        errors.append(f"{ck.name}: {err or 'failed on another rank'}")
        if not fallback:
            break
        log.warning("checkpoint %s cannot be loaded (%s); trying an older one", ck,
                    err or "failed on another rank")
    raise CheckpointError("no loadable checkpoint: " + "; ".join(errors))


def checkpoint_bytes(ckpt: str | os.PathLike) -> dict[str, int]:
    """Bytes per file kind (model / optim / rng / json) of one checkpoint folder."""
    out: dict[str, int] = {}
    for f in Path(ckpt).iterdir():
        kind = f.name.split("-")[0].split(".")[0]
        out[kind] = out.get(kind, 0) + f.stat().st_size
    return out

