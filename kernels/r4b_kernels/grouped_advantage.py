"""Grouped advantages (GRPO / Dr.GRPO / RLOO / BPO) and per-token advantage + loss weights.

Three public functions:

* :func:`grouped_advantage` — per-group and per-(group, mode) reward statistics and the
  advantage of every rollout, in one pass.  ``impl="torch"`` is the fp64 reference
  (``torch.unique`` + ``index_add``); ``impl="triton"`` sorts the ids once with torch and runs one
  fused segmented-reduction kernel (one program per group: sums/min/max, centred sums of
  squares, advantages).
* :func:`sequence_loss_weights` — the per-token loss weight of every sequence under a loss
  aggregation (token mean, sequence mean, Dr.GRPO constant, mode-balanced), computed over the
  *global* batch.
* :func:`token_advantage_weights` — writes per-token advantage and loss weight straight into a
  packed (``cu_seqlens``) micro-batch with the label-shifted row convention of the packer.

Numerics.  The standard deviation is the **unbiased sample std** (Bessel's correction, divide by
``n - 1``, as ``torch.std`` and the common GRPO implementations), in both implementations.  A
group (or subgroup) of size 1 has std 0 and advantage 0.  A set whose rewards are all exactly
equal (all right / all wrong) gets advantage exactly 0, whatever the rounding of its mean.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._common import (HAS_TRITON, KernelLaunch, cdiv, check_finite, check_tensor, device_guard,
                      next_power_of_2, resolve_impl)

if HAS_TRITON:
    import triton
    import triton.language as tl

#: Number of rollout modes: 0 = no-think, 1 = think, 2 = auto.
NUM_MODES = 3
BASELINES = ("group", "mode")
SCALES = ("std", "none")
AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm", "mode_balanced")

_INT_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


def _alloc(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Uninitialised output buffer of the Triton launchers (tests swap in a poisoning one)."""
    return torch.empty(*shape, dtype=dtype, device=device)


class GroupedAdvantage(NamedTuple):
    """Result of :func:`grouped_advantage` (``G`` groups, ``N`` rollouts).

    Groups are numbered by ascending group id: row ``j`` of every per-group field belongs to
    ``group_ids[j]``, and ``inverse[k]`` is the row of rollout ``k``.
    """

    advantages: torch.Tensor
    """[N] fp32 — advantage of every rollout."""
    group_ids: torch.Tensor
    """[G] int64 — the unique group ids, ascending (the row order of all per-group fields)."""
    inverse: torch.Tensor
    """[N] int64 — group row of every rollout (``group_ids[inverse] == input group_ids``)."""
    group_mean: torch.Tensor
    """[G] fp32 — mean reward of the merged group (all modes)."""
    group_std: torch.Tensor
    """[G] fp32 — unbiased sample std of the merged group; 0 for a group of size 1."""
    group_size: torch.Tensor
    """[G] int64 — number of rollouts in the group."""
    zero_variance: torch.Tensor
    """[G] bool — all rewards of the group are equal (all right or all wrong); True for size 1."""
    mode_mean: torch.Tensor | None
    """[G, 3] fp32 — mean reward per (group, mode); NaN where the mode is absent; None without
    ``modes``."""
    mode_count: torch.Tensor | None
    """[G, 3] int64 — rollouts per (group, mode); None without ``modes``."""


# ----------------------------------------------------------------------------- validation
def _check_group_inputs(rewards, group_ids, modes):
    check_tensor("rewards", rewards, ndim=1, dtypes=(torch.float32,))
    n = rewards.shape[0]
    check_tensor("group_ids", group_ids, ndim=1, dtypes=(torch.int32, torch.int64), length=n,
                 device=rewards.device)
    check_finite("rewards", rewards)
    _check_ids(group_ids)
    if modes is not None:
        check_tensor("modes", modes, ndim=1, dtypes=_INT_DTYPES, length=n, device=rewards.device)
        bad = (modes < 0) | (modes >= NUM_MODES)
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            raise ValueError(f"modes must be in {{0, 1, 2}} (no-think, think, auto), got "
                             f"{int(modes[i])} at index {i}")


def _check_ids(group_ids):
    neg = group_ids < 0
    if bool(neg.any()):
        i = int(neg.nonzero()[0])
        raise ValueError(f"group_ids must be non-negative, got {int(group_ids[i])} at index {i}")


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


