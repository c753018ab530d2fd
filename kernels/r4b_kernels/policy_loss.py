"""Fused clipped-ratio policy loss and forward-only token log-probs over an LM head.

Public API:

* :func:`policy_loss` -> :class:`PolicyLossOutput`: PPO/GRPO clipped-ratio loss with optional
  dual clip, KL to a reference policy (k1/k2/k3) and an entropy bonus, computed straight from
  the final hidden states and the LM-head weight; differentiable w.r.t. both.
* :func:`token_logprobs`: log-probs (and entropies) of target tokens; no autograd graph.

Both are vocab-parallel: under a tensor-parallel group every rank holds the vocab shard
``weight = W[vocab_start : vocab_start + V_local]`` and ranks exchange only per-row numbers
(running max, sum of exponentials, entropy partial sum, target logit), never logits.

Implementations (``impl=``):

* ``"torch"`` - the reference: materialises fp32 logits ``[T, V_local]`` and differentiates
  with autograd.  Obviously correct, memory ``O(T * V_local)``.
* ``"triton"`` - the fused path.  Rows are processed in chunks of ``C`` rows; per chunk:

  1. ``logits = H_c @ W^T`` (cuBLAS, bf16 inputs with an fp32 output so log-probs are not
     rounded to bf16; fp32 accumulation either way),
  2. ``_policy_loss_stats_kernel``: one program per row streams the vocab in tiles with an
     online max / sum-exp / entropy accumulator and gathers the target logit,
  3. (TP) one all-gather of the ``[C, 4]`` per-row partials,
  4. ``_policy_loss_grad_kernel``: combines the partials, computes the per-row loss terms
     and their derivative, and overwrites the chunk with ``dloss/dlogits`` (in the GEMM dtype),
  5. ``dH_c = dlogits @ W`` and ``dW += dlogits^T @ H_c`` (cuBLAS, fixed chunk order, so the
     weight gradient is deterministic without atomics).

  Because the loss is a scalar, the gradients are computed during the forward and backward
  only scales them by the incoming gradient: three GEMMs in total, the floor for this loss.
  Extra memory is one ``[C, V_local]`` fp32 logits chunk (+ a ``[C, V_local]`` bf16 dlogits
  chunk for bf16 inputs), never ``[T, V]``; ``C`` is chosen so that this stays within
  :data:`CHUNK_BUDGET_BYTES`.
* ``"chunked"`` - the same chunked driver (GEMMs, TP exchange, gradients in the forward) with
  steps 2 and 4 as whole-chunk PyTorch ops instead of the two kernels (one more fp32
  ``[C, V_local]`` buffer, the exponentials); runs on any device.  ``"auto"`` picks
  ``"triton"`` on CUDA when compiled Triton works, else ``"chunked"``: on the CPU it is the
  fused loss that never materialises ``[T, V_local]``.

Gradient semantics under TP: the gradient w.r.t. ``hidden`` returned on every rank is the
FULL gradient (the partial ``dH`` of each vocab shard is all-reduced inside), so callers must
not wrap ``hidden`` in Megatron's copy-to-tensor-parallel-region as well; the gradient w.r.t.
``weight`` is this rank's shard's gradient.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ._common import (HAS_TRITON, TRITON_INTERPRET, KernelLaunch, cdiv, check_finite, check_tensor,
                      checks_enabled, device_guard, next_power_of_2, resolve_impl)

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = ["PolicyLossOutput", "policy_loss", "token_logprobs", "CHUNK_BUDGET_BYTES",
           "EpilogueTiles", "epilogue_tiles", "default_chunk_rows", "planned_launches"]

#: Bytes the fused path may spend on its per-chunk temporaries (fp32 logits chunk plus, for
#: bf16 inputs, the bf16 dlogits chunk).  At V_local=151936 and bf16 this gives 576-row chunks
#: (~525 MB): big enough that the three GEMMs per chunk run at full rate, far below 1 GB.
CHUNK_BUDGET_BYTES = 512 * 2**20

_KL_ESTIMATORS = {"k1": 1, "k2": 2, "k3": 3}
_FLOAT_DTYPES = (torch.float32, torch.bfloat16)
# Rows of the per-token output table written by the grad kernel (and by the reference).
_ROW_LOGP, _ROW_ENT, _ROW_RATIO, _ROW_PG, _ROW_KL, _ROW_LOW, _ROW_HIGH, _ROW_DUAL = range(8)
_N_ROWS = 8

#: Tests set this to fill every internal buffer with NaN before use, so that an element a
#: kernel fails to write shows up in the results instead of stale memory.
POISON_BUFFERS = False


def _buffer(shape, dtype, device) -> torch.Tensor:
    if POISON_BUFFERS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


@dataclass
class PolicyLossOutput:
    """Result of :func:`policy_loss`.

    ``loss`` is the only differentiable field (w.r.t. ``hidden`` and ``weight``).  Per-token
    fields are ``[T]`` fp32 and detached.  Scalar statistics are 0-d fp32 tensors (no host
    sync).  "Weighted" statistics use the loss weights ``w``: ``sum_t w_t x_t / sum_t w_t``
    (0 when ``sum_t w_t == 0``); ``clip_frac_tokens`` counts tokens with ``w_t > 0``.
    """

    loss: torch.Tensor
    """Scalar ``sum_t w_t l_t``, ``l_t = pg_t + kl_coef * kl_t - entropy_coef * H_t``."""
    logprobs: torch.Tensor
    """``[T]`` log pi(target_t) at the given temperature."""
    ratio: torch.Tensor
    """``[T]`` importance ratio ``exp(logp_t - old_t)``."""
    entropy: torch.Tensor | None
    """``[T]`` entropy of softmax(z_t) when ``return_entropy`` or ``entropy_coef != 0``."""
    kl: torch.Tensor | None
    """``[T]`` per-token KL estimate (the chosen estimator) when ``ref_logprobs`` is given."""
    pg_loss: torch.Tensor
    """``sum_t w_t pg_t``: the policy-gradient part of ``loss``."""
    clip_frac: torch.Tensor
    """Weighted fraction of tokens whose ratio is clipped (low or high; gradient zeroed)."""
    clip_frac_low: torch.Tensor
    """Weighted fraction clipped at ``1 - eps_low`` (``A < 0`` and ``r < 1 - eps_low``)."""
    clip_frac_high: torch.Tensor
    """Weighted fraction clipped at ``1 + eps_high`` (``A > 0`` and ``r > 1 + eps_high``)."""
    clip_frac_tokens: torch.Tensor
    """Unweighted fraction of tokens with ``w_t > 0`` whose ratio is clipped (low or high)."""
    dual_clip_frac: torch.Tensor
    """Weighted fraction capped by the dual clip (``A < 0`` and ``pg > -c A``); 0 without it."""
    kl_mean: torch.Tensor | None
    """Weighted mean of ``kl_t`` when ``ref_logprobs`` is given."""
    entropy_mean: torch.Tensor | None
    """Weighted mean of ``H_t`` when the entropy is computed."""


#: ``impl`` values of :func:`policy_loss` and :func:`token_logprobs`.
IMPLS = ("auto", "triton", "chunked", "torch")


def _loss_impl(impl: str, device: torch.device) -> str:
    """``impl`` -> ``"triton" | "chunked" | "torch"``: ``auto`` is the Triton path on CUDA
    (when compiled Triton works) and the chunked path with the PyTorch epilogue elsewhere."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "chunked":
        return impl
    which = resolve_impl(impl, device)
    return "chunked" if (impl == "auto" and which == "torch") else which


