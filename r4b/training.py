"""How the trained model is held across data-parallel ranks: sharding, mixed precision,
activation recomputation, gradient norm and clipping.

**Implementation: torch FSDP2** (``torch.distributed.fsdp.fully_shard``).  megatron-core's
``DistributedDataParallel`` + ``DistributedOptimizer`` is the engine Megatron users scale on,
but its buffers are allocated with ``torch.cuda.current_device()`` and it cannot run on a CPU
with gloo, where r4b's CI runs the real path.  FSDP2 runs on both gloo and NCCL and gives:

* **fp32 master weights, bf16 compute**: parameters are built and stored in fp32 (sharded
  over DP); ``MixedPrecisionPolicy(param_dtype=<ModelConfig.params_dtype>,
  reduce_dtype=float32)`` all-gathers them in the compute dtype for each forward / backward and
  reduce-scatters gradients in fp32 into fp32 sharded gradients, so micro-batch accumulation,
  the DP reduction and AdamW's moments are fp32 (pure-bf16 AdamW loses the update at RL
  learning rates);
* **sharded optimizer state** (ZeRO-3: parameters, gradients and AdamW moments are all split
  over the DP ranks; each rank steps only its shard);
* **communication overlapped with backward**: each decoder layer and vision block is its own
  FSDP unit, so its gradient reduce-scatter runs while earlier layers compute, and the next
  unit's all-gather is prefetched;
* sharded state dicts (DTensor) for ``torch.distributed.checkpoint`` (:mod:`r4b.checkpoint`).

Tensor parallelism stays megatron-core's: FSDP shards each TP rank's local parameters over the
DP group only (a 2-D layout: TP inside, FSDP across).  Gradients are **summed** over DP (the
losses are normalised over the global batch), not averaged.

**Recomputation** (:func:`set_recompute`): ``"full"`` keeps only each decoder layer's (and
vision block's) input and recomputes the layer in backward; ``"selective"`` recomputes the
attention core and the MLP activation, the parts whose saved tensors are large and cheap to
recompute; ``"none"`` saves everything.  Gradients are identical in all three.

Generation runs on the same module: :func:`full_params` gathers every shard once for the whole
rollout (in the compute dtype) instead of once per decoding step.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator, Literal

import torch
import torch.distributed as dist

from .config import require_choice
from .log import get_logger

log = get_logger(__name__)

RECOMPUTE = ("none", "selective", "full")
_TP_ATTRS = ("tensor_model_parallel", "partition_dim", "partition_stride")


@dataclass(kw_only=True)
class TrainingConfig:
    """How the trained model is sharded and how much of its activations is kept."""

    recompute: Literal["none", "selective", "full"] = "none"
    """Activation recomputation of decoder layers and vision blocks: 'none', 'selective'
    (attention core and MLP activation) or 'full' (whole layers; only layer inputs are kept)."""
    reshard_after_forward: bool = True
    """Free each layer's gathered weights after its forward and gather them again for backward
    (ZeRO-3); False keeps them until backward (less communication, more memory)."""

    def __post_init__(self):
        require_choice("training.recompute", self.recompute, RECOMPUTE)
        if not isinstance(self.reshard_after_forward, bool):
            raise TypeError(f"training.reshard_after_forward must be a bool, got "
                            f"{self.reshard_after_forward!r}")


# ---------------------------------------------------------------- recomputation
def set_recompute(model: torch.nn.Module, mode: str) -> int:
    """Set the recomputation mode of every decoder layer and vision block; returns how many
    modules were set."""
    require_choice("recompute", mode, RECOMPUTE)
    from .models.lm import DecoderLayer
    from .models.vision import VisionEncoderLayer

    n = 0
    for m in model.modules():
        if isinstance(m, (DecoderLayer, VisionEncoderLayer)):
            m.recompute = mode
            n += 1
    return n


# ---------------------------------------------------------------- sharding
def _fsdp():
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    return FSDPModule, MixedPrecisionPolicy, fully_shard


def is_sharded(model: torch.nn.Module) -> bool:
    """True when ``model`` is wrapped by :func:`shard_model`."""
    FSDPModule = _fsdp()[0]
    return isinstance(model, FSDPModule)


def shard_units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules that become FSDP units below the root: decoder layers and vision blocks."""
    units = list(model.language_model.layers)
    tower = getattr(model, "vision_tower", None)
    if tower is not None:
        units += list(tower.layers)
    return units


