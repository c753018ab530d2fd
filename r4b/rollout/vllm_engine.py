"""vLLM rollout engine: the :class:`~r4b.rollout.engine.EmbeddedEngine` interface on vLLM.

For GPU users with vLLM installed (``pip install 'r4b[gpu]'``).  ``HAVE_VLLM`` says whether
vLLM can be imported; it is imported lazily, when a :class:`VLLMEngine` is constructed, and a
missing vLLM raises an ``ImportError`` naming the extra at that point.

**What is and is not verified.**  vLLM cannot be installed or run on the machine this module
was written on, so *nothing of the vLLM path has been run*: it is written against vLLM's
documented offline API (``vllm.LLM``, ``vllm.SamplingParams``, token-id prompts with
``multi_modal_data``, ``RequestOutput.outputs[0].token_ids / .logprobs``,
``RequestOutput.prompt_logprobs``, ``LLM.collective_rpc``, ``LLM.reset_prefix_cache``).  The
only things tested here are that the module imports without vLLM, that constructing the engine
then raises the documented ``ImportError``, and the vLLM-free helpers (request validation is
shared with the embedded engine).  Before relying on it, run the embedded-vs-vLLM parity check
on a GPU: same checkpoint, greedy, compare token ids and log-probs.

**How requests map onto vLLM** (one ``SamplingParams`` per request, all in one
``LLM.generate`` call, which batches them itself):

* prompt: ``{"prompt_token_ids": prompt_ids + forced_ids}``, plus
  ``"multi_modal_data": {"image": ...}`` with each tile of ``RolloutRequest.images`` as one
  ``uint8 [H, W, 3]`` image (values in [0, 1] scaled to 0-255, grayscale repeated to RGB);
  vLLM's processor for the checkpoint then resizes / normalises them.  The prompt ids keep the
  template's expanded image placeholders (``tokens_per_image`` per image); vLLM's multimodal
  processors recognise already-expanded placeholders for LLaVA-style models — unverified for
  R-4B's.
* forced response tokens are appended to the prompt, so vLLM never samples them; their
  log-probs come from ``prompt_logprobs=0`` (the log-prob of each actual prompt token).
  **Limitation:** vLLM computes prompt log-probs from the raw logits (temperature 1), so
  forced-token log-probs equal the embedded engine's only when ``temperature == 1``.
* sampled tokens: ``temperature``, ``top_p``, ``top_k`` (``-1`` when disabled), ``max_tokens``
  = the mode's budget, ``stop_token_ids`` = the engine's stop ids with ``ignore_eos=True`` (so,
  as in the embedded engine, only the stop ids end a response), ``logprobs=0`` (the sampled
  token's log-prob only), ``detokenize=False``.  ``greedy`` maps to ``temperature=0``.
  The engine is built with ``logprobs_mode="processed_logprobs"`` (vLLM >= 0.10.2): returned
  log-probs are taken after temperature and top-k / top-p, i.e. they equal the embedded
  engine's ``log_softmax(logits / T)`` when top-k / top-p are off, and are the truncated
  distribution's log-probs when they are on (the embedded engine reports the untruncated
  ones).  Under greedy, vLLM applies no temperature.
* randomness: each request gets a ``seed`` drawn from the caller's ``generator`` (per-request
  seeded sampling, reproducible for a fixed generator state; vLLM falls back to its PyTorch
  sampler for seeded requests, which is slower than FlashInfer's).
* ``vocab_limit`` maps to ``allowed_token_ids=range(vocab_limit)`` minus ``banned_ids`` (a
  logits mask applied before sampling, so it also enters the processed log-probs); without a
  ``vocab_limit``, ``banned_ids`` map to ``logit_bias`` of -100 (vLLM's bound).

**Weight sync** (unverified): :meth:`VLLMEngine.sync_weights` writes the policy as a
transformers checkpoint with :func:`r4b.models.to_hf` into the engine's ``model_path`` (the
directory vLLM loaded; it is overwritten, so build the engine on a directory written by
``to_hf``, not on an original download), then asks every vLLM worker to re-read it with
``LLM.collective_rpc("reload_weights")`` and drops cached prefixes with
``LLM.reset_prefix_cache()``.  ``to_hf`` is collective over the policy's ranks: call
``sync_weights`` on every rank.  Streaming weights through vLLM's ``load_weights`` hooks
(no disk round trip) would be faster and is not done here.
"""