# ----------------------------------------------------------------------------- torch reference
def _segment_stats(values: torch.Tensor, index: torch.Tensor, rows: int):
    """fp64 count, mean, unbiased std and all-equal flag of ``values`` grouped by ``index``."""
    count = torch.zeros(rows, dtype=torch.float64, device=values.device)
    count.index_add_(0, index, torch.ones_like(values))
    total = torch.zeros_like(count).index_add_(0, index, values)
    mean = total / count.clamp(min=1)
    dev = values - mean[index]
    ss = torch.zeros_like(count).index_add_(0, index, dev * dev)
    std = torch.sqrt(ss / (count - 1).clamp(min=1))
    lo = torch.full_like(count, float("inf")).scatter_reduce_(0, index, values, "amin")
    hi = torch.full_like(count, float("-inf")).scatter_reduce_(0, index, values, "amax")
    return count, mean, std, lo == hi


def _grouped_advantage_torch(rewards, group_ids, modes, baseline, scale, leave_one_out, eps):
    uniq, inverse, size = torch.unique(group_ids.long(), sorted=True, return_inverse=True,
                                       return_counts=True)
    g = uniq.shape[0]
    r = rewards.double()
    count, mean, std, flat = _segment_stats(r, inverse, g)
    mode_mean = mode_count = None
    if modes is not None:
        sub = inverse * NUM_MODES + modes.long()
        m_count, m_mean, m_std, m_flat = _segment_stats(r, sub, g * NUM_MODES)
        mode_count = m_count.view(g, NUM_MODES).long()
        mode_mean = torch.where(m_count > 0, m_mean, float("nan")).view(g, NUM_MODES).float()
    if baseline == "mode" and modes is not None:
        b_idx, b_count, b_mean, b_std, b_flat = sub, m_count, m_mean, m_std, m_flat
    else:  # without modes every rollout is in one subgroup: "mode" == "group"
        b_idx, b_count, b_mean, b_std, b_flat = inverse, count, mean, std, flat
    n = b_count[b_idx]
    adv = r - b_mean[b_idx]
    if leave_one_out:  # r_k - mean(others) = n / (n - 1) * (r_k - mean(all))
        adv = adv * n / (n - 1).clamp(min=1)
    if scale == "std":
        adv = adv / (b_std[b_idx] + eps)
    adv = torch.where((n <= 1) | b_flat[b_idx], 0.0, adv)
    return GroupedAdvantage(
        advantages=adv.float(), group_ids=uniq, inverse=inverse, group_mean=mean.float(),
        group_std=std.float(), group_size=size, zero_variance=flat,
        mode_mean=mode_mean, mode_count=mode_count)


