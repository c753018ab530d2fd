"""From sequences to this rank's packed micro-batches (shared by annealing and BPO).

A sequence is prompt + response token ids with its images; the C++ packer (``r4b.packing.thd``)
balances all sequences of the global batch across data-parallel ranks and fills micro-batches
under a token budget; each rank then packs its own micro-batches into THD layout.  Scored rows
follow the label-shift convention: row ``p`` of a sequence with prompt length ``P`` and length
``L`` predicts token ``p + 1`` and is scored iff ``P - 1 <= p < L - 1``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from .thd import IGNORE_INDEX, flatten_sequences, pack_microbatches, plan_microbatches


@dataclass
class PackedMicroBatch:
    """One packed micro-batch and the map from its scored rows back to sequences."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    labels: torch.Tensor
    rows: torch.Tensor
    """Scored rows (long), in packed order."""
    seqs: list[int]
    """Global sequence indices packed here, in order."""
    row_seq: torch.Tensor
    """For each scored row: position of its sequence in ``seqs``."""
    row_token: torch.Tensor
    """For each scored row: index of the predicted token within its sequence's response."""
    images: object
    """The packed sequences' images in order, as one :class:`~r4b.models.ImageBatch`, or
    None."""
    prefix_layout: object = None
    """The prefix-shared layout (:class:`r4b_kernels.PrefixLayout`) when ``cu_seqlens`` bounds
    units of a shared prompt and its rollouts (:mod:`r4b.packing.groups`); None: one sequence
    per rollout."""
    row_targets: torch.Tensor | None = None
    """The token each scored row predicts, when a row can predict for several rollouts (the
    shared layout); None: read from ``labels``."""

    @property
    def targets(self) -> torch.Tensor:
        """The token each scored row predicts."""
        if self.row_targets is not None:
            return self.row_targets
        return self.labels.index_select(0, self.rows)

    @property
    def device(self) -> torch.device:
        return self.input_ids.device

    def to(self, device: torch.device | str) -> "PackedMicroBatch":
        """The model's inputs (ids, positions, ``cu_seqlens``, labels, scored rows, images) on
        ``device``; ``seqs``, ``row_seq`` and ``row_token`` stay on the host, where the
        trainer indexes its per-sequence lists with them."""
        dev = torch.device(device)
        if self.input_ids.device == dev:
            return self
        nb = dev.type == "cuda"
        move = lambda t: t.to(dev, non_blocking=nb)  # noqa: E731
        return dataclasses.replace(
            self, input_ids=move(self.input_ids), position_ids=move(self.position_ids),
            cu_seqlens=move(self.cu_seqlens), labels=move(self.labels), rows=move(self.rows),
            images=None if self.images is None else self.images.to(dev),
            prefix_layout=None if self.prefix_layout is None else self.prefix_layout.to(dev),
            row_targets=None if self.row_targets is None else move(self.row_targets))


def plan(lengths: Sequence[int], *, dp_rank: int, dp_size: int, tokens_per_microbatch: int,
         group_ids: Sequence[int] | None = None, modes: Sequence[int] | None = None
         ) -> tuple[list[list[int]], float]:
    """This rank's micro-batches (lists of sequence indices) and the plan's imbalance.

    Every rank gets the same number of micro-batches, at least one: ranks with fewer get empty
    ones (:func:`pack` turns them into one-token batches that score nothing), so sharded
    models run the same collectives on every rank."""
    lens = np.asarray(lengths, dtype=np.int64)
    budget = int(max(tokens_per_microbatch, int(lens.max(initial=1))))
    p = plan_microbatches(lens, num_ranks=dp_size, tokens_per_microbatch=budget,
                          group_ids=None if group_ids is None else np.asarray(group_ids, np.int64),
                          modes=None if modes is None else np.asarray(modes, np.int8),
                          equal_microbatches=True)
    mine = [list(map(int, mb)) for mb in p.microbatches[dp_rank]] or [[]]
    return mine, float(p.imbalance)


