"""Real defaults for real checkpoints: preset ``auto`` (the default; the network from the
checkpoint), ``r4b-4b``'s width check, and the shipped recipe ``recipes/r4b-4b.toml``: every
value tagged with its source, parsed by the same checks as the command line, and used by the
README's GPU command.  (The command itself runs on CPU at cut depth in
``tests/test_real_path.py``.)"""

from __future__ import annotations

import logging
import re
import shlex
import sys
import tomllib
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import real_r4b as R  # noqa: E402

from r4b.components import ModelChoice, make_tokenizer, model_config  # noqa: E402
from r4b.config import parse_cli  # noqa: E402
from r4b.data import TaskConfig  # noqa: E402
from r4b.pretrain_bpo import BPOJob  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "r4b-4b.toml"
TAGS = ("[paper]", "[plan]", "[reason]")

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe")
    return R.make_tokenizer(root / "tok"), R.make_checkpoint(root / "ckpt", widths="small")


def test_auto_is_the_default_and_takes_the_network_from_the_checkpoint(small):
    from r4b.models import read_hf_config
    from r4b.models.hf import SafetensorsReader

    tok_dir, ckpt = small
    assert ModelChoice().preset == "auto"
    choice = ModelChoice(hf_path=str(ckpt), tokenizer_path=str(tok_dir))
    cfg = model_config(choice, make_tokenizer(choice), TaskConfig())
    want, _ = read_hf_config(str(ckpt), keys=list(SafetensorsReader(str(ckpt))))
    assert cfg == want and cfg.lm.hidden_size == 64 and cfg.lm.vocab_size == R.VOCAB
    # the embedded default is unchanged: auto without a checkpoint is the tiny model
    tiny = ModelChoice(preset="tiny")
    auto = ModelChoice()
    assert (model_config(auto, make_tokenizer(auto), TaskConfig())
            == model_config(tiny, make_tokenizer(tiny), TaskConfig()))


def test_r4b_4b_still_checks_widths(small):
    tok_dir, ckpt = small
    choice = ModelChoice(preset="r4b-4b", hf_path=str(ckpt), tokenizer_path=str(tok_dir))
    with pytest.raises(ValueError, match="other widths: lm.hidden_size: 64 .preset 2560.") as e:
        model_config(choice, make_tokenizer(choice), TaskConfig())
    assert "model.preset at 'auto'" in str(e.value) and "'tiny'" not in str(e.value)


def test_tiny_with_a_checkpoint_reads_as_auto_with_a_warning(small):
    tok_dir, ckpt = small
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("r4b.components")
    logger.addHandler(handler)
    try:
        choice = ModelChoice(preset="tiny", hf_path=str(ckpt), tokenizer_path=str(tok_dir))
    finally:
        logger.removeHandler(handler)
    assert choice.preset == "auto"
    assert any("names the embedded toy model" in r.getMessage() for r in records)


def test_recipe_values_are_tagged_with_their_source():
    """Every ``key = value`` line has a comment naming where it comes from, in the comment
    block right above it (blank lines end a block)."""
    block: list[str] = []
    untagged = []
    for line in RECIPE.read_text().splitlines():
        s = line.strip()
        if not s:
            block = []
        elif s.startswith("#"):
            block.append(s)
        elif s.startswith("["):
            block = []
        else:
            key = s.split("=", 1)[0].strip()
            if not any(t in c for c in block for t in TAGS):
                untagged.append(key)
    assert not untagged, f"recipe values without a [paper] / [plan] / [reason] comment: {untagged}"


def test_recipe_parses_and_sets_paper_scale_values():
    raw = tomllib.loads(RECIPE.read_text())
    job = parse_cli(BPOJob, ["--config", str(RECIPE)])
    default = BPOJob()
    assert job.rl.max_new_tokens_think >= 4096 and job.eval.max_new_tokens_think >= 4096
    assert job.rl.max_new_tokens_no_think >= 1024
    assert job.rl.lr == raw["rl"]["lr"] and job.rl.lr < default.rl.lr
    assert job.anneal.optim.lr == raw["anneal"]["optim"]["lr"] < default.anneal.optim.lr
    assert job.anneal.curation_samples == 8  # the paper's N
    assert job.rl.group_size == raw["rl"]["group_size"]
    assert job.rl.prompts_per_step == raw["rl"]["prompts_per_step"]
    assert job.setup.rollout.kv_budget_tokens == raw["setup"]["rollout"]["kv_budget_tokens"]
    assert job.setup.model.preset == "auto" and job.setup.model.hf_path is None
    # flags after --config override it
    cut = parse_cli(BPOJob, ["--config", str(RECIPE), "--rl.max_new_tokens_think", "4"])
    assert cut.rl.max_new_tokens_think == 4 and cut.rl.lr == job.rl.lr


def _readme_gpu_command() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## GPU recipe", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return shlex.split(block.replace("\\\n", " "))


def test_readme_gpu_command_uses_the_recipe(small, tmp_path):
    """The README's command line, with its placeholder paths replaced, parses into the job the
    recipe describes."""
    tok_dir, ckpt = small
    argv = _readme_gpu_command()
    assert argv[:4] == ["torchrun", "--nproc-per-node", "8", "-m"] and argv[4] == "r4b.pretrain_bpo"
    args = argv[5:]
    assert "--config" in args and args[args.index("--config") + 1] == "recipes/r4b-4b.toml"
    data = R.write_images_parquet(tmp_path / "data")
    subst = {"recipes/r4b-4b.toml": str(RECIPE), "/path/to/R-4B": str(ckpt),
             "/path/to/math.parquet": str(data)}
    args = [subst.get(a, a) for a in args]
    assert str(ckpt) in args and str(data) in args, args
    job = parse_cli(BPOJob, args + ["--setup.model.tokenizer_path", str(tok_dir)])
    recipe = parse_cli(BPOJob, ["--config", str(RECIPE)])
    assert job.rl == recipe.rl and job.anneal == recipe.anneal and job.eval == recipe.eval
    assert job.setup.tp_size == 2 and job.setup.training.recompute == "selective"