# ----------------------------------------------------------------------------- Triton kernel
if HAS_TRITON:

    @triton.jit
    def _grouped_advantage_fwd_kernel(
        rewards_ptr, modes_ptr, order_ptr, offsets_ptr,
        adv_ptr, inverse_ptr, mean_ptr, std_ptr, flat_ptr, mode_mean_ptr, mode_count_ptr,
        eps,
        HAS_MODES: tl.constexpr, BASELINE_MODE: tl.constexpr, SCALE_STD: tl.constexpr,
        LOO: tl.constexpr, BLOCK: tl.constexpr,
    ):
        # One program per group.  Rollouts of group g are order[offsets[g]:offsets[g+1]] (a
        # stable sort of the ids), so each program reads only its own segment: no atomics, and
        # the summation order is fixed, hence results are deterministic.  Per-mode statistics
        # live in [4, BLOCK] tiles (row = mode, 3 used; row 3 is padding for a power-of-2 shape).
        # Everything accumulates in fp32; the variance uses centred sums (second pass over the
        # segment, which is cache-resident) instead of E[x^2] - E[x]^2 to avoid cancellation.
        g = tl.program_id(0).to(tl.int64)
        start = tl.load(offsets_ptr + g)
        end = tl.load(offsets_ptr + g + 1)
        mode_row = tl.arange(0, 4)[:, None]
        lane = tl.arange(0, BLOCK)

        # Pass 1: per-mode sums, counts, min, max; record each rollout's group row.
        s = tl.zeros([4, BLOCK], tl.float32)
        c = tl.zeros([4, BLOCK], tl.float32)
        lo = tl.full([4, BLOCK], float("inf"), tl.float32)
        hi = tl.full([4, BLOCK], float("-inf"), tl.float32)
        for off in range(start, end, BLOCK):
            j = off + lane
            valid = j < end
            idx = tl.load(order_ptr + j, mask=valid, other=0)
            r = tl.load(rewards_ptr + idx, mask=valid, other=0.0)
            if HAS_MODES:
                m = tl.load(modes_ptr + idx, mask=valid, other=0).to(tl.int32)
            else:
                m = tl.zeros([BLOCK], tl.int32)
            sel = (m[None, :] == mode_row) & valid[None, :]
            s += tl.where(sel, r[None, :], 0.0)
            c += sel.to(tl.float32)
            lo = tl.minimum(lo, tl.where(sel, r[None, :], float("inf")))
            hi = tl.maximum(hi, tl.where(sel, r[None, :], float("-inf")))
            tl.store(inverse_ptr + idx, g, mask=valid)
        m_sum = tl.sum(s, axis=1)
        m_cnt = tl.sum(c, axis=1)
        m_lo = tl.min(lo, axis=1)
        m_hi = tl.max(hi, axis=1)
        m_mean = m_sum / tl.maximum(m_cnt, 1.0)
        g_cnt = tl.sum(m_cnt, axis=0)
        g_mean = tl.sum(m_sum, axis=0) / tl.maximum(g_cnt, 1.0)
        g_flat = tl.min(m_lo, axis=0) == tl.max(m_hi, axis=0)

        # Pass 2: centred sums of squares, merged group and per mode.
        gss = tl.zeros([BLOCK], tl.float32)
        mss = tl.zeros([4, BLOCK], tl.float32)
        for off in range(start, end, BLOCK):
            j = off + lane
            valid = j < end
            idx = tl.load(order_ptr + j, mask=valid, other=0)
            r = tl.load(rewards_ptr + idx, mask=valid, other=0.0)
            if HAS_MODES:
                m = tl.load(modes_ptr + idx, mask=valid, other=0).to(tl.int32)
            else:
                m = tl.zeros([BLOCK], tl.int32)
            sel = (m[None, :] == mode_row) & valid[None, :]
            d = tl.where(valid, r - g_mean, 0.0)
            gss += d * d
            dm = tl.where(sel, r[None, :] - m_mean[:, None], 0.0)
            mss += dm * dm
        # Unbiased (n - 1) variance; a set of size 1 has std 0.
        g_std = tl.sqrt(tl.sum(gss, axis=0) / tl.maximum(g_cnt - 1.0, 1.0))
        m_std = tl.sqrt(tl.sum(mss, axis=1) / tl.maximum(m_cnt - 1.0, 1.0))
        m_flat = m_lo == m_hi

        tl.store(mean_ptr + g, g_mean)
        tl.store(std_ptr + g, g_std)
        tl.store(flat_ptr + g, g_flat.to(tl.int8))
        if HAS_MODES:
            k = tl.arange(0, 4)
            kmask = k < 3
            tl.store(mode_mean_ptr + g * 3 + k, tl.where(m_cnt > 0, m_mean, float("nan")),
                     mask=kmask)
            tl.store(mode_count_ptr + g * 3 + k, m_cnt.to(tl.int64), mask=kmask)

        # Pass 3: advantages against the group or the rollout's (group, mode) subgroup.
        for off in range(start, end, BLOCK):
            j = off + lane
            valid = j < end
            idx = tl.load(order_ptr + j, mask=valid, other=0)
            r = tl.load(rewards_ptr + idx, mask=valid, other=0.0)
            if BASELINE_MODE:
                if HAS_MODES:
                    m = tl.load(modes_ptr + idx, mask=valid, other=0).to(tl.int32)
                else:
                    m = tl.zeros([BLOCK], tl.int32)
                sel = m[None, :] == mode_row
                b_mean = tl.sum(tl.where(sel, m_mean[:, None], 0.0), axis=0)
                b_std = tl.sum(tl.where(sel, m_std[:, None], 0.0), axis=0)
                b_cnt = tl.sum(tl.where(sel, m_cnt[:, None], 0.0), axis=0)
                b_flat = tl.sum(tl.where(sel, m_flat[:, None].to(tl.int32), 0), axis=0) > 0
            else:
                b_mean = g_mean
                b_std = g_std
                b_cnt = g_cnt
                b_flat = g_flat
            a = r - b_mean
            if LOO:
                a = a * (b_cnt / tl.maximum(b_cnt - 1.0, 1.0))
            if SCALE_STD:
                a = a / (b_std + eps)
            a = tl.where((b_cnt <= 1.0) | b_flat, 0.0, a)
            tl.store(adv_ptr + idx, a, mask=valid)

    @triton.jit
    def _token_advantage_weights_fwd_kernel(
        cu_ptr, prompt_ptr, adv_ptr, weight_ptr, out_adv_ptr, out_weight_ptr,
        n_seqs, total_tokens, n_steps,
        BLOCK: tl.constexpr,
    ):
        # One program per block of packed rows.  Each row finds its sequence by a vectorised
        # binary search over cu_seqlens (largest i with cu[i] <= row; i == n_seqs for padding),
        # so the launch needs no host-side per-sequence work and every row (padding included)
        # is written exactly once.
        pid = tl.program_id(0).to(tl.int64)
        rows = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        in_range = rows < total_tokens
        lo = tl.zeros([BLOCK], tl.int64)
        hi = tl.zeros([BLOCK], tl.int64) + n_seqs
        for _ in range(n_steps):
            mid = (lo + hi + 1) >> 1
            cu_mid = tl.load(cu_ptr + mid, mask=in_range, other=0).to(tl.int64)
            go = cu_mid <= rows
            lo = tl.where(go, mid, lo)
            hi = tl.where(go, hi, mid - 1)
        seq = lo
        in_seq = in_range & (seq < n_seqs)
        start = tl.load(cu_ptr + seq, mask=in_seq, other=0).to(tl.int64)
        end = tl.load(cu_ptr + seq + 1, mask=in_seq, other=0).to(tl.int64)
        plen = tl.load(prompt_ptr + seq, mask=in_seq, other=0).to(tl.int64)
        pos = rows - start
        # Label-shifted: row p predicts token p + 1, a response token iff plen - 1 <= p < L - 1.
        has_loss = in_seq & (pos >= plen - 1) & (pos < end - start - 1)
        a = tl.load(adv_ptr + seq, mask=has_loss, other=0.0)
        w = tl.load(weight_ptr + seq, mask=has_loss, other=0.0)
        tl.store(out_adv_ptr + rows, tl.where(has_loss, a, 0.0), mask=in_range)
        tl.store(out_weight_ptr + rows, tl.where(has_loss, w, 0.0), mask=in_range)