def pack(token_ids: Sequence[Sequence[int]], prompt_lens: Sequence[int], images: Sequence[list],
         microbatches: Sequence[Sequence[int]], *,
         process: Callable[[list], list] | None = None) -> list[PackedMicroBatch]:
    """Pack this rank's micro-batches (lists of indices into the per-sequence lists) in one call.

    ``images[j]``: sequence ``j``'s images as ``ImageBatch.collate`` takes them (processed
    images, or fixed-layout ``[C, H, W]`` tiles); with ``process`` (e.g.
    ``r4b.components.image_processor``) they are raw images, processed per micro-batch here."""
    full = [mb for mb in microbatches if len(mb)]
    packed = []
    if full:
        flat, offsets = flatten_sequences(token_ids)
        plens = np.asarray(prompt_lens, dtype=np.int64)
        packed = [_with_rows(pk, plens, images, process) for pk in
                  pack_microbatches(flat, offsets, plens,
                                    [np.asarray(mb, dtype=np.int64) for mb in full])]
    it = iter(packed)
    return [next(it) if len(mb) else empty_microbatch() for mb in microbatches]


def empty_microbatch() -> PackedMicroBatch:
    """A one-token batch with no scored rows: what a rank without work runs, so its sharded
    model takes part in the step's collectives (its loss is 0, its gradients zero)."""
    z = torch.zeros(0, dtype=torch.long, device="cpu")
    return PackedMicroBatch(
        input_ids=torch.zeros(1, dtype=torch.long, device="cpu"),
        position_ids=torch.zeros(1, dtype=torch.long, device="cpu"),
        cu_seqlens=torch.tensor([0, 1], dtype=torch.int32, device="cpu"), max_seqlen=1,
        labels=torch.full((1,), IGNORE_INDEX, dtype=torch.long, device="cpu"), rows=z, seqs=[],
        row_seq=z, row_token=z, images=None)


def _with_rows(pk, plens: np.ndarray, images: Sequence[list], process) -> PackedMicroBatch:
    from ..models.multimodal import ImageBatch

    seqs = [int(j) for j in pk.seq_indices.tolist()]  # packed order
    rows = pk.response_rows.to(torch.long)
    row_seq = pk.seq_index.to(torch.long).index_select(0, rows)
    starts = pk.cu_seqlens.to(torch.long)
    pl = torch.from_numpy(plens[np.asarray(seqs, dtype=np.int64)]).long()
    row_token = rows - starts.index_select(0, row_seq) + 1 - pl.index_select(0, row_seq)
    per_seq = [list(images[j]) for j in seqs]
    if process is not None:
        per_seq = [process(ims) if ims else [] for ims in per_seq]
    flat_imgs = [im for ims in per_seq for im in ims]
    return PackedMicroBatch(
        input_ids=pk.input_ids, position_ids=pk.position_ids, cu_seqlens=pk.cu_seqlens,
        max_seqlen=int(pk.max_seqlen), labels=pk.labels.to(torch.long), rows=rows, seqs=seqs,
        row_seq=row_seq, row_token=row_token,
        images=ImageBatch.collate(flat_imgs) if flat_imgs else None)


def forward_rows(model, mb: PackedMicroBatch, *, return_hidden: bool = True,
                 gather_logits: bool = True) -> torch.Tensor:
    """Hidden states (or logits) of ``model`` at the scored rows of ``mb``."""
    shared = {} if mb.prefix_layout is None else {"prefix_layout": mb.prefix_layout}
    out = model(input_ids=mb.input_ids, cu_seqlens=mb.cu_seqlens, position_ids=mb.position_ids,
                max_seqlen=mb.max_seqlen, images=mb.images, return_hidden=return_hidden,
                gather_logits=gather_logits, **shared)
    return out.reshape(-1, out.shape[-1]).index_select(0, mb.rows)
