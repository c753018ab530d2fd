"""Checks made before the first long stage: every data item can be prompted, its images are of
a size the model takes, and its longest prompt plus the largest response budget fits the
rollout engine.  Errors name the item (file and row for data files), the field and the limit;
bad items are an error, or skipped and counted with ``skip_bad_rows``, and a run never starts
on zero items.  The readers (:mod:`r4b.data.readers`) have already checked the rows
themselves (types, ids unique, images decodable and bounded)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from .data import Sample
from .errors import JobError
from .log import get_logger

log = get_logger(__name__)


class PreflightError(JobError, ValueError):
    """An item the run cannot use; the message names it, the field and the limit."""


@dataclass
class PreflightReport:
    """What the dry pass found."""

    items: int = 0
    kept: int = 0
    skipped: int = 0
    longest_prompt: int = 0
    max_seqlen: int = 0
    errors: list[str] = field(default_factory=list)
    """The first problems found (at most 20)."""


def _where(it: Sample, k: int) -> str:
    src = getattr(it, "source", None)
    return src or f"item {k} (uid {it.uid!r})"


def check_items(items: Sequence[Sample], template, cfg, *, largest_budget: int,
                max_seqlen: int | None, skip_bad: bool = False, what: str = "items"
                ) -> tuple[list[Sample], PreflightReport]:
    """Dry pass over ``items`` (see the module docstring); returns the usable items.

    ``max_seqlen``: the engine's explicit limit (None: ``lm.max_position_embeddings``)."""
    cap = cfg.lm.max_position_embeddings if max_seqlen is None else max_seqlen
    rep = PreflightReport(items=len(items), max_seqlen=cap)
    kept: list[Sample] = []
    seen: dict[str, int] = {}
    for k, it in enumerate(items):
        try:
            if it.uid in seen:
                raise PreflightError(f"{_where(it, k)}: field 'uid': {it.uid!r} is also the id of "
                                     f"{_where(items[seen[it.uid]], seen[it.uid])}")
            seen[it.uid] = k
            _check_item(it, k, template, cfg, cap, largest_budget, rep)
            kept.append(it)
        except PreflightError as e:
            if not skip_bad:
                raise
            rep.skipped += 1
            if len(rep.errors) < 20:
                rep.errors.append(str(e))
    rep.kept = len(kept)
    if rep.skipped:
        log.warning("preflight: skipped %d of %d %s; first: %s", rep.skipped, rep.items, what,
                    rep.errors[0])
    if not kept:
        raise PreflightError(f"preflight: none of the {rep.items} {what} is usable"
                             + (f"; first problems: {rep.errors[:3]}" if rep.errors else ""))
    log.info("preflight: %d %s usable, longest prompt %d tokens (+ response budget %d) of the "
             "engine's %d", rep.kept, what, rep.longest_prompt, largest_budget, cap)
    return kept, rep


def _check_item(it: Sample, k: int, template, cfg, cap: int, budget: int,
                rep: PreflightReport) -> None:
    from .data.images import num_image_tokens

    where = _where(it, k)
    if it.images and cfg.vision is None:
        raise PreflightError(f"{where}: field 'images': the model is text-only but the item has "
                             f"{len(it.images)} images")
    for j, im in enumerate(it.images):
        h, w = (int(x) for x in im.shape[-2:])
        if cfg.image_layout == "tile" and tuple(im.shape) != (cfg.vision.num_channels,
                                                              cfg.vision.image_size,
                                                              cfg.vision.image_size):
            raise PreflightError(f"{where}: field 'images[{j}]': shape {tuple(im.shape)}, the "
                                 f"model takes ({cfg.vision.num_channels}, "
                                 f"{cfg.vision.image_size}, {cfg.vision.image_size}) tiles "
                                 f"(image_layout 'tile')")
        try:
            num_image_tokens(h, w, cfg)
        except ValueError as e:
            raise PreflightError(f"{where}: field 'images[{j}]': {e}") from None
    try:
        n = len(template.item_prompt_ids(it, "no_think"))  # the longest mode prefix
        if it.reasoning and it.reasoning.strip():
            template.item_sft_example(it, it.reasoning, prompt_mode="think")
        template.item_sft_example(it, None, prompt_mode="no_think")
    except (TypeError, ValueError) as e:
        raise PreflightError(f"{where}: field 'question' / 'answer' / 'reasoning': {e}") from None
    rep.longest_prompt = max(rep.longest_prompt, n)
    if n + budget + 2 > cap:
        raise PreflightError(f"{where}: prompt of {n} tokens + response budget {budget} (+2 "
                             f"forced) exceeds the rollout engine's {cap} tokens "
                             f"(rollout.max_seqlen / lm.max_position_embeddings)")
