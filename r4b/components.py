"""What every entry point assembles: tokenizer, model config, model on the runtime's device,
chat template, rollout engine and data.

``r4b.anneal``, ``r4b.pretrain_bpo`` and ``r4b.evaluate`` build their pieces here and never
import each other's loading code.  Three ways to get a model (:class:`ModelChoice`):

* the **embedded default** (``preset="auto"`` or ``"tiny"``, no ``hf_path``): the built-in
  tokenizer and the tiny model sized to the embedded task's image tiles;
* a **preset** (``preset="r4b-4b"``) with a tokenizer directory: R-4B's architecture with fresh
  weights, special tokens taken from the tokenizer;
* a **transformers checkpoint** (``hf_path``, ``preset="auto"``, the default): architecture and
  weights from the directory as they are (every format :func:`r4b.models.from_hf` reads),
  tokenizer from ``tokenizer_path`` or from the checkpoint directory itself; ``preset="r4b-4b"``
  loads it too and checks that it has R-4B's widths (``"tiny"`` with ``hf_path`` is read as
  ``"auto"``, with a warning).

Any of them can be cut in depth (``num_layers``, ``vision_num_layers``) with every width,
format and token unchanged: the supported way to run the real path on a small machine.

Token ids the template and the engine rely on (image placeholder, think tags, end of turn)
always come from the tokenizer; a checkpoint whose ``config.json`` names a different image
token, or whose vocabulary is smaller than the tokenizer's, is an error before any work.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from .config import require_choice, require_range
from .data import BuiltinTokenizer, ChatTemplate, HFTokenizer, Sample, TaskConfig
from .data.template import CHAT_TEMPLATES
from .log import get_logger
from .training import TrainingConfig

log = get_logger(__name__)

PRESETS = ("auto", "tiny", "r4b-4b")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def _is_tokenizer_dir(path: Path) -> bool:
    return path.is_dir() and any((path / f).exists() for f in TOKENIZER_FILES)


@dataclass(kw_only=True)
class ModelChoice:
    """Which model to build or load, with which tokenizer."""

    preset: str = "auto"
    """Model preset: 'auto' (with ``hf_path``: the network the checkpoint's ``config.json``
    defines, as it is; without: the embedded tiny model), 'tiny' (the embedded task's toy
    model, fresh weights; with ``hf_path`` it is read as 'auto', with a warning: what it meant
    in run directories written before 'auto' existed) or 'r4b-4b' (R-4B's architecture; with
    ``hf_path`` it loads the checkpoint and checks that it has R-4B's widths)."""
    hf_path: str | None = None
    """transformers checkpoint directory to load (architecture and weights); None: fresh
    weights from the preset."""
    tokenizer_path: str | None = None
    """Local Hugging Face tokenizer directory; None: ``hf_path`` when it holds a tokenizer, else
    the built-in tokenizer (tiny preset only)."""
    params_dtype: str | None = None
    """Parameter dtype: float32, bfloat16 or float16; None: the checkpoint's (``hf_path``) or
    the preset's (tiny: float32, r4b-4b: bfloat16)."""
    num_layers: int | None = None
    """Cut the language model to its first ``num_layers`` layers (None: all)."""
    vision_num_layers: int | None = None
    """Cut the vision tower to its first layers; its last kept layer feeds the projector."""
    chat_template: str = "auto"
    """Prompt text: 'auto' (the tokenizer's chat template when it has one, else r4b's
    canonical one), 'tokenizer' (require it) or 'builtin'."""
    image_token: str = "<image>"
    """Image placeholder string of the tokenizer (its id must equal the checkpoint's
    ``image_token_index``)."""

    def __post_init__(self):
        require_choice("model.preset", self.preset, PRESETS)
        if self.preset == "tiny" and self.hf_path is not None:
            # what 'tiny' meant with a checkpoint before 'auto' existed (older run directories)
            log.warning("model.preset 'tiny' names the embedded toy model; with model.hf_path "
                        "%r it is read as 'auto' (the checkpoint as it is): pass "
                        "--setup.model.preset auto", self.hf_path)
            self.preset = "auto"
        if self.params_dtype is not None:
            require_choice("model.params_dtype", self.params_dtype,
                           ("float32", "bfloat16", "float16"))
            if self.params_dtype == "float16":
                raise ValueError("model.params_dtype 'float16' is not supported for training: it "
                                 "needs loss scaling, which r4b does not implement (every step "
                                 "overflows); use 'bfloat16' (GPU) or 'float32'")
        require_choice("model.chat_template", self.chat_template, CHAT_TEMPLATES)
        for name in ("num_layers", "vision_num_layers"):
            if getattr(self, name) is not None:
                require_range(f"model.{name}", getattr(self, name), 1)
        if self.hf_path is not None:
            p = Path(self.hf_path)
            if not p.is_dir():
                raise ValueError(f"model.hf_path {self.hf_path!r} is not a directory")
            if not (p / "config.json").is_file():
                raise ValueError(f"model.hf_path {self.hf_path!r} holds no config.json: not a "
                                 f"transformers checkpoint directory")
        if self.tokenizer_path is not None and not _is_tokenizer_dir(Path(self.tokenizer_path)):
            raise ValueError(f"model.tokenizer_path {self.tokenizer_path!r} is not a tokenizer "
                             f"directory (it must hold one of {TOKENIZER_FILES})")
        if self.preset == "r4b-4b" and self.tokenizer_dir() is None:
            raise ValueError("model.preset 'r4b-4b' needs a tokenizer: set model.tokenizer_path "
                             "(or model.hf_path to a checkpoint directory that holds one)")

    def tokenizer_dir(self) -> str | None:
        """The tokenizer directory in use (None: the built-in tokenizer)."""
        if self.tokenizer_path is not None:
            return self.tokenizer_path
        if self.hf_path is not None and _is_tokenizer_dir(Path(self.hf_path)):
            return self.hf_path
        return None


ENGINES = ("embedded", "vllm")


@dataclass(kw_only=True)
class RolloutConfig:
    """The rollout engine and its limits (shared by curation, BPO rollouts and evaluation)."""

    max_seqlen: int | None = None
    """KV-cache capacity per row, prompt + response tokens; None: the longest prompt of the
    data plus the largest response budget in use, capped at ``lm.max_position_embeddings``
    (the vLLM engine, shared by every stage of a job: ``lm.max_position_embeddings``)."""
    prefill_tokens: int = 65536
    """Prompt tokens per prefill forward: rows of equal prompt length share a forward up to
    this many tokens (a longer single prompt still runs alone).  Embedded engine only."""
    kv_budget_tokens: int | None = None
    """Most KV-cache tokens one rank holds at once: larger batches generate in waves with the
    same samples.  A wave counts its distinct prompt prefixes once plus each row's response
    budget (``share_prompts``; without it, rows x per-row capacity).  None: all requests at
    once.  KiB per token: see ``python -m r4b.plan``.  Embedded engine only (vLLM sizes its KV
    cache from ``vllm_gpu_memory_utilization``)."""
    share_prompts: bool = True
    """Embedded engine: hold and prefill each distinct prompt prefix once (a group's prompt
    and image encoding, under prompt routing the modes' common prefix), each rollout only its
    response (same tokens as per-row prompts).  False: every row prefills and holds its own
    prompt."""
    engine: str = "embedded"
    """Rollout engine: 'embedded' (r4b's own KV-cache sampler on the policy module; CPU or
    GPU) or 'vllm' (vLLM in each trainer process on its own GPU, weights pushed in memory
    after every update, asleep during it; needs ``pip install 'r4b[gpu]'`` and a CUDA device;
    see ``r4b.rollout.vllm_engine`` for what is and is not verified)."""
    vllm_gpu_memory_utilization: float = 0.5
    """vLLM engine: fraction of each GPU's memory vLLM may take for its weights and KV cache
    (vLLM's ``gpu_memory_utilization``); the trainer's memory at engine start-up plus this
    fraction must fit on the device."""
    vllm_sleep_level: int = 1
    """vLLM engine: ``LLM.sleep`` level during the update: 1 frees the GPU memory and keeps
    the weights in CPU memory, 2 drops them (less CPU memory and no copy back; safe here since
    every weight is pushed again after the update)."""
    vllm_enforce_eager: bool = False
    """vLLM engine: run without CUDA graphs (vLLM's ``enforce_eager``; slower, less memory,
    easier to debug)."""
    vllm_trust_remote_code: bool = False
    """vLLM engine: let vLLM run the checkpoint's own Python code (vLLM's
    ``trust_remote_code``; the tokenizer directory's ``*.py`` files are copied next to the
    engine's ``config.json``).  Needed for checkpoints whose ``config.json`` names a custom
    ``model_type``."""

    def __post_init__(self):
        if self.max_seqlen is not None:
            require_range("rollout.max_seqlen", self.max_seqlen, 2)
        require_range("rollout.prefill_tokens", self.prefill_tokens, 1)
        if self.kv_budget_tokens is not None:
            require_range("rollout.kv_budget_tokens", self.kv_budget_tokens, 2)
        if not isinstance(self.share_prompts, bool):
            raise TypeError(f"rollout.share_prompts must be true or false, got "
                            f"{self.share_prompts!r}")
        require_choice("rollout.engine", self.engine, ENGINES)
        require_range("rollout.vllm_gpu_memory_utilization", self.vllm_gpu_memory_utilization,
                      0.0, 1.0, lo_open=True)
        require_choice("rollout.vllm_sleep_level", self.vllm_sleep_level, (1, 2))
        for name in ("vllm_enforce_eager", "vllm_trust_remote_code"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"rollout.{name} must be true or false, got "
                                f"{getattr(self, name)!r}")
        if self.engine == "vllm":
            from .rollout.vllm_engine import VLLMMissing, vllm_available

            if not vllm_available():  # at parse time, before any work
                raise VLLMMissing("rollout.engine 'vllm' needs vLLM, which is not installed; "
                                  "install the GPU extra: pip install 'r4b[gpu]' (or use "
                                  "rollout.engine 'embedded')")


def default_task() -> TaskConfig:
    """The embedded task at the tiny model's tile size (18 px, 4 digits, grayscale)."""
    return TaskConfig(n_digits=4, image_size=18, channels=1, noise_std=0.05, vision=True)


@dataclass(kw_only=True)
class Setup:
    """Everything the entry points share about the model, the engine and the data."""

    model: ModelChoice = field(default_factory=ModelChoice)
    """Model preset and optional checkpoint / tokenizer paths."""
    task: TaskConfig = field(default_factory=default_task)
    """The embedded task (used when no data files are given)."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Rollout engine limits."""
    training: TrainingConfig = field(default_factory=TrainingConfig)
    """Sharding over data-parallel ranks and activation recomputation of the trained model."""
    seed: int = 0
    """Global seed: model init, task generation and sampling derive from it."""
    tp_size: int = 1
    """Tensor-parallel size (the launch's process count must be a multiple of it)."""
    timeout_rollout_s: float = 3600.0
    """Longest wait for a peer rank during rollouts and evaluation (ranks generate at their
    own pace), in seconds; a stuck or dead peer then ends the job naming its rank."""
    timeout_update_s: float = 900.0
    """Longest wait for a peer during updates (collectives every layer), in seconds."""
    timeout_checkpoint_s: float = 3600.0
    """Longest wait for a peer while a checkpoint is written or read, in seconds."""

    def __post_init__(self):
        require_range("setup.seed", self.seed, 0, 2**31 - 1)
        require_range("setup.tp_size", self.tp_size, 1, 1024)
        for name in ("timeout_rollout_s", "timeout_update_s", "timeout_checkpoint_s"):
            require_range(f"setup.{name}", getattr(self, name), 1.0, 7 * 24 * 3600.0)

    def timeouts(self) -> dict[str, float]:
        """Seconds per phase, for :func:`r4b.runtime.init_runtime`."""
        return {"rollout": self.timeout_rollout_s, "update": self.timeout_update_s,
                "checkpoint": self.timeout_checkpoint_s}


# ---------------------------------------------------------------- tokenizer and model config
def make_tokenizer(choice: ModelChoice):
    """The built-in tokenizer, or the local Hugging Face tokenizer of ``choice``."""
    path = choice.tokenizer_dir()
    if path is None:
        if choice.preset == "r4b-4b" or choice.hf_path is not None:
            raise ValueError(f"model.tokenizer_path is needed: {choice.hf_path or choice.preset!r} "
                             "holds no tokenizer, and the built-in one only fits the embedded "
                             "tiny model")
        return BuiltinTokenizer()
    return HFTokenizer(path, image_token=choice.image_token)


def check_tokens(cfg, tokenizer, source: str, image_token: str = "<image>") -> None:
    """Raise ``ValueError`` when ``tokenizer`` and the model config ``cfg`` (from ``source``)
    disagree on the vocabulary or the image placeholder."""
    if tokenizer.vocab_size > cfg.lm.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids but {source} has "
                         f"lm.vocab_size {cfg.lm.vocab_size}: token ids would overflow the "
                         f"embedding")
    if cfg.vision is not None and cfg.image_token_id != tokenizer.image_token_id:
        raise ValueError(f"{source} names image token id {cfg.image_token_id} but the tokenizer "
                         f"maps {image_token!r} to "
                         f"{tokenizer.image_token_id}; they must agree")


