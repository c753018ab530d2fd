"""Checkpoints: safetensors only, written atomically, resumable exactly.

Layout of one checkpoint (``<root>/step_00000010/``)::

    model-rank{r}.safetensors   this rank's model shard (TP/PP shards are per rank)
    optim-rank{r}.safetensors   optimizer tensors + param_groups (JSON in the metadata)
    rng-rank{r}.safetensors     torch CPU (and CUDA) RNG states of the rank
    meta.json                   step, config, trainer state (JSON), written by rank 0

Atomicity: every rank writes into ``<root>/.tmp-step_00000010/``; after a barrier rank 0
fsyncs and renames it to its final name and then atomically replaces ``<root>/latest`` (a
one-line text file).  A process killed at any point leaves the previous checkpoint and the
``latest`` pointer untouched; stale ``.tmp-*`` folders are removed by the next save.
Nothing is pickled: tensors go to safetensors, everything else to JSON.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .log import get_logger

log = get_logger(__name__)


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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None):
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    save_file(tensors, str(path), metadata=metadata)
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state_dict tensors (non-tensor entries such as megatron's empty
    ``_extra_state`` placeholders carry no data and are left out)."""
    return {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


# ---------------------------------------------------------------- optimizer <-> flat tensors
def optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Flatten an optimizer state_dict into safetensors-compatible tensors + JSON metadata."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state.{pid}.{k}"] = v
            else:
                scalars[f"{pid}.{k}"] = v
    meta = {"param_groups": json.dumps(sd["param_groups"]), "scalars": json.dumps(scalars)}
    return tensors, meta


def optimizer_from_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                           meta: dict[str, str]) -> None:
    """Inverse of :func:`optimizer_to_tensors`; loads into ``optimizer`` in place."""
    state: dict[int, dict[str, Any]] = {}
    for name, t in tensors.items():
        _, pid, k = name.split(".", 2)
        state.setdefault(int(pid), {})[k] = t
    for name, v in json.loads(meta.get("scalars", "{}")).items():
        pid, k = name.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})


# ---------------------------------------------------------------- RNG
def rng_state_tensors() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    t = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        t["torch_cuda"] = torch.cuda.get_rng_state()
    py = random.getstate()
    meta = {"python": json.dumps([py[0], list(py[1]), py[2]]),
            "numpy": json.dumps(_np_state_to_json(np.random.get_state()))}
    return t, meta


def _np_state_to_json(st):
    return [st[0], st[1].tolist(), int(st[2]), int(st[3]), float(st[4])]


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if "torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["torch_cuda"])
    v, s, g = json.loads(meta["python"])
    random.setstate((v, tuple(s), g))
    a, keys, pos, has_g, cached = json.loads(meta["numpy"])
    np.random.set_state((a, np.array(keys, dtype=np.uint32), pos, has_g, cached))


# ---------------------------------------------------------------- save / load
def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def save_checkpoint(root: str | os.PathLike, step: int, *, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None = None, state: dict | None = None,
                    keep_last: int | None = 2) -> Path:
    """Write checkpoint ``step`` under ``root`` atomically (collective over all ranks).

    ``state`` is JSON-serialisable trainer state (config, data cursor, counters, ...).
    ``keep_last`` prunes older complete checkpoints (None keeps all).
    """
    root = Path(root)
    rank = _rank()
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{step_dir_name(step)}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-step_*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    _save_tensors(model_tensors(model), tmp / f"model-rank{rank}.safetensors")
    if optimizer is not None:
        t, meta = optimizer_to_tensors(optimizer)
        _save_tensors(t, tmp / f"optim-rank{rank}.safetensors", meta)
    t, meta = rng_state_tensors()
    _save_tensors(t, tmp / f"rng-rank{rank}.safetensors", meta)
    if rank == 0:
        with open(tmp / "meta.json", "w") as fh:
            json.dump({"step": step, "state": state or {}}, fh, indent=1, default=str)
            fh.flush()
            os.fsync(fh.fileno())
    _barrier()
    if rank == 0:
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        ptr_tmp = root / ".latest.tmp"
        ptr_tmp.write_text(final.name + "\n")
        with open(ptr_tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(ptr_tmp, root / "latest")
        _fsync_dir(root)
        if keep_last is not None:
            done = sorted(p for p in root.glob("step_*") if p.is_dir())
            for old in done[:-keep_last]:
                if old != final:
                    shutil.rmtree(old, ignore_errors=True)
        log.info("checkpoint step %d written to %s", step, final)
    _barrier()
    return final


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The checkpoint that ``root/latest`` points to, or None when there is none."""
    ptr = Path(root) / "latest"
    if not ptr.exists():
        return None
    path = Path(root) / ptr.read_text().strip()
    if not (path / "meta.json").exists():
        raise FileNotFoundError(f"{ptr} points to {path}, which is not a complete checkpoint")
    return path


@dataclass
class Loaded:
    step: int
    state: dict
    path: Path


def load_checkpoint(path: str | os.PathLike, *, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None = None, restore_rng_state: bool = True,
                    strict: bool = True) -> Loaded:
    """Load a checkpoint written by :func:`save_checkpoint` into ``model`` (and ``optimizer``).

    ``path`` is a checkpoint folder or a root folder holding a ``latest`` pointer.
    """
    path = Path(path)
    if (path / "latest").exists():
        path = latest_checkpoint(path)
    rank = _rank()
    mfile = path / f"model-rank{rank}.safetensors"
    if not mfile.exists():
        raise FileNotFoundError(f"checkpoint {path} has no {mfile.name}: was it written with "
                                f"a different number of ranks?")
    sd = load_file(str(mfile))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("._extra_state")]
    if strict and (missing or unexpected):
        raise KeyError(f"checkpoint {mfile}: missing keys {missing}, unexpected keys {unexpected}")
    if optimizer is not None:
        ofile = path / f"optim-rank{rank}.safetensors"
        from safetensors import safe_open

        with safe_open(str(ofile), framework="pt") as f:
            meta = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        optimizer_from_tensors(optimizer, tensors, meta)
    if restore_rng_state:
        from safetensors import safe_open

        with safe_open(str(path / f"rng-rank{rank}.safetensors"), framework="pt") as f:
            restore_rng({k: f.get_tensor(k) for k in f.keys()}, f.metadata())
    meta = json.loads((path / "meta.json").read_text())
    return Loaded(step=int(meta["step"]), state=meta.get("state", {}), path=path)
