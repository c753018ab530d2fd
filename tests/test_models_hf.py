"""HF interop of the language model: parity with transformers' Qwen3, bit-exact round trips,
sharded checkpoints, and errors that list what is wrong."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from r4b.models import HFLoadError, from_hf, read_hf_config, to_hf
from r4b.models.hf import SafetensorsReader

transformers = pytest.importorskip("transformers")


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Random weights everywhere, norm scales around 1 (so a swapped norm would show)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=g))


def make_hf_qwen3(path, *, tie: bool, kv_heads: int = 2, heads: int = 4, seed: int = 0,
                  dtype=torch.float32, vocab: int = 96, layers: int = 2, max_pos: int = 64):
    """A tiny random transformers Qwen3ForCausalLM saved (safetensors) to ``path``."""
    cfg = transformers.Qwen3Config(
        vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=16,
        max_position_embeddings=max_pos, rms_norm_eps=1e-6, tie_word_embeddings=tie,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        attn_implementation="eager")
    torch.manual_seed(seed)
    model = transformers.Qwen3ForCausalLM(cfg).eval()
    _randomize(model, seed)
    if tie:
        model.tie_weights()
    model = model.to(dtype)
    model.save_pretrained(str(path), safe_serialization=True)
    return model


def _tensors(path) -> dict[str, torch.Tensor]:
    r = SafetensorsReader(path)
    return {k: r[k] for k in r}


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["gqa1", "gqa2", "gqa4"])
def test_logits_match_transformers(tmp_path, tie, kv_heads):
    ref = make_hf_qwen3(tmp_path, tie=tie, kv_heads=kv_heads, seed=kv_heads + 10 * tie)
    model = from_hf(tmp_path).eval()
    ids = torch.randint(0, 96, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(input_ids=ids).logits
        got = model(input_ids=ids)
    assert got.shape == want.shape == (2, 13, 96)
    err = (got - want).abs().max().item()
    assert err <= 1e-4, f"max |logits - transformers| = {err}"


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_round_trip_bit_exact(tmp_path, tie, dtype):
    src, dst = tmp_path / "src", tmp_path / "dst"
    make_hf_qwen3(src, tie=tie, dtype=dtype, seed=3)
    model = from_hf(src)
    assert next(model.parameters()).dtype == dtype
    to_hf(model, dst)
    a, b = _tensors(src), _tensors(dst)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    # the exported directory loads in transformers and computes the same logits
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(dst), dtype=torch.float32,
                                                             attn_implementation="eager").eval()
    ids = torch.randint(0, 96, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = ref(input_ids=ids).logits
        got = from_hf(dst, dtype=torch.float32)(input_ids=ids)
    assert (got - want).abs().max().item() <= 1e-4


def test_sharded_checkpoint_round_trip(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    ref = make_hf_qwen3(src, tie=False, seed=4)
    ref.save_pretrained(str(src), safe_serialization=True, max_shard_size="40KB")
    assert (src / "model.safetensors.index.json").exists()
    model = from_hf(src)
    to_hf(model, dst, max_shard_bytes=40_000)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    a, b = _tensors(src), _tensors(dst)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_config_translation(tmp_path):
    make_hf_qwen3(tmp_path, tie=True, kv_heads=1, max_pos=48)
    cfg, raw = read_hf_config(tmp_path)
    lm = cfg.lm
    assert (lm.vocab_size, lm.hidden_size, lm.intermediate_size, lm.num_layers) == (96, 64, 96, 2)
    assert (lm.num_heads, lm.num_kv_heads, lm.head_dim) == (4, 1, 16)
    assert lm.rope_theta == 10000.0 and lm.max_position_embeddings == 48 and lm.tie_word_embeddings
    assert cfg.vision is None and raw["architectures"] == ["Qwen3ForCausalLM"]


def _rewrite_weights(path, fn):
    f = path / "model.safetensors"
    sd = fn(load_file(str(f)))
    save_file(sd, str(f), metadata={"format": "pt"})


def test_unknown_architecture_raises(tmp_path):
    make_hf_qwen3(tmp_path, tie=True)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["architectures"] = ["MistralForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unknown architecture 'MistralForCausalLM'"):
        from_hf(tmp_path)


def test_missing_unexpected_and_mismatched_keys_are_listed(tmp_path):
    make_hf_qwen3(tmp_path, tie=False)

    def damage(sd):
        del sd["model.layers.1.mlp.up_proj.weight"]
        del sd["model.norm.weight"]
        sd["model.layers.0.self_attn.rotary.extra"] = torch.zeros(3)
        sd["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(16, 64)  # want (32, 64)
        return sd

    _rewrite_weights(tmp_path, damage)
    with pytest.raises(HFLoadError) as e:
        from_hf(tmp_path)
    msg = str(e.value)
    for needle in ("model.layers.1.mlp.up_proj.weight".removeprefix("model."), "norm.weight",
                   "layers.0.self_attn.rotary.extra", "layers.0.self_attn.k_proj.weight",
                   "expected (32, 64), got (16, 64)", "missing keys (2)", "unexpected keys (1)"):
        assert needle in msg, (needle, msg)


def test_foreign_top_level_key_is_unexpected(tmp_path):
    make_hf_qwen3(tmp_path, tie=True)
    _rewrite_weights(tmp_path, lambda sd: {**sd, "visual.proj.weight": torch.zeros(2)})
    with pytest.raises(HFLoadError, match="visual.proj.weight"):
        from_hf(tmp_path)


def test_tied_checkpoint_with_differing_lm_head_raises(tmp_path):
    make_hf_qwen3(tmp_path, tie=True)
    _rewrite_weights(tmp_path, lambda sd: {**sd, "lm_head.weight": torch.zeros(96, 64)})
    with pytest.raises(HFLoadError, match="lm_head.weight"):
        from_hf(tmp_path)
    # an exact copy of the embedding is accepted
    _rewrite_weights(tmp_path, lambda sd: {**sd, "lm_head.weight": sd["model.embed_tokens.weight"].clone()})
    from_hf(tmp_path)


def test_rope_scaling_is_rejected(tmp_path):
    make_hf_qwen3(tmp_path, tie=True)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="only plain RoPE"):
        from_hf(tmp_path)