def grouped_advantage_block(max_group_size: int) -> int:
    """Lanes per program of the grouped-advantage kernel for groups of up to this size.

    One block covers the largest group (typical BPO groups are 2g = 8..32 rollouts); larger
    groups loop.  The cap bounds the [4, BLOCK] tiles' registers.
    """
    return min(max(next_power_of_2(max_group_size), 16), 256)


def grouped_advantage_warps(block: int) -> int:
    """Warps per program for a block: one warp up to 128 lanes, two for 256.

    A [4, BLOCK] tile of 64..512 elements fills one warp; Triton's default of 4 warps left
    most threads holding copies at BPO's 16 lanes, and compiled for sm_90 (with the ptxas
    flags Triton uses) 13 of the 24 option combinations at 16 lanes spilled 4-16 bytes at 32
    registers.  With this choice no combination spills on sm_80 or sm_90 (one warp at 256
    lanes would need up to 255 registers).  See tests/test_kernels_compile.py.
    """
    return 1 if block <= 128 else 2


def _grouped_advantage_launch(n_groups, rewards, modes, order, offsets, outs, eps, baseline,
                              scale, leave_one_out, block) -> KernelLaunch:
    adv, inverse, mean, std, flat, mode_mean, mode_count = outs
    return KernelLaunch(
        _grouped_advantage_fwd_kernel, (n_groups,),
        (rewards, modes if modes is not None else rewards, order, offsets,
         adv, inverse, mean, std, flat, mode_mean, mode_count, float(eps)),
        dict(HAS_MODES=modes is not None, BASELINE_MODE=(baseline == "mode"),
             SCALE_STD=(scale == "std"), LOO=bool(leave_one_out), BLOCK=block,
             num_warps=grouped_advantage_warps(block)))


