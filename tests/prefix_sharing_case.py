"""One exactness case of the prefix-shared layout against one sequence per rollout.

Builds a BPO batch by hand (real prompts from the template, one or two images per prompt,
ragged responses truncated at random, both routings), packs it both ways with the same
trainer settings, and returns per-token old / reference log-probs, the loss, the grad norm
and every parameter's gradient of one update on each layout.  Used in-process by
``tests/test_prefix_sharing.py`` and under torchrun (TP=2, DP=2) by its ``__main__``.
"""

from __future__ import annotations

import dataclasses
import json
import random
import sys

import torch

from r4b.components import Setup, make_template, make_tokenizer, model_config
from r4b.data import TaskConfig
from r4b.models import build_model
from r4b.rl.bpo import MODE_ID, BPOTrainer, Seq, frozen_copy
from r4b.rl.config import RLConfig
from r4b.runtime import all_gather_objects
from r4b.training import shard_model


class CaptureGrads(torch.optim.Optimizer):
    """An optimizer whose step records the gradients and leaves the weights alone."""

    def __init__(self, params):
        super().__init__(list(params), {})
        self.grads: list[torch.Tensor] = []

    def step(self, closure=None):
        self.grads = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
                      for g in self.param_groups for p in g["params"]]


def build(task: TaskConfig, seed: int = 0, tp_size: int = 1):
    setup = Setup(task=task, seed=seed)
    tok = make_tokenizer(setup.model)
    cfg = model_config(setup.model, tok, task, tp_size=tp_size)
    torch.manual_seed(seed)
    model = build_model(cfg)
    return model, make_template(tok, cfg), task


def make_batch(tmpl, task: TaskConfig, *, routing: str, n_items: int, g: int, n_images: int,
               seed: int) -> list[Seq]:
    """2g rollouts per item with ragged responses (each truncated at a random length)."""
    rng = random.Random(seed)
    items = task.make(seed, n_items, split="train")
    batch = []
    for k, it in enumerate(items):
        if n_images == 2 and it.images:  # a second image: the next item's
            it = dataclasses.replace(it, images=[it.images[0],
                                                 items[(k + 1) % len(items)].images[0]])
        for mode in ["think"] * g + ["no_think"] * g:
            if routing == "token":
                prompt, forced = tmpl.item_prompt_ids(it, "auto"), tmpl.forced_ids(mode)
            else:
                prompt, forced = tmpl.item_prompt_ids(it, mode), []
            full = list(forced) + tmpl.response_ids(it.answer, it.reasoning if mode == "think"
                                                    else None, mode)
            n = rng.randint(len(forced) + 1, len(full))
            resp = full[:n]
            lps = [-rng.uniform(0.01, 3.0) for _ in resp]
            batch.append(Seq(prompt_ids=list(prompt), response_ids=resp, engine_logprobs=lps,
                             behaviour_logprobs=[x - rng.uniform(0, 0.1) for x in lps],
                             mode=MODE_ID[mode], chosen=mode, group=k, level=it.level,
                             reward=float(rng.random() < 0.5), finished=True,
                             forced=len(forced), uid=it.uid, images=list(it.images)))
    return batch


