"""Bi-mode Policy Optimization (and its plain-GRPO ablation): one file, top to bottom.

One step (DESIGN.md §2):

1. **Rollouts.** Each data-parallel rank takes its share of the step's prompts and asks the
   engine for ``g`` forced-thinking + ``g`` forced-non-thinking completions per prompt (BPO)
   or ``2g`` auto completions (GRPO).  Under ``routing="prompt"`` the mode prefix is prompt;
   under ``routing="token"`` the prompt ends at ``<think>`` and the mode-choosing token is the
   first (forced) response token.
2. **Rewards** from the rule-based verifier; rollouts are gathered on every rank, so every
   rank holds the global batch's metadata (token ids are small).
3. **Advantages** over the merged group (``r4b_kernels.grouped_advantage``), optional
   zero-variance filtering, and per-token loss weights normalised over the *global* batch
   (``sequence_loss_weights``) so micro-batching and DP do not change the objective.
4. **Packing.** The C++ packer balances sequences across DP ranks and packs each rank's share
   into THD micro-batches; labels never cross a sequence boundary.  With ``share_prefix``
   (default) a packed unit is a group: its prompt and images once, then each rollout's
   response, which attends to the prompt and to itself (``r4b.packing.groups``); the planner
   balances the units' real token counts.
5. **Old / reference log-probs**: forward-only fused kernel (``token_logprobs``).
6. **Update**: policy forward → fused clipped-ratio loss (``policy_loss``, logits never
   materialised, vocab-parallel over TP) → backward → DP all-reduce → clip → finite check →
   AdamW.  A step with non-finite loss or gradients is skipped and counted.
7. **Sync** the engine's weights (a no-op for the embedded engine, which samples from the
   policy module itself).  The engine sleeps during steps 3-7 and wakes after the sync (the
   vLLM engine frees its GPU memory for the update; no-ops for the embedded engine).

Importance corrections: truncated IS ``min(exp(old - behaviour), tis_cap)`` multiplies every
token's weight, where ``behaviour`` is the engine's log-prob of the token under the
distribution it was drawn from (after top-k / top-p; :mod:`r4b.rollout.sampling`): it corrects
engine vs trainer numerics and the truncation (with top-p the weight is about the kept mass S).  With ``routing="token"`` the
forced routing token was drawn from the forcing distribution (1/2 per mode), not from the
policy; its weight is multiplied by ``pi_old(token) / 0.5`` (≤ 2), which makes its gradient an
unbiased estimate of the auto-mode objective's routing gradient.  Forced tokens after the
routing token (``</think>`` of the no-think prefix) are template, as under prompt routing: they
carry no loss.  Ties (a group whose rewards are all equal) give the routing tokens a small
advantage towards the cheaper mode (``RLConfig.tie_bonus``); without it a tie has no gradient.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

import r4b_kernels as K

from ..log import get_logger
from ..packing import PackedMicroBatch, forward_rows, pack, pack_shared, plan
from ..components import image_processor
from ..rewards import verify
from ..rollout.engine import RolloutRequest
from ..rollout.sampling import SamplingParams
from ..runtime import Runtime, all_gather_objects, all_true
from ..training import (backward_nothing, clip_grads, full_params, full_state_dict,
                        reduce_grads)
from .config import RLConfig

log = get_logger(__name__)

MODE_ID = {"no_think": 0, "think": 1, "auto": 2}
MODE_NAME = {v: k for k, v in MODE_ID.items()}


@dataclass
class Seq:
    """One rollout as the trainer sees it (plain data, gathered across ranks)."""

    prompt_ids: list[int]
    response_ids: list[int]
    engine_logprobs: list[float]
    """Per response token: the engine's policy log-prob (full tempered distribution)."""
    behaviour_logprobs: list[float]
    """Per response token: log-prob under the distribution the token was drawn from (after
    top-k / top-p): the denominator of truncated importance sampling."""
    mode: int
    """Requested mode id (0 no-think, 1 think, 2 auto)."""
    chosen: str | None
    """Mode the response is in ('think' / 'no_think' / None when malformed)."""
    group: int
    level: int | None
    reward: float
    finished: bool
    forced: int = 0
    """Forced tokens at the start of the response (token routing)."""
    uid: str = ""
    images: list = field(default_factory=list)