def grouped_advantage_fwd(rewards, group_ids, modes, baseline, scale, leave_one_out, eps):
    """Launcher of the fused kernel: sort ids to segments, allocate, launch one program/group."""
    device = rewards.device
    n = rewards.shape[0]
    sorted_ids, order = torch.sort(group_ids.long(), stable=True)
    uniq, size = torch.unique_consecutive(sorted_ids, return_counts=True)
    g = uniq.shape[0]
    offsets = torch.zeros(g + 1, dtype=torch.int64, device=device)
    offsets[1:] = torch.cumsum(size, 0)
    # The kernel writes every element of every output: no zero-fill needed.
    adv = _alloc(n, dtype=torch.float32, device=device)
    inverse = _alloc(n, dtype=torch.int64, device=device)
    mean = _alloc(g, dtype=torch.float32, device=device)
    std = _alloc(g, dtype=torch.float32, device=device)
    flat = _alloc(g, dtype=torch.int8, device=device)
    has_modes = modes is not None
    mode_mean = _alloc(g if has_modes else 1, NUM_MODES, dtype=torch.float32, device=device)
    mode_count = _alloc(g if has_modes else 1, NUM_MODES, dtype=torch.int64, device=device)
    block = grouped_advantage_block(int(size.max()))
    with device_guard(device):
        _grouped_advantage_launch(g, rewards, modes, order, offsets,
                                  (adv, inverse, mean, std, flat, mode_mean, mode_count),
                                  eps, baseline, scale, leave_one_out, block).run()
    return GroupedAdvantage(
        advantages=adv, group_ids=uniq, inverse=inverse, group_mean=mean, group_std=std,
        group_size=size, zero_variance=flat.bool(),
        mode_mean=mode_mean if has_modes else None, mode_count=mode_count if has_modes else None)


def grouped_advantage(rewards: torch.Tensor, group_ids: torch.Tensor,
                      modes: torch.Tensor | None = None, *, baseline: str = "group",
                      scale: str = "std", leave_one_out: bool = False, eps: float = 1e-6,
                      impl: str = "auto") -> GroupedAdvantage:
    """Advantages of ``N`` rollouts grouped by prompt, with the group statistics, in one pass.

    Args:
        rewards: float32 [N] rewards (finite).
        group_ids: int64 (or int32) [N] non-negative ids; rollouts of one prompt share an id.
            Ids are arbitrary, unsorted, and groups may have different sizes.
        modes: integer [N] rollout modes (0 = no-think, 1 = think, 2 = auto) or None.  Without
            modes every rollout is in one subgroup, so ``baseline="mode"`` equals ``"group"``
            and the per-mode fields of the result are None.
        baseline: ``"group"`` — mean/std over the merged group (BPO: the modes compete);
            ``"mode"`` — mean/std within each (group, mode) subgroup.
        scale: ``"std"`` — divide by the (sub)group's unbiased sample std + ``eps`` (GRPO);
            ``"none"`` — no scaling (Dr.GRPO).
        leave_one_out: RLOO baseline: rollout k is compared with the mean of the *other*
            rollouts of its (sub)group, ``r_k - (S - r_k)/(n - 1) = n/(n-1) (r_k - mean)``;
            with ``scale="std"`` that is divided by the (sub)group std + ``eps``.
        eps: added to the std before dividing (>= 0).
        impl: ``"auto"`` | ``"triton"`` | ``"torch"`` (fp64 reference).

    Returns:
        :class:`GroupedAdvantage`.  Groups are in ascending id order.  The std is the unbiased
        sample std (``n - 1``), 0 for a group of size 1.  A (sub)group of size 1, or one whose
        rewards are all equal, gets advantage exactly 0.

    Raises:
        TypeError / ValueError naming the argument: wrong dtype or shape, length mismatch,
        NaN/inf reward, negative id, mode outside {0, 1, 2}, unknown option.
    """
    _check_choice("baseline", baseline, BASELINES)
    _check_choice("scale", scale, SCALES)
    if not isinstance(leave_one_out, bool):
        raise TypeError(f"leave_one_out must be a bool, got {leave_one_out!r}")
    if not (isinstance(eps, (int, float)) and eps >= 0 and eps == eps and eps != float("inf")):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    _check_group_inputs(rewards, group_ids, modes)
    impl = resolve_impl(impl, rewards.device)
    if impl == "torch" or rewards.shape[0] == 0:
        return _grouped_advantage_torch(rewards, group_ids, modes, baseline, scale,
                                        leave_one_out, eps)
    return grouped_advantage_fwd(rewards.contiguous(), group_ids.contiguous(),
                                 None if modes is None else modes.contiguous(),
                                 baseline, scale, leave_one_out, eps)