# ----------------------------------------------------------------------------- validation
def _tp_info(tp_group) -> tuple[int, int]:
    """(world size, rank) of the tensor-parallel group; (1, 0) without one."""
    if tp_group is None:
        return 1, 0
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("tp_group was given but torch.distributed is not initialised")
    return dist.get_world_size(tp_group), dist.get_rank(tp_group)


def _check_common(hidden, weight, targets, temperature, vocab_start, tp_group, check):
    """Shape / dtype / device / option checks (free); with ``check`` also the value checks
    (finite hidden and weight, target ids in range), which read whole tensors and sync."""
    check_tensor("hidden", hidden, ndim=2, dtypes=_FLOAT_DTYPES)
    dev = hidden.device
    check_tensor("weight", weight, ndim=2, dtypes=_FLOAT_DTYPES, device=dev)
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight must have the dtype of hidden ({hidden.dtype}), got {weight.dtype}")
    T, H = hidden.shape
    if T < 1:
        raise ValueError(f"hidden must have at least one row, got shape {tuple(hidden.shape)}")
    if weight.shape[1] != H or weight.shape[0] < 1:
        raise ValueError(f"weight must have shape [V_local >= 1, {H}] to match hidden [T, {H}], "
                         f"got {tuple(weight.shape)}")
    check_tensor("targets", targets, ndim=1, dtypes=(torch.int64, torch.int32), length=T, device=dev)
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    world, _ = _tp_info(tp_group)
    v_local = weight.shape[0]
    v_total = v_local * world
    if not isinstance(vocab_start, int) or vocab_start < 0 or vocab_start + v_local > v_total:
        raise ValueError(f"vocab_start must be an int in [0, {v_total - v_local}] (V_local={v_local}, "
                         f"TP size {world}, equal shards), got {vocab_start!r}")
    if check:
        check_finite("hidden", hidden)
        check_finite("weight", weight)
        bad = (targets < 0) | (targets >= v_total)
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            raise ValueError(f"targets must be token ids in [0, {v_total}), got {int(targets[i])} "
                             f"at index {i}")
    return T, v_total


def _per_token(name: str, t, T: int, device, check: bool) -> torch.Tensor:
    check_tensor(name, t, ndim=1, length=T, device=device)
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (fp32), got {t.dtype}")
    if check:
        check_finite(name, t)
    return t.detach().to(torch.float32).contiguous()


def _check_number(name, value, *, lo=None, lo_open=False, hi=None, hi_open=False):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value < hi if hi_open else value <= hi
    if not ok:
        rng = f"{'(' if lo_open else '['}{lo if lo is not None else '-inf'}, " \
              f"{hi if hi is not None else 'inf'}{')' if hi_open or hi is None else ']'}"
        raise ValueError(f"{name} must be a finite number in {rng}, got {value!r}")


# ----------------------------------------------------------------- shared TP autograd pieces
class _AllReduceReplicated(torch.autograd.Function):
    """Sum over the TP group of a partial that feeds a loss replicated on every rank.

    Forward: all-reduce(sum).  Backward: identity, because every rank holds the same loss and
    hence already the full derivative w.r.t. the sum.
    """

    @staticmethod
    def forward(ctx, x, group):
        import torch.distributed as dist

        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, g):
        return g, None


