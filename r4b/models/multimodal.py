"""The full model: vision tower → projector → spliced into the Qwen3 language model.

:class:`R4BModel` is one pipeline stage of the whole network (with PP=1: all of it).  The first
stage holds the vision tower, the projector and the token embedding; the last stage holds the
final norm and the LM head.  A model built with ``ModelConfig.vision = None`` is text-only.

Three ways to call it (see :meth:`R4BModel.forward`):

* plain batch: ``model(input_ids=LongTensor[B, S])`` → logits ``[B, S, V]`` (like transformers);
* packed (THD): ``model(input_ids=LongTensor[T], cu_seqlens=IntTensor[n+1], position_ids=...,
  max_seqlen=...)`` → ``[T, V]`` logits or, with ``return_hidden=True``, final hidden states
  ``[T, H]`` for the fused loss (which applies ``model.lm_head_weight()`` itself);
* cached decoding: ``model(input_ids=LongTensor[b, s], kv_cache=cache, cache_rows=rows)`` →
  ``[b, s, V]`` logits for the new tokens, appending them to the cache rows.

Images (:class:`ImageBatch`, made by :mod:`r4b.data.images`) are matched to placeholder tokens
(``image_token_id``) in order, over the flattened batch (row by row); each image's placeholders
must be consecutive.  How many an image fills depends on ``ModelConfig.image_layout``:

* ``tile``: ``tiles * vision.tokens_per_image``, the tiles' features one after the other;
* ``anyres`` (LLaVA-OneVision / R-4B): an image of ``1 + rows * cols`` tiles gives the base
  tile's ``p^2`` features, then the grid crops' features laid out as one ``rows p x cols p``
  map, unpadded to the image's aspect ratio, bilinearly downscaled when over the
  ``anyres_max_N`` budget, with ``image_newline`` after every row; an image of one tile (the
  multi-image form) gives ``p^2`` features and one ``image_newline``.  The count is
  :func:`r4b.data.images.num_image_tokens`, computed from the same config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.images import ProcessedImage, anyres_grid
from ..log import get_logger
from .attention import KVCache, PrefixTree, SharedKVCache, make_attn_meta, resolve_backend
from .config import ModelConfig
from .lm import Qwen3LM
from .parallel import (ensure_model_parallel, mark_tensor_parallel_attributes,
                       megatron_config, parallel_info)

log = get_logger(__name__)


@dataclass
class ImageBatch:
    """The images of a batch as tiles for the vision tower.

    ``pixel_values`` float ``[N_tiles, C, S, S]``: the tiles of all images, image after image,
    in the order of their placeholders in the batch.  ``tiles_per_image`` LongTensor
    ``[N_img]``: how many consecutive tiles each image has (``None``: one tile each).
    ``image_sizes`` LongTensor ``[N_img, 2]``: each image's original ``(height, width)`` in
    pixels, which the ``anyres`` layout needs to lay the grid out and unpad it (``None`` is
    fine for ``tile``).

    Build it with :meth:`collate` from what :func:`r4b.data.images.process_image` returns (a
    :class:`~r4b.data.images.ProcessedImage` per image, or per-sample lists of them), or from
    tensors for the ``tile`` layout.  Per layout, an image fills ``tiles * tokens_per_image``
    placeholders (``tile``) or :func:`r4b.data.images.num_image_tokens` of its size
    (``anyres``, ``1 + rows * cols`` tiles, or 1 tile in the multi-image form).
    """

    pixel_values: torch.Tensor
    tiles_per_image: torch.Tensor | None = None
    image_sizes: torch.Tensor | None = None

    def __post_init__(self):
        pv = self.pixel_values
        if not isinstance(pv, torch.Tensor) or pv.dim() != 4 or not pv.is_floating_point():
            shape = tuple(pv.shape) if isinstance(pv, torch.Tensor) else type(pv).__name__
            raise ValueError(f"pixel_values must be a float tensor [N_tiles, C, H, W], got {shape}")
        if self.tiles_per_image is not None:
            t = torch.as_tensor(self.tiles_per_image, dtype=torch.long, device="cpu")
            if t.dim() != 1 or int(t.sum()) != pv.shape[0] or (t.numel() and int(t.min()) < 1):
                raise ValueError(f"tiles_per_image must be positive counts summing to N_tiles="
                                 f"{pv.shape[0]}, got {t.tolist()}")
            self.tiles_per_image = t
        if self.image_sizes is not None:
            sz = torch.as_tensor(self.image_sizes, dtype=torch.long, device="cpu")
            if sz.shape != (self.num_images, 2) or (sz.numel() and int(sz.min()) < 1):
                raise ValueError(f"image_sizes must be positive (height, width) pairs, one per "
                                 f"image: shape ({self.num_images}, 2), got "
                                 f"{sz.tolist() if sz.dim() <= 2 else tuple(sz.shape)}")
            self.image_sizes = sz

    @property
    def num_images(self) -> int:
        """Number of images (not tiles)."""
        return (self.pixel_values.shape[0] if self.tiles_per_image is None
                else int(self.tiles_per_image.numel()))

    @property
    def num_tiles(self) -> int:
        """Number of tiles."""
        return int(self.pixel_values.shape[0])

    def to(self, device) -> "ImageBatch":
        """The pixels on ``device`` (tile counts and sizes stay host metadata)."""
        dev = torch.device(device)
        if self.pixel_values.device == dev:
            return self
        return ImageBatch(self.pixel_values.to(dev, non_blocking=dev.type == "cuda"),
                          self.tiles_per_image, self.image_sizes)

    def tile_counts(self) -> list[int]:
        """Tiles of each image."""
        if self.tiles_per_image is None:
            return [1] * self.num_tiles
        return [int(t) for t in self.tiles_per_image.tolist()]

    @classmethod
    def collate(cls, images) -> "ImageBatch | None":
        """Accept ``None``, an ``ImageBatch``, a :class:`~r4b.data.images.ProcessedImage`, a
        tensor or array ``[N, C, H, W]`` (one tile per image), or a per-sample list of those /
        of ``[C, H, W]`` tensors / of ``None``."""
        if images is None or isinstance(images, ImageBatch):
            return images
        if isinstance(images, ProcessedImage):
            return cls(torch.from_numpy(np.ascontiguousarray(images.pixel_values)),
                       torch.tensor([images.num_tiles], device="cpu"),
                       torch.tensor([images.image_size], device="cpu"))
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(images)
        if isinstance(images, torch.Tensor):
            return cls(images)
        if isinstance(images, Sequence):
            items = []
            for item in images:
                if isinstance(item, (torch.Tensor, np.ndarray)) and item.ndim == 3:
                    item = item[None]  # one [C, H, W] image
                item = cls.collate(item)
                if item is not None:
                    items.append(item)
            if not items:
                return None
            with_sizes = [it.image_sizes is not None for it in items]
            if any(with_sizes) and not all(with_sizes):
                raise ValueError("image_sizes must be given for every image or for none; items "
                                 f"{[i for i, w in enumerate(with_sizes) if not w]} of the batch "
                                 "have none")
            pv = torch.cat([it.pixel_values for it in items])
            tiles = torch.cat([torch.tensor(it.tile_counts(), dtype=torch.long, device="cpu")
                               for it in items])
            sizes = torch.cat([it.image_sizes for it in items]) if all(with_sizes) else None
            return cls(pv, tiles, sizes)

        raise TypeError(f"images must be None, an ImageBatch, a ProcessedImage, a tensor [N, C, H, "
                        f"W] or a list of those, got {type(images).__name__}")


class R4BModel(nn.Module):
    """One pipeline stage of the multimodal (or text-only) model.

    Attributes:
        cfg: the :class:`ModelConfig`.
        config: megatron-core ``ModelParallelConfig`` (read by megatron's pipeline schedules;
            carries ``hidden_size`` for their p2p tensor shape).
        model_type: megatron's ``ModelType.encoder_or_decoder`` (the schedules look it up).
        language_model: the :class:`Qwen3LM` stage.
        vision_tower, projector: on the first stage of a multimodal model, else absent.
        vocab_start, vocab_size: first vocabulary row of this rank's LM-head slice; full vocab.
    """

    def __init__(self, cfg: ModelConfig, *, pre_process: bool, post_process: bool,
                 layer_range: tuple[int, int], init_weights: bool = True, device=None,
                 master_dtype: torch.dtype | None = None):
        super().__init__()
        info = parallel_info()
        # Parameters are stored in master_dtype (fp32 master weights for sharded training) or
        # in the compute dtype; r4b.training.shard_model gathers them in the compute dtype.
        dtype = master_dtype or cfg.torch_dtype
        self.compute_dtype = cfg.torch_dtype
        self.cfg = cfg
        self.config = megatron_config(dtype, tp_size=info.tp_size, pp_size=info.pp_size,
                                      perform_initialization=init_weights,
                                      hidden_size=cfg.lm.hidden_size)
        # megatron's schedules call get_model_type(model) and fail without it.
        from megatron.core.enums import ModelType

        self.model_type = ModelType.encoder_or_decoder
        self.pre_process, self.post_process = pre_process, post_process
        self.language_model = Qwen3LM(cfg.lm, config=self.config, tp_group=info.tp_group,
                                      tp_rank=info.tp_rank, tp_size=info.tp_size,
                                      pre_process=pre_process, post_process=post_process,
                                      layer_range=layer_range, device=device)
        self.has_vision = cfg.vision is not None and pre_process
        if self.has_vision:
            from .vision import Projector, SiglipVisionTower

            v = cfg.vision
            self.vision_tower = SiglipVisionTower(v, parallel_config=self.config)
            self.projector = Projector(v.hidden_size, cfg.lm.hidden_size, eps=cfg.projector_eps,
                                       act=v.projector_hidden_act, pre_norm=cfg.projector_pre_norm,
                                       parallel_config=self.config)
            if cfg.image_newline:
                # Replicated over TP (it is appended to full, all-reduced projector outputs).
                newline = torch.zeros(cfg.lm.hidden_size, dtype=dtype)
                if init_weights and cfg.image_layout == "anyres":
                    nn.init.normal_(newline, std=cfg.lm.hidden_size ** -0.5)
                self.image_newline = nn.Parameter(newline)
        self.input_tensor: torch.Tensor | None = None
        # Built-for-loading and freshly initialised models must look alike to the TP-aware
        # gradient norm and to checkpointing.
        mark_tensor_parallel_attributes(self)

    # ------------------------------------------------------------ properties for the loss
    @property
    def vocab_start(self) -> int:
        """First vocabulary id of this rank's LM-head slice."""
        return self.language_model.vocab_start

    @property
    def vocab_size(self) -> int:
        """Full vocabulary size (all TP ranks together)."""
        return self.language_model.vocab_size

    def lm_head_weight(self) -> torch.Tensor:
        """This rank's ``[V_local, H]`` LM-head weight (the embedding matrix when tied)."""
        return self.language_model.lm_head_weight()

    def logits_of_hidden(self, hidden: torch.Tensor, *, gather: bool = True) -> torch.Tensor:
        """Logits ``[..., V]`` of final-normed hidden states (what ``return_hidden=True``
        returns); ``gather=False`` keeps this rank's ``[..., V_local]`` slice."""
        return self.language_model.logits(hidden, gather=gather)

    # ------------------------------------------------------------ pipeline glue
    def set_input_tensor(self, input_tensor) -> None:
        """Hidden states from the previous pipeline stage (megatron passes a one-item list;
        ``[T, 1, H]`` or ``[T, H]``); ignored on the first stage."""
        if isinstance(input_tensor, (list, tuple)):
            if len(input_tensor) != 1:
                raise ValueError(f"set_input_tensor takes one tensor, got {len(input_tensor)}")
            input_tensor = input_tensor[0]
        self.input_tensor = input_tensor

    # ------------------------------------------------------------ KV cache
    def new_kv_cache(self, batch_size: int, max_seqlen: int, dtype: torch.dtype | None = None, *,
                     prefix_tree: PrefixTree | None = None) -> KVCache | SharedKVCache:
        """An empty KV cache with ``batch_size`` rows of ``max_seqlen`` tokens (dtype defaults to
        the compute dtype), on the model's device; the dense cache's ``lengths`` start at 0.

        With ``prefix_tree`` (a :class:`~r4b.models.attention.PrefixTree` of ``batch_size``
        rows): a :class:`~r4b.models.attention.SharedKVCache` holding the tree's shared nodes
        once and each row's own tokens; ``max_seqlen`` bounds every row's chain plus own
        tokens."""
        if max_seqlen > self.cfg.lm.max_position_embeddings:
            raise ValueError(f"max_seqlen {max_seqlen} exceeds lm.max_position_embeddings "
                             f"{self.cfg.lm.max_position_embeddings}")
        p = next(self.parameters())
        if prefix_tree is not None:
            if not isinstance(prefix_tree, PrefixTree):
                raise TypeError(f"prefix_tree must be a PrefixTree, got "
                                f"{type(prefix_tree).__name__}")
            if prefix_tree.batch_size != batch_size:
                raise ValueError(f"prefix_tree describes {prefix_tree.batch_size} rows, expected "
                                 f"batch_size={batch_size}")
        cache = self.language_model.new_kv_cache(batch_size, max_seqlen,
                                                 dtype or self.compute_dtype, p.device,
                                                 prefix_tree=prefix_tree)
        if cache.max_seqlen > max_seqlen:
            raise ValueError(f"prefix_tree reaches {cache.max_seqlen} tokens in a row (chain + own "
                             f"tokens), more than max_seqlen={max_seqlen}")
        return cache

    # ------------------------------------------------------------ images
    def image_token_counts(self, images: ImageBatch) -> list[int]:
        """Placeholder tokens each image of ``images`` fills (see the module docstring);
        ``ValueError`` naming the image when its tiles do not fit its size."""
        cfg = self.cfg
        tpi = cfg.tokens_per_image
        tiles = images.tile_counts()
        if cfg.image_layout == "tile":
            return [n * tpi for n in tiles]
        if images.image_sizes is None:
            raise ValueError("image_layout='anyres' needs each image's original size: "
                             "ImageBatch.image_sizes is None (build the batch with "
                             "ImageBatch.collate from r4b.data.images.process_image outputs)")
        counts = []
        for i, (n, (h, w)) in enumerate(zip(tiles, images.image_sizes.tolist())):
            if n == 1:
                counts.append(tpi + 1)  # multi-image form: one view + one image_newline
                continue
            grid = anyres_grid(h, w, cfg)
            if n != grid.num_tiles:
                raise ValueError(
                    f"image {i} ({h}x{w} pixels, height x width) has {n} tiles, but AnyRes needs "
                    f"1 + {grid.rows} x {grid.cols} = {grid.num_tiles} for its size (base view + "
                    f"best-fit grid), or 1 in the multi-image form")
            counts.append(tpi + grid.grid_tokens)
        return counts

    def encode_images(self, images: ImageBatch) -> torch.Tensor:
        """Tower → projector → layout: ``[sum(image_token_counts), H]`` features, in placeholder
        order (``tile``: tile after tile; ``anyres``: per image, base tile then the grid rows
        each ended by ``image_newline``)."""
        if not self.has_vision:
            raise ValueError("images were given but this model has no vision tower "
                             "(ModelConfig.vision is None or this is not the first pipeline stage)")
        images = ImageBatch.collate(images)
        p = self.vision_tower.patch_embedding.weight
        feats = self.vision_tower(images.pixel_values.to(device=p.device, dtype=p.dtype))
        feats = self.projector(feats)  # [N_tiles, p^2, H], full width on every TP rank
        if self.cfg.image_layout == "tile":
            return feats.reshape(-1, feats.shape[-1])
        self.image_token_counts(images)  # tiles against sizes, naming the image
        return torch.cat(self._anyres_features(feats, images))

    def _anyres_features(self, feats: torch.Tensor, images: ImageBatch) -> list[torch.Tensor]:
        """Per image ``[tokens, H]`` pieces laid out as LLaVA-OneVision's model does."""
        side = self.cfg.vision.image_size // self.cfg.vision.patch_size
        newline = self.image_newline.to(feats.dtype)
        out, start = [], 0
        for n, (h, w) in zip(images.tile_counts(), images.image_sizes.tolist()):
            f = feats[start:start + n]
            start += n
            if n == 1:
                out += [f[0], newline[None]]
                continue
            g = anyres_grid(h, w, self.cfg)
            # [rows*cols, p*p, H] -> [H, rows*p, cols*p]: patch (y, x) of crop (r, c) lands at
            # (r*p + y, c*p + x), so the crops' features form one map of the padded image.
            grid = (f[1:].view(g.rows, g.cols, side, side, -1).permute(4, 0, 2, 1, 3)
                    .reshape(-1, g.rows * side, g.cols * side))
            top, bottom, left, right = g.crop
            grid = grid[:, top:bottom, left:right]  # drop the rows / columns of padding
            if g.downscaled:
                grid = F.interpolate(grid[None], size=g.out_size, mode="bilinear",
                                     align_corners=False)[0]
            rows = torch.cat([grid, newline[:, None, None].expand(-1, grid.shape[1], 1)], dim=2)
            out += [f[0], rows.flatten(1).t()]  # [H, h, w+1] -> [h*(w+1), H], row-major
        return out

    def _check_placeholders(self, mask: torch.Tensor, images: ImageBatch | None) -> None:
        """Raise ``ValueError`` unless the placeholder tokens hold every image in order, each
        image's run consecutive; the message names the first image that does not fit."""
        cfg = self.cfg
        n_ph = int(mask.sum())
        counts = [] if images is None else self.image_token_counts(images)
        need = sum(counts)
        img_id = cfg.image_token_id
        if n_ph == need and images is None:
            return
        m = mask.to(torch.int8)
        edges = torch.diff(m, prepend=m.new_zeros(1), append=m.new_zeros(1))
        starts = (edges == 1).nonzero().squeeze(1).tolist()
        ends = (edges == -1).nonzero().squeeze(1).tolist()
        runs = list(zip(starts, [e - s for s, e in zip(starts, ends)]))
        detail = _first_misfit(runs, counts, None if images is None else images.image_sizes)
        if n_ph != need:
            if cfg.image_layout == "tile":
                n_img = 0 if images is None else images.num_images
                n_tiles = 0 if images is None else images.num_tiles
                tpi = cfg.tokens_per_image
                head = (f"image placeholders do not match the images: input_ids hold {n_ph} "
                        f"image tokens (id {img_id}), but {n_img} images with {n_tiles} tiles "
                        f"need {n_tiles} x {tpi} (tokens_per_image) = {need}")
            else:
                head = (f"image placeholders do not match the images: input_ids hold {n_ph} "
                        f"image tokens (id {img_id}), but the {len(counts)} images need "
                        f"{need} (per image: {counts})")
            raise ValueError(head + (f"; {detail}" if detail else ""))
        if detail:
            raise ValueError(f"image placeholders do not match the images: {detail}")

    def _embed(self, ids_flat: torch.Tensor, images, *, check_placeholders: bool) -> torch.Tensor:
        lm = self.language_model
        if ids_flat.device.type == "cpu" and ids_flat.numel():
            lo, hi = int(ids_flat.min()), int(ids_flat.max())
            if lo < 0 or hi >= lm.vocab_size:
                raise ValueError(f"input_ids must lie in [0, {lm.vocab_size}), got values in "
                                 f"[{lo}, {hi}]")
        emb = lm.embed(ids_flat)
        images = ImageBatch.collate(images)
        if self.cfg.vision is None:
            if images is not None:
                raise ValueError("images were given but this model is text-only (ModelConfig.vision is None)")
            return emb
        if images is None and not check_placeholders:
            return emb
        mask = ids_flat == self.cfg.image_token_id
        self._check_placeholders(mask, images)
        if images is None:
            if self.has_vision and torch.is_grad_enabled():
                emb = emb + self._untouched_image_params(tower=True)
            return emb
        feats = self.encode_images(images).to(emb.dtype)
        out = emb.masked_scatter(mask[:, None], feats)
        if torch.is_grad_enabled() and self.cfg.image_layout == "tile":
            out = out + self._untouched_image_params(tower=False)
        return out

    def _untouched_image_params(self, *, tower: bool) -> torch.Tensor:
        """A zero that depends on every image parameter this micro-batch does not use: the
        tower and projector (through one blank tile, when ``tower``) and ``image_newline``
        (unused by text-only micro-batches and by the ``tile`` layout).

        Under FSDP the gradient reduce-scatter of a unit packs the gradients of its
        parameters that have one; a rank whose micro-batch leaves a parameter out would pack
        fewer bytes than its peers (or skip a unit's collectives altogether) and the job
        dies with a collective mismatch.  Adding this zero makes every rank's backward give
        every parameter a gradient (zero where unused), whatever its micro-batch holds."""
        p = self.vision_tower.patch_embedding.weight
        zero = torch.zeros((), dtype=self.compute_dtype, device=p.device)
        if tower:
            v = self.cfg.vision
            blank = torch.zeros((1, v.num_channels, v.image_size, v.image_size), dtype=p.dtype,
                                device=p.device)
            zero = zero + 0.0 * self.projector(self.vision_tower(blank)).sum()
        newline = getattr(self, "image_newline", None)
        if newline is not None:
            zero = zero + 0.0 * newline.sum()
        return zero

    # ------------------------------------------------------------ forward
    def forward(self, input_ids: torch.Tensor | None = None, *, images=None,
                position_ids: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
                max_seqlen: int | None = None, kv_cache=None,
                cache_rows: torch.Tensor | None = None, return_hidden: bool = False,
                gather_logits: bool = True, prefix_layout=None) -> torch.Tensor:
        """Run this stage.

        Args:
            input_ids: ``[B, S]`` (plain batch or cached step) or ``[T]`` packed with
                ``cu_seqlens``.  Non-first pipeline stages read their hidden states from
                :meth:`set_input_tensor` but still take ``input_ids`` (or ``cu_seqlens``) for
                the layout.
            images: ``ImageBatch``, ``[N, C, H, W]`` tensor or per-sample list (see
                :class:`ImageBatch`); first stage only.
            position_ids: ``[T]`` (packed; default: restart at 0 per sequence) or ``[B, S]``
                (plain; default ``arange(S)``).
            cu_seqlens: int32 ``[n+1]`` sequence boundaries of packed ``input_ids``.
            max_seqlen: longest packed sequence (computed from ``cu_seqlens`` when omitted).
            kv_cache: a cache from :meth:`new_kv_cache` (or a shared cache's ``nodes`` view,
                to prefill its shared segments); switches to cached decoding.
            cache_rows: LongTensor ``[b]``, the cache rows (nodes) ``input_ids`` belong to
                (default: all rows, ``b`` must equal the cache's batch size).
            return_hidden: return final-normed hidden states ``[..., H]`` instead of logits.
            gather_logits: gather logits over TP (``False``: this rank's ``[..., V_local]``).
            prefix_layout: a :class:`r4b_kernels.PrefixLayout` when the packed tokens are
                prefix-shared units (:mod:`r4b.packing.groups`); ``cu_seqlens`` then bounds
                the units and ``position_ids`` must be given.

        Returns:
            last stage: logits ``[B, S, V]`` / ``[T, V]`` (or hidden ``[..., H]``); other
            stages: hidden states ``[T, 1, H]`` for the next stage.
        """
        if kv_cache is not None:
            return self._forward_cached(input_ids, images, kv_cache, cache_rows, return_hidden,
                                        gather_logits)
        lm = self.language_model
        max_pos = self.cfg.lm.max_position_embeddings
        if prefix_layout is not None:
            _check_prefix_layout(prefix_layout, cu_seqlens, position_ids)
        if cu_seqlens is not None:
            if input_ids is not None:
                if input_ids.dim() == 2 and input_ids.shape[0] == 1:
                    input_ids = input_ids[0]
                if input_ids.dim() != 1:
                    raise ValueError(f"packed input_ids must be [T] (with cu_seqlens), got shape "
                                     f"{tuple(input_ids.shape)}")
            cu = cu_seqlens.to(torch.int32)
            if cu.dim() != 1 or cu.numel() < 2:
                raise ValueError(f"cu_seqlens must be int32 [n+1] with n >= 1, got shape "
                                 f"{tuple(cu_seqlens.shape)}")
            t = input_ids.shape[0] if input_ids is not None else None
            if max_seqlen is None or (t is not None and cu.device.type == "cpu"):
                cu_host = cu.cpu()
                lens = cu_host[1:] - cu_host[:-1]
                if int(cu_host[0]) != 0 or int(lens.min()) < 1:
                    raise ValueError(f"cu_seqlens must start at 0 and increase strictly, got "
                                     f"{cu_host.tolist()}")
                if t is not None and int(cu_host[-1]) != t:
                    raise ValueError(f"cu_seqlens[-1]={int(cu_host[-1])} must equal the number of "
                                     f"packed tokens {t}")
                max_seqlen = int(lens.max()) if max_seqlen is None else max_seqlen
            if max_seqlen > max_pos:
                raise ValueError(f"a packed sequence has {max_seqlen} tokens, more than "
                                 f"lm.max_position_embeddings={max_pos}")
            dense = None
            if position_ids is None:
                position_ids = _positions_from_cu(cu, t)
            position_ids = position_ids.reshape(-1)
            ids_flat = input_ids
        else:
            if input_ids is None or input_ids.dim() != 2:
                shape = None if input_ids is None else tuple(input_ids.shape)
                raise ValueError(f"input_ids must be [B, S] (or [T] with cu_seqlens), got {shape}")
            b, s = input_ids.shape
            if s > max_pos:
                raise ValueError(f"sequence length {s} exceeds lm.max_position_embeddings={max_pos}")
            dev = input_ids.device
            if position_ids is None:
                position_ids = torch.arange(s, device=dev).repeat(b)
            else:
                if tuple(position_ids.shape) != (b, s):
                    raise ValueError(f"position_ids must have the shape of input_ids {(b, s)}, got "
                                     f"{tuple(position_ids.shape)}")
                position_ids = position_ids.reshape(-1)
            cu = torch.arange(0, (b + 1) * s, s, device=dev, dtype=torch.int32)
            max_seqlen, dense = s, (b, s)
            ids_flat = input_ids.reshape(-1)
        if self.pre_process:
            hidden = self._embed(ids_flat, images, check_placeholders=True)
        else:
            hidden = self._stage_input()
        backend = resolve_backend(self.cfg.attention_backend, hidden.device, hidden.dtype)
        meta = make_attn_meta(cu.to(hidden.device), max_seqlen, backend=backend, dense=dense,
                              prefix=None if prefix_layout is None else prefix_layout.to(hidden.device))
        hidden = lm.run_layers(hidden, position_ids.to(hidden.device), meta=meta)
        if not self.post_process:
            return hidden.unsqueeze(1)
        out = self._head(hidden, return_hidden, gather_logits)
        return out.view(*dense, out.shape[-1]) if dense is not None else out

    def _stage_input(self) -> torch.Tensor:
        if self.input_tensor is None:
            raise RuntimeError("this pipeline stage has no input: call set_input_tensor() with the "
                               "previous stage's output first")
        x = self.input_tensor
        return x.reshape(-1, x.shape[-1])

    def _head(self, hidden: torch.Tensor, return_hidden: bool, gather: bool) -> torch.Tensor:
        lm = self.language_model
        h = lm.final_norm(hidden)
        return h if return_hidden else lm.logits(h, gather=gather)

    def _forward_cached(self, input_ids, images, cache, rows, return_hidden, gather):
        if not (self.pre_process and self.post_process):
            raise RuntimeError("cached decoding runs on a single pipeline stage (PP=1) only")
        if input_ids is None or input_ids.dim() != 2:
            shape = None if input_ids is None else tuple(input_ids.shape)
            raise ValueError(f"cached decoding takes input_ids [b, s], got {shape}")
        b, s = input_ids.shape
        if rows is None:
            if b != cache.batch_size:
                raise ValueError(f"without cache_rows, input_ids must have one row per cache row "
                                 f"({cache.batch_size}), got {b}")
            rows = torch.arange(b, device="cpu")
        if not isinstance(rows, torch.Tensor):
            rows = torch.tensor(rows, dtype=torch.long, device="cpu")
        rows = rows.long()
        if rows.shape != (b,):
            raise ValueError(f"cache_rows must be a LongTensor [{b}] (one per input row), got "
                             f"shape {tuple(rows.shape)}")
        step = cache.plan(rows, s)
        max_pos = self.cfg.lm.max_position_embeddings
        if step.kv_len > max_pos:
            raise ValueError(f"cached sequence would reach {step.kv_len} tokens, more than "
                             f"lm.max_position_embeddings={max_pos}")
        hidden = self._embed(input_ids.reshape(-1), images, check_placeholders=images is not None)
        pos = step.positions.reshape(-1)
        hidden = self.language_model.run_layers(hidden, pos, cache=cache, step=step)
        cache.advance(step)
        out = self._head(hidden, return_hidden, gather)
        return out.view(b, s, out.shape[-1])