def routed(s: "Seq") -> bool:
    """Whether ``s`` is a forced-mode rollout whose first response token is the forced routing
    token (token routing)."""
    return s.forced > 0 and s.mode != MODE_ID["auto"]


def template_tokens(s: "Seq") -> int:
    """Forced tokens after the routing token of a forced-mode rollout (``</think>`` of the
    no-think prefix under token routing): template, not a choice, so they carry no loss —
    as under prompt routing, where the whole prefix is prompt."""
    return s.forced - 1 if routed(s) else 0


def build_requests(items: Sequence[Any], template, cfg: RLConfig, group_base: int) -> list[RolloutRequest]:
    """The step's rollout requests for ``items`` (one group per item)."""
    reqs = []
    for k, it in enumerate(items):
        if cfg.algo == "bpo":
            modes = ["think"] * cfg.group_size + ["no_think"] * cfg.group_size
        else:
            modes = ["auto"] * (2 * cfg.group_size)
        auto_prompt = template.item_prompt_ids(it, "auto")
        imgs = list(it.images) or None
        for m in modes:
            if cfg.routing == "token" or m == "auto":
                prompt, forced = auto_prompt, template.forced_ids(m)
            else:
                prompt, forced = template.item_prompt_ids(it, m), []
            reqs.append(RolloutRequest(prompt_ids=prompt, mode=m, forced_ids=forced, images=imgs,
                                       group_id=group_base + k, uid=(it.uid, it.level)))
    return reqs


def sampling_params(cfg: RLConfig) -> SamplingParams:
    return SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p,
                          max_new_tokens_think=cfg.max_new_tokens_think,
                          max_new_tokens_no_think=cfg.max_new_tokens_no_think,
                          max_new_tokens_auto=cfg.max_new_tokens_auto)


def score(rollouts, items_by_uid: dict, template) -> list[Seq]:
    """Rewards (rule-based verifier; model output is never evaluated as code) → ``Seq``s."""
    out = []
    for r in rollouts:
        req = r.request
        uid, level = req.uid
        item = items_by_uid[uid]
        prompt_mode = template.prompt_mode_of(req.prompt_ids) or "auto"
        text = template.assistant_text_of(r.response_ids, prompt_mode)
        reward = verify(text, item.answer) if r.finished else 0.0
        out.append(Seq(prompt_ids=list(req.prompt_ids), response_ids=list(r.response_ids),
                       engine_logprobs=list(r.logprobs),
                       behaviour_logprobs=list(r.behaviour_logprobs if r.behaviour_logprobs
                                               is not None else r.logprobs),
                       mode=MODE_ID[req.mode],
                       chosen=r.mode_chosen, group=req.group_id, level=level, reward=float(reward),
                       finished=r.finished, forced=len(req.forced_ids), uid=uid,
                       images=list(item.images)))
    return out


@dataclass
class MicroBatch:
    """One packed micro-batch on this rank, with what the update needs per scored row."""

    pk: PackedMicroBatch
    targets: torch.Tensor
    advantages: torch.Tensor
    weights: torch.Tensor
    engine_lp: torch.Tensor
    behaviour_lp: torch.Tensor
    routing_rows: torch.Tensor
    """Bool per scored row: the forced routing token of a forced-mode rollout."""
    modes: torch.Tensor
    has_routing: bool = False
    """Whether any row is a forced routing token (known on the host when packing)."""
    old_lp: torch.Tensor | None = None
    ref_lp: torch.Tensor | None = None


