"""Configuration of the BPO / GRPO update (owned by ``r4b.rl``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..config import require_choice, require_range


@dataclass(kw_only=True)
class RLConfig:
    """Knobs of Bi-mode Policy Optimization and its ablations.

    Defaults follow the paper where it is explicit (merged-group baseline, std scaling,
    forced prefix as prompt) and the project's own runs on the embedded task elsewhere
    (see README, "Results on the embedded default").
    """

    algo: Literal["bpo", "grpo"] = "bpo"
    """'bpo': g forced-thinking + g forced-non-thinking rollouts per prompt; 'grpo': 2g
    auto-mode rollouts per prompt (the ablation: the model picks its mode, no forcing)."""
    group_size: int = 4
    """g: rollouts per mode per prompt (BPO samples 2g per prompt; GRPO samples 2g auto)."""
    prompts_per_step: int = 16
    """Prompts per optimizer step (global, across data-parallel ranks)."""
    baseline: Literal["group", "mode"] = "group"
    """Advantage baseline: over the merged 2g group (the paper: modes compete) or per mode."""
    scale: Literal["std", "none"] = "std"
    """'std': divide advantages by the group std + eps (GRPO); 'none': Dr.GRPO."""
    eps_low: float = 0.2
    """Lower clip range of the ratio: clip(r, 1 - eps_low, 1 + eps_high)."""
    eps_high: float = 0.28
    """Upper clip range of the ratio (clip-higher keeps exploration alive)."""
    dual_clip: float | None = None
    """Dual-clip constant c > 1 for negative advantages (None disables)."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    """KL(pi || pi_ref) estimator per token."""
    kl_coef: float = 0.0
    """KL penalty coefficient beta; 0 skips the reference model entirely."""
    entropy_coef: float = 0.0
    """Entropy bonus coefficient (subtracted from the loss)."""
    loss_aggregation: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm",
                              "mode_balanced"] = "mode_balanced"
    """How per-token losses are weighted; 'mode_balanced' gives each mode equal weight per
    group, since thinking answers are several times longer."""
    routing: Literal["prompt", "token"] = "token"
    """'prompt': the forced mode prefix is prompt (the paper as written: the token that picks
    the mode gets no gradient); 'token': the mode-choosing token is part of the response and
    trained, with an importance correction for the forcing (behaviour prob 1/2 per mode)."""
    tis_cap: float | None = 2.0
    """Truncated importance sampling against the engine's log-probs: weight each token by
    min(exp(old - engine), tis_cap). None disables it."""
    filter_zero_variance: bool = False
    """Drop groups whose rewards are all equal (they carry no signal under std scaling)."""
    tie_bonus: float | None = None
    """Routing advantage of a tie: in a group whose 2g rewards are all equal (both modes
    equally right, or equally wrong), the forced routing tokens get advantage ``+tie_bonus``
    on no-think rollouts and ``-tie_bonus`` on thinking ones, so the cheaper mode wins a tie
    (the oracle router's rule).  Without it a tie carries no gradient and the routing of easy
    prompts drifts with what the harder ones teach (README, "Results").  Only the routing
    token is touched; every other token keeps advantage 0.  0 is the paper's objective.
    Needs ``algo='bpo'``, ``routing='token'`` and no zero-variance filtering (there is no
    routing token otherwise, or no tie left).  None: 0.1 where it applies, else 0 (0.5
    pulled level 2 to no-think on the embedded task: think rate 0.26, -12 points there)."""
    inner_epochs: int = 1
    """Passes over each rollout batch (>1 makes the ratio and clipping active)."""
    minibatches: int = 1
    """Optimizer steps per pass over the rollout batch."""
    tokens_per_microbatch: int = 4096
    """Token budget of one packed micro-batch (the packer's budget)."""
    share_prefix: bool = True
    """Pack each group's shared prompt (and its images) once, followed by its rollouts'
    responses, in the old-log-prob, reference and update passes (``r4b.packing.groups``);
    the log-probs, loss and gradients equal those of one sequence per rollout (``false``, the
    comparison path), with fewer LM tokens and vision tiles.  A group over the token budget is
    split, each part with its own copy of the prompt."""
    lr: float = 1e-4
    """AdamW learning rate of the policy (5e-4 destabilised the tiny model on the embedded
    task: forced-thinking accuracy on level 4 fell from 0.76 to 0.12 in 60 steps)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (0 disables)."""
    temperature: float = 1.0
    """Rollout sampling temperature (the loss uses the same temperature)."""
    top_p: float = 1.0
    """Rollout nucleus sampling."""
    max_new_tokens_think: int = 80
    """Response budget of forced-thinking rollouts."""
    max_new_tokens_no_think: int = 16
    """Response budget of forced-non-thinking rollouts."""
    max_new_tokens_auto: int = 80
    """Response budget of auto rollouts."""
    levels: tuple[int, ...] | None = None
    """Restrict RL prompts to items of these difficulty levels (e.g. 2 3 4: math only, the
    reading level left out, as R-4B trains BPO on math); None: every item.  Evaluation still
    covers every level."""

    def __post_init__(self):
        require_choice("rl.algo", self.algo, ("bpo", "grpo"))
        require_range("rl.group_size", self.group_size, 1)
        require_range("rl.prompts_per_step", self.prompts_per_step, 1)
        require_choice("rl.baseline", self.baseline, ("group", "mode"))
        require_choice("rl.scale", self.scale, ("std", "none"))
        require_range("rl.eps_low", self.eps_low, 0.0, 1.0)
        require_range("rl.eps_high", self.eps_high, 0.0)
        if self.dual_clip is not None:
            require_range("rl.dual_clip", self.dual_clip, 1.0, lo_open=True)
        require_choice("rl.kl_estimator", self.kl_estimator, ("k1", "k2", "k3"))
        require_range("rl.kl_coef", self.kl_coef, 0.0)
        require_range("rl.entropy_coef", self.entropy_coef, 0.0)
        require_choice("rl.loss_aggregation", self.loss_aggregation,
                       ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm", "mode_balanced"))
        require_choice("rl.routing", self.routing, ("prompt", "token"))
        if self.tis_cap is not None:
            require_range("rl.tis_cap", self.tis_cap, 1.0)
        if self.tie_bonus is not None:
            require_range("rl.tie_bonus", self.tie_bonus, 0.0)
            if self.tie_bonus > 0 and not self._tie_bonus_applies():
                raise ValueError(
                    f"rl.tie_bonus = {self.tie_bonus} needs rl.algo = 'bpo', rl.routing = 'token' "
                    f"and rl.filter_zero_variance = False, got {self.algo!r}, {self.routing!r}, "
                    f"{self.filter_zero_variance!r} (there is no routing token or no tie to break; "
                    f"set --rl.tie_bonus 0)")
        require_range("rl.inner_epochs", self.inner_epochs, 1)
        require_range("rl.minibatches", self.minibatches, 1)
        require_range("rl.tokens_per_microbatch", self.tokens_per_microbatch, 16)
        require_range("rl.lr", self.lr, 0.0, lo_open=True)
        require_range("rl.weight_decay", self.weight_decay, 0.0)
        require_range("rl.grad_clip", self.grad_clip, 0.0)
        require_range("rl.temperature", self.temperature, 0.0, lo_open=True)
        require_range("rl.top_p", self.top_p, 0.0, 1.0, lo_open=True)
        for m in ("think", "no_think", "auto"):
            require_range(f"rl.max_new_tokens_{m}", getattr(self, f"max_new_tokens_{m}"), 1)
        if self.levels is not None:
            self.levels = tuple(self.levels)
            if not self.levels:
                raise ValueError("rl.levels must name at least one level, got ()")
            for lv in self.levels:
                require_range("rl.levels[...]", lv, 0)

    def _tie_bonus_applies(self) -> bool:
        return self.algo == "bpo" and self.routing == "token" and not self.filter_zero_variance

    @property
    def effective_tie_bonus(self) -> float:
        """``tie_bonus`` with None resolved: 0.1 where a tie bonus applies, else 0."""
        if self.tie_bonus is not None:
            return float(self.tie_bonus)
        return 0.1 if self._tie_bonus_applies() else 0.0
