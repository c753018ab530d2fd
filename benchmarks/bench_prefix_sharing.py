"""The BPO trainer's old-log-prob and update passes, prefix-shared vs one sequence per rollout.

One BPO group of ``2g = 8`` rollouts (4 forced-thinking, 4 forced-non-thinking, token routing:
all eight share the prompt exactly) on a one-image prompt, at r4b-4b's real widths (Qwen3-4B:
hidden 2,560, 32 / 8 heads, MLP 9,728, vocab 151,936; SigLIP So400m: 1,152) cut to 2 LM + 2
vision layers, random weights.  The same :class:`~r4b.rl.bpo.BPOTrainer` packs the group both
ways (``--rl.share_prefix True`` / ``False``) at the r4b-4b recipe's 16,384-token micro-batch
budget, scores the old log-probs (``score_old_and_ref``) and runs the update (``update``:
forward, fused policy loss, backward, clip, optimizer step).  The optimizer is SGD with lr 0,
so both layouts see the same weights in every repeat, and their losses, grad norms and
per-token old log-probs are compared (they must agree: the shared layout is exact).

Cases: a 384 x 384 image (1,485 image tokens: the base tile and one crop) and a 1024 x 768
image (4,725 image tokens: the base tile and six crops); responses of 400 (thinking) and 80
(non-thinking) tokens.  Per case and layout: LM tokens, vision tiles, micro-batches, and the
wall time of packing, the old-log-prob pass and the update (median over ``--repeats``, the two
layouts alternating so that a drift of the machine's speed hits both); the ratios dense /
shared as ``lm_tokens_ratio``, ``vision_tiles_ratio``, ``old_logprob_time_ratio``,
``update_time_ratio`` and ``passes_time_ratio`` (old log-prob + update).

Run it in one process::

    python benchmarks/bench_prefix_sharing.py                # both cases, CPU: ~25 min
    python benchmarks/bench_prefix_sharing.py --images 384x384 --repeats 1
    python benchmarks/bench_prefix_sharing.py --images 384x384 --layers 4 --append

It writes ``benchmarks/results/prefix-sharing-<device>.json`` (``--out`` to choose).  On a GPU,
``pytest benchmarks/bench_prefix_sharing.py --benchmark`` runs the same cases in bf16 (the
device check's ``benchmarks`` phase); on the CPU that test points to this script instead of
taking half an hour inside pytest.  Without ``--benchmark``: a seconds-long smoke run at
small widths that checks both layouts give the same loss and log-probs.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import RESULTS_DIR, environment, sync  # noqa: E402

import json  # noqa: E402

CASES = {"384x384": (384, 384), "1024x768": (768, 1024)}
"""Image sizes (height, width) by their ``WIDTHxHEIGHT`` name."""
THINK_LEN, NO_THINK_LEN = 400, 80
G = 4  # rollouts per forced mode: 2g = 8 per group
BUDGET = 16384  # recipes/r4b-4b.toml: rl.tokens_per_microbatch


def cut_r4b_4b(layers: int = 2, *, dtype: str = "float32"):
    """r4b-4b's model config with ``layers`` LM and vision layers."""
    from r4b.models.presets import r4b_4b

    cfg = r4b_4b(params_dtype=dtype)
    return dataclasses.replace(
        cfg, lm=dataclasses.replace(cfg.lm, num_layers=layers),
        vision=dataclasses.replace(cfg.vision, num_layers=layers, feature_layer=layers))