class _CopyToTP(torch.autograd.Function):
    """Identity forward; all-reduce of the gradient (sum of each shard's partial dH)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        import torch.distributed as dist

        g = g.clone()
        dist.all_reduce(g, group=ctx.group)
        return g, None


# ------------------------------------------------------------------------ torch reference
def _logp_entropy_torch(hidden, weight, targets, temperature, vocab_start, tp_group, need_entropy):
    """Reference log-softmax pieces over a (possibly vocab-sharded) materialised fp32 logits."""
    world, _ = _tp_info(tp_group)
    z = (hidden.float() @ weight.float().t()) / temperature  # [T, V_local] fp32
    v_local = weight.shape[0]
    m = z.detach().amax(dim=-1)
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=tp_group)
    e = torch.exp(z - m[:, None])
    s = e.sum(-1)
    local = targets.long() - vocab_start
    in_shard = (local >= 0) & (local < v_local)
    zt = z.gather(1, local.clamp(0, v_local - 1)[:, None])[:, 0] * in_shard
    if need_entropy:
        ez = (e * z).sum(-1)  # sum_j exp(z_j - m) z_j, local part
    if world > 1:
        s = _AllReduceReplicated.apply(s, tp_group)
        zt = _AllReduceReplicated.apply(zt, tp_group)
        if need_entropy:
            ez = _AllReduceReplicated.apply(ez, tp_group)
    lse = m + torch.log(s)
    # A target outside [0, V_total) gets a NaN log-prob (and so a NaN loss) instead of a
    # silently wrong value; no host sync (check_inputs=True raises with its index instead).
    logp = torch.where(_target_ok(targets, v_local * world), zt - lse, float("nan"))
    entropy = lse - ez / s if need_entropy else None  # H = lse - sum_j p_j z_j
    return logp, entropy


def _target_ok(targets: torch.Tensor, v_total: int) -> torch.Tensor:
    return (targets >= 0) & (targets < v_total)


def _per_token_terms(logp, old, adv, ref, *, kl_estimator, eps_low, eps_high, dual_clip):
    """Reference per-token ratio, clipped policy-gradient term, KL and clip flags (autograd)."""
    ratio = torch.exp(logp - old)
    pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1.0 - eps_low, 1.0 + eps_high))
    r = ratio.detach()
    low = (adv < 0) & (r < 1.0 - eps_low)
    high = (adv > 0) & (r > 1.0 + eps_high)
    if dual_clip is not None:
        cap = -dual_clip * adv
        dual = (adv < 0) & (pg.detach() > cap)
        pg = torch.where(adv < 0, torch.minimum(pg, cap), pg)
    else:
        dual = torch.zeros_like(low)
    kl = None
    if ref is not None:
        d = logp - ref
        if kl_estimator == "k1":
            kl = d
        elif kl_estimator == "k2":
            kl = 0.5 * d * d
        else:
            kl = torch.exp(-d) + d - 1.0  # exp(ref - logp) - (ref - logp) - 1
    return ratio, pg, kl, low, high, dual


def _policy_loss_torch(hidden, weight, targets, old, adv, w, ref, cfg):
    h = hidden
    if cfg["world"] > 1 and torch.is_grad_enabled() and hidden.requires_grad:
        h = _CopyToTP.apply(hidden, cfg["tp_group"])
    need_ent = cfg["need_entropy"]
    logp, ent = _logp_entropy_torch(h, weight, targets, cfg["temperature"], cfg["vocab_start"],
                                    cfg["tp_group"], need_ent)
    ratio, pg, kl, low, high, dual = _per_token_terms(
        logp, old, adv, ref, kl_estimator=cfg["kl_estimator"], eps_low=cfg["eps_low"],
        eps_high=cfg["eps_high"], dual_clip=cfg["dual_clip"])
    per_tok = pg
    if kl is not None and cfg["kl_coef"] != 0.0:
        per_tok = per_tok + cfg["kl_coef"] * kl
    if ent is not None and cfg["entropy_coef"] != 0.0:
        per_tok = per_tok - cfg["entropy_coef"] * ent
    loss = (w * per_tok).sum()
    nan = torch.full_like(old, float("nan"))
    rows = torch.stack([
        logp.detach(), ent.detach() if ent is not None else nan, ratio.detach(), pg.detach(),
        kl.detach() if kl is not None else nan, low.float(), high.float(), dual.float()])
    return loss, rows


# ----------------------------------------------------------------------------- triton path
if HAS_TRITON:

    @triton.jit
    def _policy_loss_stats_kernel(
        logits_ptr, stride_l, targets_ptr, stats_ptr, row0, n_rows, V, vocab_start, inv_tau,
        BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        """Per-row partials over this rank's vocab shard, written as stats[row, 0:4] =
        (m, s, a, zt): m = max_j z_j, s = sum_j exp(z_j - m), a = sum_j exp(z_j - m) (z_j - m),
        zt = z[target] if the target is in this shard else 0; z = logits * inv_tau.

        Each program owns BLOCK_R rows and streams the shard in [BLOCK_R, BLOCK_V] tiles with
        an online max.  ``a`` is kept relative to the running max so that
        entropy = log s - a / s needs no cancellation of large logits.  All math in fp32.
        """
        rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = rows < n_rows
        tgt = tl.load(targets_ptr + row0 + rows, mask=rmask, other=-1).to(tl.int64) - vocab_start
        offs0 = tl.arange(0, BLOCK_V)
        # -1e30 instead of -inf (start value and masked lanes): the first rescale multiplies
        # s = 0 by (m_old - m_new), and masked lanes multiply exp(d) = 0 by d; finite values
        # keep both products 0 instead of 0 * inf = NaN.
        m = tl.full((BLOCK_R,), -1.0e30, tl.float32)
        s = tl.zeros((BLOCK_R,), tl.float32)
        a = tl.zeros((BLOCK_R,), tl.float32)
        zt = tl.zeros((BLOCK_R,), tl.float32)
        for start in range(0, V, BLOCK_V):
            offs = start + offs0
            mask = rmask[:, None] & (offs < V)[None, :]
            ptrs = logits_ptr + rows[:, None] * stride_l + offs[None, :]
            z = tl.load(ptrs, mask=mask, other=-1.0e30).to(tl.float32) * inv_tau
            m_new = tl.maximum(m, tl.max(z, axis=1))
            scale = tl.exp(m - m_new)
            d = z - m_new[:, None]
            e = tl.where(mask, tl.exp(d), 0.0)
            a = scale * (a + s * (m - m_new)) + tl.sum(tl.where(mask, e * d, 0.0), axis=1)
            s = scale * s + tl.sum(e, axis=1)
            # masked lanes hold the -1e30 fill, so the target match must be masked too (a
            # target owned by another shard can fall into this tile's padding)
            hit = mask & (offs[None, :] == tgt[:, None])
            zt += tl.sum(tl.where(hit, z, 0.0), axis=1)
            m = m_new
        out = stats_ptr + rows * 4
        tl.store(out + 0, m, mask=rmask)
        tl.store(out + 1, s, mask=rmask)
        tl.store(out + 2, a, mask=rmask)
        tl.store(out + 3, zt, mask=rmask)

    @triton.jit
    def _combine_parts(stats_ptr, stride_part, n_parts, rows, rmask, BLOCK_R: tl.constexpr):
        """Merge the (m, s, a, zt) partials of every vocab shard, in rank order."""
        m = tl.full((BLOCK_R,), -1.0e30, tl.float32)
        for p in range(0, n_parts):
            m = tl.maximum(m, tl.load(stats_ptr + p * stride_part + rows * 4, mask=rmask, other=0.0))
        s = tl.zeros((BLOCK_R,), tl.float32)
        a = tl.zeros((BLOCK_R,), tl.float32)
        zt = tl.zeros((BLOCK_R,), tl.float32)
        for p in range(0, n_parts):
            ptr = stats_ptr + p * stride_part + rows * 4
            mp = tl.load(ptr, mask=rmask, other=0.0)
            sp = tl.load(ptr + 1, mask=rmask, other=1.0)
            scale = tl.exp(mp - m)
            s += scale * sp
            a += scale * (tl.load(ptr + 2, mask=rmask, other=0.0) + sp * (mp - m))
            zt += tl.load(ptr + 3, mask=rmask, other=0.0)
        return m, s, a, zt

    @triton.jit
    def _policy_loss_grad_kernel(
        logits_ptr, stride_l, dl_ptr, stride_d, stats_ptr, stride_part, n_parts,
        targets_ptr, old_ptr, adv_ptr, w_ptr, ref_ptr, out_ptr, stride_out, row0, n_rows,
        V, vocab_start, inv_tau, clip_lo, clip_hi, dual_c, kl_coef, ent_coef,
        HAS_REF: tl.constexpr, KL_EST: tl.constexpr, HAS_DUAL: tl.constexpr,
        HAS_ENT: tl.constexpr, WRITE_GRAD: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        """Per row: merge shard partials, evaluate the loss terms, write the per-token table
        and (WRITE_GRAD) overwrite the logits row with dloss/dlogits.

        With z = x / tau, logp = z_t - lse, S = sum_j p_j z_j, H = lse - S and
        l = w (pg + kl_coef kl - ent_coef H), the row gradient is
            dl/dx_j = alpha [j == t] - p_j (alpha + beta (S - z_j)),
        alpha = w g / tau, beta = w ent_coef / tau, g = dpg/dlogp + kl_coef dkl/dlogp
        (dH/dz_j = -p_j (z_j - S)).
        """
        rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = rows < n_rows
        t = row0 + rows
        m, s, a, zt = _combine_parts(stats_ptr, stride_part, n_parts, rows, rmask, BLOCK_R)
        log_s = tl.log(s)
        lse = m + log_s
        # A target id outside [0, V_total) is in no shard: its log-prob is NaN (and so is the
        # loss), never a silently wrong finite value.
        tgt_glob = tl.load(targets_ptr + t, mask=rmask, other=0).to(tl.int64)
        tgt_ok = (tgt_glob >= 0) & (tgt_glob < V.to(tl.int64) * n_parts)
        logp = tl.where(tgt_ok, zt - lse, float("nan"))
        ent = log_s - a / s
        s_mean = m + a / s  # S = sum_j p_j z_j
        adv = tl.load(adv_ptr + t, mask=rmask, other=0.0)
        w = tl.load(w_ptr + t, mask=rmask, other=0.0)
        ratio = tl.exp(logp - tl.load(old_ptr + t, mask=rmask, other=0.0))
        unclipped = -adv * ratio
        # NaN-propagating min/max (as torch.clamp / torch.maximum in the reference): the
        # hardware min/max would turn a NaN ratio into a finite clipped value, hiding a bad
        # input that the unchecked default path must surface as a NaN loss.
        nan_all: tl.constexpr = tl.PropagateNan.ALL
        clipped = -adv * tl.minimum(tl.maximum(ratio, clip_lo, propagate_nan=nan_all), clip_hi,
                                    propagate_nan=nan_all)
        pg = tl.maximum(unclipped, clipped, propagate_nan=nan_all)
        # The gradient flows only through the unclipped branch (the clipped one is constant);
        # ties happen only inside the clip range, where both branches have slope -A r.
        dpg = tl.where(unclipped >= clipped, -adv * ratio, 0.0)
        low = ((adv < 0) & (ratio < clip_lo)).to(tl.float32)
        high = ((adv > 0) & (ratio > clip_hi)).to(tl.float32)
        dual = tl.zeros((BLOCK_R,), tl.float32)
        if HAS_DUAL:
            cap = -dual_c * adv
            capped = (adv < 0) & (pg > cap)
            pg = tl.where(capped, cap, pg)
            dpg = tl.where(capped, 0.0, dpg)
            dual = capped.to(tl.float32)
        g = dpg
        kl = tl.zeros((BLOCK_R,), tl.float32)
        if HAS_REF:
            d = logp - tl.load(ref_ptr + t, mask=rmask, other=0.0)
            if KL_EST == 1:
                kl = d
                g += kl_coef
            elif KL_EST == 2:
                kl = 0.5 * d * d
                g += kl_coef * d
            else:
                e_rd = tl.exp(-d)
                kl = e_rd + d - 1.0
                g += kl_coef * (1.0 - e_rd)
        tl.store(out_ptr + 0 * stride_out + t, logp, mask=rmask)
        tl.store(out_ptr + 1 * stride_out + t, ent, mask=rmask)
        tl.store(out_ptr + 2 * stride_out + t, ratio, mask=rmask)
        tl.store(out_ptr + 3 * stride_out + t, pg, mask=rmask)
        tl.store(out_ptr + 4 * stride_out + t, kl, mask=rmask)
        tl.store(out_ptr + 5 * stride_out + t, low, mask=rmask)
        tl.store(out_ptr + 6 * stride_out + t, high, mask=rmask)
        tl.store(out_ptr + 7 * stride_out + t, dual, mask=rmask)
        if WRITE_GRAD:
            alpha = w * g * inv_tau
            beta = w * ent_coef * inv_tau
            tgt = tgt_glob - vocab_start
            offs0 = tl.arange(0, BLOCK_V)
            for start in range(0, V, BLOCK_V):
                offs = start + offs0
                mask = rmask[:, None] & (offs < V)[None, :]
                z = tl.load(logits_ptr + rows[:, None] * stride_l + offs[None, :], mask=mask,
                            other=0.0).to(tl.float32) * inv_tau
                p = tl.exp(z - lse[:, None])
                if HAS_ENT:
                    gz = -p * (alpha[:, None] + beta[:, None] * (s_mean[:, None] - z))
                else:
                    gz = -p * alpha[:, None]
                gz = tl.where(mask & (offs[None, :] == tgt[:, None]), gz + alpha[:, None], gz)
                tl.store(dl_ptr + rows[:, None] * stride_d + offs[None, :],
                         gz.to(dl_ptr.dtype.element_ty), mask=mask)


class EpilogueTiles(NamedTuple):
    """Launch shape of the two epilogue kernels (stats and grad): rows per program, vocab
    tile width, warps per program."""

    block_r: int
    block_v: int
    num_warps: int


def epilogue_tiles(v_local: int, *, interpret: bool | None = None) -> EpilogueTiles:
    """Tiles of the stats and grad kernels for a vocab shard of ``v_local`` columns.

    GPU: one row per program, 2048-wide fp32 tiles (8 KB), 8 warps: 8 elements per thread per
    tile.  Compiled for sm_80 and sm_90 (tests/test_kernels_compile.py) this needs 32
    registers per thread in both kernels, so 8 programs fit on an SM (100% theoretical
    occupancy) and a 576-row chunk is one wave on an A100 or H100.  4096-wide tiles need 58-64
    registers in the stats kernel: 4 programs per SM (50%) and 1.09 waves on an H100 (1.33 on
    an A100), i.e. a second, nearly empty wave per chunk.
    Interpreter (``interpret``, default ``TRITON_INTERPRET``): 16 rows x 256 columns, so that
    the per-program Python overhead is paid once per 16 rows and modest test vocabularies still
    span several tiles (exercising the online rescaling).
    """
    if TRITON_INTERPRET if interpret is None else interpret:
        return EpilogueTiles(16, min(256, next_power_of_2(v_local)), 8)
    return EpilogueTiles(1, min(2048, next_power_of_2(v_local)), 8)


def default_chunk_rows(n_rows: int, v_local: int, dtype: torch.dtype, with_grad: bool, *,
                       impl: str = "triton") -> int:
    """Rows per chunk of the fused path (``impl`` ``"triton"`` or ``"chunked"``, which holds a
    second fp32 ``[C, V_local]`` buffer, the exponentials) under :data:`CHUNK_BUDGET_BYTES`."""
    per_row = v_local * (4 + (dtype.itemsize if (with_grad and dtype != torch.float32) else 0))
    if impl == "chunked":
        per_row += v_local * 4
    c = max(16, CHUNK_BUDGET_BYTES // per_row // 16 * 16)  # multiple of 16 for tensor cores
    return int(min(n_rows, c))


def _chunk_spans(n_rows: int, chunk: int):
    """(first row, rows) of every chunk, in the fixed order that makes dW deterministic."""
    for c0 in range(0, n_rows, chunk):
        yield c0, min(chunk, n_rows - c0)


def _chunk_buffers(chunk: int, v_local: int, dtype: torch.dtype, with_grad: bool, device):
    """The per-chunk temporaries: fp32 logits [C, V_local], dlogits in the GEMM dtype (the
    logits buffer itself for fp32 or without gradients), per-row partials [C, 4]."""
    logits = _buffer((chunk, v_local), torch.float32, device)
    dlog = logits if (dtype == torch.float32 or not with_grad) else _buffer((chunk, v_local), dtype, device)
    return logits, dlog, _buffer((chunk, 4), torch.float32, device)


def _stats_launch(tiles: EpilogueTiles, logits, targets, stats, row0: int, vocab_start: int,
                  inv_tau: float) -> KernelLaunch:
    """The stats kernel over the ``[n, V_local]`` logits chunk whose first row is ``row0``."""
    n, v_local = logits.shape
    return KernelLaunch(
        _policy_loss_stats_kernel, (cdiv(n, tiles.block_r),),
        (logits, logits.stride(0), targets, stats, row0, n, v_local, vocab_start, inv_tau),
        dict(BLOCK_R=tiles.block_r, BLOCK_V=tiles.block_v, num_warps=tiles.num_warps))


def _grad_launch(tiles: EpilogueTiles, logits, dlogits, parts, targets, old, adv, w, ref, rows,
                 row0: int, cfg, with_grad: bool) -> KernelLaunch:
    """The grad kernel over the chunk: ``parts`` [world, n, 4] are the gathered partials."""
    n, v_local = logits.shape
    return KernelLaunch(
        _policy_loss_grad_kernel, (cdiv(n, tiles.block_r),),
        (logits, logits.stride(0), dlogits, dlogits.stride(0), parts, parts.stride(0), cfg["world"],
         targets, old, adv, w, ref if ref is not None else old, rows, rows.stride(0), row0, n,
         v_local, cfg["vocab_start"], 1.0 / cfg["temperature"], 1.0 - cfg["eps_low"],
         1.0 + cfg["eps_high"], float(cfg["dual_clip"] or 0.0), float(cfg["kl_coef"]),
         float(cfg["entropy_coef"])),
        dict(HAS_REF=ref is not None, KL_EST=_KL_ESTIMATORS[cfg["kl_estimator"]],
             HAS_DUAL=cfg["dual_clip"] is not None, HAS_ENT=cfg["entropy_coef"] != 0.0,
             WRITE_GRAD=with_grad, BLOCK_R=tiles.block_r, BLOCK_V=tiles.block_v,
             num_warps=tiles.num_warps))


def planned_launches(op: str, n_rows: int, v_local: int, dtype: torch.dtype, *, world: int = 1,
                     with_grad: bool = True, has_ref: bool = False, kl_estimator: str = "k3",
                     dual_clip: float | None = None, entropy_coef: float = 0.0,
                     temperature: float = 1.0, vocab_start: int = 0, chunk_rows: int | None = None,
                     interpret: bool | None = None) -> list[KernelLaunch]:
    """Every Triton launch one call of ``op`` (``"policy_loss"`` | ``"token_logprobs"``) makes
    at this shape and these options, built by the launchers' own functions on meta tensors
    (nothing is allocated or run).  The ahead-of-time compile check compiles these for sm_80
    and sm_90; tests check that they equal what the launchers really launch."""
    if op not in ("policy_loss", "token_logprobs"):
        raise ValueError(f"op must be 'policy_loss' or 'token_logprobs', got {op!r}")
    dev = torch.device("meta")
    with_grad = with_grad and op == "policy_loss"
    C = chunk_rows or default_chunk_rows(n_rows, v_local, dtype, with_grad)
    tiles = epilogue_tiles(v_local, interpret=interpret)
    targets = torch.empty(n_rows, dtype=torch.int64, device=dev)
    out = []
    if op == "token_logprobs":
        logits = torch.empty((C, v_local), dtype=torch.float32, device=dev)
        stats = torch.empty((n_rows, 4), dtype=torch.float32, device=dev)
        for c0, n in _chunk_spans(n_rows, C):
            out.append(_stats_launch(tiles, logits[:n], targets, stats[c0:c0 + n], c0, vocab_start,
                                     1.0 / temperature))
        return out
    logits, dlog, stats = _chunk_buffers(C, v_local, dtype, with_grad, dev)
    vec = torch.empty(n_rows, dtype=torch.float32, device=dev)
    rows = torch.empty((_N_ROWS, n_rows), dtype=torch.float32, device=dev)
    cfg = dict(world=world, vocab_start=vocab_start, temperature=temperature, eps_low=0.2,
               eps_high=0.28, dual_clip=dual_clip, kl_coef=0.04 if has_ref else 0.0,
               entropy_coef=entropy_coef, kl_estimator=kl_estimator)
    for c0, n in _chunk_spans(n_rows, C):
        out.append(_stats_launch(tiles, logits[:n], targets, stats[:n], c0, vocab_start,
                                 1.0 / temperature))
        parts = torch.empty((world, n, 4), dtype=torch.float32, device=dev)
        out.append(_grad_launch(tiles, logits[:n], dlog[:n], parts, targets, vec, vec, vec,
                                vec if has_ref else None, rows, c0, cfg, with_grad))
    return out


_MM_OUT_DTYPE_OK: dict[str, bool] = {}
_log = logging.getLogger(__name__)


def _logits_mm(h: torch.Tensor, w_t: torch.Tensor, out: torch.Tensor) -> None:
    """out[fp32] = h @ w_t with fp32 accumulation and fp32 output, without rounding to bf16."""
    if h.dtype == torch.float32:
        torch.mm(h, w_t, out=out)
        return
    key = h.device.type
    if _MM_OUT_DTYPE_OK.get(key, True):
        try:  # cuBLAS bf16 x bf16 -> fp32 output (torch's mm.dtype_out; CUDA builds)
            torch.mm(h, w_t, out_dtype=torch.float32, out=out)
            _MM_OUT_DTYPE_OK[key] = True
            return
        except (RuntimeError, TypeError, NotImplementedError) as e:
            # This torch has no bf16 -> fp32-output matmul on this device: upcast the operands
            # instead (same result, but fp32 copies of each chunk's operands in memory).
            _MM_OUT_DTYPE_OK[key] = False
            # Once per device type; a warning on GPUs, where the memory bound depends on it.
            _log.log(logging.WARNING if key == "cuda" else logging.DEBUG,
                     "torch.mm(out_dtype=float32) unavailable on %s (%s); upcasting %s operands "
                     "to fp32 for the logits GEMM, which costs extra memory",
                     key, str(e).splitlines()[0][:200], h.dtype)
    torch.mm(h.float(), w_t.float(), out=out)


def _tp_gather_stats(local: torch.Tensor, world: int, group) -> torch.Tensor:
    """[n, 4] local partials -> [world, n, 4] partials of every rank (rank order)."""
    if world == 1:
        return local.unsqueeze(0)
    import torch.distributed as dist

    out = _buffer((world,) + tuple(local.shape), local.dtype, local.device)
    # all_gather into views of one buffer: supported by gloo and NCCL alike.
    dist.all_gather(list(out.unbind(0)), local.contiguous(), group=group)
    return out


# ------------------------------------------------------------------ PyTorch epilogue
# The same per-chunk math as the two Triton kernels, as whole-chunk PyTorch ops: the fused
# path's ``"chunked"`` implementation (``auto`` off CUDA).  Three GEMMs and a handful of passes
# over one [C, V_local] chunk at a time, gradients computed in the forward; memory two
# [C, V_local] fp32 buffers instead of the reference's several [T, V_local] ones.
def _stats_torch(lg: torch.Tensor, e: torch.Tensor, targets: torch.Tensor, st: torch.Tensor,
                 vocab_start: int, inv_tau: float) -> None:
    """``lg`` [n, V_local] fp32 logits -> in place ``d = z - m`` (``z = lg * inv_tau``,
    ``m`` the row max), ``e = exp(d)``, and ``st[n, 4] = (m, s, a, zt)`` as the stats kernel
    writes them: ``s = sum_j e_j``, ``a = sum_j e_j d_j``, ``zt = z[target]`` in this shard
    else 0."""
    n, v = lg.shape
    if inv_tau != 1.0:
        lg.mul_(inv_tau)
    m = lg.amax(dim=1)
    lg.sub_(m[:, None])
    torch.exp(lg, out=e)
    local = targets - vocab_start
    inside = (local >= 0) & (local < v)
    d_t = lg.gather(1, local.clamp(0, v - 1)[:, None])[:, 0]
    st[:, 0] = m
    st[:, 1] = e.sum(dim=1)
    st[:, 2] = torch.bmm(e.unsqueeze(1), lg.unsqueeze(2)).view(n)  # row dot products, no temp
    st[:, 3] = torch.where(inside, d_t + m, torch.zeros_like(m))


def _combine_parts_torch(parts: torch.Tensor):
    """[world, n, 4] shard partials -> merged (m, s, a, zt), as ``_combine_parts``."""
    m_p, s_p, a_p, zt_p = parts.unbind(-1)
    m = m_p.amax(0)
    scale = torch.exp(m_p - m)
    return m, (scale * s_p).sum(0), (scale * (a_p + s_p * (m_p - m))).sum(0), zt_p.sum(0)


def _grad_torch(lg, e, dl, m_loc, parts, targets, old, adv, w, ref, rows, row0: int, cfg,
                with_grad: bool) -> None:
    """The grad kernel's work on one chunk after :func:`_stats_torch`: per-row loss terms
    into ``rows[:, row0:row0 + n]`` and (``with_grad``) ``dloss/dlogits`` into ``dl``
    (``lg``'s buffer for fp32; the chunk's ``d`` and ``e`` are consumed).  ``m_loc`` is this
    shard's row max (its ``st[:, 0]``), ``parts`` the [world, n, 4] partials of all shards."""
    n, v = lg.shape
    world = cfg["world"]
    sl = slice(row0, row0 + n)
    tgt, old, adv, w = targets[sl], old[sl], adv[sl], w[sl]
    m, s, a, zt = _combine_parts_torch(parts)
    log_s = torch.log(s)
    lse = m + log_s
    logp = torch.where(_target_ok(tgt, v * world), zt - lse, float("nan"))
    ent = log_s - a / s
    s_mean = m + a / s
    # The values as the reference computes them; their derivative w.r.t. logp explicitly.
    ratio, pg, kl, low, high, dual = _per_token_terms(
        logp, old, adv, None if ref is None else ref[sl], kl_estimator=cfg["kl_estimator"],
        eps_low=cfg["eps_low"], eps_high=cfg["eps_high"], dual_clip=cfg["dual_clip"])
    unclipped = -adv * ratio
    # The gradient flows only through the unclipped branch, and not where the dual clip caps.
    g = torch.where((unclipped >= -adv * ratio.clamp(1.0 - cfg["eps_low"], 1.0 + cfg["eps_high"]))
                    & ~dual, unclipped, torch.zeros_like(ratio))
    if kl is None:
        kl = torch.zeros_like(ratio)
    else:
        k, d = cfg["kl_coef"], logp - ref[sl]
        if cfg["kl_estimator"] == "k1":
            g = g + k
        elif cfg["kl_estimator"] == "k2":
            g = g + k * d
        else:
            g = g + k * (1.0 - torch.exp(-d))
    rows[:, sl] = torch.stack([logp, ent, ratio, pg, kl, low.float(), high.float(), dual.float()])
    if not with_grad:
        return
    inv_tau = 1.0 / cfg["temperature"]
    alpha = w * g * inv_tau
    beta = w * cfg["entropy_coef"] * inv_tau
    c = torch.exp(m_loc - lse)  # p_j = exp(z_j - lse) = e_j c
    if cfg["entropy_coef"] != 0.0:
        # -p (alpha + beta (S - z)) with z = m_loc + d: d <- (alpha + beta (S - m_loc)) - beta d
        lg.mul_(-beta[:, None]).add_((alpha + beta * (s_mean - m_loc))[:, None])
        lg.mul_(e).mul_(-c[:, None])
    else:
        torch.mul(e, (-alpha * c)[:, None], out=lg)
    local = tgt - cfg["vocab_start"]
    inside = (local >= 0) & (local < v)
    ar = torch.arange(n, device=lg.device)
    lg.index_put_((ar, local.clamp(0, v - 1)), torch.where(inside, alpha, torch.zeros_like(alpha)),
                  accumulate=True)
    if dl is not lg:
        dl.copy_(lg)


