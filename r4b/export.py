"""Export a run's checkpoint as a transformers checkpoint:
``torchrun --nproc-per-node <tp_size> -m r4b.export --run_dir runs/bpo --out_dir DIR``.

The run's ``job.json`` rebuilds the model; its latest checkpoint (any DP size) is loaded
on as many processes as the run's TP size, TP shards are gathered, and the directory gets the
weights in the model's compute dtype (``--dtype`` to choose another), ``config.json`` in the
layout ``transformers`` loads (``LlavaOnevisionForConditionalGeneration`` /
``RForConditionalGeneration`` / ``Qwen3ForCausalLM``), and the run's tokenizer files when it had
a tokenizer directory, ``generation_config.json`` (end of turn and end of text as
``eos_token_id``, the pad token: what ``generate`` needs to stop where r4b's engine stops), and
``r4b_export.json`` naming the run, the checkpoint and its step.  ``from_pretrained(DIR)``
loads it; its logits are the run's.

The folder is written beside ``out_dir`` and renamed into place when complete.  An existing
non-empty ``out_dir`` is refused unless ``--replace True``, which replaces it as a whole (no
old shard, index or tokenizer file stays beside the new weights).
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .config import parse_cli, require_choice
from .log import get_logger, setup_logging

log = get_logger(__name__)


@dataclass(kw_only=True)
class ExportCLI:
    """``torchrun --nproc-per-node <tp> -m r4b.export``: a run's checkpoint as transformers'."""

    run_dir: str = "runs/bpo"
    """Run directory of r4b.pretrain_bpo or r4b.anneal (holds ``job.json`` and ``ckpt/``)."""
    out_dir: str = "runs/bpo/hf"
    """Where to write the transformers checkpoint (a new or empty folder; see ``replace``)."""
    replace: bool = False
    """Replace an existing non-empty ``out_dir`` as a whole (without it such a folder is
    refused)."""
    dtype: str | None = None
    """Tensor dtype: float32, bfloat16 or float16; None: the model's compute dtype."""
    checkpoint: str | None = None
    """A checkpoint folder to export instead of the run's latest."""

    def __post_init__(self):
        if self.dtype is not None:
            require_choice("dtype", self.dtype, ("float32", "bfloat16", "float16"))


def export(cli: ExportCLI, rt) -> Path:
    """Load the run's checkpoint into this rank's shards and write ``cli.out_dir``."""
    from .checkpoint import latest_checkpoint, load_checkpoint
    from .components import Setup, make_tokenizer, model_config
    from .data.tokenizer import copy_tokenizer_files
    from .config import config_from_dict
    from .models import build_model, to_hf

    run = Path(cli.run_dir)
    job = json.loads((run / "job.json").read_text())
    setup = config_from_dict(Setup, job["setup"])
    if setup.tp_size != rt.tp_size:
        raise ValueError(f"{run} was trained at tensor-parallel size {setup.tp_size}; launch "
                         f"the export with --nproc-per-node {setup.tp_size} (got {rt.tp_size})")
    tok = make_tokenizer(setup.model)
    cfg = model_config(setup.model, tok, setup.task, tp_size=setup.tp_size)
    ck = Path(cli.checkpoint) if cli.checkpoint else latest_checkpoint(run / "ckpt")
    if ck is None:
        raise FileNotFoundError(f"{run / 'ckpt'} holds no checkpoint to export")
    import torch

    out = Path(cli.out_dir)
    check_out_dir(out, replace=cli.replace)
    model = build_model(cfg, init_weights=False, device=rt.device, master_dtype=torch.float32)
    load_checkpoint(ck, model=model, restore_rng_state=False)
    step = json.loads((ck / "meta.json").read_text())["step"]
    tmp = out.parent / f".{out.name}.export-tmp"
    if rt.is_main:
        out.parent.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
    _barrier(rt)
    to_hf(model, tmp, dtype=cli.dtype or cfg.params_dtype)
    _barrier(rt)
    if rt.is_main:
        tok_dir = setup.model.tokenizer_dir()
        if tok_dir is not None:
            copy_tokenizer_files(tok_dir, tmp)
        _write_json(tmp / "generation_config.json", generation_config(tok))
        _write_json(tmp / "r4b_export.json", {"run_dir": str(run), "checkpoint": str(ck),
                                              "step": step,
                                              "dtype": cli.dtype or cfg.params_dtype})
        from .rundir import replace_dir

        replace_dir(tmp, out)
    _barrier(rt)
    log.info("exported %s (step %s) to %s", ck, step, out)
    return out


def check_out_dir(out: Path, *, replace: bool) -> None:
    """``out_dir`` must be new, an empty folder, or (with ``replace``) a folder to replace."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir {str(out)!r} is a file; expected a folder for the export")
    if out.is_dir() and any(out.iterdir()) and not replace:
        raise ValueError(f"out_dir {str(out)!r} is not empty; pass --replace True to replace "
                         f"it as a whole, or choose another out_dir")


def generation_config(tok) -> dict:
    """``generation_config.json`` from the tokenizer's special tokens: generation stops at the
    end of turn (``<|im_end|>``) or at end of text, and pads with the pad token."""
    eos = [tok.im_end_id] + ([tok.eos_id] if tok.eos_id != tok.im_end_id else [])
    cfg = {"eos_token_id": eos, "pad_token_id": tok.pad_id}
    bos = getattr(getattr(tok, "hf", None), "bos_token_id", None)
    if bos is not None:
        cfg["bos_token_id"] = bos
    return cfg


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1) + "\n")


def _barrier(rt) -> None:
    import torch.distributed as dist

    if rt.world_size > 1 and dist.is_initialized():
        dist.barrier()


def main(argv: Sequence[str] | None = None) -> int:
    import torch.distributed as dist

    from .runtime import init_runtime, run_entry

    setup_logging()
    cli = parse_cli(ExportCLI, argv, prog="torchrun --nproc-per-node <tp_size> -m r4b.export",
                    description="Export an r4b run's checkpoint as a transformers checkpoint.")
    # (checked here, not in ExportCLI: the parser builds the default ExportCLI first)
    job = Path(cli.run_dir) / "job.json"
    if not job.is_file():
        log.error("run_dir %r holds no job.json: not a run directory", cli.run_dir)
        return 1
    rt = init_runtime(json.loads(job.read_text())["setup"]["tp_size"])
    try:
        return run_entry(export, cli, rt, also=(FileNotFoundError, ValueError))
    finally:
        # as the other entry points: not at interpreter exit, where a gloo worker can abort
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
