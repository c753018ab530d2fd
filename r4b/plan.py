"""Memory planner: ``python -m r4b.plan`` prints the per-GPU budget of a BPO configuration and
which TP x DP layouts of a node fit it.

Per rank, in bytes (P = parameters held by one TP rank, split into the FSDP root R — token
embedding / tied LM head, final norm, vision embeddings, projector — and units: decoder layers
and vision blocks; c = bytes of the compute dtype; everything sharded over DP is divided by
DP):

* **master weights** ``4 P / DP``, **AdamW moments** ``8 P / DP``, **gradients** ``4 P / DP``
  (fp32, ``r4b.training``);
* **gathered weights** during training: the root in the compute dtype (it stays gathered from
  forward to backward), plus two units (the one running and the one prefetched), each with
  its unsharded gradient and the fp32 copy the reduce-scatter takes;
* **activations**: what autograd saves per token per layer, *measured* by running one decoder
  layer and one vision block with this rank's shard widths on the meta device (no memory:
  ``r4b.memory.saved_activation_bytes``), times tokens and layers; with full recomputation
  only each layer's input is kept, plus one layer's activations while it is recomputed;
* **loss buffers**: the fused policy loss' chunk (fp32 logits + dlogits in the compute dtype,
  ``r4b_kernels.policy_loss.default_chunk_rows``) and its dH; on the CPU path the reference
  loss' saved tensors, measured on meta the same way;
* **rollouts**: the KV cache (``2 x layers x kv_heads/TP x head_dim x c`` per token) for the
  rows generated at once (``rollout.kv_budget_tokens``, or every rollout of the rank's
  prompts), the full weights gathered in the compute dtype, and the sampler's logits.  The
  embedded engine's shared cache (``--share_prompts``, its default) holds a group's prompt
  once and each row's response budget (:func:`rollout_wave`); without it every row holds
  prompt + response;
* **reference model** (KL on): a full copy in the compute dtype.

Peak = max(update phase, rollout phase) over what is live in each; master weights and moments
live in both.

**Packing layout** (:func:`step_layout`; ``--share_prefix``, as the trainer's
``--rl.share_prefix``).  A group is N = 2g rollouts of P prompt and R response tokens (every
response at its budget).  One sequence per rollout packs N (P + R) tokens per group; the
prefix-shared layout packs units of the prompt once and k responses, k = min(N, (B - P) // R)
(at least 1) for a micro-batch budget B, so ``ceil(N / k)`` units and ``ceil(N / k) P + N R``
tokens per group: N (P + R) / (P + N R) times fewer when a group fits one unit.  Token counts,
vision tiles (one image set per unit) and the K/V every trainer pass computes (old and
reference log-probs, the update: ``tokens x kv bytes per token``) scale with it.  A micro-batch
is bounded by the same budget in both layouts, so its language-model activations are the same;
it holds fewer image sets and more scored rows when shared.

The prediction is checked against measured peaks (``tests/test_plan.py``): tensor bytes, as
``torch.cuda.max_memory_allocated`` counts them, without the allocator's fragmentation (keep
10% of the GPU free for it: ``fits`` uses 90%).
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from typing import Sequence

import torch

from .config import parse_cli, require_choice, require_range
from .log import get_logger, setup_logging

log = get_logger(__name__)

GiB = 2**30
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# ---------------------------------------------------------------- parameters per rank
def _lm_layer_params(lm, tp: int) -> int:
    h, d, nh, nkv, i = lm.hidden_size, lm.head_dim, lm.num_heads, lm.num_kv_heads, lm.intermediate_size
    split = h * (nh + 2 * nkv) * d + nh * d * h + 3 * h * i
    return split // tp + 2 * h + 2 * d  # norms (and q/k norms) replicated


def _vision_block_params(v, tp: int) -> int:
    h, i = v.hidden_size, v.intermediate_size
    split = 4 * h * h + 3 * h + 2 * h * i + i  # q/k/v/out weights + q/k/v biases, fc1 (+bias), fc2
    return split // tp + h + h + 4 * h  # out / fc2 biases, two LayerNorms


def param_counts(cfg, tp: int = 1) -> dict[str, int]:
    """Parameters one TP rank holds: ``root``, ``lm_layer`` (each), ``vision_block`` (each),
    ``total``."""
    lm = cfg.lm
    root = lm.vocab_size * lm.hidden_size // tp + lm.hidden_size  # embedding (tied head), norm
    if not lm.tie_word_embeddings:
        root += lm.vocab_size * lm.hidden_size // tp
    vb = 0
    if cfg.vision is not None:
        v = cfg.vision
        patches = (v.image_size // v.patch_size) ** 2
        root += v.num_channels * v.patch_size ** 2 * v.hidden_size + v.hidden_size  # patch conv
        root += patches * v.hidden_size + 2 * v.hidden_size  # positions, post-LayerNorm
        root += (2 * v.hidden_size if cfg.projector_pre_norm else 0)
        root += (v.hidden_size * lm.hidden_size + lm.hidden_size) // tp  # linear_1
        root += lm.hidden_size * lm.hidden_size // tp + lm.hidden_size  # linear_2 (+ bias)
        root += lm.hidden_size if cfg.image_newline else 0
        vb = _vision_block_params(v, tp)
    layer = _lm_layer_params(lm, tp)
    n_vis = cfg.vision.num_layers if cfg.vision is not None else 0
    return {"root": root, "lm_layer": layer, "vision_block": vb,
            "total": root + lm.num_layers * layer + n_vis * vb}


# ---------------------------------------------------------------- activations, measured on meta
def _shard_lm(lm, tp: int):
    return dataclasses.replace(lm, num_heads=lm.num_heads // tp,
                               num_kv_heads=max(1, lm.num_kv_heads // tp),
                               intermediate_size=lm.intermediate_size // tp)


_SOLO = None


def _solo_group():
    """A one-rank process group: the meta runs build layers at this rank's shard widths with
    TP=1 whatever the job's TP size."""
    global _SOLO
    import torch.distributed as dist

    from .models.parallel import parallel_info

    info = parallel_info()
    if info.tp_size == 1:
        return info.tp_group
    if _SOLO is None:
        _SOLO = dist.new_group([dist.get_rank()], use_local_synchronization=True)
    return _SOLO


