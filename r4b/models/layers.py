"""Building blocks of the language model and the one place where implementations are chosen.

Implementations, decided once at import:

* ``HAVE_LIGER`` (liger-kernel importable): on CUDA tensors RMSNorm, rotary embedding and the
  SwiGLU product use Liger's fused Triton kernels; on CPU tensors the PyTorch references below.
* ``HAVE_TE`` (transformer-engine importable): the decoder-layer and final RMSNorms of a model
  built for a CUDA device (``build_model(..., device="cuda")``) are
  ``transformer_engine.pytorch.RMSNorm`` modules.  That is all Transformer-Engine is used for:
  the per-head QK norms stay ours (their gradient must be summed over TP ranks), and the
  projections stay megatron-core's local ``Column/RowParallelLinear`` (Transformer-Engine's
  linears need megatron's full ``TransformerConfig`` plumbing, which this model does not use).
  These GPU paths are selected here only; the CPU test suite cannot exercise them.

The CPU path is the reference: every fused path computes the same function as the PyTorch
code next to it (RMSNorm in fp32 then cast back, as transformers' Qwen3 does).

All activations are token-major ``[T, ...]`` (packed sequences flattened); the linears are
megatron-core's tensor-parallel layers built from a ``ModelParallelConfig`` (see
``r4b.models.parallel.megatron_config``).
"""

from __future__ import annotations

import importlib.util
import math

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from ..log import get_logger

log = get_logger(__name__)

HAVE_LIGER = importlib.util.find_spec("liger_kernel") is not None
HAVE_TE = importlib.util.find_spec("transformer_engine") is not None

_liger_ops = None


def _liger():
    """Liger's autograd functions, imported on first use (they pull in triton)."""
    global _liger_ops
    if _liger_ops is None:
        if not HAVE_LIGER:
            raise ImportError("liger-kernel is not installed: pip install 'liger-kernel>=0.8.5'")
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
        from liger_kernel.ops.rope import LigerRopeFunction
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction

        _liger_ops = (LigerRMSNormFunction, LigerRopeFunction, LigerSiLUMulFunction)
    return _liger_ops


def _use_fused(x: torch.Tensor) -> bool:
    return HAVE_LIGER and x.is_cuda


# ---------------------------------------------------------------- RMSNorm
def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * (x / sqrt(mean(x^2) + eps))``, statistics in fp32, result in ``x.dtype``."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension (Liger's kernel on CUDA, else the reference)."""
    if _use_fused(x):
        fn = _liger()[0]
        shape = x.shape
        y = fn.apply(x.reshape(-1, shape[-1]), weight, eps, 0.0, "llama", False)
        return y.view(shape)
    return rms_norm_reference(x, weight, eps)


class RMSNorm(nn.Module):
    """RMSNorm with a learned scale (``weight``, initialised to ones).

    ``grad_group``: a process group over which the scale's gradient is summed in backward —
    needed when the scale is replicated but each rank normalises different data (the per-head
    QK norms see only this rank's heads under tensor parallelism).
    """

    def __init__(self, dim: int, eps: float, *, dtype: torch.dtype = torch.float32, grad_group=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))
        self.grad_group = grad_group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise ``x [..., dim]``."""
        w = self.weight
        if self.grad_group is not None:
            from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

            w = copy_to_tensor_model_parallel_region(w, group=self.grad_group)
        return rms_norm(x, w, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def make_rms_norm(dim: int, eps: float, *, dtype: torch.dtype, device: torch.device | str | None = None) -> nn.Module:
    """The RMSNorm module for this build: Transformer-Engine's on CUDA when installed, else ours.

    Both hold their scale as ``weight``, so checkpoints do not depend on the choice.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    if HAVE_TE and device.type == "cuda":
        import transformer_engine.pytorch as te

        return te.RMSNorm(dim, eps=eps, params_dtype=dtype, device=device)
    return RMSNorm(dim, eps, dtype=dtype)


