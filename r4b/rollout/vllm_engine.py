"""vLLM rollout engine, colocated with the trainer: the :class:`~r4b.rollout.engine.EmbeddedEngine`
interface on vLLM, one engine per rank, in the trainer's own process, on that rank's GPU.

Chosen with ``--setup.rollout.engine vllm`` (see :class:`r4b.components.RolloutConfig`); for
GPU users with vLLM installed (``pip install 'r4b[gpu]'``).  vLLM is imported lazily: choosing
it without vLLM installed raises :class:`VLLMMissing` (an ``ImportError`` naming the extra)
when the configuration is parsed, before any work.

**What is and is not verified.**  vLLM cannot be installed on the machine this module was
written on, and it has no GPU.  *Nothing here has run on real vLLM or on a GPU.*  What is
verified, on CPU, is the wiring and the contract against ``tests/vllm_standin`` — a stand-in
``vllm`` package implementing exactly the subset of vLLM's API used below, backed by a real
r4b model (``tests/test_vllm_engine.py``): every ``LLM`` / ``SamplingParams`` keyword passed
here is one vLLM's source accepts (the stand-in rejects others), weights pushed by
:meth:`VLLMEngine.sync_weights` reach the generating model under the names vLLM's loaders map,
greedy generation matches the embedded engine on the same weights, forced prefixes go in as
in the embedded engine, the behaviour log-probs are the truncated distribution's (the top-p
importance weight BPO computes is the kept mass), and BPOTrainer sleeps / wakes the engine
around its update; image prompts, a tower changed by a sync, the vocabulary mask, the stop
at the budget and a single-process launch, against the stand-in as 0.10.2 and as 0.34.0.  The
stand-in's sampler follows vLLM's order; its numerics, scheduling, memory behaviour, CUDA
graphs, sleep-mode allocator, HF image processor and TP are *not* vLLM's.  Before relying on it, run the embedded-vs-vLLM parity check on a GPU (same
checkpoint, greedy: token ids and log-probs), then one short BPO run.

**Targeted API.**  Read from the released source of vLLM 0.10.2 and 0.34.0 (the two ends of
the supported range; ``setup.py`` bounds it; other versions log a warning); the minimum is
0.10.2 (``logprobs_mode``).  Routes used, with where they are defined:

* ``LLM(..., distributed_executor_backend="external_launcher")`` — vLLM's mechanism for
  running inside torchrun processes (``vllm/v1/executor/uniproc_executor.py``:
  ``ExecutorWithExternalLauncher``: one worker in this process, ``env://`` with ``RANK`` /
  ``LOCAL_RANK`` (set by :func:`launcher_env` for a single process without torchrun), device
  ``cuda:LOCAL_RANK``; ``ParallelConfig.__post_init__`` sets
  ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` for it).  vLLM's tensor-parallel size is r4b's; every
  other factor of the world is vLLM's "ExternalDP" (``vllm/distributed/parallel_state.py``
  ``initialize_model_parallel``: layout ExternalDP x DP x PP x TP, "every dp rank can generate
  independently"), which matches megatron's TP-innermost rank layout.  ``data_parallel_size``
  is not passed (vLLM rejects offline DP for dense models).
* ``enable_sleep_mode=True``; ``LLM.sleep(level=...)`` / ``LLM.wake_up(tags=...)``, tags
  ``"weights"`` and ``"kv_cache"``.
* ``load_format="dummy"``: vLLM builds the network from a ``config.json`` this engine writes
  (no weights on disk); the weights are pushed in memory right away.
* Weight push: ``LLM.apply_model(fn)`` (``Worker.apply_model`` = ``fn(self.get_model())``, run
  in this process by the external launcher) with ``fn`` calling the vLLM model's
  ``load_weights(weights=...)`` on ``(name, tensor)`` pairs under transformers checkpoint names
  (:func:`r4b.models.hf.model_hf_state_dict`: ``model.*`` / ``lm_head.weight`` for Qwen3,
  ``model.language_model.*``, ``model.vision_tower.vision_model.*``,
  ``model.multi_modal_projector.*``, ``model.image_newline`` for LLaVA-OneVision / R-4B, which
  vLLM's ``hf_to_vllm_mapper`` maps), then the check vLLM's own ``DefaultModelLoader``
  makes (every ``named_parameters()`` name was loaded), then ``LLM.reset_prefix_cache()``.
* ``logprobs_mode="processed_logprobs"`` (``vllm/v1/sample/sampler.py``: log-probs after the
  allowed-token mask, logit bias, temperature and top-k / top-p).

**How requests map onto vLLM** (one ``SamplingParams`` per request, all in one
``LLM.generate`` call, which batches them itself):

* prompt: ``{"prompt_token_ids": ...}`` = ``prompt_ids + forced_ids`` with each image's run
  of placeholders cut to one ``<image>``: vLLM's processors expand the first ``<image>`` of
  each image themselves, for token prompts too, and leave any other ``<image>`` ids where
  they are (0.10.2 ``multimodal/processing.py`` ``_apply_matches``; 0.34
  ``multimodal/processing/processor.py``); 0.10.2 then fails on the count, 0.34 embeds the
  extra ids as text.  Images go in as RGB PIL images under ``"multi_modal_data"`` (0.10.2's
  ``multimodal/parse.py`` reads every array channels-first) with ``"multi_modal_uuids"``
  made of their content hash and the weight version: vLLM caches vision features by image
  hash across requests and ``reset_prefix_cache`` leaves them, so after a sync the old
  tower's features would be served (0.34 also gets ``llm_engine.reset_encoder_cache()``;
  0.10.2 has no reset).  Before sending, the engine checks that vLLM's count of each image
  (:func:`vllm_image_tokens`) is this model's, and refuses the request otherwise (prompts
  with several images; R-4B's vLLM class on images whose map anyres_max_9 reduces); after,
  that vLLM's expanded prompt has r4b's length.
* forced response tokens (token routing) are appended to the prompt, so vLLM never samples
  them; their log-prob comes from ``prompt_logprobs=0``.  vLLM computes prompt log-probs from
  the raw logits (temperature 1; v0.10.2-v0.11 at least), so sampling with forced tokens is
  only allowed at ``temperature == 1`` (an error otherwise); then the value is the policy
  log-prob, and ``behaviour = policy`` for forced tokens as the contract says.
* sampled tokens: ``temperature``, ``top_p``, ``top_k`` (``-1`` when disabled), ``max_tokens``
  = the mode's budget, ``stop_token_ids`` = the engine's stop ids with ``ignore_eos=True`` (only
  the stop ids end a response, as in the embedded engine), ``logprobs=0`` (the sampled token's
  log-prob only), ``detokenize=False``; ``greedy`` maps to ``temperature=0``.  The ids at or
  above the vocabulary limit and the banned ids map to ``logit_bias`` -100 (vLLM's bound) when
  there are at most 1024 of them, else to ``allowed_token_ids`` when those are at most 1024
  (vLLM 0.34's per-request cap on both, ``v1/worker/gpu/sample/logit_bias.py``), else to an
  error; a sampled excluded id is an error.  A row is finished when its last token is a stop
  id, whatever vLLM's ``finish_reason`` (0.10.2 checks the length cap first).
* randomness: each request gets a ``seed`` drawn from the caller's ``generator`` (every TP
  rank of a group passes the same generator state, so vLLM's TP ranks draw alike).

**The log-prob contract.**  vLLM returns one log-prob mode per engine.  This engine asks for
``processed_logprobs``, which is exactly the *behaviour* log-prob (the truncated, renormalised
distribution the token was drawn from): ``Rollout.behaviour_logprobs``, which BPO's truncated
importance sampling divides by.  The tempered full-vocabulary *policy* log-prob is not
available from vLLM; BPO recomputes it itself (``old_lp``, ``score_old_and_ref``) and uses the
engine's policy field only for the ``old_vs_engine_logprob_maxabs`` metric.  So
``Rollout.logprobs`` holds what vLLM can honestly give: the same processed values for sampled
tokens (equal to the policy log-prob when nothing is truncated; with top-k / top-p or a
vocabulary limit they differ by ``log S``, S the kept mass, and the metric then shows it) and
the prompt log-probs for forced tokens.  Under greedy decoding vLLM applies no temperature:
the log-probs are at temperature 1 (evaluation reads only the tokens).

**Weights and memory.**  :meth:`VLLMEngine.sync_weights` gathers the policy's full weights
(``r4b.training.full_params`` over FSDP, a DP collective; ``model_hf_state_dict`` gathers TP
shards, a TP collective: call it on every rank) and pushes them into vLLM's model in memory,
cast to the engine dtype.  :meth:`sleep` (before the update: ``LLM.sleep(level)``, level 1
backs the weights up in CPU memory, level 2 drops them — cheaper here since every weight is
pushed again) and :meth:`wake_up` (after the sync) bracket the update; while asleep, the sync
first wakes the weights only (``tags=["weights"]``), then :meth:`wake_up` the KV cache.
Sleep mode needs PyTorch's CUDA allocator without ``expandable_segments``.  vLLM's worker
seeds Python's, NumPy's and torch's global random generators with ``seed`` when the engine
starts (``Worker.init_device`` → ``set_random_seed``); r4b's samplers take explicit
generators, but code that draws from the global stream after the engine starts sees it.

The engine also tracks the bound policy's parameter version counters: when they changed
since the last sync (an optimizer step or a checkpoint load by a caller that does not sync,
e.g. ``r4b.anneal`` or a BPO resume), :meth:`generate` syncs first.  That sync is collective,
and safe where r4b calls ``generate``: every rank of a TP group generates for the same
requests, and DP ranks either call it the same number of times (curation, BPO rollouts) or
inside ``full_params`` (evaluation), where the FSDP gather is already done.

One engine per process: the annealing and BPO stages of one job share it
(:func:`colocated_engine`); its ``max_model_len`` is ``rollout.max_seqlen`` or the model's
``max_position_embeddings``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..log import get_logger
from .engine import Rollout, RolloutRequest, validate_requests
from .sampling import SamplingParams

log = get_logger(__name__)

HAVE_VLLM: bool = importlib.util.find_spec("vllm") is not None
"""True when ``import vllm`` could succeed when this module was imported (see
:func:`vllm_available` for the current answer)."""

VLLM_MISSING = ("the vLLM rollout engine needs vLLM, which is not installed; install the GPU "
                "extra: pip install 'r4b[gpu]'")

SLEEP_LEVELS = (1, 2)
"""``LLM.sleep`` levels: 1 backs the weights up in CPU memory, 2 drops them."""

CHECKED_VERSIONS = ("0.10.2", "0.34.0")
"""The vLLM releases whose source this engine was checked against (``setup.py``'s range)."""

MAX_MASK_IDS = 1024
"""Most ``allowed_token_ids`` / ``logit_bias`` entries a request may carry: vLLM 0.34's GPU
runner caps both (``vllm/v1/worker/gpu/sample/logit_bias.py``, ``MAX_NUM_ALLOWED_TOKEN_IDS``
and ``MAX_NUM_LOGIT_BIAS_TOKENS``); 0.10.2 has no cap."""

BANNED_BIAS = -100.0
"""``logit_bias`` of a banned id: vLLM clamps biases to [-100, 100] (``SamplingParams``)."""

class VLLMMissing(ImportError, ValueError):
    """vLLM is not installed (an ``ImportError``; also a ``ValueError`` so the command-line
    parser reports it as a bad ``rollout.engine`` value)."""


def vllm_available() -> bool:
    """Whether ``import vllm`` can succeed now."""
    try:
        return importlib.util.find_spec("vllm") is not None
    except (ImportError, ValueError):
        return False


def require_vllm() -> None:
    """Raise :class:`VLLMMissing` (naming the extra) unless vLLM can be imported."""
    if not vllm_available():
        raise VLLMMissing(VLLM_MISSING)


def _import_vllm():
    """``import vllm`` at the point of use, with the extra to install when it is missing."""
    require_vllm()
    try:
        import vllm
    except ImportError as e:  # installed but broken (e.g. a CUDA / torch mismatch)
        raise ImportError(f"vLLM is installed but failed to import ({e}); reinstall the GPU "
                          f"extra: pip install 'r4b[gpu]'") from e
    return vllm


def _version_tuple(v: str) -> tuple[int, ...]:
    out = []
    for part in v.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


def launcher_env() -> dict[str, str]:
    """Set what vLLM's external launcher reads from the environment, for a process that
    torchrun did not start (``python -m ...``); returns the variables set.

    The launcher reads ``RANK`` and ``LOCAL_RANK`` (``int(os.environ[...])``, a ``KeyError``
    without them: 0.10.2 ``vllm/executor/uniproc_executor.py``, 0.34.0
    ``vllm/v1/executor/uniproc_executor.py``) and, when torch.distributed is not initialised
    yet, ``env://`` needs ``MASTER_ADDR`` / ``MASTER_PORT``.  Single process only: a world of
    several processes without them was not started by torchrun, which is an error."""
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    missing = [k for k in ("RANK", "LOCAL_RANK") if k not in os.environ]
    if not missing:
        return {}
    if world > 1:
        raise RuntimeError(f"rollout.engine 'vllm' in a world of {world} processes needs "
                           f"{missing} in the environment (vLLM's external launcher reads "
                           f"them): start the job with torchrun")
    rank = str(dist.get_rank()) if world > 1 else "0"
    want = {"RANK": rank, "LOCAL_RANK": "0", "WORLD_SIZE": "1"}
    if not (dist.is_available() and dist.is_initialized()):
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            want.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(sock.getsockname()[1]))
    set_now = {k: v for k, v in want.items() if k not in os.environ}
    os.environ.update(set_now)
    return set_now