def lm_activation_bytes(cfg, tp: int, dtype: torch.dtype, recompute: str, tokens: int = 64) -> float:
    """Saved bytes per token of one decoder layer with this rank's shard widths (meta run)."""
    from .memory import saved_activation_bytes
    from .models.attention import make_attn_meta
    from .models.layers import RotaryEmbedding
    from .models.lm import DecoderLayer
    from .models.parallel import megatron_config
    from .training import set_recompute

    lm = _shard_lm(cfg.lm, tp)
    mc = megatron_config(dtype, tp_size=1, perform_initialization=False)
    with torch.device("meta"):
        layer = DecoderLayer(lm, config=mc, tp_group=_solo_group(), tp_size=1)
        x = torch.empty(tokens, lm.hidden_size, dtype=dtype, requires_grad=True)
        cos, sin = RotaryEmbedding(lm.head_dim, lm.rope_theta)(torch.arange(tokens))
    set_recompute(layer, recompute)
    half = tokens // 2
    meta = make_attn_meta(torch.tensor([0, half, tokens], dtype=torch.int32, device="meta"), half,
                          backend="sdpa", dense=(2, half))
    b = saved_activation_bytes(lambda: layer(x, cos, sin, meta=meta), exclude=list(layer.parameters()))
    if recompute == "full":
        b += tokens * lm.hidden_size * dtype.itemsize  # the layer input the recomputation keeps
    return b / tokens