# ----------------------------------------------------------------------------- loss weights
def sequence_loss_weights(response_lens: torch.Tensor, group_ids: torch.Tensor,
                          modes: torch.Tensor | None = None, *, aggregation: str,
                          max_response_len: int | None = None) -> torch.Tensor:
    """Per-token loss weight of every sequence's response tokens, over the global batch.

    The weighted sum ``sum_i w_i * sum_{t in response_i} loss_{i,t}`` equals the batch loss
    under ``aggregation``, however the sequences are later split into micro-batches and
    data-parallel ranks — provided the arrays passed here describe the *global* batch.  Under
    data parallelism, all-gather the per-sequence metadata first (``N`` integers each).

    Sequences with 0 response tokens are ignored (weight 0; they are not counted in ``N_seq``,
    ``G`` or ``M_g``).  With ``N_seq`` non-empty sequences, ``len_i`` their response lengths:

    * ``"token_mean"``: ``w = 1 / sum_i len_i`` (every response token of the batch equal);
    * ``"seq_mean_token_mean"``: ``w_i = 1 / (N_seq * len_i)`` (mean over sequences of the
      per-sequence token mean);
    * ``"seq_mean_token_sum_norm"``: ``w = 1 / (N_seq * max_response_len)`` (Dr.GRPO's constant
      normaliser; requires ``max_response_len >= max len_i``; weights sum to <= 1);
    * ``"mode_balanced"``: ``w_i = 1 / (G * M_g * tokens_{g,m})`` for sequence i in group g with
      mode m: each of the G groups weighs 1/G, shared equally by its M_g modes present, spread
      evenly over that (group, mode)'s tokens.  Without ``modes``: ``1 / (G * tokens_g)``.

    Except for ``seq_mean_token_sum_norm``, the weights of all response tokens sum to 1 (when
    the batch has at least one response token).

    Args:
        response_lens: integer [N] number of response tokens of each sequence (>= 0).
        group_ids: integer [N] non-negative group ids (as in :func:`grouped_advantage`).
        modes: integer [N] modes in {0, 1, 2} or None.
        aggregation: one of ``AGGREGATIONS``.
        max_response_len: the generation length limit; required for
            ``"seq_mean_token_sum_norm"``.

    Returns:
        float32 [N] weight per response token of each sequence.
    """
    _check_choice("aggregation", aggregation, AGGREGATIONS)
    check_tensor("response_lens", response_lens, ndim=1, dtypes=_INT_DTYPES)
    n = response_lens.shape[0]
    device = response_lens.device
    check_tensor("group_ids", group_ids, ndim=1, dtypes=(torch.int32, torch.int64), length=n,
                 device=device)
    neg = response_lens < 0
    if bool(neg.any()):
        i = int(neg.nonzero()[0])
        raise ValueError(f"response_lens must be >= 0, got {int(response_lens[i])} at index {i}")
    _check_ids(group_ids)
    if modes is not None:
        check_tensor("modes", modes, ndim=1, dtypes=_INT_DTYPES, length=n, device=device)
        bad = (modes < 0) | (modes >= NUM_MODES)
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            raise ValueError(f"modes must be in {{0, 1, 2}}, got {int(modes[i])} at index {i}")

    lens = response_lens.double()
    live = response_lens > 0
    n_seq = live.sum().double()
    if aggregation == "token_mean":
        w = torch.ones_like(lens) / lens.sum().clamp(min=1)
    elif aggregation == "seq_mean_token_mean":
        w = 1.0 / (n_seq.clamp(min=1) * lens.clamp(min=1))
    elif aggregation == "seq_mean_token_sum_norm":
        if max_response_len is None:
            raise ValueError("max_response_len is required for aggregation="
                             "'seq_mean_token_sum_norm' (Dr.GRPO's constant normaliser)")
        longest = int(response_lens.max()) if n else 0
        if not isinstance(max_response_len, int) or max_response_len < max(longest, 1):
            raise ValueError(f"max_response_len must be an int >= max(response_lens) = {longest}"
                             f" and >= 1, got {max_response_len!r}")
        w = torch.ones_like(lens) / (n_seq.clamp(min=1) * max_response_len)
    else:  # mode_balanced
        _, inv = torch.unique(group_ids.long(), return_inverse=True)
        g_rows = int(inv.max()) + 1 if n else 0
        m = modes.long() if modes is not None else torch.zeros_like(inv)
        sub = inv * NUM_MODES + m
        tokens = torch.zeros(g_rows * NUM_MODES, dtype=torch.float64, device=device)
        tokens.index_add_(0, sub, lens)
        present = (tokens > 0).view(g_rows, NUM_MODES)
        modes_present = present.sum(1).double()        # M_g
        n_groups = (modes_present > 0).sum().double()  # G (groups with any response token)
        w = 1.0 / (n_groups.clamp(min=1) * modes_present[inv].clamp(min=1)
                   * tokens[sub].clamp(min=1))
    return torch.where(live, w, 0.0).float()