# ---------------------------------------------------------------- rotary embedding
class RotaryEmbedding(nn.Module):
    """Rotary position embedding (rotate-half layout, as in transformers' Qwen3).

    ``forward(position_ids [T])`` returns ``cos, sin [T, head_dim]`` in fp32; the inverse
    frequencies are ``theta ** (-2i / head_dim)``.
    """

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        """``theta ** (-2i / head_dim)`` in fp32 (recomputed per call: no buffer that a bf16
        cast of the module could round)."""
        exps = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float()
        return 1.0 / (self.theta ** (exps / self.head_dim))

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos, sin`` for integer ``position_ids [T]``."""
        freqs = position_ids.float()[:, None] * self.inv_freq(position_ids.device)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, theta={self.theta}"


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                           sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``q [T, Hq, D]`` and ``k [T, Hk, D]`` by ``cos, sin [T, D]`` (math in q's dtype)."""
    cos = cos.to(q.dtype)[:, None, :]
    sin = sin.to(q.dtype)[:, None, :]
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of token-major ``q, k`` (Liger's kernel on CUDA, else the reference).

    Never modifies ``q`` or ``k``: the results are new tensors on both paths.
    """
    if _use_fused(q):
        fn = _liger()[1]
        # Liger expects [B, H, S, D] and cos/sin [1, S, D]: view the tokens as one sequence.
        # Its kernel rotates its (contiguous) inputs in place, and for a contiguous [T, H, D]
        # input that storage is q's own; so hand it fresh contiguous copies.  The clone is
        # differentiable, so gradients still flow to q and k.
        qb = q.clone(memory_format=torch.contiguous_format).unsqueeze(0).transpose(1, 2)
        kb = k.clone(memory_format=torch.contiguous_format).unsqueeze(0).transpose(1, 2)
        qo, ko = fn.apply(qb, kb, cos.to(q.dtype)[None], sin.to(q.dtype)[None])
        return qo.transpose(1, 2).squeeze(0), ko.transpose(1, 2).squeeze(0)
    return apply_rotary_reference(q, k, cos, sin)


# ---------------------------------------------------------------- SwiGLU
def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` (Liger's fused kernel on CUDA, else PyTorch)."""
    if _use_fused(gate):
        return _liger()[2].apply(gate, up)
    return F.silu(gate) * up


# ---------------------------------------------------------------- tensor-parallel linears
def init_normal(std: float):
    """Megatron ``init_method``: normal(0, std) in place."""
    return lambda w: nn.init.normal_(w, mean=0.0, std=std)


def column_linear(in_f: int, out_f: int, *, config, tp_group, std: float, gather_output: bool = False,
                  skip_weight: bool = False):
    """megatron-core ``ColumnParallelLinear`` without bias (output split over TP ranks)."""
    from megatron.core.tensor_parallel import ColumnParallelLinear

    return ColumnParallelLinear(in_f, out_f, config=config, init_method=init_normal(std), bias=False,
                                gather_output=gather_output, skip_bias_add=False,
                                skip_weight_param_allocation=skip_weight, tp_group=tp_group)


def row_linear(in_f: int, out_f: int, *, config, tp_group, std: float):
    """megatron-core ``RowParallelLinear`` without bias (input split over TP ranks, output all-reduced)."""
    from megatron.core.tensor_parallel import RowParallelLinear

    return RowParallelLinear(in_f, out_f, config=config, init_method=init_normal(std), bias=False,
                             input_is_parallel=True, skip_bias_add=False, tp_group=tp_group)


class ParallelSwiGLUMLP(nn.Module):
    """``down(silu(gate(x)) * up(x))``; gate and up fused in one column-parallel GEMM.

    Each rank's ``gate_up.weight`` holds ``[gate_r; up_r]`` (its slices of both), so the
    activation needs no communication; ``down`` is row-parallel.
    """

    def __init__(self, hidden: int, intermediate: int, *, config, tp_group, tp_size: int,
                 init_std: float, num_layers: int):
        super().__init__()
        self.inter_local = intermediate // tp_size
        self.gate_up = column_linear(hidden, 2 * intermediate, config=config, tp_group=tp_group,
                                     std=init_std)
        self.down = row_linear(intermediate, hidden, config=config, tp_group=tp_group,
                               std=init_std / math.sqrt(2 * num_layers))

    recompute_act: bool = False
    """Recompute the SwiGLU product in backward (selective recomputation): the gate/up outputs
    are kept, the activation and the product are not."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [T, hidden]`` -> ``[T, hidden]`` (all-reduced over TP)."""
        gu = self.gate_up(x)[0]
        gate, up = gu.split(self.inter_local, dim=-1)
        if self.recompute_act and torch.is_grad_enabled():
            act = torch.utils.checkpoint.checkpoint(swiglu, gate, up, use_reentrant=False)
        else:
            act = swiglu(gate, up)
        return self.down(act)[0]