def _fused_chunks(hidden, weight, targets, old, adv, w, ref, cfg, need_dh, need_dw, chunk_rows,
                  impl: str):
    """Run the chunked fused pass, its epilogue the Triton kernels (``impl="triton"``) or the
    PyTorch ops (``"chunked"``); returns (rows [8, T], dH or None, dW or None)."""
    T, H = hidden.shape
    V = weight.shape[0]
    dev, dtype = hidden.device, hidden.dtype
    world, group = cfg["world"], cfg["tp_group"]
    with_grad = need_dh or need_dw
    C = chunk_rows or default_chunk_rows(T, V, dtype, with_grad, impl=impl)
    tiles = epilogue_tiles(V)
    w_t = weight.t()
    if dev.type != "cuda" and dtype != torch.float32:
        w_t = w_t.float()  # CPU/interpreter: one upcast per call instead of one per chunk
    logits, dlog, stats = _chunk_buffers(C, V, dtype, with_grad, dev)
    exps = _buffer((C, V), torch.float32, dev) if impl == "chunked" else None
    rows = _buffer((_N_ROWS, T), torch.float32, dev)
    dH = _buffer(hidden.shape, dtype, dev) if need_dh else None
    dW = _buffer(weight.shape, dtype, dev) if need_dw else None
    inv_tau = 1.0 / cfg["temperature"]
    for c0, n in _chunk_spans(T, C):
        lg, st, dl = logits[:n], stats[:n], dlog[:n]
        _logits_mm(hidden[c0:c0 + n], w_t, lg)
        if impl == "chunked":
            _stats_torch(lg, exps[:n], targets[c0:c0 + n], st, cfg["vocab_start"], inv_tau)
        else:
            _stats_launch(tiles, lg, targets, st, c0, cfg["vocab_start"], inv_tau).run()
        parts = _tp_gather_stats(st, world, group)
        if impl == "chunked":
            _grad_torch(lg, exps[:n], dl, st[:, 0], parts, targets, old, adv, w, ref, rows, c0,
                        cfg, with_grad)
        else:
            _grad_launch(tiles, lg, dl, parts, targets, old, adv, w, ref, rows, c0, cfg,
                         with_grad).run()
        if need_dh:
            torch.mm(dl, weight, out=dH[c0:c0 + n])
        if need_dw:
            # Fixed chunk order + beta=0 on the first chunk: deterministic, no zero-fill pass.
            # For bf16 weights dW is accumulated in bf16 (cuBLAS adds in fp32 and rounds once
            # per chunk), so no fp32 [V, H] buffer is needed.
            dW.addmm_(dl.t(), hidden[c0:c0 + n], beta=0.0 if c0 == 0 else 1.0)
    if need_dh and world > 1:
        import torch.distributed as dist

        dist.all_reduce(dH, group=group)  # each shard's partial dH -> the full gradient
    return rows, dH, dW