# ----------------------------------------------------------------------------- packed layout
def _token_advantage_weights_torch(cu, prompt_lens, advantages, seq_weights, total_tokens):
    n = prompt_lens.shape[0]
    device = advantages.device
    lens = (cu[1:] - cu[:-1]).long()
    used = int(cu[-1])
    seq = torch.repeat_interleave(torch.arange(n, device=device), lens)
    pos = torch.arange(used, device=device) - cu[:-1].long()[seq]
    pl = prompt_lens.long()[seq]
    has_loss = (pos >= pl - 1) & (pos < lens[seq] - 1)
    out_adv = torch.zeros(total_tokens, dtype=torch.float32, device=device)
    out_w = torch.zeros(total_tokens, dtype=torch.float32, device=device)
    out_adv[:used] = torch.where(has_loss, advantages[seq], 0.0)
    out_w[:used] = torch.where(has_loss, seq_weights[seq], 0.0)
    return out_adv, out_w


#: Packed rows per program of the token-advantage kernel, and its warps.
TOKEN_ADVANTAGE_BLOCK = 1024
TOKEN_ADVANTAGE_WARPS = 4


def _token_advantage_weights_launch(cu, prompt_lens, advantages, seq_weights, out_adv, out_w,
                                    total_tokens) -> KernelLaunch:
    n = prompt_lens.shape[0]
    return KernelLaunch(
        _token_advantage_weights_fwd_kernel, (cdiv(total_tokens, TOKEN_ADVANTAGE_BLOCK),),
        # n.bit_length() + 1 halvings of [0, n] find any row's sequence.
        (cu, prompt_lens, advantages, seq_weights, out_adv, out_w, n, total_tokens,
         n.bit_length() + 1),
        dict(BLOCK=TOKEN_ADVANTAGE_BLOCK, num_warps=TOKEN_ADVANTAGE_WARPS))


def token_advantage_weights_fwd(cu, prompt_lens, advantages, seq_weights, total_tokens):
    """Launcher of the packed-layout kernel: one program per block of 1024 rows."""
    out_adv = _alloc(total_tokens, dtype=torch.float32, device=advantages.device)
    out_w = _alloc(total_tokens, dtype=torch.float32, device=advantages.device)
    if total_tokens == 0:
        return out_adv, out_w
    with device_guard(advantages.device):
        _token_advantage_weights_launch(cu, prompt_lens, advantages, seq_weights, out_adv, out_w,
                                        total_tokens).run()
    return out_adv, out_w


def planned_launches(op: str, *, n: int, max_group_size: int = 16,
                     modes_dtype: torch.dtype | None = torch.int64, baseline: str = "group",
                     scale: str = "std", leave_one_out: bool = False,
                     total_tokens: int | None = None, cu_dtype: torch.dtype = torch.int32,
                     prompt_dtype: torch.dtype = torch.int64) -> list[KernelLaunch]:
    """The Triton launch of one call of ``op``, built by the launchers' own functions on meta
    tensors (nothing is allocated or run), for the ahead-of-time compile check.

    ``"grouped_advantage"``: ``n`` rollouts in groups of up to ``max_group_size``, modes of
    ``modes_dtype`` (None: no modes).  ``"token_advantage_weights"``: ``n`` sequences packed
    into ``total_tokens`` rows (default ``8 n``).
    """
    dev = torch.device("meta")
    f32, i64 = torch.float32, torch.int64

    def e(shape, dtype):
        return torch.empty(shape, dtype=dtype, device=dev)

    if op == "grouped_advantage":
        g = cdiv(n, max_group_size)
        has_modes = modes_dtype is not None
        outs = (e(n, f32), e(n, i64), e(g, f32), e(g, f32), e(g, torch.int8),
                e((g if has_modes else 1, NUM_MODES), f32), e((g if has_modes else 1, NUM_MODES), i64))
        return [_grouped_advantage_launch(
            g, e(n, f32), e(n, modes_dtype) if has_modes else None, e(n, i64), e(g + 1, i64), outs, 1e-6,
            baseline, scale, leave_one_out, grouped_advantage_block(max_group_size))]
    if op == "token_advantage_weights":
        total = total_tokens if total_tokens is not None else 8 * n
        return [_token_advantage_weights_launch(e(n + 1, cu_dtype), e(n, prompt_dtype), e(n, f32),
                                                e(n, f32), e(total, f32), e(total, f32), total)]
    raise ValueError(f"op must be 'grouped_advantage' or 'token_advantage_weights', got {op!r}")