def model_config(choice: ModelChoice, tokenizer, task: TaskConfig, *, tp_size: int = 1):
    """Model config for ``choice``: the checkpoint's, the preset's (image token from the
    tokenizer) or the tiny model sized to the tokenizer and the task's tiles; cut in depth and
    cast as ``choice`` says, and checked against the tokenizer."""
    from .models import get_preset, read_hf_config
    from .models.hf import SafetensorsReader, cut_depth

    if choice.hf_path is not None:
        cfg, raw = read_hf_config(choice.hf_path, keys=list(SafetensorsReader(choice.hf_path)))
        source = f"checkpoint {choice.hf_path!r}"
        if choice.preset == "r4b-4b":
            _check_r4b_widths(cfg, source)
    elif choice.preset == "r4b-4b":
        cfg = get_preset("r4b-4b")
        source = "preset 'r4b-4b'"
        if cfg.vision is not None:
            cfg = dataclasses.replace(cfg, image_token_id=tokenizer.image_token_id)
    else:
        vocab = -(-tokenizer.vocab_size // tp_size) * tp_size  # padded ids are never sampled
        cfg = get_preset("tiny", vocab_size=vocab, image_token_id=tokenizer.image_token_id,
                         vision=task.vision)
        if cfg.vision is not None:
            patch = task.image_size // 2  # one patch per digit cell of the 2x2 grid
            cfg = dataclasses.replace(cfg, vision=dataclasses.replace(
                cfg.vision, image_size=task.image_size, patch_size=patch,
                num_channels=task.channels))
        source = "preset 'tiny'"
    if choice.params_dtype is not None:
        cfg = dataclasses.replace(cfg, params_dtype=choice.params_dtype)
    if choice.num_layers is not None or choice.vision_num_layers is not None:
        cfg = cut_depth(cfg, num_layers=choice.num_layers,
                        vision_num_layers=choice.vision_num_layers)
    check_tokens(cfg, tokenizer, source, choice.image_token)
    cfg.lm.check_tp(tp_size)
    return cfg


def _check_r4b_widths(cfg, source: str) -> None:
    from .models import get_preset

    want = get_preset("r4b-4b")
    diffs = [f"lm.{k}: {getattr(cfg.lm, k)} (preset {getattr(want.lm, k)})"
             for k in ("hidden_size", "intermediate_size", "num_heads", "num_kv_heads",
                       "head_dim", "vocab_size") if getattr(cfg.lm, k) != getattr(want.lm, k)]
    if cfg.vision is None:
        diffs.append("vision: none (preset: SigLIP So400m)")
    else:
        diffs += [f"vision.{k}: {getattr(cfg.vision, k)} (preset {getattr(want.vision, k)})"
                  for k in ("hidden_size", "intermediate_size", "num_heads", "patch_size",
                            "image_size") if getattr(cfg.vision, k) != getattr(want.vision, k)]
    if diffs:
        raise ValueError(f"model.preset is 'r4b-4b' but {source} has other widths: "
                         + "; ".join(diffs) + " (leave model.preset at 'auto' to load any "
                         "checkpoint as it is)")


def image_counter(cfg):
    """``f(images) -> placeholder tokens per image`` of one prompt for model ``cfg`` (None for
    text-only models); images are ``[C, H, W]`` arrays (their size is all that is read)."""
    if cfg.vision is None:
        return None
    from .data.images import prompt_image_tokens

    return lambda images: prompt_image_tokens([tuple(im.shape[-2:]) for im in images], cfg)


def image_processor(cfg):
    """``f(images) -> processed images`` of one prompt for model ``cfg`` (tiles, sizes and
    token counts; :func:`r4b.data.images.process_prompt_images`)."""
    from .data.images import process_prompt_images

    return lambda images: process_prompt_images(images, cfg)


def make_template(tokenizer, cfg, choice: ModelChoice | None = None) -> ChatTemplate:
    """The chat template for ``tokenizer`` and model ``cfg`` (the tokenizer's own Jinja template
    when ``choice.chat_template`` allows it; images expanded to the model's token counts)."""
    mode = "builtin" if choice is None else choice.chat_template
    return ChatTemplate(tokenizer, max(1, cfg.tokens_per_image), chat_template=mode,
                        image_counter=image_counter(cfg))


# ---------------------------------------------------------------- the model on its device
def build_policy(choice: ModelChoice, cfg, rt, *, seed: int):
    """This rank's trainable model on ``rt.device`` with fp32 master parameters (compute dtype
    ``cfg.params_dtype``, applied by :func:`r4b.training.shard_model`): loaded from
    ``choice.hf_path`` (cut as ``cfg`` says) or freshly initialised from ``seed`` (weights drawn
    on the CPU, so every device and TP layout gets the same values)."""
    from .models import build_model, from_hf

    if choice.hf_path is not None:
        model = from_hf(choice.hf_path, tp_size=rt.tp_size, dtype=cfg.params_dtype,
                        device=rt.device, num_layers=choice.num_layers,
                        vision_num_layers=choice.vision_num_layers, master_dtype=torch.float32)
        if model.cfg != cfg:
            raise RuntimeError(f"the model loaded from {choice.hf_path!r} does not match its "
                               f"config: {model.cfg} vs {cfg}")
        return model
    torch.manual_seed(seed)
    return build_model(cfg, device=rt.device, master_dtype=torch.float32)


def build_trainable(cfg, rt, training: TrainingConfig):
    """An fp32-master model of ``cfg`` on ``rt.device`` with no weights drawn, sharded for
    training (to load a run's checkpoint into)."""
    from .models import build_model
    from .training import shard_model

    model = build_model(cfg, init_weights=False, device=rt.device, master_dtype=torch.float32)
    return shard_model(model, rt, training)


# ---------------------------------------------------------------- engine and data
def prompt_budget(items: Sequence[Sample], template) -> int:
    """Longest prompt (forced non-thinking form, the longest mode prefix) over ``items``."""
    return max((len(template.item_prompt_ids(it, "no_think")) for it in items), default=1)


def engine_max_seqlen(rollout: RolloutConfig, cfg, *, longest_prompt: int,
                      largest_budget: int) -> int:
    """``rollout.max_seqlen``, or the longest prompt plus the largest response budget (two
    forced routing tokens included), capped at the model's ``max_position_embeddings``."""
    cap = cfg.lm.max_position_embeddings
    if rollout.max_seqlen is not None:
        if rollout.max_seqlen > cap:
            raise ValueError(f"rollout.max_seqlen {rollout.max_seqlen} exceeds the model's "
                             f"lm.max_position_embeddings {cap}")
        return rollout.max_seqlen
    return min(cap, longest_prompt + largest_budget + 2)


def build_engine(model, template, tokenizer, *, max_seqlen: int,
                 rollout: RolloutConfig | None = None):
    """The rollout engine ``rollout.engine`` names, on ``model``: stops at end of turn / text,
    never samples the image placeholder or the vocabulary padding ids.

    'embedded': an :class:`~r4b.rollout.engine.EmbeddedEngine` on ``model`` itself.  'vllm':
    this process's :class:`~r4b.rollout.vllm_engine.VLLMEngine` (one per process, shared by
    the stages of a job), built or re-bound to ``model`` and holding its weights (collective:
    call on every rank); ``model`` must be on this rank's CUDA device."""
    from .rollout.engine import EmbeddedEngine

    rollout = rollout or RolloutConfig()
    stop_ids = [tokenizer.im_end_id, tokenizer.eos_id]
    if rollout.engine == "vllm":
        return _vllm_engine(model, template, tokenizer, stop_ids, max_seqlen, rollout)
    return EmbeddedEngine(model, stop_ids=stop_ids,
                          mode_classifier=template.classify_mode, max_seqlen=max_seqlen,
                          vocab_limit=tokenizer.vocab_size, banned_ids=[tokenizer.image_token_id],
                          prefill_tokens=rollout.prefill_tokens,
                          kv_budget_tokens=rollout.kv_budget_tokens,
                          share_prompts=rollout.share_prompts)


def _vllm_device(model) -> torch.device:
    """The CUDA device vLLM's external launcher will use (``cuda:LOCAL_RANK``), which must be
    ``model``'s: ``ValueError`` naming ``rollout.engine`` otherwise."""
    import os

    dev = next(model.parameters()).device
    if dev.type != "cuda":
        raise ValueError(f"rollout.engine 'vllm' needs the model on a CUDA device, got {dev}; "
                         f"use rollout.engine 'embedded' on this machine")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if (dev.index if dev.index is not None else torch.cuda.current_device()) != local:
        raise ValueError(f"rollout.engine 'vllm' runs vLLM on cuda:LOCAL_RANK = cuda:{local} "
                         f"(vLLM's external launcher), but the model is on {dev}")
    return dev


def _vllm_engine(model, template, tokenizer, stop_ids, max_seqlen: int, rollout: RolloutConfig):
    from .models.parallel import parallel_info
    from .rollout.vllm_engine import colocated_engine, require_vllm

    require_vllm()
    _vllm_device(model)
    info = parallel_info()
    if info.pp_size != 1:
        raise ValueError(f"rollout.engine 'vllm' needs pipeline-parallel size 1, got {info.pp_size}")
    cap = model.cfg.lm.max_position_embeddings
    max_model_len = rollout.max_seqlen or cap
    if max_seqlen > max_model_len:
        raise ValueError(f"the engine needs max_seqlen {max_seqlen} but rollout.max_seqlen is "
                         f"{rollout.max_seqlen}")
    return colocated_engine(
        model, stop_ids=stop_ids, mode_classifier=template.classify_mode,
        max_seqlen=max_model_len, vocab_limit=tokenizer.vocab_size,
        banned_ids=[tokenizer.image_token_id], tokenizer_dir=getattr(tokenizer, "path", None),
        tensor_parallel_size=info.tp_size,
        gpu_memory_utilization=rollout.vllm_gpu_memory_utilization,
        sleep_level=rollout.vllm_sleep_level, enforce_eager=rollout.vllm_enforce_eager,
        trust_remote_code=rollout.vllm_trust_remote_code)


def load_items(setup: Setup, data: str | None, *, n_train: int, n_eval: int,
               reader=None, eval_data: str | None = None) -> tuple[list[Sample], list[Sample]]:
    """(train, eval) items: the embedded task (``n_eval`` distinct eval items), or a data file
    (read with ``reader``, a :class:`r4b.data.ReaderConfig`) with every row for training and
    ``eval_data``'s rows for evaluation, or without ``eval_data`` split 90/10 by row order.
    The log says which eval set is used."""
    from .data import read_samples, train_eval_split

    if eval_data is not None and not Path(eval_data).is_file():
        raise ValueError(f"eval.data {eval_data!r} is not a file")
    if data is None:
        try:
            train, evals = train_eval_split(setup.seed, n_train, 0 if eval_data else n_eval,
                                           config=setup.task)
        except ValueError as e:
            raise ValueError(f"eval.n_items {n_eval}: {e}") from None
        if eval_data is None:
            log.info("eval set: %d distinct items of the embedded task's eval split", len(evals))
            return train, evals
    else:
        samples, stats = read_samples(data, config=reader)
        log.info("read %d rows from %s (%d skipped)", stats.rows_read, data, stats.rows_skipped)
        if eval_data is not None:
            train = samples
        else:
            if len(samples) < 2:
                raise ValueError(f"{data}: {len(samples)} usable rows; training needs at least 2 "
                                 f"(one for evaluation), or an eval file (eval.data)")
            n = max(1, len(samples) // 10)
            log.info("eval set: the first %d of %d rows of %s (the rest train; eval.data FILE "
                     "names a separate eval set)", n, len(samples), data)
            return samples[n:], samples[:n]
    evals, stats = read_samples(eval_data, config=reader)
    if not evals:
        raise ValueError(f"eval.data {eval_data!r}: no usable rows")
    log.info("eval set: %d rows of %s (eval.data; %d skipped)", len(evals), eval_data,
             stats.rows_skipped)
    return train, evals


def preflight(setup: Setup, template, cfg, items: Sequence[Sample], *, largest_budget: int,
              skip_bad: bool = False, what: str = "items") -> list[Sample]:
    """:func:`r4b.preflight.check_items` with the run's engine limit; the usable items."""
    from .preflight import check_items

    kept, _ = check_items(items, template, cfg, largest_budget=largest_budget,
                          max_seqlen=setup.rollout.max_seqlen, skip_bad=skip_bad, what=what)
    return kept
