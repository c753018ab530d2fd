"""r4b_kernels behind verl's seams (tested with verl 0.9.1).

Three seams, read from verl 0.9.1's code:

* **Fused log-probs** (``actor.use_fused_kernels``): :func:`linear_cross_entropy` has the
  signature and return of ``verl.utils.kernel.linear_cross_entropy.linear_cross_entropy``
  (``(hidden, weight, labels, temperature, "none", dist_process_group) -> (log_probs,
  entropy)``), computed by r4b's fused kernels (vocab-parallel through the process group);
  :func:`patch_linear_cross_entropy` puts it in verl's place (the FSDP models' triton backend
  and Megatron's fused forward / ``output_processor`` both call that name).
* **Policy loss** (``actor.policy_loss.loss_mode``): :func:`compute_policy_loss_r4b`, registered
  as ``"r4b"``: the clipped-ratio loss with dual clip of verl's ``"vanilla"`` with r4b's
  per-token terms, and verl's loss aggregations written as r4b token weights
  (:func:`verl_token_weights`).
* **Advantage** (``algorithm.adv_estimator``): ``"r4b_grpo"`` (a drop-in for verl's ``"grpo"``,
  computed by :func:`r4b_kernels.grouped_advantage`) and ``"r4b_bpo"`` (the merged-2g group
  advantage of BPO: give a prompt's think and no-think rollouts one ``uid``; a rollout alone in
  its group and an all-equal group get advantage exactly 0).

:func:`register` adds the loss and the estimators to verl's registries; importing
``r4b_kernels.integrations.verl_plugin`` calls it, so
``VERL_USE_EXTERNAL_MODULES=r4b_kernels.integrations.verl_plugin`` registers them in every
verl process.  This module imports verl only inside :func:`register` and
:func:`patch_linear_cross_entropy`.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from ..grouped_advantage import grouped_advantage
from ..policy_loss import _per_token_terms
from . import logprobs_entropy

__all__ = ["TESTED_VERL", "linear_cross_entropy", "patch_linear_cross_entropy", "compute_policy_loss_r4b",
           "verl_token_weights", "compute_grpo_outcome_advantage_r4b", "compute_bpo_outcome_advantage",
           "register", "LOSS_AGG_MODES"]

#: verl releases this adapter was tested against (tests/test_integrations_verl.py).
TESTED_VERL = ">=0.9.1,<0.10"

LOSS_AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-sum-norm",
                  "seq-mean-token-mean")


# ----------------------------------------------------------------------- fused log-probs
class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.scale, None


def linear_cross_entropy(hidden, weight, labels, temperature=1.0, reduction="none",
                         dist_process_group=None, *, impl="auto", chunk_rows=None):
    """Drop-in for verl's ``linear_cross_entropy``: per-token log-probs and entropies.

    Args:
        hidden: ``[..., H]`` final hidden states (flattened to ``[N, H]``).
        weight: ``[V_local, H]`` LM head; under ``dist_process_group`` this rank's vocab shard
            (equal shards, rank ``r`` holds ids ``[r V_local, (r + 1) V_local)``), as verl's
            Megatron path passes it.
        labels: ``[...]`` int64 global token ids, ``N`` of them.
        temperature: float > 0; logits are divided by it.
        reduction: only ``"none"`` (what verl's callers pass).
        dist_process_group: the tensor-parallel group, or None.
        impl, chunk_rows: as in :func:`r4b_kernels.policy_loss`.

    Returns:
        ``(log_probs, entropy)``, ``[N]`` fp32 each, differentiable w.r.t. ``hidden`` and
        ``weight``.  Gradient conventions match verl's kernel: the weight gradient is this
        shard's; under a group of size ``P`` each rank's hidden gradient is ``1/P`` of the
        full gradient, so that the sum over the group (Megatron's sequence-parallel gather
        sums it in its backward, as it does verl's per-shard partials) is the full gradient.
    """
    if reduction != "none":
        raise ValueError(f"reduction must be 'none' (per-token log_probs and entropy), got {reduction!r}")
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool):
        raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
    if hidden.dim() < 2:
        raise ValueError(f"hidden must have shape [..., H], got {tuple(hidden.shape)}")
    H = hidden.shape[-1]
    h = hidden.reshape(-1, H)
    y = labels.reshape(-1)
    if y.shape[0] != h.shape[0]:
        raise ValueError(f"labels must hold one id per hidden row ({h.shape[0]}), got shape "
                         f"{tuple(labels.shape)}")
    world, vocab_start = 1, 0
    if dist_process_group is not None:
        import torch.distributed as dist

        world = dist.get_world_size(dist_process_group)
        vocab_start = dist.get_rank(dist_process_group) * weight.shape[0]
    if world > 1:
        h = _ScaleGrad.apply(h, 1.0 / world)
    return logprobs_entropy(h, weight, y.long(), temperature=float(temperature),
                            tp_group=dist_process_group, vocab_start=vocab_start, impl=impl,
                            chunk_rows=chunk_rows)


def patch_linear_cross_entropy():
    """Make verl call :func:`linear_cross_entropy` where it calls its own.

    Replaces ``verl.utils.kernel.linear_cross_entropy.linear_cross_entropy`` (which the FSDP
    models' fused forward imports at call time) and the name in every loaded ``verl.*`` module
    that imported it at import time (``verl.models.mcore.model_forward_fused``, ...).  Use with
    ``actor_rollout_ref.model.use_fused_kernels=True`` and ``fused_kernel_options.impl_backend=
    triton`` (the backend that calls this name).  Returns a function that undoes the patch.
    """
    import verl.utils.kernel.linear_cross_entropy as lce

    original = lce.linear_cross_entropy
    patched = [(lce, "linear_cross_entropy")]
    lce.linear_cross_entropy = linear_cross_entropy
    for name, mod in list(sys.modules.items()):
        if name.startswith("verl.") and mod is not lce and getattr(mod, "linear_cross_entropy", None) is original:
            mod.linear_cross_entropy = linear_cross_entropy
            patched.append((mod, "linear_cross_entropy"))

    def undo():
        for mod, attr in patched:
            setattr(mod, attr, original)

    return undo


# ---------------------------------------------------------------------------- policy loss
def verl_token_weights(response_mask, loss_agg_mode, *, dp_size=1, batch_num_tokens=None,
                       global_batch_size=None, loss_scale_factor=None):
    """Per-token loss weights ``w`` such that ``sum(w * loss_mat)`` is verl's
    ``agg_loss(loss_mat, response_mask, loss_agg_mode, **global_batch_info)``.

    ``response_mask`` is ``[B, L]``; the keyword arguments are verl's ``global_batch_info``.
    Modes (``m`` the mask, ``n_b`` sequence ``b``'s token count, ``D`` = ``dp_size``):
    ``token-mean`` ``D m / batch_num_tokens``; ``token-sum`` ``D m``; ``seq-mean-token-sum``
    ``D m / global_batch_size``; ``seq-mean-token-sum-norm`` that ``/ loss_scale_factor``
    (default ``L``); ``seq-mean-token-mean`` ``D m / ((n_b + 1e-8) global_batch_size)``.
    ``batch_num_tokens`` / ``global_batch_size`` default to this batch's (``dp_size == 1`` only).
    """
    if loss_agg_mode not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg_mode must be one of {LOSS_AGG_MODES}, got {loss_agg_mode!r}")
    if response_mask.dim() != 2:
        raise ValueError(f"response_mask must be [batch, response_length], got shape {tuple(response_mask.shape)}")
    m = response_mask.to(torch.float32)
    n = m.sum(-1, keepdim=True)
    if loss_agg_mode == "token-mean":
        if batch_num_tokens is None:
            if dp_size > 1:
                raise ValueError(f"loss_agg_mode 'token-mean' with dp_size={dp_size} needs the global "
                                 "batch_num_tokens, got None")
            batch_num_tokens = m.sum()
        return m * (dp_size / batch_num_tokens)
    if loss_agg_mode == "token-sum":
        return m * dp_size
    if global_batch_size is None:
        if dp_size > 1:
            raise ValueError(f"loss_agg_mode {loss_agg_mode!r} with dp_size={dp_size} needs the global "
                             "global_batch_size, got None")
        global_batch_size = (n > 0).sum()
    if loss_agg_mode == "seq-mean-token-mean":
        return m / (n + 1e-8) * (dp_size / global_batch_size)
    w = m * (dp_size / global_batch_size)
    if loss_agg_mode == "seq-mean-token-sum-norm":
        w = w / (m.shape[-1] if loss_scale_factor is None else loss_scale_factor)
    return w


def _masked_mean(x, mask):
    return (torch.where(mask.bool(), x, 0.0) * mask).sum() / (mask.sum() + 1e-8)  # verl_F.masked_mean


def compute_policy_loss_r4b(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                            config=None, rollout_is_weights=None):
    """verl policy loss ``"r4b"``: verl's ``"vanilla"`` objective with r4b's per-token terms.

    Same signature, config fields (``clip_ratio``, ``clip_ratio_low``, ``clip_ratio_high``,
    ``clip_ratio_c``, ``global_batch_info``) and metrics (``actor/pg_clipfrac``,
    ``actor/ppo_kl``, ``actor/pg_clipfrac_lower``) as verl 0.9.1's
    ``compute_policy_loss_vanilla``.  Per token: ``pg = max(-A r, -A clip(r, 1 - eps_low,
    1 + eps_high))``, capped at ``-c A`` for ``A < 0`` (dual clip, ``c = clip_ratio_c``), times
    ``rollout_is_weights``; the loss is ``sum(w * pg)`` with ``w`` from
    :func:`verl_token_weights`.  One difference: verl clamps ``log r`` to ``[-20, 20]`` before
    ``exp`` and r4b does not; the two differ only where ``log r < -20`` and ``A > 0``, by at
    most ``A e^-20`` per token.
    """
    if config is None:
        raise ValueError("config (the actor config with clip_ratio*, global_batch_info) is required, got None")
    clip = config.clip_ratio
    low = config.clip_ratio_low if config.clip_ratio_low is not None else clip
    high = config.clip_ratio_high if config.clip_ratio_high is not None else clip
    c = config.get("clip_ratio_c", 3.0)
    if not c > 1.0:
        raise ValueError(f"clip_ratio_c must be > 1 (dual-clip PPO), got {c!r}")
    mask = response_mask
    # Rows outside the mask may hold anything (padding); keep them out of the autograd graph.
    logp = torch.where(mask.bool(), log_prob, old_log_prob.detach())
    ratio, pg, _, lo, hi, dual = _per_token_terms(logp, old_log_prob.detach(), advantages.detach(), None,
                                                  kl_estimator="k3", eps_low=low, eps_high=high,
                                                  dual_clip=c)
    if rollout_is_weights is not None:
        pg = pg * rollout_is_weights
    w = verl_token_weights(mask, loss_agg_mode, **dict(getattr(config, "global_batch_info", None) or {}))
    loss = (w * torch.where(mask.bool(), pg, 0.0)).sum()
    d = torch.clamp(logp.detach() - old_log_prob, -20.0, 20.0)
    metrics = {
        "actor/pg_clipfrac": _masked_mean((lo | hi).float(), mask).item(),
        "actor/ppo_kl": _masked_mean(-d, mask).item(),
        "actor/pg_clipfrac_lower": _masked_mean(dual.float(), mask).item(),
    }
    return loss, metrics


# ------------------------------------------------------------------------------ advantages
def _group_ids(index) -> torch.Tensor:
    arr = np.asarray(index)
    if arr.ndim != 1:
        raise ValueError(f"index must be a 1-D array of group ids (uids), got shape {arr.shape}")
    _, inv = np.unique(arr, return_inverse=True)
    return torch.from_numpy(inv.astype(np.int64).reshape(-1))


def _scores(token_level_rewards, response_mask, index):
    if token_level_rewards.shape != response_mask.shape or token_level_rewards.dim() != 2:
        raise ValueError(f"token_level_rewards and response_mask must both be [batch, response_length], got "
                         f"{tuple(token_level_rewards.shape)} and {tuple(response_mask.shape)}")
    scores = token_level_rewards.sum(dim=-1).to(torch.float32)
    gid = _group_ids(index)
    if gid.shape[0] != scores.shape[0]:
        raise ValueError(f"index must hold one uid per response ({scores.shape[0]}), got {gid.shape[0]}")
    return scores, gid.to(scores.device)


def compute_grpo_outcome_advantage_r4b(token_level_rewards, response_mask, index, epsilon=1e-6,
                                       norm_adv_by_std_in_grpo=True, config=None):
    """verl advantage estimator ``"r4b_grpo"``: verl 0.9.1's ``"grpo"``, computed by
    :func:`r4b_kernels.grouped_advantage` (unbiased std, ``(r - mean) / (std + epsilon)``, or
    ``r - mean`` without ``norm_adv_by_std_in_grpo``).  As verl, a response alone in its group
    gets ``r / (1 + epsilon)`` (``r`` unscaled); a group whose rewards are all equal gets exactly
    0 (verl: the rounding residue of its mean over ``epsilon``, 0 for equal 0/1 rewards).
    Returns ``(advantages, returns)``, both ``[batch, response_length]`` (equal).
    """
    scores, gid = _scores(token_level_rewards, response_mask, index)
    res = grouped_advantage(scores, gid, scale="std" if norm_adv_by_std_in_grpo else "none", eps=epsilon)
    single = res.group_size[res.inverse] == 1
    alone = scores / (1.0 + epsilon) if norm_adv_by_std_in_grpo else scores
    adv = torch.where(single, alone, res.advantages)
    out = adv.unsqueeze(-1) * response_mask
    return out, out


def compute_bpo_outcome_advantage(token_level_rewards, response_mask, index, epsilon=1e-6,
                                  norm_adv_by_std_in_grpo=True, config=None):
    """verl advantage estimator ``"r4b_bpo"``: BPO's merged-group advantage.

    ``index`` must give a prompt's 2g rollouts (think and no-think) one uid, so the modes are
    compared with each other: ``(r - mean_2g) / (std_2g + epsilon)`` (or ``r - mean_2g``).  A
    rollout alone in its group and a group whose rewards are all equal (all right / all wrong)
    get advantage exactly 0.  Returns ``(advantages, returns)`` as ``"grpo"`` does.
    """
    scores, gid = _scores(token_level_rewards, response_mask, index)
    res = grouped_advantage(scores, gid, scale="std" if norm_adv_by_std_in_grpo else "none", eps=epsilon)
    out = res.advantages.unsqueeze(-1) * response_mask
    return out, out


def register():
    """Register ``"r4b"`` (policy loss), ``"r4b_grpo"`` and ``"r4b_bpo"`` (advantage estimators)
    in verl's registries.  Idempotent.  Returns verl's ``core_algos`` module."""
    from verl.trainer.ppo import core_algos

    core_algos.register_policy_loss("r4b")(compute_policy_loss_r4b)
    for name, fn in (("r4b_grpo", compute_grpo_outcome_advantage_r4b), ("r4b_bpo", compute_bpo_outcome_advantage)):
        if core_algos.ADV_ESTIMATOR_REGISTRY.get(name) is not fn:
            core_algos.register_adv_est(name)(fn)
    return core_algos