class _FusedPolicyLoss(torch.autograd.Function):
    """Gradients are computed in forward (the loss is a scalar); backward scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, old, adv, w, ref, cfg, need_dh, need_dw, chunk_rows,
                impl):
        with device_guard(hidden.device):
            rows, dH, dW = _fused_chunks(hidden, weight, targets, old, adv, w, ref, cfg,
                                         need_dh, need_dw, chunk_rows, impl)
        loss = (w * _loss_terms(rows, cfg)).sum()
        ctx.grads = (dH, dW)
        ctx.mark_non_differentiable(rows)
        return loss, rows

    @staticmethod
    def backward(ctx, g_loss, g_rows):
        if ctx.grads is None:
            raise RuntimeError("policy_loss backward ran twice; the fused path scales its "
                               "precomputed gradients in place and supports one backward")
        dH, dW = ctx.grads
        ctx.grads = None
        g = g_loss.to(torch.float32)
        # In place: avoids a second [V, H] buffer for dW (770 MB at the Qwen3-4B shape).
        if dH is not None:
            dH.mul_(g.to(dH.dtype))
        if dW is not None:
            dW.mul_(g.to(dW.dtype))
        return dH, dW, None, None, None, None, None, None, None, None, None, None


def _loss_terms(rows: torch.Tensor, cfg) -> torch.Tensor:
    per_tok = rows[_ROW_PG]
    if cfg["has_ref"] and cfg["kl_coef"] != 0.0:
        per_tok = per_tok + cfg["kl_coef"] * rows[_ROW_KL]
    if cfg["entropy_coef"] != 0.0:
        per_tok = per_tok - cfg["entropy_coef"] * rows[_ROW_ENT]
    return per_tok


def _weighted_mean(w: torch.Tensor, x: torch.Tensor, wsum: torch.Tensor) -> torch.Tensor:
    return torch.where(wsum > 0, (w * x).sum() / wsum.clamp_min(torch.finfo(torch.float32).tiny),
                       torch.zeros_like(wsum))


# -------------------------------------------------------------------------------- public
def policy_loss(hidden, weight, targets, old_logprobs, advantages, *, token_weights=None,
                ref_logprobs=None, kl_coef=0.0, kl_estimator="k3", eps_low=0.2, eps_high=0.2,
                dual_clip=None, entropy_coef=0.0, temperature=1.0, tp_group=None, vocab_start=0,
                impl="auto", return_entropy=False, chunk_rows=None,
                check_inputs=None) -> PolicyLossOutput:
    """Clipped-ratio policy loss over an LM head, fused with the head GEMM.

    Per row ``t`` (``z = hidden[t] @ weight.T / temperature`` over the full vocab, all shards):
    ``logp_t = log_softmax(z)[target_t]``, ``r_t = exp(logp_t - old_t)``,
    ``pg_t = max(-A_t r_t, -A_t clip(r_t, 1 - eps_low, 1 + eps_high))``; with ``dual_clip=c``
    (> 1) and ``A_t < 0``: ``pg_t = min(pg_t, -c A_t)``.  KL estimators with
    ``d = logp - ref``: k1 ``d``; k2 ``d^2 / 2``; k3 ``exp(-d) + d - 1``.  ``H_t`` is the
    entropy of softmax(z).  ``loss = sum_t w_t (pg_t + kl_coef kl_t - entropy_coef H_t)``
    with ``w = token_weights`` (default ``1/T`` each).

    Args:
        hidden: ``[T, H]`` bf16/fp32 rows to score; differentiable.
        weight: ``[V_local, H]`` LM head (this rank's vocab shard), same dtype; differentiable.
        targets: ``[T]`` int64 global token ids in ``[0, V_local * tp_size)``.
        old_logprobs, advantages: ``[T]`` fp32 (no gradient).
        token_weights: ``[T]`` non-negative fp32 loss weights (default ``1/T``).
        ref_logprobs: ``[T]`` fp32 reference log-probs; required when ``kl_coef != 0``.
        kl_coef, kl_estimator: KL penalty weight and estimator (``"k1" | "k2" | "k3"``).
        eps_low, eps_high: clip range ``[1 - eps_low, 1 + eps_high]``.
        dual_clip: ``c > 1`` caps ``pg`` at ``-c A`` for ``A < 0``; ``None`` disables.
        entropy_coef: weight of the entropy bonus (subtracted from the loss).
        temperature: logits are divided by it.
        tp_group, vocab_start: vocab-parallel group and this shard's first token id.  The
            returned gradient w.r.t. ``hidden`` is the FULL gradient on every rank (partial
            dH is all-reduced inside; do not also use copy-to-TP-region); the gradient w.r.t.
            ``weight`` is this shard's.
        impl: ``"auto" | "triton" | "chunked" | "torch"`` (module docstring).
        return_entropy: also return per-token entropies (implied by ``entropy_coef != 0``).
        chunk_rows: rows per chunk of the fused path (default: from
            :data:`CHUNK_BUDGET_BYTES`); ignored by ``"torch"``.
        check_inputs: also run the value checks, which read whole tensors and sync with the
            device: hidden, weight and the per-token inputs finite, target ids in
            ``[0, V_total)``, token weights ``>= 0``.  Default ``None``: on when the
            environment sets ``R4B_KERNEL_CHECKS=1``, else off (shape, dtype and device
            checks always run; they cost nothing).  Unchecked, a NaN input gives a NaN loss
            and an out-of-range target a NaN log-prob for its row.

    Returns:
        :class:`PolicyLossOutput`.  The fused path supports a single backward per call.
    """
    check = checks_enabled(check_inputs)
    T, _ = _check_common(hidden, weight, targets, temperature, vocab_start, tp_group, check)
    dev = hidden.device
    old = _per_token("old_logprobs", old_logprobs, T, dev, check)
    adv = _per_token("advantages", advantages, T, dev, check)
    if token_weights is None:
        w = torch.full((T,), 1.0 / T, dtype=torch.float32, device=dev)
    else:
        w = _per_token("token_weights", token_weights, T, dev, check)
        if check and bool((w < 0).any()):
            i = int((w < 0).nonzero()[0])
            raise ValueError(f"token_weights must be >= 0, got {w[i].item()} at index {i}")
    ref = None if ref_logprobs is None else _per_token("ref_logprobs", ref_logprobs, T, dev, check)
    if kl_estimator not in _KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {sorted(_KL_ESTIMATORS)}, got {kl_estimator!r}")
    _check_number("kl_coef", kl_coef)
    _check_number("entropy_coef", entropy_coef)
    _check_number("eps_low", eps_low, lo=0.0, hi=1.0, hi_open=True)
    _check_number("eps_high", eps_high, lo=0.0)
    if dual_clip is not None:
        _check_number("dual_clip", dual_clip, lo=1.0, lo_open=True)
    if kl_coef != 0.0 and ref is None:
        raise ValueError(f"kl_coef={kl_coef} needs ref_logprobs, got None")
    if chunk_rows is not None and (not isinstance(chunk_rows, int) or chunk_rows < 1):
        raise ValueError(f"chunk_rows must be a positive int or None, got {chunk_rows!r}")
    world, _ = _tp_info(tp_group)
    need_entropy = bool(return_entropy) or entropy_coef != 0.0
    cfg = dict(world=world, tp_group=tp_group, temperature=float(temperature),
               vocab_start=vocab_start, kl_estimator=kl_estimator, kl_coef=float(kl_coef),
               eps_low=float(eps_low), eps_high=float(eps_high),
               dual_clip=None if dual_clip is None else float(dual_clip),
               entropy_coef=float(entropy_coef), need_entropy=need_entropy, has_ref=ref is not None)
    targets = targets.contiguous()
    which = _loss_impl(impl, dev)
    if which == "torch":
        loss, rows = _policy_loss_torch(hidden, weight, targets, old, adv, w, ref, cfg)
    else:
        grad_on = torch.is_grad_enabled()
        need_dh = grad_on and hidden.requires_grad
        need_dw = grad_on and weight.requires_grad
        loss, rows = _FusedPolicyLoss.apply(hidden.contiguous(), weight, targets, old, adv, w, ref,
                                            cfg, need_dh, need_dw, chunk_rows, which)
    with torch.no_grad():
        wsum = w.sum()
        clipped = torch.maximum(rows[_ROW_LOW], rows[_ROW_HIGH])
        active = w > 0
        n_active = active.sum()
        return PolicyLossOutput(
            loss=loss,
            logprobs=rows[_ROW_LOGP].clone(),
            ratio=rows[_ROW_RATIO].clone(),
            entropy=rows[_ROW_ENT].clone() if need_entropy else None,
            kl=rows[_ROW_KL].clone() if ref is not None else None,
            pg_loss=(w * rows[_ROW_PG]).sum(),
            clip_frac=_weighted_mean(w, clipped, wsum),
            clip_frac_low=_weighted_mean(w, rows[_ROW_LOW], wsum),
            clip_frac_high=_weighted_mean(w, rows[_ROW_HIGH], wsum),
            clip_frac_tokens=torch.where(n_active > 0, (clipped * active).sum() / n_active.clamp_min(1),
                                         torch.zeros_like(wsum)),
            dual_clip_frac=_weighted_mean(w, rows[_ROW_DUAL], wsum),
            kl_mean=_weighted_mean(w, rows[_ROW_KL], wsum) if ref is not None else None,
            entropy_mean=_weighted_mean(w, rows[_ROW_ENT], wsum) if need_entropy else None,
        )


def _token_logprobs_fused(hidden, weight, targets, temperature, vocab_start, tp_group, chunk_rows,
                          impl: str):
    T = hidden.shape[0]
    V = weight.shape[0]
    dev, dtype = hidden.device, hidden.dtype
    world, _ = _tp_info(tp_group)
    C = chunk_rows or default_chunk_rows(T, V, dtype, with_grad=False, impl=impl)
    tiles = epilogue_tiles(V)
    w_t = weight.t()
    if dev.type != "cuda" and dtype != torch.float32:
        w_t = w_t.float()
    logits = _buffer((C, V), torch.float32, dev)
    exps = _buffer((C, V), torch.float32, dev) if impl == "chunked" else None
    stats = _buffer((T, 4), torch.float32, dev)
    for c0, n in _chunk_spans(T, C):
        lg = logits[:n]
        _logits_mm(hidden[c0:c0 + n], w_t, lg)
        if impl == "chunked":
            _stats_torch(lg, exps[:n], targets[c0:c0 + n], stats[c0:c0 + n], vocab_start,
                         1.0 / temperature)
        else:
            _stats_launch(tiles, lg, targets, stats[c0:c0 + n], c0, vocab_start,
                          1.0 / temperature).run()
    # One exchange for the whole batch: merge the [T, 4] partials of every shard.
    m, s, a, zt = _combine_parts_torch(_tp_gather_stats(stats, world, tp_group))
    log_s = torch.log(s)
    logp = torch.where(_target_ok(targets, V * world), zt - (m + log_s), float("nan"))
    return logp, log_s - a / s


def token_logprobs(hidden, weight, targets, *, temperature=1.0, return_entropy=False,
                   tp_group=None, vocab_start=0, impl="auto", chunk_rows=None, check_inputs=None):
    """Log-probs of ``targets`` under ``softmax(hidden @ weight.T / temperature)``; no graph.

    Same conventions as :func:`policy_loss` (vocab-parallel with ``tp_group`` /
    ``vocab_start``; ``weight`` is this rank's ``[V_local, H]`` shard).  Used for old and
    reference log-probs and for rollout scoring.  ``check_inputs`` as in :func:`policy_loss`
    (off by default: an out-of-range target gives a NaN log-prob for its row).

    Returns:
        ``logprobs`` ``[T]`` fp32, or the tuple ``(logprobs, entropy)`` (both ``[T]`` fp32)
        when ``return_entropy=True``.  Every TP rank returns the same values.
    """
    _check_common(hidden, weight, targets, temperature, vocab_start, tp_group,
                  checks_enabled(check_inputs))
    if chunk_rows is not None and (not isinstance(chunk_rows, int) or chunk_rows < 1):
        raise ValueError(f"chunk_rows must be a positive int or None, got {chunk_rows!r}")
    targets = targets.contiguous()
    with torch.no_grad():
        which = _loss_impl(impl, hidden.device)
        if which == "torch":
            logp, ent = _logp_entropy_torch(hidden, weight, targets, float(temperature),
                                            vocab_start, tp_group, bool(return_entropy))
        else:
            with device_guard(hidden.device):
                logp, ent = _token_logprobs_fused(
                    hidden.contiguous(), weight, targets, float(temperature), vocab_start,
                    tp_group, chunk_rows, which)
    return (logp, ent) if return_entropy else logp