# ---------------------------------------------------------------- images
VLLM_ONEVISION = "LlavaOnevisionForConditionalGeneration"
VLLM_R4B = "RForConditionalGeneration"


def tiles_to_images(tiles: torch.Tensor) -> list[np.ndarray]:
    """Tiles ``[n, C, H, W]`` with values in [0, 1] → one ``uint8 [H, W, 3]`` array per tile
    (C = 1 is repeated to RGB)."""
    if tiles.dim() != 4 or tiles.shape[1] not in (1, 3):
        raise ValueError(f"tiles must be [n, C, H, W] with C in (1, 3), got {tuple(tiles.shape)}")
    x = (tiles.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return [np.ascontiguousarray(t.permute(1, 2, 0).cpu().numpy()) for t in x]


def to_pil(image, where: str):
    """One raw image (float ``[C, H, W]`` in [0, 1], C in (1, 3), numpy or torch) as an RGB
    PIL image: the input every supported vLLM reads the same way (0.10.2's
    ``multimodal/parse.py`` reads any array channels-first, ``_, h, w = image.shape``, so a
    ``uint8 [H, W, 3]`` array gets the wrong size there)."""
    from PIL import Image

    t = torch.as_tensor(np.asarray(image) if not isinstance(image, torch.Tensor) else image,
                        device="cpu")
    if t.dim() != 3 or t.shape[0] not in (1, 3) or not t.is_floating_point():
        raise ValueError(f"{where} must be a raw float image [C, H, W] with C in (1, 3) (vLLM "
                         f"processes each image itself: AnyRes), got {t.dtype} "
                         f"{tuple(t.shape)}")
    lo, hi = float(t.min()), float(t.max())
    if not (0.0 <= lo and hi <= 1.0):
        raise ValueError(f"{where} must hold values in [0, 1], got [{lo}, {hi}]")
    return Image.fromarray(tiles_to_images(t[None])[0], "RGB")


def vllm_image_tokens(arch: str, height: int, width: int, cfg) -> int:
    """Placeholder tokens vLLM's processor for ``arch`` gives one ``height x width`` image.

    Read from ``vllm/model_executor/models/llava_onevision.py`` / ``llava_next.py`` /
    ``rvl.py`` at 0.10.2 and 0.34.0 (identical there): every image is counted on its own, as a
    lone AnyRes image (no multi-image form); LLaVA-OneVision's class reduces the unpadded map
    to 9 tiles (hard-coded ``anyres_max_9``); R-4B's ``RForConditionalGeneration`` is
    registered with LLaVA-NeXT's processing info, which never reduces it (its model still
    reduces the features, so the two disagree for large images)."""
    import dataclasses

    from ..data.images import ImageLayout, anyres_grid

    lay = dataclasses.replace(ImageLayout.of(cfg), max_tiles=9 if arch == VLLM_ONEVISION else None)
    return lay.tokens_per_tile + anyres_grid(height, width, lay).grid_tokens


def compress_placeholders(prompt_ids: Sequence[int], counts: Sequence[int], image_id: int,
                          where: str) -> list[int]:
    """``prompt_ids`` with each image's run of ``counts[k]`` placeholders cut to one
    ``image_id``: the token prompt vLLM expands itself (its processors expand the first
    ``<image>`` of each image, for token prompts too, and leave the rest as they are)."""
    out: list[int] = []
    ids = [int(t) for t in prompt_ids]
    k = i = 0
    while i < len(ids):
        if ids[i] != image_id:
            out.append(ids[i])
            i += 1
            continue
        if k >= len(counts):
            raise ValueError(f"{where}: the prompt holds more image placeholders (id {image_id}) "
                             f"than its {len(counts)} images need ({list(counts)})")
        n = int(counts[k])
        if ids[i:i + n] != [image_id] * n:
            run = next((j for j in range(i, len(ids)) if ids[j] != image_id), len(ids)) - i
            raise ValueError(f"{where}: image {k} needs {n} consecutive placeholders (id "
                             f"{image_id}), the prompt has a run of {run} there")
        out.append(image_id)
        i += n
        k += 1
    if k != len(counts):
        raise ValueError(f"{where}: the prompt holds placeholders for {k} images, the request "
                         f"has {len(counts)}")
    return out


def image_key(image: "Any") -> str:
    """Content hash of one PIL image (mode, size, pixels)."""
    import hashlib

    h = hashlib.sha256(repr((image.mode, image.size)).encode())
    h.update(image.tobytes())
    return h.hexdigest()[:32]


# ---------------------------------------------------------------- weights
def _version(p: torch.Tensor) -> tuple[int, int]:
    """In-place modification counters of ``p`` and of its local shard (an optimizer step on a
    DTensor bumps the former, a checkpoint load into ``to_local()`` the latter)."""
    from ..training import _local

    return int(p._version), int(_local(p)._version)


def _push_weights_fn(weights: dict[str, torch.Tensor], dtype: torch.dtype):
    """The function ``LLM.apply_model`` runs on vLLM's model: ``load_weights`` on
    ``weights`` (cast one tensor at a time), then the names of the model's parameters that were
    not loaded (vLLM's ``DefaultModelLoader`` check)."""

    def push(model) -> list[str]:
        loaded = model.load_weights(weights=((k, v.detach().to(dtype)) for k, v in weights.items()))
        if loaded is None:  # a model without load tracking: nothing to check
            return []
        return sorted({name for name, _ in model.named_parameters()} - set(loaded))

    return push


class VLLMEngine:
    """Rollout engine on an in-process vLLM ``LLM``, with :class:`EmbeddedEngine`'s interface
    plus :meth:`sleep` / :meth:`wake_up` (see the module docstring).

    Args:
        policy: the trainer's r4b model (any FSDP / TP sharding; PP = 1) whose weights the
            engine samples with; kept as ``engine.model``.
        stop_ids: token ids that end a response.
        mode_classifier: ``f(prompt_ids, response_ids) -> 'think' | 'no_think' | None``.
        max_seqlen: longest prompt + response (vLLM's ``max_model_len``).
        vocab_limit: ids at or above it are never sampled (None: no limit).
        banned_ids: ids that are never sampled (e.g. the image placeholder).
        tokenizer_dir: Hugging Face tokenizer directory whose files vLLM reads (None:
            ``skip_tokenizer_init``, text-only models).
        tensor_parallel_size: vLLM's TP size (r4b's: vLLM's TP groups are megatron's).
        gpu_memory_utilization: fraction of the GPU's memory vLLM may take (weights, KV
            cache); the trainer's memory at construction plus this must fit.
        sleep_level: ``LLM.sleep`` level used by :meth:`sleep` (1 or 2).
        enforce_eager, trust_remote_code, seed: passed to ``vllm.LLM``.
        work_dir: where the engine's ``config.json`` directory is made (None: a temporary
            directory, removed with the engine).
        **llm_kwargs: further ``vllm.LLM`` keywords (they override the ones above).
    """

    def __init__(self, policy: torch.nn.Module, *, stop_ids: Sequence[int],
                 mode_classifier: Callable[[list[int], list[int]], str | None] | None = None,
                 max_seqlen: int = 512, vocab_limit: int | None = None,
                 banned_ids: Sequence[int] = (), tokenizer_dir: str | Path | None = None,
                 tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.5,
                 sleep_level: int = 1, enforce_eager: bool = False,
                 trust_remote_code: bool = False, seed: int = 0,
                 work_dir: str | Path | None = None, **llm_kwargs: Any):
        vllm = _import_vllm()
        cfg = getattr(policy, "cfg", None)
        if cfg is None or not hasattr(policy, "language_model"):
            raise TypeError(f"policy must be an r4b model (r4b.models.R4BModel), got "
                            f"{type(policy).__name__}")
        self.stop_ids = set(int(i) for i in stop_ids)
        if not self.stop_ids:
            raise ValueError("stop_ids must name at least one token id, got none")
        if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 2:
            raise ValueError(f"max_seqlen must be an int >= 2, got {max_seqlen!r}")
        if max_seqlen > cfg.lm.max_position_embeddings:
            raise ValueError(f"max_seqlen {max_seqlen} exceeds the model's "
                             f"lm.max_position_embeddings {cfg.lm.max_position_embeddings}")
        V = int(cfg.lm.vocab_size)
        if vocab_limit is not None and (isinstance(vocab_limit, bool) or not isinstance(vocab_limit, int)
                                        or not 1 <= vocab_limit <= V):
            raise ValueError(f"vocab_limit must be an int in [1, {V}] or None, got {vocab_limit!r}")
        if not 0.0 < gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got "
                             f"{gpu_memory_utilization!r}")
        if sleep_level not in SLEEP_LEVELS:
            raise ValueError(f"sleep_level must be one of {SLEEP_LEVELS}, got {sleep_level!r}")
        if "expandable_segments:true" in os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "").replace(" ", "").lower():
            raise ValueError("vLLM's sleep mode does not work with PYTORCH_CUDA_ALLOC_CONF="
                             "expandable_segments:True; unset it for rollout.engine 'vllm'")
        if cfg.vision is not None:
            if cfg.vision_aspect_ratio != "anyres_max_9":
                raise ValueError(f"vLLM's LLaVA-OneVision model reduces every image's feature "
                                 f"map to 9 tiles (anyres_max_9, hard-coded); this model uses "
                                 f"vision_aspect_ratio {cfg.vision_aspect_ratio!r}: use "
                                 f"rollout.engine 'embedded'")
            if cfg.image_layout != "anyres":
                raise ValueError(f"vLLM runs LLaVA-OneVision's AnyRes image layout; this model "
                                 f"uses r4b's {cfg.image_layout!r} layout: use rollout.engine "
                                 f"'embedded'")
            if tokenizer_dir is None:
                raise ValueError("a multimodal model on vLLM needs a Hugging Face tokenizer / "
                                 "processor directory (vLLM's image processor reads it)")
        self.mode_classifier = mode_classifier
        self.max_seqlen = max_seqlen
        self.vocab_limit = vocab_limit
        self.vocab_size = V
        self.banned_ids = sorted(set(int(t) for t in banned_ids))
        if any(not 0 <= t < V for t in self.banned_ids):
            raise ValueError(f"banned_ids must lie in [0, {V}), got {self.banned_ids}")
        self.sleep_level = sleep_level
        self.cfg = cfg
        from ..models.config import dtype_from_name

        self.dtype = dtype_from_name(cfg.params_dtype)
        self._vllm = vllm
        self._tmp = None
        if work_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="r4b-vllm-")
            work_dir = self._tmp.name
        self.model_dir = Path(work_dir)
        self.arch = self._write_model_dir(policy, tokenizer_dir, trust_remote_code)
        version = str(getattr(vllm, "__version__", "0"))
        v, lo, hi = (_version_tuple(x) for x in (version,) + CHECKED_VERSIONS)
        if not (lo <= v and v[:2] <= hi[:2]):
            log.warning("vLLM %s is outside the versions this engine was checked against "
                        "(%s to %d.%d.x)", version, CHECKED_VERSIONS[0], *hi[:2])
        set_env = launcher_env()
        if set_env:
            log.info("single process: set %s for vLLM's external launcher", sorted(set_env))
        kwargs = dict(model=str(self.model_dir), tensor_parallel_size=tensor_parallel_size,
                      dtype=cfg.params_dtype, seed=seed, max_model_len=max_seqlen,
                      gpu_memory_utilization=gpu_memory_utilization,
                      distributed_executor_backend="external_launcher",
                      enable_sleep_mode=True, load_format="dummy",
                      logprobs_mode="processed_logprobs", enforce_eager=enforce_eager,
                      skip_tokenizer_init=tokenizer_dir is None,
                      trust_remote_code=trust_remote_code)
        kwargs.update(llm_kwargs)
        self.llm_kwargs = kwargs
        self.llm = vllm.LLM(**kwargs)
        self._asleep = False
        self._weights_awake = True
        self._reset_pending = False
        self.weights_version = 0
        self._tracked: list[torch.Tensor] = []
        self._versions: tuple[tuple[int, int], ...] = ()
        self.model = policy
        self.last_stats: dict[str, float] = {}
        self.sync_weights(policy)

    def _write_model_dir(self, policy, tokenizer_dir, trust_remote_code: bool) -> str:
        """``config.json`` of ``policy`` (transformers format, what vLLM builds the network
        from) plus the tokenizer / processor files of ``tokenizer_dir``; no weights.  Returns
        the architecture vLLM will build."""
        from ..data.tokenizer import copy_tokenizer_files
        from ..models.hf import hf_config_dict

        d = self.model_dir
        d.mkdir(parents=True, exist_ok=True)
        cfg_dict = hf_config_dict(policy.cfg, getattr(policy, "hf_config_source", None))
        (d / "config.json").write_text(json.dumps(cfg_dict, indent=2, sort_keys=True))
        if tokenizer_dir is not None:
            copy_tokenizer_files(tokenizer_dir, d, with_code=trust_remote_code)
        return cfg_dict["architectures"][0]

    # ------------------------------------------------------------ sleep / wake
    def sleep(self) -> None:
        """Free vLLM's GPU memory for the update: ``LLM.sleep(level=sleep_level)`` (drops the
        KV cache; weights backed up in CPU memory at level 1, dropped at level 2).  No-op when
        already asleep."""
        if self._asleep:
            return
        self.llm.sleep(level=self.sleep_level)
        self._asleep = True
        self._weights_awake = False

    def wake_up(self) -> None:
        """Reallocate what :meth:`sleep` freed (only the KV cache when :meth:`sync_weights`
        already woke the weights) and drop cached prefixes.  No-op when awake."""
        if not self._asleep:
            return
        self.llm.wake_up(tags=["kv_cache"] if self._weights_awake else None)
        self._asleep = False
        self._weights_awake = True
        if self._reset_pending:
            self._reset_caches()
            self._reset_pending = False

    # ------------------------------------------------------------ weights
    def sync_weights(self, policy: torch.nn.Module | None = None) -> float:
        """Push ``policy``'s weights (default: the bound one; another module of the same
        config becomes the bound one) into vLLM's model in memory; returns seconds spent.

        Collective: FSDP gathers over DP, TP gathers inside ``model_hf_state_dict`` — call on
        every rank.  While asleep, wakes the weights only (:meth:`wake_up` does the rest)."""
        from ..models.hf import model_hf_state_dict
        from ..training import full_params

        t0 = time.perf_counter()
        policy = self.model if policy is None else policy
        if getattr(policy, "cfg", None) != self.cfg:
            raise ValueError("policy does not match the engine's model config: the vLLM engine "
                             "was built for another network")
        if self._asleep and not self._weights_awake:
            self.llm.wake_up(tags=["weights"])
            self._weights_awake = True
        with torch.no_grad(), full_params(policy):
            sd = model_hf_state_dict(policy)
            missing = self.llm.apply_model(_push_weights_fn(sd, self.dtype))
            del sd
        not_loaded = sorted({n for worker in missing for n in (worker or [])})
        if not_loaded:
            raise RuntimeError(f"vLLM's model kept {len(not_loaded)} parameters the policy did "
                               f"not provide (e.g. {not_loaded[:5]}): its network differs from "
                               f"the policy's")
        self.model = policy
        self._track()
        # Cached image features are the old tower's: every image is keyed by its content and
        # this counter from now on (multi_modal_uuids), on every version.
        self.weights_version += 1
        if self._asleep:
            self._reset_pending = True
        else:
            self._reset_caches()
        return time.perf_counter() - t0

    def _reset_caches(self) -> None:
        """Drop what vLLM cached under the old weights: KV prefixes, and where the version has
        it, the encoder cache (shim: ``LLMEngine.reset_encoder_cache`` exists in 0.34, not in
        0.10.2, whose stale entries are simply never hit again: new keys, see
        :meth:`_image_uuids`)."""
        self.llm.reset_prefix_cache()
        reset = getattr(getattr(self.llm, "llm_engine", None), "reset_encoder_cache", None)
        if reset is not None:
            reset()

    def _track(self) -> None:
        """Remember the bound policy's parameters (the sharded ones: outside ``full_params``)
        and their version counters."""
        if not getattr(self.model, "_r4b_full_depth", 0) or not self._tracked:
            self._tracked = list(self.model.parameters())
        self._versions = tuple(_version(p) for p in self._tracked)

    def weights_stale(self) -> bool:
        """Whether the bound policy's parameters were modified in place since the last sync."""
        return tuple(_version(p) for p in self._tracked) != self._versions

    # ------------------------------------------------------------ generation
    _mask_cache: tuple | None = None
    """(vocab_limit, banned ids) and the excluded ids and sampling keywords they give."""

    def _vocab_mask(self) -> tuple[frozenset, dict]:
        """The ids no request may sample (ids at or above ``vocab_limit``, the banned ids) and
        the ``SamplingParams`` keywords that exclude them: ``logit_bias`` -100 on each (vLLM's
        bound) when they fit vLLM 0.34's cap of 1024 entries, else ``allowed_token_ids`` when
        the allowed ids fit it, else ``ValueError``.  The same on every version (0.10.2 has no
        cap).  Cached per (limit, banned ids), which a rebind may change."""
        key = (self.vocab_limit, tuple(self.banned_ids))
        if self._mask_cache is None or self._mask_cache[0] != key:
            limit = self.vocab_size if self.vocab_limit is None else self.vocab_limit
            excluded = frozenset(range(limit, self.vocab_size)) | frozenset(self.banned_ids)
            kw: dict = {}
            if excluded and len(excluded) <= MAX_MASK_IDS:
                kw["logit_bias"] = {t: BANNED_BIAS for t in sorted(excluded)}
            elif excluded:
                allowed = [t for t in range(self.vocab_size) if t not in excluded]
                if len(allowed) > MAX_MASK_IDS:
                    raise ValueError(
                        f"vocab_limit {self.vocab_limit} and banned_ids exclude {len(excluded)} "
                        f"of the model's {self.vocab_size} ids and allow {len(allowed)}: vLLM "
                        f"takes at most {MAX_MASK_IDS} logit_bias or allowed_token_ids entries "
                        f"per request (0.34, vllm/v1/worker/gpu/sample/logit_bias.py); use "
                        f"rollout.engine 'embedded'")
                kw["allowed_token_ids"] = allowed
            self._mask_cache = (key, excluded, kw)
        return self._mask_cache[1], self._mask_cache[2]

    def _sampling_params(self, req: RolloutRequest, params: SamplingParams, seed: int | None):
        kw = dict(n=1, temperature=0.0 if params.greedy else params.temperature,
                  top_p=params.top_p, top_k=params.top_k if params.top_k > 0 else -1,
                  max_tokens=params.max_new_tokens(req.mode), logprobs=0,
                  prompt_logprobs=0 if req.forced_ids else None,
                  stop_token_ids=sorted(self.stop_ids), ignore_eos=True, seed=seed,
                  detokenize=False, skip_special_tokens=False)
        kw.update(self._vocab_mask()[1])
        return self._vllm.SamplingParams(**kw)

    # ------------------------------------------------------------ images
    def _image_counts(self, images: list, i: int) -> list[int]:
        """Placeholder tokens of each image of ``requests[i]`` — r4b's count, which must be
        vLLM's (``ValueError`` naming the image otherwise)."""
        from ..data.images import prompt_image_tokens

        sizes = [tuple(int(x) for x in np.shape(im)[-2:]) for im in images]
        ours = prompt_image_tokens(sizes, self.cfg)
        for k, ((h, w), n) in enumerate(zip(sizes, ours)):
            theirs = vllm_image_tokens(self.arch, h, w, self.cfg)
            if theirs == n:
                continue
            if len(sizes) > 1:
                why = (f"vLLM's processors count every image of a prompt as a lone AnyRes image, "
                       f"while this model's layout puts {len(sizes)} images of one prompt in "
                       f"the multi-image form ({n} tokens each)")
            else:
                why = (f"vLLM's {self.arch} counts its tokens with LLaVA-NeXT's formula, "
                       f"without the anyres_max_9 reduction its model applies")
            raise ValueError(f"requests[{i}].images[{k}] ({h}x{w} pixels, height x width): "
                             f"vLLM would give it {theirs} placeholder tokens, this model "
                             f"{n}: {why}; use rollout.engine 'embedded'")
        return ours

    def _image_uuids(self, pil_images: list) -> list[str]:
        """``multi_modal_uuids`` of a request's images: content hash and weight version, so
        that vLLM's encoder cache (vision features by image hash, kept across requests and
        across ``reset_prefix_cache``) never serves features of weights before the last
        sync."""
        return [f"r4b-{image_key(im)}-w{self.weights_version}" for im in pil_images]

    def _prompt(self, r: RolloutRequest, i: int) -> dict:
        """The vLLM prompt of ``requests[i]``: token ids with one ``<image>`` per image
        (vLLM expands them), images as PIL, uuids carrying the weight version."""
        ids = [int(t) for t in r.prompt_ids]
        prompt: dict[str, Any] = {}
        if r.images is not None and len(r.images):
            if self.cfg.vision is None:
                raise ValueError(f"requests[{i}] has images but the model is text-only")
            images = list(r.images) if isinstance(r.images, (list, tuple)) else [r.images]
            pil = [to_pil(im, f"requests[{i}].images[{k}]") for k, im in enumerate(images)]
            counts = self._image_counts(images, i)
            ids = compress_placeholders(ids, counts, int(self.cfg.image_token_id),
                                        f"requests[{i}]")
            prompt["multi_modal_data"] = {"image": pil}
            prompt["multi_modal_uuids"] = {"image": self._image_uuids(pil)}
        elif self.cfg.vision is not None and int(self.cfg.image_token_id) in set(ids):
            raise ValueError(f"requests[{i}].prompt_ids hold image placeholders (id "
                             f"{self.cfg.image_token_id}) but the request has no images")
        prompt["prompt_token_ids"] = ids + [int(t) for t in r.forced_ids]
        return prompt

    def generate(self, requests: Sequence[RolloutRequest], params: SamplingParams,
                 generator: torch.Generator | None = None) -> list[Rollout]:
        """Generate one completion per request, in request order (see the module docstring
        for how each field maps onto vLLM).  Syncs first when the policy changed since the
        last sync (collective)."""
        requests = list(requests)
        validate_requests(requests, params, max_seqlen=self.max_seqlen, vocab_size=self.vocab_size)
        if self._asleep:
            raise RuntimeError("VLLMEngine.generate while the engine is asleep: call wake_up() "
                               "after the update")
        if self.weights_stale():
            log.info("the policy changed since the last weight sync: syncing the vLLM engine")
            self.sync_weights()
        if not params.greedy and params.temperature != 1.0:
            bad = [i for i, r in enumerate(requests) if r.forced_ids]
            if bad:
                raise ValueError(f"requests[{bad[0]}] has forced tokens and the temperature is "
                                 f"{params.temperature}: vLLM scores forced (prompt) tokens at "
                                 f"temperature 1, so the vLLM engine supports forced tokens only "
                                 f"at temperature 1 (use rl.routing 'prompt', temperature 1, or "
                                 f"rollout.engine 'embedded')")
        if not requests:
            self.last_stats = {"seconds": 0.0, "rows": 0, "response_tokens": 0, "tokens_per_s": 0.0}
            return []
        t0 = time.perf_counter()
        seeds: list[int | None] = [None] * len(requests)
        if generator is not None:
            seeds = torch.randint(0, 2**31 - 1, (len(requests),), generator=generator,
                                  device=generator.device).tolist()
        prompts, sps = [], []
        for i, (r, seed) in enumerate(zip(requests, seeds)):
            prompts.append(self._prompt(r, i))
            sps.append(self._sampling_params(r, params, seed))
        outputs = self.llm.generate(prompts, sampling_params=sps, use_tqdm=False)
        out = [self._rollout(r, o) for r, o in zip(requests, outputs, strict=True)]
        n_tok = sum(len(r.response_ids) for r in out)
        dt = time.perf_counter() - t0
        self.last_stats = {"seconds": dt, "rows": len(out), "response_tokens": n_tok,
                           "tokens_per_s": n_tok / max(dt, 1e-9)}
        return out

    def _rollout(self, req: RolloutRequest, output) -> Rollout:
        """One vLLM ``RequestOutput`` → :class:`Rollout` (forced tokens first).  Sampled
        tokens: vLLM's processed log-probs as both fields (see the module docstring); forced
        tokens: their prompt log-probs, behaviour = policy."""
        comp = output.outputs[0]
        gen_ids = [int(t) for t in comp.token_ids]
        uid = req.uid
        if comp.logprobs is None or len(comp.logprobs) != len(gen_ids):
            n_lp = 0 if comp.logprobs is None else len(comp.logprobs)
            raise RuntimeError(f"vLLM returned {n_lp} "
                               f"log-prob entries for {len(gen_ids)} tokens (request uid "
                               f"{uid!r}); logprobs=0 was requested")
        # vLLM's prompt is its expanded one: it must be r4b's, token for token in length.
        want = len(req.prompt_ids) + len(req.forced_ids)
        got = getattr(output, "prompt_token_ids", None)
        if got is not None and len(got) != want:
            raise RuntimeError(f"vLLM expanded the prompt of request uid {uid!r} to {len(got)} "
                               f"tokens, r4b's has {want}: its image placeholders differ")
        excluded = self._vocab_mask()[0]
        bad = [t for t in gen_ids if t in excluded]
        if bad:
            raise RuntimeError(f"vLLM sampled excluded token ids {bad[:5]} for request uid "
                               f"{uid!r} (ids >= vocab_limit {self.vocab_limit} or banned "
                               f"{self.banned_ids})")
        gen_lps = [float(comp.logprobs[k][t].logprob) for k, t in enumerate(gen_ids)]
        forced = [int(t) for t in req.forced_ids]
        forced_lps: list[float] = []
        if forced:
            # prompt_logprobs[k] scores prompt token k given tokens < k (entry 0 is None), over
            # vLLM's expanded prompt (images as their full placeholder runs): the forced tokens
            # are its last len(forced) entries.
            plp = output.prompt_logprobs
            if plp is None or len(plp) < len(forced) + 1:
                raise RuntimeError(f"vLLM returned no prompt log-probs for the forced tokens of "
                                   f"request uid {uid!r}; prompt_logprobs=0 was requested")
            tail = plp[len(plp) - len(forced):]
            forced_lps = [float(d[t].logprob) for d, t in zip(tail, forced)]
        resp = forced + gen_ids
        # A response ends with a stop id or it is cut by the budget.  vLLM 0.10.2 checks the
        # length cap first (vllm/v1/core/sched/utils.py check_stop), so a stop token drawn as
        # the last allowed token reports finish_reason "length": the token decides.
        finished = bool(gen_ids) and gen_ids[-1] in self.stop_ids
        chosen = None
        if self.mode_classifier is not None:
            chosen = self.mode_classifier([int(t) for t in req.prompt_ids], resp)
        lps = forced_lps + gen_lps
        return Rollout(request=req, response_ids=resp, logprobs=lps, finished=finished,
                       mode_chosen=chosen, behaviour_logprobs=list(lps))

    # ------------------------------------------------------------ lifetime
    def shutdown(self) -> None:
        """Drop the vLLM instance and the engine's directory."""
        self.llm = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


