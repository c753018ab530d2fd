"""Adapters that put r4b_kernels behind the loss seams of other RL trainers.

* :mod:`r4b_kernels.integrations.trl` - TRL: a ``LigerFusedLinearGRPOLoss``-compatible module
  (the loss TRL <= 1.13 builds for ``use_liger_kernel=True``) and, for TRL 1.15 - 1.16, a
  replacement of the fused LM head's per-token log-prob kernel.
* :mod:`r4b_kernels.integrations.verl` - verl: a registered policy loss and advantage
  estimators, and a ``linear_cross_entropy``-compatible fused log-prob + entropy
  (vocab-parallel through the process group).

Importing this package (or either submodule) imports neither TRL nor verl; each submodule
imports its host library only inside the functions that need it.  This module holds what
both share: :func:`logprobs_entropy`, log-probs and entropies of target tokens straight from
the final hidden states and the LM head, differentiable w.r.t. both.
"""

from __future__ import annotations

import torch

from ..policy_loss import policy_loss, token_logprobs

__all__ = ["logprobs_entropy"]


def _tp_world(tp_group) -> int:
    if tp_group is None:
        return 1
    import torch.distributed as dist

    return dist.get_world_size(tp_group)


class _LogProbsEntropy(torch.autograd.Function):
    """Forward: :func:`token_logprobs` (one GEMM pass).  Backward: :func:`policy_loss` calls
    whose loss has, for every row, the incoming gradients as its derivatives.

    With ``old = logp`` (the forward's own log-probs, so the ratio is 1 up to rounding, far
    inside the clip range) and no KL, row ``t`` of ``policy_loss`` contributes
    ``w_t (-A_t r_t - c H_t)``: derivative ``-w_t A_t`` w.r.t. ``logp_t`` and ``-c w_t`` w.r.t.
    ``H_t``.  For incoming gradients ``(a_t, b_t)``:

    * rows with ``b_t > 0``: one call with ``c = -1``, ``w_t = b_t``, ``A_t = -a_t / b_t``;
    * rows with ``b_t < 0``: one call with ``c = +1``, ``w_t = -b_t``, ``A_t = -a_t / |b_t|``;
    * rows with ``b_t = 0`` and ``a_t != 0`` (and rows whose ``a_t / |b_t|`` overflows, which
      then take ``A_t = 0`` above): one call with ``c = 0``, ``w_t = |a_t|``,
      ``A_t = -sign(a_t)``.

    Every row is in at most two calls (one unless the quotient overflows), so the backward
    costs the three GEMMs of the fused loss over the rows once, plus one row gather.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, tp_group, vocab_start, impl, chunk_rows):
        ctx.set_materialize_grads(False)
        logp, ent = token_logprobs(hidden.detach(), weight.detach(), targets, temperature=temperature,
                                   return_entropy=True, tp_group=tp_group, vocab_start=vocab_start,
                                   impl=impl, chunk_rows=chunk_rows)
        ctx.save_for_backward(hidden, weight, targets, logp)
        ctx.opts = dict(temperature=temperature, tp_group=tp_group, vocab_start=vocab_start,
                        impl=impl, chunk_rows=chunk_rows)
        ctx.mark_non_differentiable(targets)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, targets, logp = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if (g_logp is None and g_ent is None) or not (need_h or need_w):
            return None, None, None, None, None, None, None, None
        T = hidden.shape[0]
        a = torch.zeros(T, dtype=torch.float32, device=hidden.device) if g_logp is None else g_logp.float()
        b = torch.zeros(T, dtype=torch.float32, device=hidden.device) if g_ent is None else g_ent.float()
        opts = ctx.opts
        group = opts["tp_group"]
        if _tp_world(group) > 1:
            # Every rank must make the same calls on the same rows (they are collectives): take
            # the incoming gradients of the group's first rank (a replicated loss gives equal
            # gradients on every rank anyway).
            import torch.distributed as dist

            ab = torch.stack([a, b]).contiguous()
            dist.broadcast(ab, src=dist.get_global_rank(group, 0), group=group)
            a, b = ab[0], ab[1]
        quot = -a / b.abs()
        ok = (b != 0) & torch.isfinite(quot)
        calls = [(b > 0, -1.0, b, torch.where(ok, quot, 0.0)),
                 (b < 0, 1.0, -b, torch.where(ok, quot, 0.0)),
                 ((a != 0) & ~ok, 0.0, a.abs(), -torch.sign(a))]
        dH = torch.zeros_like(hidden) if need_h else None
        dW = torch.zeros_like(weight) if need_w else None
        W = weight.detach().requires_grad_(need_w)
        for rows_mask, ent_coef, w, adv in calls:
            rows = rows_mask.nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            h = hidden.detach().index_select(0, rows).requires_grad_(need_h)
            with torch.enable_grad():
                out = policy_loss(h, W, targets.index_select(0, rows), logp.index_select(0, rows),
                                  adv.index_select(0, rows), token_weights=w.index_select(0, rows),
                                  eps_low=0.9, eps_high=1e9, entropy_coef=ent_coef,
                                  temperature=opts["temperature"], tp_group=group,
                                  vocab_start=opts["vocab_start"], impl=opts["impl"],
                                  chunk_rows=opts["chunk_rows"])
                grads = torch.autograd.grad(out.loss, [t for t, n in ((h, need_h), (W, need_w)) if n])
            grads = list(grads)
            if need_h:
                dH.index_add_(0, rows, grads.pop(0).to(dH.dtype))
            if need_w:
                dW.add_(grads.pop(0).to(dW.dtype))
        return dH, dW, None, None, None, None, None, None


def logprobs_entropy(hidden, weight, targets, *, temperature=1.0, tp_group=None, vocab_start=0,
                     impl="auto", chunk_rows=None):
    """Log-probs and entropies of ``targets`` under ``softmax(hidden @ weight.T / temperature)``,
    differentiable w.r.t. ``hidden`` and ``weight``; the logits are never materialised.

    Args:
        hidden: ``[T, H]`` fp32/bf16.
        weight: ``[V_local, H]`` LM head (this rank's vocab shard under ``tp_group``).
        targets: ``[T]`` int64 global token ids.
        temperature, tp_group, vocab_start, impl, chunk_rows: as in
            :func:`r4b_kernels.policy_loss`.

    Returns:
        ``(logprobs, entropy)``, both ``[T]`` fp32.  Forward is one :func:`token_logprobs`
        pass; backward runs :func:`r4b_kernels.policy_loss` on the rows with a non-zero
        incoming gradient (see ``_LogProbsEntropy``).  Under ``tp_group`` the gradient w.r.t.
        ``hidden`` is the FULL gradient on every rank (as :func:`policy_loss`'s); the
        gradient w.r.t. ``weight`` is this shard's.
    """
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool):
        raise TypeError(f"temperature must be a number, got {temperature!r}")
    return _LogProbsEntropy.apply(hidden, weight, targets, float(temperature), tp_group, vocab_start,
                                  impl, chunk_rows)