def token_advantage_weights(cu_seqlens: torch.Tensor, prompt_lens: torch.Tensor,
                            advantages: torch.Tensor, seq_weights: torch.Tensor, *,
                            total_tokens: int | None = None,
                            impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token advantage and loss weight of a packed micro-batch.

    Row convention (label-shifted, shared with the packer): packed row ``p`` of sequence ``i``
    (0-based position inside the sequence of length ``L_i``) carries a loss iff
    ``prompt_lens[i] - 1 <= p < L_i - 1`` — its label, token ``p + 1``, is a response token.
    Those rows get ``(advantages[i], seq_weights[i])``; every other row (prompt rows, each
    sequence's last row, padding rows ``>= cu_seqlens[-1]``) gets 0.

    Args:
        cu_seqlens: int32 (or int64) [n+1] cumulative sequence lengths, starting at 0,
            non-decreasing.
        prompt_lens: integer [n] prompt tokens of each sequence, ``1 <= prompt_lens[i] <= L_i``.
        advantages: float32 [n] advantage of each sequence (finite).
        seq_weights: float32 [n] per-token loss weight of each sequence (finite), e.g. from
            :func:`sequence_loss_weights`.
        total_tokens: rows of the packed buffer ``T >= cu_seqlens[-1]`` (default
            ``cu_seqlens[-1]``); rows past the last sequence are padding.
        impl: ``"auto"`` | ``"triton"`` | ``"torch"``.

    Returns:
        ``(token_advantages, token_weights)``, both float32 [T].
    """
    check_tensor("cu_seqlens", cu_seqlens, ndim=1, dtypes=(torch.int32, torch.int64))
    if cu_seqlens.shape[0] < 1:
        raise ValueError("cu_seqlens must have at least one element (n + 1 for n sequences), "
                         "got shape (0,)")
    n = cu_seqlens.shape[0] - 1
    device = cu_seqlens.device
    check_tensor("prompt_lens", prompt_lens, ndim=1, dtypes=_INT_DTYPES, length=n, device=device)
    check_tensor("advantages", advantages, ndim=1, dtypes=(torch.float32,), length=n,
                 device=device)
    check_tensor("seq_weights", seq_weights, ndim=1, dtypes=(torch.float32,), length=n,
                 device=device)
    if int(cu_seqlens[0]) != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {int(cu_seqlens[0])}")
    lens = cu_seqlens[1:].long() - cu_seqlens[:-1].long()
    if bool((lens < 0).any()):
        i = int((lens < 0).nonzero()[0])
        raise ValueError(f"cu_seqlens must be non-decreasing, got {int(cu_seqlens[i + 1])} < "
                         f"{int(cu_seqlens[i])} at index {i + 1}")
    bad = (prompt_lens < 1) | (prompt_lens.long() > lens)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(f"prompt_lens must satisfy 1 <= prompt_lens[i] <= sequence length, got "
                         f"{int(prompt_lens[i])} at index {i} (sequence length {int(lens[i])})")
    check_finite("advantages", advantages)
    check_finite("seq_weights", seq_weights)
    used = int(cu_seqlens[-1])
    if total_tokens is None:
        total_tokens = used
    if not isinstance(total_tokens, int) or total_tokens < used:
        raise ValueError(f"total_tokens must be an int >= cu_seqlens[-1] = {used}, "
                         f"got {total_tokens!r}")
    impl = resolve_impl(impl, device)
    if impl == "torch":
        return _token_advantage_weights_torch(cu_seqlens, prompt_lens, advantages, seq_weights,
                                              total_tokens)
    return token_advantage_weights_fwd(cu_seqlens.contiguous(), prompt_lens.contiguous(),
                                       advantages.contiguous(), seq_weights.contiguous(),
                                       total_tokens)