def frozen_copy(model):
    """A frozen reference copy of ``model`` on its device, in the compute dtype (same config,
    same TP shards, DP shards gathered, no gradients): the reference policy of the KL term.
    A collective over DP when ``model`` is sharded."""
    from ..models import build_model

    ref = build_model(model.cfg, init_weights=False, device=next(model.parameters()).device)
    ref.load_state_dict(full_state_dict(model))
    ref.eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


class BPOTrainer:
    """Runs BPO / GRPO steps on a policy (and optional frozen reference) with an engine."""

    def __init__(self, cfg: RLConfig, *, policy, engine, template, rt: Runtime, ref_model=None,
                 optimizer: torch.optim.Optimizer | None = None):
        self.cfg = cfg
        self.policy = policy
        self.ref = ref_model
        self.engine = engine
        self.template = template
        self.rt = rt
        self.opt = optimizer or torch.optim.AdamW(policy.parameters(), lr=cfg.lr,
                                                  weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
        self.skipped_steps = 0
        if cfg.kl_coef > 0 and ref_model is None:
            raise ValueError(f"rl.kl_coef = {cfg.kl_coef} needs a reference model, got none")

    # ------------------------------------------------------------ 1-2. rollouts and rewards
    def rollout(self, items: Sequence[Any], step: int, generator: torch.Generator) -> list[Seq]:
        """Generate and score this rank's share of ``items``; return the global batch."""
        rt, cfg = self.rt, self.cfg
        share = items[rt.dp_rank::rt.dp_size]
        uids = [it.uid for it in share]
        if len(set(uids)) != len(uids):
            dup = sorted({u for u in uids if uids.count(u) > 1})
            raise ValueError(f"items {dup[:5]} appear more than once in one rollout batch: rewards "
                             f"are looked up by uid, so uids must be unique")
        group_base = step * 1_000_000 + rt.dp_rank * 10_000
        reqs = build_requests(share, self.template, cfg, group_base)
        rollouts = self.engine.generate(reqs, sampling_params(cfg), generator)
        local = score(rollouts, {it.uid: it for it in share}, self.template)
        batch = [s for part in all_gather_objects(local, rt) for s in part]
        return batch

    # ------------------------------------------------------------ 3. advantages and weights
    def advantages(self, batch: list[Seq]):
        """Grouped advantages over the global batch (host tensors: N scalars per rollout)."""
        cfg = self.cfg
        rewards = torch.tensor([s.reward for s in batch], dtype=torch.float32, device="cpu")
        groups = torch.tensor([s.group for s in batch], dtype=torch.int64, device="cpu")
        modes = torch.tensor([s.mode for s in batch], dtype=torch.int8, device="cpu")
        ga = K.grouped_advantage(rewards, groups, modes, baseline=cfg.baseline, scale=cfg.scale)
        keep = torch.ones(len(batch), dtype=torch.bool, device="cpu")
        if cfg.filter_zero_variance:
            keep = ~ga.zero_variance[ga.inverse]
        return ga, keep

    def tie_bonus(self, batch: list[Seq], ga) -> torch.Tensor:
        """Per rollout: the extra advantage of its forced routing token (host).  In a group
        whose rewards are all equal, ``+tie_bonus`` for no-think and ``-tie_bonus`` for
        thinking rollouts (the cheaper mode wins a tie); 0 elsewhere."""
        b = self.cfg.effective_tie_bonus
        out = torch.zeros(len(batch), dtype=torch.float32, device="cpu")
        if b <= 0:
            return out
        tie = ga.zero_variance[ga.inverse]
        no_think = torch.tensor([s.mode == MODE_ID["no_think"] for s in batch], device="cpu")
        mask = tie & torch.tensor([routed(s) for s in batch], dtype=torch.bool, device="cpu")
        return torch.where(mask, torch.where(no_think, b, -b), out)

    def loss_weights(self, batch: list[Seq], keep: torch.Tensor) -> torch.Tensor:
        """Per-token loss weight of every rollout, normalised over the global batch (host)."""
        cfg = self.cfg
        idx = keep.nonzero()[:, 0].tolist()
        lens = torch.tensor([len(batch[i].response_ids) - template_tokens(batch[i]) for i in idx],
                            dtype=torch.int64, device="cpu")
        groups = torch.tensor([batch[i].group for i in idx], dtype=torch.int64, device="cpu")
        modes = torch.tensor([self._loss_mode(batch[i]) for i in idx], dtype=torch.int8,
                             device="cpu")
        w = torch.zeros(len(batch), dtype=torch.float32, device="cpu")
        if idx:
            w[torch.tensor(idx, dtype=torch.long, device="cpu")] = K.sequence_loss_weights(
                lens, groups, modes, aggregation=cfg.loss_aggregation,
                max_response_len=max(cfg.max_new_tokens_think, cfg.max_new_tokens_auto) + 2)
        return w

    @staticmethod
    def _loss_mode(s: Seq) -> int:
        """Mode used for mode-balanced weighting: requested for forced rollouts, chosen for auto."""
        if s.mode != MODE_ID["auto"]:
            return s.mode
        return MODE_ID.get(s.chosen or "think", 1)

    # ------------------------------------------------------------ 4. packing
    def microbatches(self, batch: list[Seq], adv: torch.Tensor, weights: torch.Tensor,
                     keep: torch.Tensor, route_bonus: torch.Tensor | None = None
                     ) -> tuple[list[MicroBatch], dict]:
        """This rank's packed micro-batches, each moved to the model's device in one copy;
        per-row values are assembled on the host (they index per-sequence Python lists).
        ``route_bonus`` (per rollout, :meth:`tie_bonus`) is added to the advantage of forced
        routing tokens only."""
        rt, cfg = self.rt, self.cfg
        dev = rt.device
        idx = keep.nonzero()[:, 0].tolist()
        kept = [batch[i] for i in idx]
        tokens = [s.prompt_ids + s.response_ids for s in kept]
        plens = [len(s.prompt_ids) for s in kept]
        process = image_processor(self.policy.cfg) if self.policy.cfg.vision is not None else None
        images = [s.images for s in kept]
        if cfg.share_prefix:
            packed, stats, imbalance = pack_shared(
                tokens, plens, [s.group for s in kept], images, dp_rank=rt.dp_rank,
                dp_size=rt.dp_size, tokens_per_microbatch=cfg.tokens_per_microbatch,
                image_token_id=self.policy.cfg.image_token_id, process=process)
        else:
            mine, imbalance = plan([len(t) for t in tokens], dp_rank=rt.dp_rank,
                                   dp_size=rt.dp_size, tokens_per_microbatch=cfg.tokens_per_microbatch,
                                   group_ids=[s.group for s in kept], modes=[s.mode for s in kept])
            packed = pack(tokens, plens, images, mine, process=process)
            n_tok = sum(len(t) for t in tokens)
            stats = {"pack/dense_tokens": n_tok, "pack/tokens": n_tok}
        sel_keep = torch.tensor(idx, dtype=torch.long, device="cpu")
        adv_k = adv[sel_keep].float()
        w_k = weights[sel_keep].float()
        bonus_k = route_bonus[sel_keep].float() if route_bonus is not None else None
        modes_k = torch.tensor([s.mode for s in kept], dtype=torch.int8, device="cpu")
        plens_t = torch.tensor(plens, dtype=torch.long, device="cpu")
        out = []
        for pk in packed:
            seqs = pk.seqs  # packed order: cu_seqlens and row_seq refer to it
            if not seqs:  # this rank's share ran out: an empty micro-batch, same collectives
                dpk = pk.to(dev)
                e = torch.zeros(0, dtype=torch.float32, device=dev)
                out.append(MicroBatch(pk=dpk, targets=dpk.targets, advantages=e, weights=e,
                                      engine_lp=e, behaviour_lp=e,
                                      routing_rows=torch.zeros(0, dtype=torch.bool, device=dev),
                                      modes=torch.zeros(0, dtype=torch.int8, device=dev)))
                continue
            sel = torch.tensor(seqs, dtype=torch.long, device="cpu")
            rows = pk.rows
            if pk.prefix_layout is None:
                tok_adv, tok_w = K.token_advantage_weights(
                    pk.cu_seqlens, plens_t[sel], adv_k[sel], w_k[sel],
                    total_tokens=pk.input_ids.shape[0])
                row_adv, row_w = tok_adv[rows], tok_w[rows]
            else:  # a shared prompt row scores for several rollouts: per row, not per token
                row_adv, row_w = adv_k[sel][pk.row_seq], w_k[sel][pk.row_seq]
            at = list(zip(pk.row_seq.tolist(), pk.row_token.tolist()))
            eng = torch.tensor([kept[seqs[j]].engine_logprobs[k] for j, k in at],
                               dtype=torch.float32, device="cpu")
            beh = torch.tensor([kept[seqs[j]].behaviour_logprobs[k] for j, k in at],
                               dtype=torch.float32, device="cpu")
            forced = torch.tensor([routed(kept[j]) for j in seqs], dtype=torch.bool, device="cpu")
            routing = (pk.row_token == 0) & forced[pk.row_seq]
            n_template = torch.tensor([template_tokens(kept[j]) for j in seqs], dtype=torch.long,
                                      device="cpu")
            template = (pk.row_token >= 1) & (pk.row_token <= n_template[pk.row_seq])
            if bonus_k is not None:
                row_adv = torch.where(routing, row_adv + bonus_k[sel][pk.row_seq], row_adv)
            row_w = torch.where(template, 0.0, row_w)
            host = (row_adv, row_w, eng, beh, routing, modes_k[sel][pk.row_seq])
            d_adv, d_w, d_eng, d_beh, d_routing, d_modes = (t.to(dev) for t in host)
            dpk = pk.to(dev)
            out.append(MicroBatch(pk=dpk, targets=dpk.targets, advantages=d_adv, weights=d_w,
                                  engine_lp=d_eng, behaviour_lp=d_beh, routing_rows=d_routing,
                                  modes=d_modes,
                                  has_routing=bool(routing.any())))
        stats["imbalance"] = imbalance
        stats["pack/rank_vision_tiles"] = sum(mb.pk.images.num_tiles for mb in out
                                         if mb.pk.images is not None)
        return out, stats

    # ------------------------------------------------------------ 5. old / ref log-probs
    @torch.no_grad()
    def score_old_and_ref(self, mbs: list[MicroBatch]) -> tuple[float, float]:
        t_old = t_ref = 0.0
        with full_params(self.policy):  # gathered once for all micro-batches
            for mb in mbs:
                t0 = time.perf_counter()
                mb.old_lp = self._logprobs(self.policy, mb)
                t_old += time.perf_counter() - t0
        if self.cfg.kl_coef > 0:
            for mb in mbs:
                t0 = time.perf_counter()
                mb.ref_lp = self._logprobs(self.ref, mb)
                t_ref += time.perf_counter() - t0
        return t_old, t_ref

    def _logprobs(self, model, mb: MicroBatch) -> torch.Tensor:
        if mb.targets.numel() == 0:
            return torch.zeros(0, dtype=torch.float32, device=self.rt.device)
        h = forward_rows(model, mb.pk)
        lp = K.token_logprobs(h, model.lm_head_weight(), mb.targets, temperature=self.cfg.temperature,
                              tp_group=self.rt.tp_group if self.rt.tp_size > 1 else None,
                              vocab_start=model.vocab_start)
        return lp[0] if isinstance(lp, tuple) else lp

    # ------------------------------------------------------------ 6. update
    def token_weights(self, mb: MicroBatch) -> torch.Tensor:
        """Loss weight of each scored row: the sequence weight, times the truncated importance
        weight ``min(pi_old / behaviour, tis_cap)`` (behaviour: what the engine drew from,
        after top-k / top-p, so a truncation is corrected too), times ``pi_old / 0.5`` on
        forced routing tokens."""
        w = mb.weights
        if self.cfg.tis_cap is not None:
            w = w * torch.exp(mb.old_lp - mb.behaviour_lp).clamp(max=self.cfg.tis_cap)
        if mb.has_routing:
            w = torch.where(mb.routing_rows, w * torch.exp(mb.old_lp - math.log(0.5)), w)
        return w

    def update(self, mbs: list[MicroBatch]) -> dict:
        """Optimizer steps over the packed rollout batch.  Statistics accumulate on the device;
        each optimizer step syncs with the host once (the finiteness decision and the norm)."""
        cfg, rt = self.cfg, self.rt
        dev = rt.device
        n_modes = len(MODE_ID)
        # per mode: [clipped rows, kl sum, entropy sum, rows]
        stats = torch.zeros(n_modes, 4, dtype=torch.float64, device=dev)
        losses, norms, skipped = [], [], 0
        for _epoch in range(cfg.inner_epochs):
            for part in np.array_split(np.arange(len(mbs)), cfg.minibatches):
                self.opt.zero_grad(set_to_none=True)
                loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
                for i in part.tolist():
                    mb = mbs[i]
                    h = forward_rows(self.policy, mb.pk)
                    if mb.targets.numel() == 0:  # empty micro-batch: zero loss, same collectives
                        backward_nothing(h, self.policy.lm_head_weight())
                        continue
                    w = self.token_weights(mb)
                    out = K.policy_loss(
                        h, self.policy.lm_head_weight(), mb.targets, mb.old_lp, mb.advantages,
                        token_weights=w * cfg.minibatches, ref_logprobs=mb.ref_lp,
                        kl_coef=cfg.kl_coef, kl_estimator=cfg.kl_estimator, eps_low=cfg.eps_low,
                        eps_high=cfg.eps_high, dual_clip=cfg.dual_clip,
                        entropy_coef=cfg.entropy_coef, temperature=cfg.temperature,
                        tp_group=rt.tp_group if rt.tp_size > 1 else None,
                        vocab_start=self.policy.vocab_start, return_entropy=True)
                    out.loss.backward()
                    loss_sum += out.loss.detach()
                    self._accumulate(stats, mb, out)
                reduce_grads(self.policy, rt)
                norm = clip_grads(self.policy, cfg.grad_clip, rt)
                loss_host = float(loss_sum)
                ok = all_true(math.isfinite(loss_host) and math.isfinite(norm), rt)
                if ok:
                    self.opt.step()
                else:
                    skipped += 1
                    self.skipped_steps += 1
                    log.warning("non-finite loss (%s) or grad norm (%s): optimizer step skipped "
                                "(%d skipped so far)", loss_host, norm, self.skipped_steps)
                self.opt.zero_grad(set_to_none=True)
                losses.append(loss_host)
                norms.append(norm)
        m = {"loss": float(np.mean(losses)), "grad_norm": float(np.mean(norms)),
             "skipped_steps": skipped, "skipped_steps_total": self.skipped_steps}
        for (name, _), (clip, kl, ent, n) in zip(sorted(MODE_ID.items(), key=lambda kv: kv[1]),
                                                  stats.tolist()):
            if n:
                m[f"{name}/clip_frac"] = clip / n
                m[f"{name}/entropy"] = ent / n
                if cfg.kl_coef > 0:
                    m[f"{name}/kl"] = kl / n
        return m

    def _accumulate(self, stats: torch.Tensor, mb: MicroBatch, out) -> None:
        """Add this micro-batch's per-mode clip / KL / entropy sums to ``stats`` (on the device,
        no host sync)."""
        ratio = out.ratio.detach()
        adv = mb.advantages
        clipped = ((adv > 0) & (ratio > 1 + self.cfg.eps_high)) | \
                  ((adv < 0) & (ratio < 1 - self.cfg.eps_low))
        cols = [clipped.double(), torch.zeros_like(ratio, dtype=torch.float64),
                torch.zeros_like(ratio, dtype=torch.float64), torch.ones_like(ratio, dtype=torch.float64)]
        if mb.ref_lp is not None:
            d = (mb.ref_lp - out.logprobs.detach()).double()
            cols[1] = torch.exp(d) - d - 1
        if out.entropy is not None:
            cols[2] = out.entropy.detach().double()
        stats.index_add_(0, mb.modes.long(), torch.stack(cols, dim=1))

    # ------------------------------------------------------------ the whole step
    def step(self, items: Sequence[Any], step: int, generator: torch.Generator) -> dict:
        """One BPO/GRPO step on ``items`` (the global prompt batch); returns metrics."""
        t0 = time.perf_counter()
        with self.rt.phase("rollout"):
            batch = self.rollout(items, step, generator)
        t_gen = time.perf_counter() - t0
        with self.rt.phase("update"):
            return self._learn(batch, t0, t_gen)

    def _learn(self, batch: list[Seq], t0: float, t_gen: float) -> dict:
        """Steps 3-7 of a BPO step on a gathered rollout batch.  The engine sleeps from here
        until its weights are synced after the update (no-op for the embedded engine; the vLLM
        engine frees its weights and KV cache for the update's memory)."""
        self.engine.sleep()
        ga, keep = self.advantages(batch)
        weights = self.loss_weights(batch, keep)
        bonus = self.tie_bonus(batch, ga)
        mbs, pack_stats = self.microbatches(batch, ga.advantages, weights, keep, bonus)
        t_old, t_ref = self.score_old_and_ref(mbs)
        t1 = time.perf_counter()
        upd = self.update(mbs) if mbs else {"loss": 0.0, "grad_norm": 0.0, "skipped_steps": 0}
        t_upd = time.perf_counter() - t1
        t_sync = self.engine.sync_weights(self.policy)  # wakes the engine's weights first
        self.engine.wake_up()
        metrics = rollout_metrics(batch, ga, keep)
        metrics["tie_bonus_rollouts"] = int((bonus != 0).sum())
        metrics.update(upd)
        metrics.update(pack_stats)
        mism = [(mb.old_lp - mb.engine_lp).abs().max() for mb in mbs if mb.targets.numel()]
        metrics["old_vs_engine_logprob_maxabs"] = float(torch.stack(mism).max()) if mism else 0.0
        n_tok = sum(len(s.response_ids) for s in batch)
        total = time.perf_counter() - t0
        metrics.update({"time/generate": t_gen, "time/old_logprob": t_old, "time/reference": t_ref,
                        "time/update": t_upd, "time/sync": t_sync, "time/step": total,
                        "tokens_per_s": n_tok / max(total, 1e-9)})
        return metrics


def rollout_metrics(batch: list[Seq], ga, keep: torch.Tensor) -> dict:
    """Per-mode reward / length / think rate and group statistics of one rollout batch."""
    m: dict[str, float] = {}
    for name, mid in MODE_ID.items():
        sel = [s for s in batch if s.mode == mid]
        if not sel:
            continue
        m[f"{name}/reward"] = float(np.mean([s.reward for s in sel]))
        m[f"{name}/response_len"] = float(np.mean([len(s.response_ids) for s in sel]))
        m[f"{name}/well_formed"] = float(np.mean([s.chosen is not None for s in sel]))
        if name == "auto":
            m["auto/think_rate"] = float(np.mean([s.chosen == "think" for s in sel]))
    m["reward"] = float(np.mean([s.reward for s in batch]))
    m["groups"] = int(ga.group_size.numel()) if hasattr(ga, "group_size") else 0
    m["zero_variance_groups"] = int(ga.zero_variance.sum())
    m["kept_rollouts"] = int(keep.sum())
    return m