def _first_misfit(runs: list[tuple[int, int]], counts: list[int], sizes) -> str:
    """Which image does not fit the placeholder runs ``(start, length)`` (flat positions), each
    image taking the next ``counts[i]`` placeholders within one run; ``''`` when all fit."""
    def name(i: int) -> str:
        if sizes is None:
            return f"image {i}"
        h, w = sizes[i].tolist()
        return f"image {i} ({h}x{w} pixels, height x width)"

    r, used = 0, 0
    for i, n in enumerate(counts):
        if r == len(runs):
            where = "input_ids hold none" if i == 0 else f"none are left after image {i - 1}"
            return f"{name(i)} needs {n} placeholders but {where}"
        start, length = runs[r]
        left = length - used
        if n > left:
            return (f"{name(i)} needs {n} consecutive placeholders, but the run at flat "
                    f"position {start + used} of input_ids holds {left}")
        used += n
        if used == length:
            r, used = r + 1, 0
    if r < len(runs):
        start = runs[r][0] + used
        extra = sum(length for _, length in runs[r:]) - used
        return (f"{extra} placeholders from flat position {start} of input_ids are left over "
                f"after the {len(counts)} images")
    return ""


def _check_prefix_layout(layout, cu_seqlens, position_ids) -> None:
    """The layout must bound the same units as ``cu_seqlens``; positions cannot be derived."""
    if cu_seqlens is None or position_ids is None:
        raise ValueError("prefix_layout needs cu_seqlens (the units' bounds) and position_ids "
                         "(a suffix continues from its prefix), got "
                         f"cu_seqlens={'set' if cu_seqlens is not None else None}, "
                         f"position_ids={'set' if position_ids is not None else None}")
    if layout.cu_units.shape != cu_seqlens.shape or (
            cu_seqlens.device.type == "cpu" and layout.cu_units.device.type == "cpu"
            and not torch.equal(layout.cu_units, cu_seqlens.to(torch.int32))):
        raise ValueError(f"prefix_layout.cu_units {layout.cu_units.tolist()} must equal "
                         f"cu_seqlens {cu_seqlens.tolist()}")