def run_case(rt, *, task: TaskConfig, routing: str, n_images: int, budget: int,
             share: bool, kl_coef: float = 0.1, seed: int = 0) -> dict:
    """Old / reference log-probs per (rollout, token), loss, grad norm and gradients of one
    update of ``share``'s layout on the batch of ``seed``."""
    model, tmpl, task = build(task, seed, tp_size=rt.tp_size)
    model = model.to(rt.device)
    if rt.dp_size > 1:
        shard_model(model, rt)
    ref = frozen_copy(model) if kl_coef > 0 else None
    cfg = RLConfig(group_size=2, prompts_per_step=2, routing=routing, kl_coef=kl_coef,
                   tokens_per_microbatch=budget, share_prefix=share, grad_clip=0.0,
                   entropy_coef=0.01)
    opt = CaptureGrads(model.parameters())
    trainer = BPOTrainer(cfg, policy=model, engine=None, template=tmpl, rt=rt, ref_model=ref,
                         optimizer=opt)
    batch = make_batch(tmpl, task, routing=routing, n_items=2, g=2, n_images=n_images, seed=seed)
    ga, keep = trainer.advantages(batch)
    weights = trainer.loss_weights(batch, keep)
    bonus = trainer.tie_bonus(batch, ga)
    mbs, stats = trainer.microbatches(batch, ga.advantages, weights, keep, bonus)
    trainer.score_old_and_ref(mbs)
    old: dict[str, float] = {}
    refl: dict[str, float] = {}
    for mb in mbs:
        for r, (j, t) in enumerate(zip(mb.pk.row_seq.tolist(), mb.pk.row_token.tolist())):
            key = f"{mb.pk.seqs[j]}:{t}"
            old[key] = float(mb.old_lp[r])
            if mb.ref_lp is not None:
                refl[key] = float(mb.ref_lp[r])
    m = trainer.update(mbs)
    loss = torch.tensor(m["loss"], dtype=torch.float64)
    if rt.dp_size > 1:  # each DP rank's loss is its share; the plan differs between layouts
        torch.distributed.all_reduce(loss, group=rt.dp_group)
        old = {k: v for part in all_gather_objects(old, rt) for k, v in part.items()}
        refl = {k: v for part in all_gather_objects(refl, rt) for k, v in part.items()}
    names = [n for n, _ in model.named_parameters()]
    grads = [_local(g) for g in opt.grads]  # this rank's TP / FSDP shard of each gradient
    return {"old": old, "ref": refl, "loss": float(loss), "grad_norm": m["grad_norm"],
            "grads": dict(zip(names, grads)), "stats": stats, "n_mbs": len(mbs)}


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def compare(a: dict, b: dict, rtol: float = 1e-5) -> list[str]:
    """Differences between two :func:`run_case` results beyond ``rtol`` (relative to each
    quantity's scale); empty when they agree."""
    bad = []
    for what in ("old", "ref"):
        if a[what].keys() != b[what].keys():
            bad.append(f"{what}: different scored tokens ({len(a[what])} vs {len(b[what])})")
            continue
        if not a[what]:
            continue
        x = torch.tensor([a[what][k] for k in sorted(a[what])], dtype=torch.float64)
        y = torch.tensor([b[what][k] for k in sorted(a[what])], dtype=torch.float64)
        err = float((x - y).abs().max() / y.abs().max().clamp_min(1e-12))
        if err > rtol:
            bad.append(f"{what} log-probs: relative max diff {err:.3g}")
    for what in ("loss", "grad_norm"):
        err = abs(a[what] - b[what]) / max(abs(b[what]), 1e-12)
        if err > rtol:
            bad.append(f"{what}: {a[what]!r} vs {b[what]!r} (relative {err:.3g})")
    # A gradient that is zero in exact arithmetic (the key bias of an attention: it shifts a
    # query's scores by a constant) is rounding noise on both sides: each tensor is compared
    # relative to its own scale, but not below 1e-3 of the largest gradient.
    floor = 1e-3 * max(float(g.abs().max()) for g in b["grads"].values())
    for name, ga in a["grads"].items():
        gb = b["grads"][name]
        scale = max(float(gb.abs().max()), floor, 1e-30)
        err = float((ga - gb).abs().max()) / scale
        if err > rtol:
            bad.append(f"grad {name}: max diff {err:.3g} relative to {scale:.3g}")
    return bad


def main() -> None:
    """Under torchrun: ``python -m torch.distributed.run ... tests/prefix_sharing_case.py
    TP OUT.json``: every case both ways; rank 0 writes the differences found."""
    from r4b.runtime import init_runtime

    tp, out = int(sys.argv[1]), sys.argv[2]
    rt = init_runtime(tp)
    results = {}
    for name, kw in CASES.items():
        a = run_case(rt, share=True, **kw)
        b = run_case(rt, share=False, **kw)
        bad = compare(a, b)
        every = [None] * rt.world_size
        torch.distributed.all_gather_object(every, bad)
        results[name] = {"bad": {str(r): x for r, x in enumerate(every) if x},
                         "stats": a["stats"], "loss": a["loss"], "dense_loss": b["loss"],
                         "grad_norm": a["grad_norm"], "dense_grad_norm": b["grad_norm"],
                         "n_mbs": a["n_mbs"], "dense_n_mbs": b["n_mbs"]}
    if rt.rank == 0:
        with open(out, "w") as f:
            json.dump({"tp": rt.tp_size, "dp": rt.dp_size, "results": results}, f, indent=1)
    # Leave together and close the gloo group: a rank that exits while its peer's gloo threads
    # still run can abort at exit ("terminate called without an active exception").
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


CASES = {
    "image_token_routing": dict(task=TaskConfig(image_size=18), routing="token", n_images=1,
                                budget=4096),
    "two_images_prompt_routing": dict(task=TaskConfig(image_size=18), routing="prompt",
                                      n_images=2, budget=4096),
    "split_group": dict(task=TaskConfig(image_size=18), routing="token", n_images=1, budget=32),
}
"""Named cases (a budget of 32 tokens splits each group over several units and micro-batches)."""

if __name__ == "__main__":
    main()