def shard_model(model: torch.nn.Module, rt, cfg: TrainingConfig | None = None,
                *, compute_dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Wrap ``model`` (built with fp32 master parameters) in FSDP2 over ``rt``'s DP group, in
    place: one unit per decoder layer and vision block plus the root.  ``compute_dtype``
    (default ``model.cfg.params_dtype``) is the dtype weights are gathered in for forward and
    backward; gradients are reduced and kept in fp32.  Megatron's TP attributes are carried
    over to the sharded parameters."""
    FSDPModule, MixedPrecisionPolicy, fully_shard = _fsdp()
    from torch.distributed.device_mesh import DeviceMesh

    cfg = cfg or TrainingConfig()
    if is_sharded(model):
        raise ValueError("model is already sharded")
    compute = compute_dtype or model.cfg.torch_dtype
    bad = sorted({str(p.dtype) for p in model.parameters() if p.dtype != torch.float32})
    if bad:
        raise ValueError(f"shard_model needs fp32 master parameters (build the model with "
                         f"build_model(..., master_dtype=torch.float32)); found {bad}")
    attrs = {n: {a: getattr(p, a) for a in _TP_ATTRS if hasattr(p, a)}
             for n, p in model.named_parameters()}
    group = rt.dp_group if dist.is_initialized() else None
    if group is None:
        raise RuntimeError("shard_model needs torch.distributed (init_runtime first)")
    mesh = DeviceMesh.from_group(group, rt.device.type)
    mp = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)
    set_recompute(model, cfg.recompute)
    for unit in shard_units(model):
        fully_shard(unit, mesh=mesh, mp_policy=mp, reshard_after_forward=cfg.reshard_after_forward)
        unit._r4b_reshard = cfg.reshard_after_forward  # restored by full_params
    # The root (embeddings, final norm, tied LM head, projector) stays gathered from forward to
    # backward: the fused loss reads the LM head after the forward has returned.
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=False)
    model._r4b_reshard = False
    for m in model.modules():
        if isinstance(m, FSDPModule):
            # Sum, not average: every rank's loss is already normalised over the global batch.
            # (gloo has no PREMUL_SUM, so the factor 1 must be an explicit sum reduction.)
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)
    for n, p in model.named_parameters():
        for a, v in attrs.get(n, {}).items():
            setattr(p, a, v)
    model.compute_dtype = compute
    log.info("sharded the model over %d DP ranks (FSDP2; compute %s, master and gradients "
             "float32, recompute %s)", rt.dp_size, str(compute).replace("torch.", ""), cfg.recompute)
    return model


@contextlib.contextmanager
def full_params(model: torch.nn.Module) -> Iterator[None]:
    """Gather every FSDP unit's weights once for the whole block (generation): forwards inside
    run without further all-gathers; the shards are restored on exit.  A collective over DP:
    every rank enters the same blocks, whatever its share of the work (an empty one
    included).  Nested blocks are free; no-op for unsharded models."""
    FSDPModule = _fsdp()[0]
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    depth = getattr(model, "_r4b_full_depth", 0)
    if not units or depth:  # unsharded model, or already inside full_params: nothing to do
        yield
        return
    for m in units:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    model._r4b_full_depth = 1
    try:
        yield
    finally:
        model._r4b_full_depth = 0
        for m in units:
            m.reshard()
        for m in units:
            m.set_reshard_after_forward(getattr(m, "_r4b_reshard", True), recurse=False)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state dict with every DP-sharded tensor gathered (a collective over DP);
    TP shards stay this rank's."""
    from torch.distributed.tensor import DTensor

    out = {}
    for k, v in model.state_dict().items():
        if isinstance(v, DTensor):
            v = v.full_tensor()
        if isinstance(v, torch.Tensor):
            out[k] = v
    return out


# ---------------------------------------------------------------- gradients
def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def backward_nothing(*outs: torch.Tensor) -> None:
    """Backward through ``out`` with zero gradients: what a rank runs for an empty micro-batch,
    so every shard unit takes part in the step's collectives while adding nothing to any
    parameter's gradient (``0 * sum`` keeps the graph, unlike ``detach``)."""
    (sum(o.float().sum() for o in outs) * 0.0).backward()


def reduce_grads(model: torch.nn.Module, rt) -> None:
    """Sum gradients over DP for an unsharded model (a sharded one reduced them in backward)."""
    if is_sharded(model):
        return
    from .runtime import all_reduce_grads

    all_reduce_grads(model, rt)


def grad_norm(model: torch.nn.Module, rt) -> float:
    """Global L2 norm of the gradients (one host sync).

    Per-tensor norms in the gradients' own dtype (no fp64 copies of parameters), their squares
    summed in fp64: TP-sharded parameters (megatron's ``tensor_model_parallel``) over the TP
    group, every parameter's DP shards over the DP group when the model is sharded;
    TP-replicated parameters are counted once."""
    sharded_dp = is_sharded(model)
    groups: dict[bool, list[torch.Tensor]] = {True: [], False: []}
    for p in model.parameters():
        if p.grad is not None:
            groups[bool(getattr(p, "tensor_model_parallel", False))].append(_local(p.grad))
    dev = rt.device
    sq = torch.zeros(2, dtype=torch.float64, device=dev)  # [tp-sharded, tp-replicated]
    for i, key in enumerate((True, False)):
        gs = [g for g in groups[key] if g.numel()]
        if gs:
            norms = torch._foreach_norm(gs)
            sq[i] = torch.stack(norms).double().pow(2).sum()
    if sharded_dp and rt.dp_size > 1:
        dist.all_reduce(sq, group=rt.dp_group)
    if rt.tp_size > 1:
        tp_part = sq[:1].clone()
        dist.all_reduce(tp_part, group=rt.tp_group)
        sq = torch.cat([tp_part, sq[1:]])
    return math.sqrt(float(sq.sum()))


def clip_grads(model: torch.nn.Module, max_norm: float, rt) -> float:
    """Clip gradients to global norm ``max_norm`` (0: no clipping); returns the norm before."""
    norm = grad_norm(model, rt)
    if max_norm > 0 and math.isfinite(norm) and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        gs = [_local(p.grad) for p in model.parameters() if p.grad is not None]
        if gs:
            torch._foreach_mul_(gs, scale)
    return norm