from __future__ import annotations

import importlib.util
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
"""True when ``import vllm`` can succeed (the package is installed)."""

VLLM_MISSING = ("VLLMEngine needs vLLM, which is not installed; install the GPU extra: "
                "pip install 'r4b[gpu]'")


def _import_vllm():
    """``import vllm`` at the point of use, with the extra to install when it is missing."""
    if not HAVE_VLLM:
        raise ImportError(VLLM_MISSING)
    try:
        import vllm
    except ImportError as e:  # installed but broken (e.g. a CUDA / torch mismatch)
        raise ImportError(f"vLLM is installed but failed to import ({e}); reinstall the GPU "
                          f"extra: pip install 'r4b[gpu]'") from e
    return vllm


def tiles_to_images(tiles: torch.Tensor) -> list[np.ndarray]:
    """Tiles ``[n, C, H, W]`` with values in [0, 1] → one ``uint8 [H, W, 3]`` image per tile
    (what vLLM's image inputs take; C = 1 is repeated to RGB)."""
    if tiles.dim() != 4 or tiles.shape[1] not in (1, 3):
        raise ValueError(f"tiles must be [n, C, H, W] with C in (1, 3), got {tuple(tiles.shape)}")
    x = (tiles.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return [np.ascontiguousarray(t.permute(1, 2, 0).cpu().numpy()) for t in x]


class VLLMEngine:
    """Rollout engine on vLLM, with :class:`~r4b.rollout.engine.EmbeddedEngine`'s interface.

    Args:
        model_path: transformers checkpoint directory vLLM loads (and :meth:`sync_weights`
            overwrites).
        stop_ids: token ids that end a response.
        mode_classifier: ``f(prompt_ids, response_ids) -> 'think' | 'no_think' | None``.
        max_seqlen: longest prompt + response (vLLM's ``max_model_len``).
        vocab_limit: ids at or above it are never sampled (None: no limit).
        banned_ids: ids that are never sampled (e.g. the image placeholder).
        tensor_parallel_size, dtype, seed: passed to ``vllm.LLM``.
        gpu_memory_utilization: fraction of GPU memory vLLM may take (the trainer shares the
            device).
        **llm_kwargs: further ``vllm.LLM`` arguments (they override the ones above), e.g.
            ``skip_tokenizer_init=True`` for a checkpoint without tokenizer files.
    """

    def __init__(self, model_path: str | Path, *, stop_ids: Sequence[int],
                 mode_classifier: Callable[[list[int], list[int]], str | None] | None = None,
                 max_seqlen: int = 512, vocab_limit: int | None = None,
                 banned_ids: Sequence[int] = (), tensor_parallel_size: int = 1,
                 dtype: str = "auto", seed: int = 0, gpu_memory_utilization: float = 0.5,
                 **llm_kwargs: Any):
        vllm = _import_vllm()
        self.stop_ids = set(int(i) for i in stop_ids)
        if not self.stop_ids:
            raise ValueError("stop_ids must name at least one token id, got none")
        if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 2:
            raise ValueError(f"max_seqlen must be an int >= 2, got {max_seqlen!r}")
        if vocab_limit is not None and (not isinstance(vocab_limit, int) or vocab_limit < 1):
            raise ValueError(f"vocab_limit must be a positive int or None, got {vocab_limit!r}")
        if not 0.0 < gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got "
                             f"{gpu_memory_utilization!r}")
        self.model_path = Path(model_path)
        self.mode_classifier = mode_classifier
        self.max_seqlen = max_seqlen
        self.vocab_limit = vocab_limit
        self.banned_ids = sorted(set(int(t) for t in banned_ids))
        self._vllm = vllm
        kwargs = dict(model=str(self.model_path), tensor_parallel_size=tensor_parallel_size,
                      dtype=dtype, seed=seed, max_model_len=max_seqlen,
                      gpu_memory_utilization=gpu_memory_utilization,
                      logprobs_mode="processed_logprobs")
        kwargs.update(llm_kwargs)
        self.llm = vllm.LLM(**kwargs)
        self.last_stats: dict[str, float] = {}

    # ------------------------------------------------------------ weights
    def sync_weights(self, policy: torch.nn.Module | None = None) -> float:
        """Write ``policy`` to ``model_path`` with ``r4b.models.to_hf`` (collective over the
        policy's ranks) and make vLLM re-read it; returns seconds spent.  ``None``: nothing
        to do (vLLM already holds ``model_path``'s weights)."""
        t0 = time.perf_counter()
        if policy is None:
            return 0.0
        from ..models import to_hf

        to_hf(policy, self.model_path)
        self.llm.collective_rpc("reload_weights")
        self.llm.reset_prefix_cache()
        return time.perf_counter() - t0

    # ------------------------------------------------------------ generation
    def _sampling_params(self, req: RolloutRequest, params: SamplingParams, seed: int | None):
        kw = dict(n=1, temperature=0.0 if params.greedy else params.temperature,
                  top_p=params.top_p, top_k=params.top_k if params.top_k > 0 else -1,
                  max_tokens=params.max_new_tokens(req.mode), logprobs=0,
                  prompt_logprobs=0 if req.forced_ids else None,
                  stop_token_ids=sorted(self.stop_ids), ignore_eos=True, seed=seed,
                  detokenize=False, skip_special_tokens=False)
        if self.vocab_limit is not None:
            banned = set(self.banned_ids)
            kw["allowed_token_ids"] = [t for t in range(self.vocab_limit) if t not in banned]
        elif self.banned_ids:
            kw["logit_bias"] = {t: -100.0 for t in self.banned_ids}
        return self._vllm.SamplingParams(**kw)

    def generate(self, requests: Sequence[RolloutRequest], params: SamplingParams,
                 generator: torch.Generator | None = None) -> list[Rollout]:
        """Generate one completion per request, in request order (see the module docstring
        for how each field maps onto vLLM)."""
        requests = list(requests)
        validate_requests(requests, params, max_seqlen=self.max_seqlen)
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
            prompt: dict[str, Any] = {"prompt_token_ids": [int(t) for t in r.prompt_ids]
                                      + [int(t) for t in r.forced_ids]}
            if r.images is not None and len(r.images):
                imgs = tiles_to_images(torch.stack([torch.as_tensor(np.asarray(x), device="cpu")
                                                    for x in r.images]))
                prompt["multi_modal_data"] = {"image": imgs[0] if len(imgs) == 1 else imgs}
            prompts.append(prompt)
            sps.append(self._sampling_params(r, params, seed))
        outputs = self.llm.generate(prompts, sampling_params=sps, use_tqdm=False)
        out = [self._rollout(r, o) for r, o in zip(requests, outputs, strict=True)]
        n_tok = sum(len(r.response_ids) for r in out)
        dt = time.perf_counter() - t0
        self.last_stats = {"seconds": dt, "rows": len(out), "response_tokens": n_tok,
                           "tokens_per_s": n_tok / max(dt, 1e-9)}
        return out

    def _rollout(self, req: RolloutRequest, output) -> Rollout:
        """One vLLM ``RequestOutput`` → :class:`Rollout` (forced tokens first)."""
        comp = output.outputs[0]
        gen_ids = [int(t) for t in comp.token_ids]
        if comp.logprobs is None or len(comp.logprobs) != len(gen_ids):
            n_lp = 0 if comp.logprobs is None else len(comp.logprobs)
            raise RuntimeError(f"vLLM returned {n_lp} "
                               f"log-prob entries for {len(gen_ids)} tokens (request uid "
                               f"{req.uid!r}); logprobs=0 was requested")
        gen_lps = [float(comp.logprobs[k][t].logprob) for k, t in enumerate(gen_ids)]
        forced = [int(t) for t in req.forced_ids]
        forced_lps: list[float] = []
        if forced:
            # prompt_logprobs[k] scores prompt token k given tokens < k (entry 0 is None).
            n = len(req.prompt_ids)
            plp = output.prompt_logprobs
            forced_lps = [float(plp[n + k][t].logprob) for k, t in enumerate(forced)]
        resp = forced + gen_ids
        finished = comp.finish_reason == "stop" and bool(gen_ids) and gen_ids[-1] in self.stop_ids
        chosen = None
        if self.mode_classifier is not None:
            chosen = self.mode_classifier([int(t) for t in req.prompt_ids], resp)
        return Rollout(request=req, response_ids=resp, logprobs=forced_lps + gen_lps,
                       finished=finished, mode_chosen=chosen)