def vision_activation_bytes(cfg, tp: int, dtype: torch.dtype, recompute: str) -> float:
    """Saved bytes per image token of one vision block (meta run).  The MLP is measured at
    this rank's width; the attention at full width (an over-estimate at TP > 1: the vision
    tower is small next to the language model)."""
    from .memory import saved_activation_bytes
    from .models.parallel import megatron_config
    from .models.vision import VisionEncoderLayer

    v = dataclasses.replace(cfg.vision, intermediate_size=max(1, cfg.vision.intermediate_size // tp))
    mc = megatron_config(dtype, tp_size=1, perform_initialization=False)
    n = 16
    with torch.device("meta"):
        blk = VisionEncoderLayer(v, mc, _solo_group())
        x = torch.empty(1, n, v.hidden_size, dtype=dtype, requires_grad=True)
    blk.recompute = recompute
    b = saved_activation_bytes(lambda: blk(x), exclude=list(blk.parameters()))
    if recompute != "none":
        b += n * v.hidden_size * dtype.itemsize
    return b / n


def torch_loss_bytes(rows: int, v_local: int, hidden: int, dtype: torch.dtype) -> float:
    """Saved bytes of the reference (CPU) policy loss for ``rows`` scored rows (meta run)."""
    import r4b_kernels as K

    from .memory import saved_activation_bytes

    with torch.device("meta"):
        h = torch.empty(rows, hidden, dtype=dtype, requires_grad=True)
        w = torch.empty(v_local, hidden, dtype=dtype, requires_grad=True)
        tg = torch.zeros(rows, dtype=torch.long)
        z = torch.zeros(rows)
    return saved_activation_bytes(lambda: K.policy_loss(h, w, tg, z, z, token_weights=z,
                                                        impl="torch").loss, exclude=[h, w])


# ---------------------------------------------------------------- the budget
@dataclass(frozen=True)
class Workload:
    """What one rank processes (tokens are prompt + response)."""

    tokens_per_microbatch: int = 16384
    scored_per_microbatch: int | None = None
    """Scored (response) rows per micro-batch; None: 85% of the tokens."""
    image_tiles_per_microbatch: int = 0
    rollout_rows: int = 512
    """Rollouts one rank generates at once (prompts x 2g / DP, or the KV budget's rows)."""
    rollout_tokens_per_row: int = 9700
    """KV tokens each rollout row holds itself: prompt + response budget, or only the
    response budget when the prompts are held once (``rollout_prompt_tokens``)."""
    rollout_prompt_tokens: int = 0
    """Prompt tokens held once for all the rows that share them (the engine's shared cache:
    one prompt per group in the wave)."""
    kl: bool = False
    loss_impl: str = "fused"
    """'fused' (the GPU kernel) or 'torch' (the CPU reference, logits materialised)."""


def predict(cfg, *, tp: int, dp: int, dtype: torch.dtype, recompute: str, work: Workload,
            phase: str = "peak") -> dict[str, float]:
    """Bytes per rank by component and ``peak`` (see the module docstring)."""
    c = dtype.itemsize
    pc = param_counts(cfg, tp)
    P, R = pc["total"], pc["root"]
    U = max(pc["lm_layer"], pc["vision_block"])
    lm = cfg.lm
    v_local = lm.vocab_size // tp
    T = work.tokens_per_microbatch
    Ts = work.scored_per_microbatch if work.scored_per_microbatch is not None else int(0.85 * T)
    out: dict[str, float] = {}
    out["master"] = 4 * P / dp
    out["moments"] = 8 * P / dp
    out["grads"] = 4 * P / dp
    upcast = 0 if c == 4 else 4  # the fp32 reduce-scatter input next to compute-dtype grads
    out["gathered"] = c * R + 2 * (c * U) + (c + upcast) * U  # root + running/prefetched units
    out["root_grads"] = (c + upcast) * R  # unsharded root gradients before their reduce-scatter
    a_lm = lm_activation_bytes(cfg, tp, dtype, recompute)
    act = T * lm.num_layers * a_lm
    if recompute == "full":
        act += T * lm_activation_bytes(cfg, tp, dtype, "none")
    if cfg.vision is not None and work.image_tiles_per_microbatch:
        v = cfg.vision
        n_img = work.image_tiles_per_microbatch * (v.image_size // v.patch_size) ** 2
        a_v = vision_activation_bytes(cfg, tp, dtype, recompute)
        act += n_img * v.num_layers * a_v
        if recompute != "none":
            act += n_img * vision_activation_bytes(cfg, tp, dtype, "none")
    out["activations"] = act
    if work.loss_impl == "fused":
        from r4b_kernels.policy_loss import default_chunk_rows

        C = default_chunk_rows(Ts, v_local, dtype, True)
        out["loss"] = C * v_local * (4 + (c if c != 4 else 0)) + Ts * lm.hidden_size * c + 32 * Ts
    else:  # saved fp32 logits etc., and the fp32 logits' gradient in backward
        out["loss"] = torch_loss_bytes(Ts, v_local, lm.hidden_size, dtype) + Ts * v_local * 4
    # Tied embeddings: the input embedding's own dense gradient, added to the LM head's.
    out["tied_grad"] = c * v_local * lm.hidden_size if lm.tie_word_embeddings else 0.0
    # AdamW (foreach): one fp32 temporary per parameter shard while it steps.
    out["optimizer_temp"] = 4 * P / dp
    out["reference"] = c * P if work.kl else 0.0
    kv_per_token = 2 * lm.num_layers * max(1, lm.num_kv_heads // tp) * lm.head_dim * c
    out["kv_cache"] = (work.rollout_rows * work.rollout_tokens_per_row
                       + work.rollout_prompt_tokens) * kv_per_token
    out["rollout_weights"] = c * P
    out["sampler"] = work.rollout_rows * lm.vocab_size * 4 * 3  # logits, probabilities, cdf
    common = out["master"] + out["moments"] + out["reference"]
    head_grad = c * v_local * lm.hidden_size
    # Three moments of an update: the loss' backward (every activation alive, the LM head's
    # gradient just computed), the end of backward (all units' sharded gradients, the root's
    # unsharded ones including the tied embedding's second gradient), the optimizer step.
    at_loss = common + out["gathered"] + out["activations"] + out["loss"] + head_grad
    at_end = common + out["grads"] + out["gathered"] + out["root_grads"] + out["tied_grad"]
    optimizer = common + out["grads"] + out["optimizer_temp"]
    update = max(at_loss, at_end, optimizer)
    out["update_moments"] = {"loss_backward": at_loss, "end_of_backward": at_end,
                             "optimizer": optimizer}
    rollout = (out["master"] + out["moments"] + out["rollout_weights"] + out["kv_cache"] +
               out["sampler"] + out["reference"])
    out["update_peak"], out["rollout_peak"] = update, rollout
    out["peak"] = {"update": update, "rollout": rollout}.get(phase, max(update, rollout))
    out["kv_bytes_per_token"] = kv_per_token
    out["activation_bytes_per_token_layer"] = a_lm
    return out


# ---------------------------------------------------------------- measuring
def measure_update_peak(cfg, rt, *, recompute: str, tokens: int, scored: int,
                        seed: int = 0) -> dict[str, float]:
    """Peak tensor bytes of one BPO update micro-batch on this rank, measured with
    :class:`r4b.memory.TensorMemory`: an FSDP-sharded fp32-master model of ``cfg`` on
    ``rt.device``, AdamW state initialised by a first step, then forward, fused (or reference)
    policy loss, backward, clipping and the optimizer step of a packed text micro-batch of
    ``tokens`` rows (``scored`` of them scored).  The weights are random."""
    import r4b_kernels as K

    from .memory import TensorMemory
    from .models import build_model
    from .training import TrainingConfig, clip_grads, shard_model

    torch.manual_seed(seed)
    model = build_model(cfg, device=rt.device, master_dtype=torch.float32)
    shard_model(model, rt, TrainingConfig(recompute=recompute))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    g = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randint(0, cfg.lm.vocab_size, (tokens,), generator=g, device="cpu").to(rt.device)
    cu = torch.tensor([0, tokens // 2, tokens], dtype=torch.int32, device="cpu").to(rt.device)
    rows = torch.arange(tokens - scored, tokens, device=rt.device)
    targets = torch.randint(0, cfg.lm.vocab_size, (scored,), generator=g, device="cpu").to(rt.device)
    zeros = torch.zeros(scored, device=rt.device)
    tp_group = rt.tp_group if rt.tp_size > 1 else None

    def step():
        h = model(input_ids=ids, cu_seqlens=cu, return_hidden=True).index_select(0, rows)
        out = K.policy_loss(h, model.lm_head_weight(), targets, zeros, zeros + 1.0,
                            token_weights=zeros + 1.0 / scored, tp_group=tp_group,
                            vocab_start=model.vocab_start)
        out.loss.backward()
        clip_grads(model, 1.0, rt)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # AdamW state now exists, as in any step after the first
    from .training import _local

    with TensorMemory() as mem:
        # count what exists (weak references only: the step may replace storages)
        mem.add(_local(p) for p in model.parameters())
        mem.add(_local(v) for st in opt.state.values() for v in st.values() if torch.is_tensor(v))
        mem.add([ids, cu, rows, targets, zeros])
        base = mem.current
        step()
    return {"peak": float(mem.peak), "persistent": float(base)}


# ---------------------------------------------------------------- command line
@dataclass(kw_only=True)
class PlanCLI:
    """``python -m r4b.plan``: per-GPU memory of a BPO configuration and the layouts that fit."""

    preset: str = "r4b-4b"
    """Model preset (r4b-4b or tiny), or see ``hf_path``."""
    hf_path: str | None = None
    """A transformers checkpoint whose config.json to plan for instead of the preset."""
    gpus: int = 8
    """GPUs per node (TP x DP layouts of this many ranks are listed)."""
    gpu_gib: float = 80.0
    """Memory per GPU in GiB; a layout fits when its peak is under 90% of it."""
    dtype: str = "bfloat16"
    """Compute dtype."""
    prompts_per_step: int = 32
    """Prompts per step (global)."""
    group_size: int = 8
    """g: rollouts per mode per prompt (2g per prompt)."""
    prompt_tokens: int = 1500
    """Prompt tokens per rollout (images included: 1485 for a 384-px image)."""
    response_tokens: int = 8192
    """Response budget per rollout."""
    tokens_per_microbatch: int = 16384
    """Packed tokens per update micro-batch (at least one prompt + response)."""
    image_tiles_per_microbatch: int = 4
    """Image tiles in one micro-batch of one sequence per rollout (each 729 vision tokens at
    384 px); see ``image_tiles_per_prompt``."""
    image_tiles_per_prompt: int | None = None
    """Image tiles of one prompt (2 for one 384-px image: the base tile and one AnyRes tile);
    when given, it overrides ``image_tiles_per_microbatch`` (a micro-batch holds its rollouts'
    or units' tiles).  None: ``image_tiles_per_microbatch`` over the rollouts such a
    micro-batch holds."""
    kv_budget_tokens: int | None = None
    """rollout.kv_budget_tokens (None: all of a rank's rollouts at once)."""
    kl: bool = False
    """A reference model for the KL term."""
    share_prefix: bool = True
    """The trainer's prefix-shared layout (``--rl.share_prefix``): a group's prompt and images
    once per packed unit, then its rollouts' responses.  False: one sequence per rollout."""
    share_prompts: bool = True
    """The embedded engine's shared KV cache (``--setup.rollout.share_prompts``): a group's
    prompt held once per wave, each row its response.  False: every row holds its prompt."""

    def __post_init__(self):
        require_choice("preset", self.preset, ("r4b-4b", "tiny"))
        require_choice("dtype", self.dtype, tuple(_DTYPES))
        for f in ("gpus", "prompts_per_step", "group_size", "prompt_tokens", "response_tokens",
                  "tokens_per_microbatch", "image_tiles_per_microbatch"):
            require_range(f, getattr(self, f), 0 if f == "image_tiles_per_microbatch" else 1)
        if self.image_tiles_per_prompt is not None:
            require_range("image_tiles_per_prompt", self.image_tiles_per_prompt, 0)
        require_range("gpu_gib", self.gpu_gib, 1.0)


def layout_problems(tp: int, gpus: int, cfg) -> list[str]:
    """Why ``tp`` cannot split the model over ``gpus`` ranks (empty: it can)."""
    checks = [("the GPU count", gpus), ("the language model's num_kv_heads", cfg.lm.num_kv_heads),
              ("the language model's num_heads", cfg.lm.num_heads),
              ("the vocabulary size", cfg.lm.vocab_size)]
    if cfg.vision is not None:
        checks.append(("the vision tower's num_heads", cfg.vision.num_heads))
    return [f"{what} {n} is not divisible by {tp}" for what, n in checks if n % tp]


def layouts(gpus: int, cfg) -> list[tuple[int, int]]:
    """(TP, DP) pairs of ``gpus`` ranks the model splits over (heads, KV heads, vocabulary)."""
    return [(tp, gpus // tp) for tp in range(1, gpus + 1) if not layout_problems(tp, gpus, cfg)]


def left_out(gpus: int, cfg) -> list[str]:
    """One line per TP size that divides ``gpus`` but not the model, saying why."""
    out = []
    for tp in range(2, gpus + 1):
        why = layout_problems(tp, gpus, cfg)
        if gpus % tp == 0 and why:
            out.append(f"TP={tp} DP={gpus // tp} left out: " + "; ".join(why))
    return out


def per_token(nbytes: float) -> str:
    """Bytes per token with a unit that keeps small models readable (never "0 KiB")."""
    if nbytes < 1024:
        return f"{nbytes:.0f} B"
    kib = nbytes / 1024
    return f"{kib:.1f} KiB" if kib < 10 else f"{kib:.0f} KiB"


def step_layout(*, prompts: int, group_size: int, prompt_tokens: int, response_tokens: int,
                tokens_per_microbatch: int, image_tiles_per_microbatch: int, dp: int,
                share_prefix: bool, image_tiles_per_prompt: int | None = None) -> dict:
    """Token and tile counts of one BPO step in one packing layout (see the module docstring).

    A micro-batch holds ``microbatch_tokens = max(budget, P + R)`` tokens.  One sequence per
    rollout, it holds ``d = microbatch_tokens // (P + R)`` rollouts (at least one),
    ``int(microbatch_tokens R / (P + R))`` scored rows and ``image_tiles_per_microbatch`` tiles
    (or ``d`` prompts' tiles with ``image_tiles_per_prompt``; without it a prompt's tiles are
    ``image_tiles_per_microbatch / d``).  Shared, the fullest micro-batch of whole units has
    ``int(microbatch_tokens k R / (P + k R))`` scored rows and the tiles of as many units of the
    smallest size (a group's remainder) as fit.  Returns ``rollouts_per_unit`` (k),
    ``units_per_group``, ``tokens_per_group``, ``tokens_per_step`` (global), ``tokens_per_rank``,
    ``tiles_per_prompt``, ``tiles_per_step`` (global), ``tiles_per_rank``,
    ``microbatch_tokens``, ``scored_per_microbatch`` and ``tiles_per_microbatch``."""
    n, p, r = 2 * group_size, prompt_tokens, response_tokens
    seq = p + r
    mb_tokens = max(tokens_per_microbatch, seq)
    dense_rollouts = max(1, mb_tokens // seq)
    if image_tiles_per_prompt is None:
        dense_tiles = image_tiles_per_microbatch
        tiles_per_prompt = image_tiles_per_microbatch / dense_rollouts
    else:
        dense_tiles = dense_rollouts * image_tiles_per_prompt
        tiles_per_prompt = float(image_tiles_per_prompt)
    if share_prefix:
        k = min(n, max(1, (tokens_per_microbatch - p) // r))  # as group_units fills units
        units = -(-n // k)
        smallest = p + (n - (units - 1) * k) * r
        scored = int(mb_tokens * k * r / (p + k * r))
        per_mb = max(1, mb_tokens // smallest)  # <= dense_rollouts: a unit has >= P + R tokens
        tiles_mb = -(-per_mb * dense_tiles // dense_rollouts)
    else:
        k, units = 1, n
        scored = int(mb_tokens * r / seq)
        tiles_mb = dense_tiles
    per_group = units * p + n * r
    return {"rollouts_per_unit": k, "units_per_group": units, "tokens_per_group": per_group,
            "tokens_per_step": prompts * per_group, "tokens_per_rank": prompts * per_group / dp,
            "tiles_per_prompt": tiles_per_prompt, "tiles_per_step": prompts * units * tiles_per_prompt,
            "tiles_per_rank": prompts * units * tiles_per_prompt / dp,
            "microbatch_tokens": mb_tokens, "scored_per_microbatch": scored,
            "tiles_per_microbatch": tiles_mb}


def _cli_layout(cli: PlanCLI, dp: int, share_prefix: bool) -> dict:
    return step_layout(prompts=cli.prompts_per_step, group_size=cli.group_size,
                       prompt_tokens=cli.prompt_tokens, response_tokens=cli.response_tokens,
                       tokens_per_microbatch=cli.tokens_per_microbatch,
                       image_tiles_per_microbatch=cli.image_tiles_per_microbatch, dp=dp,
                       share_prefix=share_prefix, image_tiles_per_prompt=cli.image_tiles_per_prompt)


def rollout_wave(rows: int, group_rows: int, prompt_tokens: int, response_tokens: int,
                 kv_budget_tokens: int | None, *, share_prompts: bool = True) -> tuple[int, int]:
    """``(rows, prompt tokens held)`` of the engine's largest wave for ``rows`` rollouts in
    groups of ``group_rows`` that share their prompt.  Shared (the embedded engine's default),
    rows join in group order while the wave's prompts (once per group started) plus its rows'
    response budgets fit ``kv_budget_tokens``, as ``EmbeddedEngine._waves`` fills them; per row,
    ``budget // (prompt + response)`` rows hold their prompt each (prompt tokens held: 0, they
    count per row).  At least one row."""
    seq = prompt_tokens + response_tokens
    if not share_prompts:
        n = rows if kv_budget_tokens is None else min(rows, kv_budget_tokens // seq)
        return max(1, n), 0
    n = held = 0
    while n < rows:
        new_prompt = prompt_tokens if n % group_rows == 0 else 0
        if (kv_budget_tokens is not None and n
                and held + new_prompt + (n + 1) * response_tokens > kv_budget_tokens):
            break
        held += new_prompt
        n += 1
    return n, held


def _workload(cli: PlanCLI, dp: int, lay: dict) -> Workload:
    per_rank = int(cli.prompts_per_step * 2 * cli.group_size / dp)
    rows, held = rollout_wave(per_rank, 2 * cli.group_size, cli.prompt_tokens,
                              cli.response_tokens, cli.kv_budget_tokens,
                              share_prompts=cli.share_prompts)
    per_row = cli.response_tokens if cli.share_prompts else cli.prompt_tokens + cli.response_tokens
    return Workload(tokens_per_microbatch=lay["microbatch_tokens"],
                    scored_per_microbatch=lay["scored_per_microbatch"],
                    image_tiles_per_microbatch=lay["tiles_per_microbatch"], rollout_rows=rows,
                    rollout_tokens_per_row=per_row, rollout_prompt_tokens=held, kl=cli.kl)


def _model_cfg(cli: PlanCLI):
    from .models import get_preset, read_hf_config

    return read_hf_config(cli.hf_path)[0] if cli.hf_path else get_preset(cli.preset)


def plan_table(cli: PlanCLI) -> list[dict]:
    """One row per (TP, DP, recompute), in the packing layout ``cli.share_prefix`` selects."""
    cfg = _model_cfg(cli)
    dtype = _DTYPES[cli.dtype]
    rows = []
    for tp, dp in layouts(cli.gpus, cfg):
        work = _workload(cli, dp, _cli_layout(cli, dp, cli.share_prefix))
        for rc in ("none", "selective", "full"):
            p = predict(cfg, tp=tp, dp=dp, dtype=dtype, recompute=rc, work=work)
            rows.append({"tp": tp, "dp": dp, "recompute": rc, **p,
                         "fits": p["peak"] <= 0.9 * cli.gpu_gib * GiB})
    return rows


def layout_table(cli: PlanCLI) -> list[dict]:
    """Both packing layouts per (TP, DP): :func:`step_layout`'s counts, plus per rank the K/V
    bytes the trainer's passes compute in one step (``kv_per_step``: old log-probs, reference
    log-probs with ``kl``, the update; ``passes`` of them), the activations one update
    micro-batch saves at each recompute mode (``activations_<mode>``, :func:`predict`) and the
    activations the update saves over all its micro-batches without recomputation
    (``activations_per_step``)."""
    cfg = _model_cfg(cli)
    dtype = _DTYPES[cli.dtype]
    lm = cfg.lm
    passes = 3 if cli.kl else 2
    rows = []
    for tp, dp in layouts(cli.gpus, cfg):
        a_lm = lm_activation_bytes(cfg, tp, dtype, "none")
        a_v = vision_activation_bytes(cfg, tp, dtype, "none") if cfg.vision is not None else 0.0
        patches = (cfg.vision.image_size // cfg.vision.patch_size) ** 2 if cfg.vision else 0
        n_vis = cfg.vision.num_layers if cfg.vision is not None else 0
        for share in (False, True):
            lay = _cli_layout(cli, dp, share)
            work = _workload(cli, dp, lay)
            kv = 2 * lm.num_layers * max(1, lm.num_kv_heads // tp) * lm.head_dim * dtype.itemsize
            row = {"tp": tp, "dp": dp, "share_prefix": share, **lay, "passes": passes,
                   "kv_per_step": passes * lay["tokens_per_rank"] * kv,
                   "activations_per_step": lay["tokens_per_rank"] * lm.num_layers * a_lm +
                   lay["tiles_per_rank"] * patches * n_vis * a_v}
            for rc in ("none", "selective", "full"):
                row[f"activations_{rc}"] = predict(cfg, tp=tp, dp=dp, dtype=dtype, recompute=rc,
                                                   work=work, phase="update")["activations"]
            rows.append(row)
    return rows


def format_table(rows: list[dict], gpu_gib: float) -> str:
    cols = [("tp", "TP"), ("dp", "DP"), ("recompute", "recompute"), ("master", "master"),
            ("moments", "Adam"), ("grads", "grads"), ("gathered", "gathered"),
            ("activations", "activations"), ("loss", "loss"), ("reference", "ref"),
            ("kv_cache", "KV cache"), ("update_peak", "update peak"),
            ("rollout_peak", "rollout peak"), ("peak", "peak")]
    head = "| " + " | ".join(t for _, t in cols) + " | fits |"
    lines = [head, "|" + "---|" * (len(cols) + 1)]
    for r in rows:
        cells = [str(r[k]) if k in ("tp", "dp", "recompute") else f"{r[k] / GiB:.1f}"
                 for k, _ in cols]
        lines.append("| " + " | ".join(cells) + f" | {'yes' if r['fits'] else 'no'} |")
    return "\n".join(lines) + f"\n\n(GiB per GPU; fits: peak <= 90% of {gpu_gib:g} GiB)\n"


def format_layouts(rows: list[dict]) -> str:
    """The two packing layouts per (TP, DP) as a Markdown table, and the token ratio."""
    cols = ["TP", "DP", "layout", "units / group (rollouts each)", "tokens / step",
            "tokens / rank", "vision tiles / rank", "micro-batch: tokens, scored, tiles",
            "activations / micro-batch (none, selective, full)", "activations saved / step (none)",
            "K/V of the passes / rank"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join([
            str(r["tp"]), str(r["dp"]), "shared" if r["share_prefix"] else "one per rollout",
            f"{r['units_per_group']} ({r['rollouts_per_unit']})", f"{r['tokens_per_step']:,}",
            f"{r['tokens_per_rank']:,.0f}", f"{r['tiles_per_rank']:,.1f}",
            f"{r['microbatch_tokens']:,}, {r['scored_per_microbatch']:,}, "
            f"{r['tiles_per_microbatch']}",
            ", ".join(f"{r[f'activations_{rc}'] / GiB:.1f}" for rc in ("none", "selective", "full")),
            f"{r['activations_per_step'] / GiB:.1f}",
            f"{r['kv_per_step'] / GiB:.1f} ({r['passes']} passes)"]) + " |")
    dense = next(r for r in rows if not r["share_prefix"])
    shared = next(r for r in rows if r["share_prefix"])
    d, s = dense["tokens_per_step"], shared["tokens_per_step"]
    return ("\n".join(lines) + "\n\n(GiB per GPU; activations / micro-batch as in the table "
            "above, saved / step summed over the update's micro-batches; tokens and tiles per rank "
            "in each of the trainer's passes; the shared layout packs "
            f"{s:,} tokens per step against {d:,}: {d / s:.2f}x fewer)\n")


def main(argv: Sequence[str] | None = None) -> int:
    setup_logging()
    cli = parse_cli(PlanCLI, argv, prog="python -m r4b.plan",
                    description="Per-GPU memory budget of a BPO configuration, and which TP x DP "
                                "layouts fit one node.")
    rows = plan_table(cli)
    print(format_table(rows, cli.gpu_gib))
    fit = [f"TP={r['tp']} DP={r['dp']} recompute={r['recompute']}" for r in rows if r["fits"]]
    print("fits:", ", ".join(fit) if fit else "no layout fits as configured")
    cfg = _model_cfg(cli)
    for line in left_out(cli.gpus, cfg):
        print(line)
    budget = 0.9 * cli.gpu_gib * GiB
    for r in rows:
        if r["recompute"] == "full":
            room = budget - (r["rollout_peak"] - r["kv_cache"])
            n = max(0, int(room // r["kv_bytes_per_token"]))
            print(f"TP={r['tp']} DP={r['dp']}: rollout.kv_budget_tokens up to {n} "
                  f"({per_token(r['kv_bytes_per_token'])} per token) keeps rollouts within "
                  f"{budget / GiB:.0f} GiB; the update peak with full recomputation is "
                  f"{r['update_peak'] / GiB:.1f} GiB")
    print(f"\npacking layouts (the table above: "
          f"{'shared' if cli.share_prefix else 'one sequence per rollout'}; --share_prefix "
          f"{not cli.share_prefix} for the other):\n")
    print(format_layouts(layout_table(cli)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
