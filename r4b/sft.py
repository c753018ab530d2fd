"""Supervised fine-tuning on packed sequences (the annealing stage's optimiser loop).

Loss: token-level cross-entropy on response tokens (``sft_loss_mask``), summed over the whole
global batch and divided by its global number of target tokens, so micro-batching and data
parallelism leave the objective unchanged.  With ``share_prefix`` the examples of one source
item in a batch (its two answer forms under their forced prefixes, which differ only after the
common part of the prompt) are packed as one prefix-shared unit: the common prompt and the
images once, then each example's rest (:mod:`r4b.packing.groups`); the loss and every gradient
are those of one sequence per example.  Cross-entropy is vocab-parallel over TP
(megatron-core's ``vocab_parallel_cross_entropy`` on this rank's logit shard).  AdamW with
linear warm-up and cosine decay; non-finite steps are skipped and counted.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from .packing import forward_rows, pack, pack_shared, plan
from .components import image_processor
from .config import require_range
from .log import get_logger
from .runtime import Runtime, all_true
from .training import backward_nothing, clip_grads, reduce_grads

log = get_logger(__name__)


@dataclass(kw_only=True)
class OptimConfig:
    """AdamW with linear warm-up and cosine decay."""

    lr: float = 2e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of ``lr`` (cosine floor)."""
    warmup_steps: int = 20
    """Linear warm-up steps."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (0 disables)."""

    def __post_init__(self):
        require_range("optim.lr", self.lr, 0.0, lo_open=True)
        require_range("optim.min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        require_range("optim.warmup_steps", self.warmup_steps, 0)
        require_range("optim.weight_decay", self.weight_decay, 0.0)
        require_range("optim.grad_clip", self.grad_clip, 0.0)


def cosine_lr(step: int, total: int, cfg: OptimConfig) -> float:
    """Learning rate at optimizer step ``step`` (0-based) of ``total``."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    cos = 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cos)


def make_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))


@dataclass
class Example:
    """One SFT sequence: token ids, where the loss starts, and its images."""

    ids: list[int]
    prompt_len: int
    images: list
    mode: int = 0
    item: str | None = None
    """The source item's uid: examples of one item (e.g. both answer forms) share a prompt
    prefix and the images, and with ``share_prefix`` a batch packs them as one unit.  None:
    the example is its own unit."""


def sft_step(model, optimizer, examples: Sequence[Example], rt: Runtime, *, lr: float,
             grad_clip: float, tokens_per_microbatch: int, share_prefix: bool = True) -> dict:
    """One optimizer step on ``examples`` (the *global* batch; every rank passes the same list).

    With ``share_prefix`` the examples of one ``item`` are packed as one prefix-shared unit
    (when no item has two examples in the batch, the layout is one sequence per example either
    way).  The metrics hold ``pack/tokens`` (tokens packed) and ``pack/dense_tokens`` (tokens
    of one sequence per example).  Micro-batches go to the model's device with one copy each;
    loss and accuracy accumulate on the device, and the step syncs with the host once, after
    the last micro-batch."""
    with rt.phase("update"):
        return _sft_step(model, optimizer, examples, rt, lr=lr, grad_clip=grad_clip,
                         tokens_per_microbatch=tokens_per_microbatch, share_prefix=share_prefix)


def item_groups(examples: Sequence[Example]) -> list[int]:
    """Group id per example: examples with the same ``item`` share an id; an example without
    one is a group of its own.  Ids are numbered in order of first appearance."""
    ids: dict[object, int] = {}
    return [ids.setdefault(e.item if e.item is not None else ("", j), len(ids))
            for j, e in enumerate(examples)]


def _sft_microbatches(examples: Sequence[Example], rt: Runtime, *, tokens_per_microbatch: int,
                      share_prefix: bool, process, image_token_id: int | None):
    """This rank's packed micro-batches of ``examples`` and the ``pack/*`` statistics."""
    tokens = [e.ids for e in examples]
    plens = [e.prompt_len for e in examples]
    images = [e.images for e in examples]
    n_tok = sum(len(t) for t in tokens)
    groups = item_groups(examples)
    if share_prefix and len(set(groups)) < len(groups):
        packed, stats, _ = pack_shared(tokens, plens, groups, images, dp_rank=rt.dp_rank,
                                       dp_size=rt.dp_size,
                                       tokens_per_microbatch=tokens_per_microbatch,
                                       image_token_id=image_token_id, process=process)
        return packed, stats
    mine, _ = plan([len(t) for t in tokens], dp_rank=rt.dp_rank, dp_size=rt.dp_size,
                   tokens_per_microbatch=tokens_per_microbatch, modes=[e.mode for e in examples])
    stats = {"pack/dense_tokens": n_tok, "pack/tokens": n_tok}
    return pack(tokens, plens, images, mine, process=process), stats


def _sft_step(model, optimizer, examples, rt, *, lr, grad_clip, tokens_per_microbatch,
              share_prefix) -> dict:
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    for g in optimizer.param_groups:
        g["lr"] = lr
    dev = rt.device
    n_target = sum(len(e.ids) - e.prompt_len for e in examples)
    optimizer.zero_grad(set_to_none=True)
    # [loss sum, correct tokens] of this rank, reduced over DP after the last micro-batch.
    acc = torch.zeros(2, dtype=torch.float64, device=dev)
    cfg = getattr(model, "cfg", None)
    process = image_processor(cfg) if getattr(cfg, "vision", None) is not None else None
    packed, stats = _sft_microbatches(examples, rt, tokens_per_microbatch=tokens_per_microbatch,
                                      share_prefix=share_prefix, process=process,
                                      image_token_id=getattr(cfg, "image_token_id", None))
    for mb in packed:
        mb = mb.to(dev)
        logits = forward_rows(model, mb, return_hidden=False, gather_logits=False).float()
        targets = mb.targets
        if targets.numel() == 0:  # an empty micro-batch: zero loss, same collectives
            backward_nothing(logits)
            continue
        ce = vocab_parallel_cross_entropy(logits, targets)
        loss = ce.sum() / n_target
        loss.backward()
        acc[0] += loss.detach()
        if rt.tp_size == 1:
            acc[1] += (logits.argmax(-1) == targets).sum()
    reduce_grads(model, rt)
    norm = clip_grads(model, grad_clip, rt)
    if rt.dp_size > 1:
        torch.distributed.all_reduce(acc, group=rt.dp_group)
    loss_sum, correct = acc.tolist()
    ok = all_true(math.isfinite(loss_sum) and math.isfinite(norm), rt)
    if ok:
        optimizer.step()
    else:
        log.warning("SFT step skipped: non-finite loss (%s) or gradient norm (%s)", loss_sum, norm)
    optimizer.zero_grad(set_to_none=True)
    out = {"loss": loss_sum, "grad_norm": norm, "lr": lr, "skipped": int(not ok),
           "target_tokens": n_target, **stats}
    if rt.tp_size == 1:
        out["token_acc"] = correct / max(1, n_target)
    return out


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Deterministic batch ``step`` of an epoch-wise shuffled order over ``n`` examples."""
    per_epoch = max(1, n // batch_size)
    epoch, k = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return perm[k * batch_size:(k + 1) * batch_size].tolist()


def train_sft(model, optimizer, examples: Sequence[Example], rt: Runtime, *, steps: int,
              start_step: int, batch_size: int, optim: OptimConfig, seed: int,
              tokens_per_microbatch: int, on_step: Callable[[int, dict], None] | None = None,
              progress_desc: str = "sft", share_prefix: bool = True) -> None:
    """Run SFT steps ``start_step .. steps-1`` (resumable: batches depend only on the step);
    ``share_prefix`` as in :func:`sft_step`."""
    from .log import progress

    bar = progress(total=steps, initial=start_step, desc=progress_desc)
    for step in range(start_step, steps):
        t0 = time.perf_counter()
        batch = [examples[i] for i in batch_indices(len(examples), batch_size, step, seed)]
        m = sft_step(model, optimizer, batch, rt, lr=cosine_lr(step, steps, optim),
                     grad_clip=optim.grad_clip, tokens_per_microbatch=tokens_per_microbatch,
                     share_prefix=share_prefix)
        m["time/step"] = time.perf_counter() - t0
        bar.update(1)
        bar.set_postfix(loss=f"{m['loss']:.3f}")
        if on_step is not None:
            on_step(step + 1, m)
    bar.close()