def make_group(cfg, image_hw: tuple[int, int], *, think_len: int, no_think_len: int, g: int,
               seed: int = 0) -> list:
    """One BPO group as the trainer receives it: 2g rollouts of one image prompt (chat text
    around the image placeholder, expanded to the image's token count), forced routing tokens
    at the start of each response, alternating rewards so that every advantage is nonzero."""
    from r4b.data.images import num_image_tokens
    from r4b.rl.bpo import MODE_ID, Seq

    gen = torch.Generator(device="cpu").manual_seed(seed)
    vocab = min(cfg.lm.vocab_size, cfg.image_token_id or cfg.lm.vocab_size)

    def text(n: int) -> list[int]:
        return torch.randint(10, vocab, (n,), generator=gen, device="cpu").tolist()

    h, w = image_hw
    image = torch.rand(3, h, w, generator=gen, device="cpu")
    n_img = num_image_tokens(h, w, cfg)
    prompt = text(5) + [cfg.image_token_id] * n_img + text(24) + text(5)
    forced = {"think": 1, "no_think": 3}  # <think> / <think></think>: routing token + template
    batch = []
    for k, mode in enumerate(["think"] * g + ["no_think"] * g):
        n = think_len if mode == "think" else no_think_len
        lps = (-torch.rand(n, generator=gen, device="cpu") * 2 - 0.01).tolist()
        batch.append(Seq(prompt_ids=list(prompt), response_ids=text(n), engine_logprobs=lps,
                         behaviour_logprobs=[x - 0.01 for x in lps], mode=MODE_ID[mode],
                         chosen=mode, group=0, level=None, reward=float(k % 2),
                         finished=True, forced=forced[mode], uid="bench", images=[image]))
    return batch


def run_layout(trainer, batch, *, share: bool, device) -> dict:
    """Pack ``batch`` in one layout, score the old log-probs, run one update; timings and
    what to compare."""
    trainer.cfg = dataclasses.replace(trainer.cfg, share_prefix=share)
    ga, keep = trainer.advantages(batch)
    weights = trainer.loss_weights(batch, keep)
    bonus = trainer.tie_bonus(batch, ga)
    sync(device)
    t0 = time.perf_counter()
    mbs, stats = trainer.microbatches(batch, ga.advantages, weights, keep, bonus)
    sync(device)
    t1 = time.perf_counter()
    trainer.score_old_and_ref(mbs)
    sync(device)
    t2 = time.perf_counter()
    m = trainer.update(mbs)
    sync(device)
    t3 = time.perf_counter()
    old = {}
    for mb in mbs:
        for r, (j, t) in enumerate(zip(mb.pk.row_seq.tolist(), mb.pk.row_token.tolist())):
            old[(mb.pk.seqs[j], t)] = float(mb.old_lp[r])
    return {"lm_tokens": int(sum(mb.pk.input_ids.numel() for mb in mbs)),
            "vision_tiles": int(stats["pack/rank_vision_tiles"]), "microbatches": len(mbs),
            "pack_s": t1 - t0, "old_logprob_s": t2 - t1, "update_s": t3 - t2,
            "loss": m["loss"], "grad_norm": m["grad_norm"], "old": old}


