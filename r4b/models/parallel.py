"""Process-group setup for the model: torch.distributed + megatron-core ``parallel_state``.

The model's tensor-parallel layers come from megatron-core and look up their process group in
``parallel_state``.  These helpers initialise it on either kind of machine:

* CPU: the ``gloo`` backend (megatron-core's TP layers run on CPU with gloo);
* GPU: ``nccl``, one device per local rank.

:func:`init_model_parallel` is what entry points call (under ``torchrun`` it reads ``RANK``,
``WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT`` from the environment).  :func:`ensure_model_parallel`
is what model construction calls: when nothing is initialised yet it sets up a one-process
group (TP=1, PP=1), so a model can be built in a notebook, a test or a single-process job
without any ceremony.
"""

from __future__ import annotations

import datetime
import os
import socket
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..log import get_logger

log = get_logger(__name__)


def _parallel_state():
    # megatron-core warns at import that Apex / Transformer-Engine are absent; that is the
    # expected state on CPU machines, so the warnings are silenced here (once).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        from megatron.core import parallel_state
    return parallel_state


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (for single-node rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def default_backend() -> str:
    """``nccl`` when CUDA is available, else ``gloo``."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(backend: str | None = None, *, timeout_s: float | None = None) -> None:
    """Initialise ``torch.distributed`` once (no-op when already initialised).

    Reads ``RANK``/``WORLD_SIZE`` (default 0/1) and ``MASTER_ADDR``/``MASTER_PORT`` (without
    them: 127.0.0.1 and a free port, for one process only; the environment is left as it is).  On ``nccl`` the current CUDA
    device is set to ``LOCAL_RANK``.
    """
    if dist.is_initialized():
        return
    backend = backend or default_backend()
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and "MASTER_PORT" not in os.environ:
        raise RuntimeError(f"WORLD_SIZE={world} but MASTER_PORT is not set; launch with torchrun "
                           "or set MASTER_ADDR/MASTER_PORT")
    kw = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
    if "MASTER_PORT" in os.environ:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    else:
        # One process: a free port of its own, passed directly rather than written into
        # os.environ, where every subprocess started later would inherit a port that this
        # process's store still holds (EADDRINUSE in a later single-process launch).
        kw["init_method"] = f"tcp://127.0.0.1:{free_port()}"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, rank=rank, world_size=world, **kw)
    log.info("torch.distributed initialised: backend=%s rank=%d world=%d", backend, rank, world)


def init_model_parallel(tp_size: int = 1, pp_size: int = 1, *, backend: str | None = None,
                        timeout_s: float | None = None) -> None:
    """Initialise torch.distributed (if needed) and megatron-core's model-parallel groups.

    Raises ``ValueError`` when the world size is not a multiple of ``tp_size * pp_size`` and
    ``RuntimeError`` when groups with different sizes are already initialised.
    """
    if tp_size < 1 or pp_size < 1:
        raise ValueError(f"tp_size and pp_size must be >= 1, got tp_size={tp_size}, pp_size={pp_size}")
    init_distributed(backend, timeout_s=timeout_s)
    ps = _parallel_state()
    if ps.model_parallel_is_initialized():
        have = (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size())
        if have != (tp_size, pp_size):
            raise RuntimeError(f"model parallel groups already initialised with (tp, pp)={have}, "
                               f"asked for ({tp_size}, {pp_size}); call destroy_model_parallel() first")
        return
    world = dist.get_world_size()
    if world % (tp_size * pp_size):
        raise ValueError(f"world size {world} is not a multiple of tp_size*pp_size = "
                         f"{tp_size}*{pp_size}")
    kw = {} if timeout_s is None else {"distributed_timeout_minutes": max(1, int(timeout_s // 60))}
    ps.initialize_model_parallel(tensor_model_parallel_size=tp_size,
                                 pipeline_model_parallel_size=pp_size, **kw)


def ensure_model_parallel() -> None:
    """Make sure model-parallel groups exist; sets up a one-process TP=1/PP=1 world if not."""
    ps = _parallel_state()
    if ps.model_parallel_is_initialized():
        return
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise RuntimeError("WORLD_SIZE > 1 but torch.distributed is not initialised; call "
                           "r4b.models.parallel.init_model_parallel(tp_size, pp_size) first")
    init_model_parallel(1, 1)


def destroy_model_parallel() -> None:
    """Tear down megatron's groups and the default process group (for tests and re-init)."""
    ps = _parallel_state()
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


@dataclass(frozen=True)
class ParallelInfo:
    """This rank's place in the model-parallel layout."""

    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    tp_group: object
    pp_group: object


def parallel_info() -> ParallelInfo:
    """Ranks, sizes and groups of the current model-parallel layout (initialising TP=PP=1 if needed)."""
    ensure_model_parallel()
    ps = _parallel_state()
    return ParallelInfo(
        tp_rank=ps.get_tensor_model_parallel_rank(),
        tp_size=ps.get_tensor_model_parallel_world_size(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        pp_size=ps.get_pipeline_model_parallel_world_size(),
        tp_group=ps.get_tensor_model_parallel_group(),
        pp_group=ps.get_pipeline_model_parallel_group(),
    )


def is_data_parallel_rank0() -> bool:
    """True on the first data-parallel replica (the one that writes shared files)."""
    ps = _parallel_state()
    if not ps.model_parallel_is_initialized():
        return True
    return ps.get_data_parallel_rank() == 0


def megatron_config(params_dtype: torch.dtype, *, tp_size: int, pp_size: int = 1,
                    perform_initialization: bool = True, hidden_size: int | None = None):
    """The megatron-core ``ModelParallelConfig`` our TP layers and PP schedules read.

    Weights are always initialised on CPU (``use_cpu_initialization``): megatron then draws the
    full master weight from the default torch generator and keeps this rank's slice, so a model
    built with TP=2 holds exactly the slices of the TP=1 model built with the same seed, and no
    CUDA RNG tracker is needed.  ``variable_seq_lengths`` lets the pipeline schedules send
    packed micro-batches whose token count changes from step to step.

    megatron's schedules also read a few ``TransformerConfig`` fields that a plain
    ``ModelParallelConfig`` lacks; they are set as extra attributes, to TransformerConfig's
    defaults: ``calculate_per_token_loss=False`` (read when a loss function returns
    ``(loss, num_tokens, metrics)``), ``fine_grained_activation_offloading=False`` (read at
    the end of every schedule call that runs backward) and, when given, ``hidden_size`` (the
    PP>1 schedules' p2p tensor shape ``[T, 1, H]``).
    """
    from megatron.core import ModelParallelConfig

    config = ModelParallelConfig(
        tensor_model_parallel_size=tp_size,
        pipeline_model_parallel_size=pp_size,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        use_cpu_initialization=True,
        perform_initialization=perform_initialization,
        variable_seq_lengths=True,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
    )
    config.calculate_per_token_loss = False
    config.fine_grained_activation_offloading = False
    if hidden_size is not None:
        config.hidden_size = hidden_size
    return config


def mark_tensor_parallel_attributes(module: torch.nn.Module) -> int:
    """Give every megatron tensor-parallel parameter under ``module`` its TP attributes
    (``tensor_model_parallel``, ``partition_dim``, ``partition_stride``) when they are missing.

    megatron-core sets them only while drawing initial weights, so a model built with
    ``perform_initialization=False`` (to load a checkpoint) would otherwise look replicated to
    the TP-aware gradient norm.  Returns how many parameters were marked.
    """
    from megatron.core.tensor_parallel import (ColumnParallelLinear, RowParallelLinear,
                                               VocabParallelEmbedding)
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

    marked = 0
    for sub in module.modules():
        if isinstance(sub, (ColumnParallelLinear, VocabParallelEmbedding)):
            dims = {"weight": 0, "bias": 0}
        elif isinstance(sub, RowParallelLinear):
            dims = {"weight": 1}  # its bias is added after the all-reduce: replicated
        else:
            continue
        for name, dim in dims.items():
            p = getattr(sub, name, None)
            if isinstance(p, torch.Tensor) and not hasattr(p, "tensor_model_parallel"):
                set_tensor_model_parallel_attributes(p, True, dim, 1)
                marked += 1
    return marked