def _positions_from_cu(cu: torch.Tensor, t: int | None) -> torch.Tensor:
    """Positions restarting at 0 at each ``cu_seqlens`` boundary."""
    cu = cu.long()
    n_tok = int(cu[-1]) if t is None else t
    lens = cu[1:] - cu[:-1]
    starts = torch.repeat_interleave(cu[:-1], lens, output_size=n_tok)
    return torch.arange(n_tok, device=cu.device) - starts


def build_model(cfg: ModelConfig, *, pre_process: bool | None = None, post_process: bool | None = None,
                layer_range: tuple[int, int] | None = None, device: torch.device | str | None = None,
                init_weights: bool = True, master_dtype: torch.dtype | None = None) -> R4BModel:
    """Build this rank's stage of the model described by ``cfg``.

    Process groups come from megatron's ``parallel_state`` (a one-process TP=1/PP=1 world is set
    up when nothing is initialised).  ``pre_process`` / ``post_process`` / ``layer_range``
    default to this rank's pipeline stage (layers split evenly, earlier stages taking the
    remainder); pass them to build a stage explicitly.  Weights are drawn on CPU from the
    default torch generator (``init_weights=False`` skips that, for loading checkpoints) and
    the model is then moved to ``device``.  ``master_dtype`` stores the parameters in another
    dtype than ``cfg.params_dtype`` (fp32 master weights; the compute dtype stays
    ``cfg.params_dtype`` and is ``model.compute_dtype``).
    """
    from .pipeline import stage_layer_range

    ensure_model_parallel()
    info = parallel_info()
    if pre_process is None:
        pre_process = info.pp_rank == 0
    if post_process is None:
        post_process = info.pp_rank == info.pp_size - 1
    if layer_range is None:
        layer_range = stage_layer_range(cfg.lm.num_layers, info.pp_rank, info.pp_size)
    model = R4BModel(cfg, pre_process=pre_process, post_process=post_process,
                     layer_range=layer_range, init_weights=init_weights, device=device,
                     master_dtype=master_dtype)
    if device is not None:
        model = model.to(device)
    return model
