"""Pipeline parallelism: stage partitioning and the glue to megatron-core's schedules.

A model built by ``r4b.models.build_model`` on a PP>1 world is this rank's stage: the first
stage embeds (and runs the vision tower), the last applies the final norm and LM head, and
every stage holds a contiguous range of decoder layers (:func:`stage_layer_range`).  Stages
exchange hidden states shaped ``[T, 1, H]`` (packed tokens, micro-batch size 1), so the
schedules are called with ``seq_length = T`` and ``micro_batch_size = 1``; the model's
megatron config sets ``variable_seq_lengths`` so ``T`` may change between micro-batches.

What the schedules need from the model: ``model.model_type`` (``ModelType.encoder_or_decoder``,
looked up by every schedule), ``model.set_input_tensor`` and ``model.config`` (built by
:func:`r4b.models.parallel.megatron_config`), which beyond ``variable_seq_lengths`` and
``pipeline_dtype`` carries the ``TransformerConfig`` fields the schedules read:
``hidden_size``, ``calculate_per_token_loss`` and ``fine_grained_activation_offloading``.

Where they run (megatron-core 0.16.1):

* PP=1 (``forward_backward_no_pipelining``) needs a CUDA build of torch, but only for one
  line: ``schedules.py`` line 596 allocates its token counter with
  ``torch.zeros([], dtype=torch.int, device="cuda")`` unconditionally, before any micro-batch
  and behind no config switch.  Everything else on that path (megatron's per-micro-batch
  ``forward_step`` / ``backward_step``, the loss scaling, our forward step) runs on CPU, and
  ``tests/test_schedule.py`` drives exactly those two functions over packed micro-batches on
  CPU.  :func:`run_pipeline` raises a clear error on a machine without CUDA.
* PP>1 needs CUDA throughout: the same counter (``schedules.py`` line 2138) and the p2p
  exchange (``p2p_communication`` allocates its buffers on ``torch.cuda.current_device()``
  and calls ``torch.cuda.synchronize()``), meant for NCCL; on CPU the stages can be
  composed in one process by hand (see ``tests/test_models_lm.py``).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist


def stage_layer_range(num_layers: int, pp_rank: int, pp_size: int) -> tuple[int, int]:
    """``(start, end)`` of the decoder layers on stage ``pp_rank``: an even split, the first
    ``num_layers % pp_size`` stages taking one extra layer."""
    if pp_size < 1 or not 0 <= pp_rank < pp_size:
        raise ValueError(f"pp_rank must be in [0, pp_size), got pp_rank={pp_rank}, pp_size={pp_size}")
    if num_layers < pp_size:
        raise ValueError(f"num_layers ({num_layers}) must be >= the pipeline size ({pp_size})")
    base, extra = divmod(num_layers, pp_size)
    start = pp_rank * base + min(pp_rank, extra)
    return start, start + base + (1 if pp_rank < extra else 0)


def make_forward_step(loss_fn: Callable[[torch.Tensor, dict], tuple], *,
                      model_kwargs: Callable[[dict], dict] | None = None,
                      return_hidden: bool = True) -> Callable:
    """A megatron-core ``forward_step_func`` for :class:`r4b.models.R4BModel` stages.

    The data iterator yields one dict per micro-batch holding the model's keyword arguments
    (``input_ids``, ``cu_seqlens``, ``position_ids``, ``max_seqlen``, ``images``) plus whatever
    ``loss_fn`` needs; every stage must see the same dicts (non-first stages use the layout
    keys).  ``model_kwargs(batch)`` picks the forward's arguments (default: the keys above that
    are present).  On the last stage the output (final hidden states when ``return_hidden``,
    else logits) goes to ``loss_fn(output, batch)``, which returns megatron's
    ``(loss, num_tokens, metrics)`` (``num_tokens`` an int tensor) or ``(loss, metrics)``.

    megatron scales the returned loss in place (divides it by ``num_microbatches``, and by
    ``num_tokens`` in the 3-tuple form); the loss is handed over as a clone, so metrics that
    hold ``loss.detach()`` (a view of the same storage) keep the unscaled value.
    """
    keys = ("input_ids", "cu_seqlens", "position_ids", "max_seqlen", "images")

    def pick(batch: dict) -> dict:
        if model_kwargs is not None:
            return model_kwargs(batch)
        return {k: batch[k] for k in keys if k in batch and batch[k] is not None}

    def forward_step(data_iterator: Iterator[dict], model, *unused: Any):
        batch = next(data_iterator)
        stage = model.module if hasattr(model, "module") else model
        kwargs = pick(batch)
        if stage.post_process:
            kwargs["return_hidden"] = return_hidden
        if not stage.pre_process:
            kwargs.pop("images", None)  # only the first stage runs the vision tower
        out = model(**kwargs)

        def loss_func(output_tensor: torch.Tensor):
            loss, *rest = loss_fn(output_tensor, batch)
            return (loss.clone(), *rest)

        return out, loss_func

    return forward_step


def run_pipeline(model, data_iterator, *, num_microbatches: int, tokens_per_microbatch: int,
                 forward_step, forward_only: bool = False):
    """Run megatron-core's schedule for the current PP size over ``num_microbatches``.

    Gradients accumulate into ``.grad`` as for ``sum(loss_i) / num_microbatches`` (2-tuple
    loss functions).  Returns the list of per-micro-batch metrics dicts (last stage; empty
    elsewhere).  Needs a CUDA build of torch even with PP=1 (see the module docstring).
    """
    if not torch.cuda.is_available():
        raise RuntimeError(
            "megatron-core's pipeline schedules need CUDA, even with PP=1: "
            "forward_backward_no_pipelining allocates its token counter with "
            "torch.zeros(..., device='cuda') (megatron/core/pipeline_parallel/schedules.py, "
            "megatron-core 0.16.1); on CPU compose the stages by hand")
    from megatron.core.pipeline_parallel import get_forward_backward_func

    fb = get_forward_backward_func()
    return fb(forward_step_func=forward_step, data_iterator=data_iterator, model=[model],
              num_microbatches=num_microbatches, seq_length=tokens_per_microbatch,
              micro_batch_size=1, forward_only=forward_only)


def allreduce_tied_embedding_grads(model) -> None:
    """Sum the gradients of the tied embedding and its LM-head copy over the embedding group.

    With tied embeddings and PP>1 the first stage owns ``embed_tokens.weight`` and the last
    stage a copy as its LM head; after backward both must receive the sum of their gradients so
    that the optimizer keeps them equal.  A no-op with PP=1 or untied embeddings.
    """
    from megatron.core import parallel_state as ps

    stage = model.module if hasattr(model, "module") else model
    lm = stage.language_model
    if not stage.cfg.lm.tie_word_embeddings or ps.get_pipeline_model_parallel_world_size() == 1:
        return
    if lm.pre_process:
        w = lm.embed_tokens.weight
    elif lm.post_process:
        w = lm.lm_head.weight
    else:
        return
    if w.grad is None:
        w.grad = torch.zeros_like(w)
    dist.all_reduce(w.grad, group=ps.get_embedding_group())