def bench_case(name: str, image_hw: tuple[int, int], *, cfg, rt, layers: int, repeats: int, warmup: int,
               think_len: int = THINK_LEN, no_think_len: int = NO_THINK_LEN, g: int = G,
               log=print) -> dict:
    """Both layouts on one case; the row recorded in the results file."""
    from r4b.models import build_model
    from r4b.rl.bpo import BPOTrainer
    from r4b.rl.config import RLConfig

    torch.manual_seed(0)
    model = build_model(cfg).to(rt.device)
    rl = RLConfig(group_size=g, prompts_per_step=1, routing="token", kl_coef=0.0,
                  tokens_per_microbatch=BUDGET, share_prefix=True, temperature=1.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # the weights stay as they are
    trainer = BPOTrainer(rl, policy=model, engine=None, template=None, rt=rt, optimizer=opt)
    batch = make_group(cfg, image_hw, think_len=think_len, no_think_len=no_think_len, g=g)
    for _ in range(warmup):
        run_layout(trainer, batch, share=True, device=rt.device)
    runs = {True: [], False: []}
    for r in range(repeats):
        for share in (True, False):
            res = run_layout(trainer, batch, share=share, device=rt.device)
            runs[share].append(res)
            log(f"  {name} {'shared' if share else 'dense '} repeat {r + 1}/{repeats}: "
                f"{res['lm_tokens']} LM tokens, {res['vision_tiles']} tiles, "
                f"old-logprob {res['old_logprob_s']:.2f} s, update {res['update_s']:.2f} s, "
                f"loss {res['loss']:.6g}")
    del model, trainer, opt

    def med(share: bool, key: str) -> float:
        return statistics.median(x[key] for x in runs[share])

    def side(share: bool) -> dict:
        x = runs[share][0]
        return {"lm_tokens": x["lm_tokens"], "vision_tiles": x["vision_tiles"],
                "microbatches": x["microbatches"],
                "pack_s": med(share, "pack_s"), "old_logprob_s": med(share, "old_logprob_s"),
                "update_s": med(share, "update_s"),
                "passes_s": med(share, "old_logprob_s") + med(share, "update_s"),
                "update_s_all": [x["update_s"] for x in runs[share]],
                "old_logprob_s_all": [x["old_logprob_s"] for x in runs[share]],
                "loss": x["loss"], "grad_norm": x["grad_norm"]}

    sh, de = side(True), side(False)
    a, b = runs[True][0], runs[False][0]
    if a["old"].keys() != b["old"].keys():
        raise AssertionError(f"{name}: the layouts score different tokens "
                             f"({len(a['old'])} vs {len(b['old'])})")
    lp_diff = max(abs(a["old"][k] - b["old"][k]) for k in a["old"])
    prompt = len(batch[0].prompt_ids)
    return {
        "case": name, "image_hw": list(image_hw),
        "image_tokens": int(sum(t == cfg.image_token_id for t in batch[0].prompt_ids)),
        "prompt_tokens": prompt, "rollouts": len(batch),
        "response_tokens": [len(s.response_ids) for s in batch],
        "layers": {"lm": layers, "vision": layers}, "dtype": str(cfg.params_dtype),
        "tokens_per_microbatch": BUDGET, "repeats": repeats, "warmup": warmup,
        "shared": sh, "dense": de,
        "lm_tokens_ratio": de["lm_tokens"] / sh["lm_tokens"],
        "vision_tiles_ratio": de["vision_tiles"] / sh["vision_tiles"],
        "old_logprob_time_ratio": de["old_logprob_s"] / sh["old_logprob_s"],
        "update_time_ratio": de["update_s"] / sh["update_s"],
        "passes_time_ratio": de["passes_s"] / sh["passes_s"],
        "loss_rel_diff": abs(sh["loss"] - de["loss"]) / max(abs(de["loss"]), 1e-30),
        "grad_norm_rel_diff": abs(sh["grad_norm"] - de["grad_norm"]) / max(de["grad_norm"], 1e-30),
        "old_logprob_max_abs_diff": lp_diff, "scored_tokens": len(a["old"]),
        "targets": {"lm_tokens_ratio": 3.0, "update_time_ratio": 2.5},
    }


def run(cases, *, layers: int = 2, repeats: int = 2, warmup: int = 1, dtype: str | None = None,
        out: Path | None = None, append: bool = False, log=print) -> tuple[list[dict], Path]:
    """Every case in ``cases`` in this process; writes and returns the rows and the path.
    ``append`` keeps the file's rows of other (case, layers, dtype) and replaces equal ones."""
    from r4b.runtime import init_runtime

    rt = init_runtime(1)
    dtype = dtype or ("bfloat16" if rt.device.type == "cuda" else "float32")
    cfg = cut_r4b_4b(layers, dtype=dtype)
    env = environment()
    rows = []
    for name in cases:
        log(f"case {name}: r4b-4b widths, {layers} + {layers} layers, {dtype}, {env['device']}")
        t0 = time.perf_counter()
        rows.append(bench_case(name, CASES[name], cfg=cfg, rt=rt, layers=layers, repeats=repeats,
                               warmup=warmup, log=log))
        r = rows[-1]
        log(f"case {name}: P={r['prompt_tokens']} LM tokens {r['dense']['lm_tokens']} -> "
            f"{r['shared']['lm_tokens']} ({r['lm_tokens_ratio']:.2f}x), update "
            f"{r['dense']['update_s']:.2f} -> {r['shared']['update_s']:.2f} s "
            f"({r['update_time_ratio']:.2f}x), old log-probs {r['old_logprob_time_ratio']:.2f}x, "
            f"loss rel diff {r['loss_rel_diff']:.2g}; {time.perf_counter() - t0:.0f} s")
    dev = "".join(c if c.isalnum() else "_" for c in env["device"]).strip("_").lower() or "cpu"
    path = out or RESULTS_DIR / f"prefix-sharing-{dev}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    def key(r):
        return (r["case"], r["layers"]["lm"], r["dtype"])

    kept = []
    if append and path.exists():
        old = json.loads(path.read_text())
        mine = {key(r) for r in rows}
        kept = [r for r in old.get("results", []) if key(r) not in mine]
        for r in kept:  # rows written before per-row stamps: the file's own stamp
            r.setdefault("environment", {**old.get("environment", {}),
                                         "command": old.get("command")})
    tmp = path.with_suffix(path.suffix + ".tmp")
    stamp = {**env, "command": " ".join(sys.argv)}
    for r in rows:
        r["environment"] = stamp  # rows of an appended file keep their own run's stamp
    tmp.write_text(json.dumps({"environment": env, "command": " ".join(sys.argv),
                               "results": kept + rows}, indent=2) + "\n")
    tmp.replace(path)
    return rows, path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", nargs="+", default=list(CASES), choices=list(CASES),
                    help="cases by image size (default: both)")
    ap.add_argument("--layers", type=int, default=2, help="LM and vision layers (default 2)")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per layout (default 2)")
    ap.add_argument("--warmup", type=int, default=1,
                    help="untimed shared-layout runs before timing (default 1)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                    help="parameter dtype (default: float32 on CPU, bfloat16 on CUDA)")
    ap.add_argument("--out", type=Path, default=None,
                    help="results file (default benchmarks/results/prefix-sharing-<device>.json)")
    ap.add_argument("--append", action="store_true",
                    help="keep the results file's rows of other cases / depths / dtypes")
    a = ap.parse_args(argv)
    for name, v in (("--layers", a.layers), ("--repeats", a.repeats)):
        if v < 1:
            ap.error(f"{name} must be >= 1, got {v}")
    if a.warmup < 0:
        ap.error(f"--warmup must be >= 0, got {a.warmup}")
    rows, path = run(a.images, layers=a.layers, repeats=a.repeats, warmup=a.warmup,
                     dtype=a.dtype, out=a.out, append=a.append)
    print(f"wrote {path}")
    return 0


# ------------------------------------------------------------------ pytest entry points
def test_prefix_sharing_bench(bench_mode, tmp_path):
    """Smoke (default): the tiny preset's widths, both layouts agree.  ``--benchmark``: the
    real-width cases on a GPU (the CPU run is this file's ``main``: half an hour)."""
    import pytest

    if not bench_mode:
        from r4b.models.presets import tiny
        from r4b.runtime import init_runtime

        rt = init_runtime(1)
        cfg = tiny()
        r = bench_case("tiny", (16, 16), cfg=cfg, rt=rt, layers=cfg.lm.num_layers, repeats=1,
                       warmup=0, think_len=12, no_think_len=4, g=2, log=lambda *_: None)
        assert r["shared"]["lm_tokens"] < r["dense"]["lm_tokens"]
        assert r["shared"]["vision_tiles"] * r["rollouts"] == r["dense"]["vision_tiles"]
        assert r["loss_rel_diff"] <= 1e-5 and r["grad_norm_rel_diff"] <= 1e-5, r
        assert r["old_logprob_max_abs_diff"] <= 1e-5, r
        return
    if not torch.cuda.is_available():
        pytest.skip("on the CPU the real-width run takes ~25 min: run "
                    "`python benchmarks/bench_prefix_sharing.py` (one process) instead")
    rows, path = run(list(CASES), repeats=3, warmup=1)
    for r in rows:
        print(f"prefix-sharing {r['case']}: lm_tokens_ratio {r['lm_tokens_ratio']:.2f} "
              f"update_time_ratio {r['update_time_ratio']:.2f} "
              f"passes_time_ratio {r['passes_time_ratio']:.2f} ({path.name})")
        # bf16: the layouts round differently; the loss itself is ~1e-6 (ratios are 1 and the
        # group's advantages sum to zero), so the grad norm is the quantity compared
        assert r["grad_norm_rel_diff"] <= 2e-2, r


if __name__ == "__main__":
    sys.exit(main())
