"""Export a run's checkpoint as a transformers checkpoint:
``torchrun --nproc-per-node <tp_size> -m r4b.export --run_dir runs/bpo --out_dir DIR``.

The run's ``job.json`` rebuilds the model; its latest checkpoint (any DP size) is loaded
on as many processes as the run's TP size, TP shards are gathered, and the directory gets the
weights in the model's compute dtype (``--dtype`` to choose another), ``config.json`` in the
layout ``transformers`` loads (``LlavaOnevisionForConditionalGeneration`` /
``RForConditionalGeneration`` / ``Qwen3ForCausalLM``), and the run's tokenizer files when it had
a tokenizer directory.  ``from_pretrained(DIR)`` loads it; its logits are the run's.
"""

from __future__ import annotations

import json
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
    """Where to write the transformers checkpoint (created; existing files are replaced)."""
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

    model = build_model(cfg, init_weights=False, device=rt.device, master_dtype=torch.float32)
    load_checkpoint(ck, model=model, restore_rng_state=False)
    out = Path(cli.out_dir)
    to_hf(model, out, dtype=cli.dtype or cfg.params_dtype)
    tok_dir = setup.model.tokenizer_dir()
    if rt.is_main and tok_dir is not None:
        copy_tokenizer_files(tok_dir, out)
    log.info("exported %s (step %s) to %s", ck, json.loads((ck / "meta.json").read_text())["step"],
             out)
    return out


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