_PROCESS_ENGINE: VLLMEngine | None = None
_REBINDABLE = ("stop_ids", "mode_classifier", "vocab_limit", "banned_ids")


def _spec_of(policy, kwargs: dict) -> dict:
    """What identifies the vLLM instance ``VLLMEngine(policy, **kwargs)`` builds."""
    from ..models.hf import hf_config_dict

    return {"config": hf_config_dict(policy.cfg),
            **{k: v for k, v in kwargs.items() if k not in _REBINDABLE}}


def colocated_engine(policy: torch.nn.Module, **kwargs: Any) -> VLLMEngine:
    """This process's vLLM engine, bound to ``policy`` (collective: call on every rank).

    vLLM holds one model-parallel state per process, so one engine serves every stage of a
    job (annealing, BPO, evaluation): the first call builds ``VLLMEngine(policy, **kwargs)``;
    later calls with the same network and settings re-bind it to ``policy`` (stop ids,
    classifier, vocabulary limit and banned ids may change) and push ``policy``'s weights.  A
    call for another network or other vLLM settings is an error."""
    global _PROCESS_ENGINE
    spec = _spec_of(policy, kwargs)
    eng = _PROCESS_ENGINE
    if eng is None or eng.llm is None:
        eng = VLLMEngine(policy, **kwargs)
        eng._colocated_spec = spec
        _PROCESS_ENGINE = eng
        return eng
    if spec != eng._colocated_spec:
        diff = sorted(k for k in set(spec) | set(eng._colocated_spec)
                      if spec.get(k) != eng._colocated_spec.get(k))
        raise RuntimeError(f"this process already runs a vLLM engine built with other "
                           f"settings ({diff}); vLLM holds one engine per process, so every "
                           f"stage of a job must use the same network and rollout settings")
    eng.stop_ids = set(int(i) for i in kwargs["stop_ids"])
    eng.mode_classifier = kwargs.get("mode_classifier")
    eng.vocab_limit = kwargs.get("vocab_limit")
    eng.banned_ids = sorted(set(int(t) for t in kwargs.get("banned_ids", ())))
    eng.wake_up()
    eng.sync_weights(policy)
    return eng


def release_colocated_engine() -> None:
    """Forget this process's engine (tests; vLLM itself cannot be re-initialised in-process)."""
    global _PROCESS_ENGINE
    if _PROCESS_ENGINE is not None:
        _PROCESS_ENGINE.shutdown()
    _PROCESS_ENGINE = None
