"""Checkpoint layouts: every format transformers 5.x writes for LLaVA-OneVision, the R-4B hub
layout, depth cuts, and TP attributes of loaded models."""

from __future__ import annotations

import pytest
import torch

from r4b.models import build_model, from_hf, to_hf
from r4b.models.hf import LAYOUTS, detect_layout

transformers = pytest.importorskip("transformers")


def make_llava_ov(path, *, tie: bool, layers: int = 2, seed: int = 0,
                  original_format: bool = True, shard: str | None = None):
    """A tiny random transformers LlavaOnevisionForConditionalGeneration saved to ``path``."""
    tc = transformers.Qwen3Config(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=tie,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    vc = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=layers, num_attention_heads=2,
                                         patch_size=14, image_size=28, vision_use_head=False)
    cfg = transformers.LlavaOnevisionConfig(text_config=tc, vision_config=vc,
                                            image_token_index=127, vision_feature_layer=-1,
                                            tie_word_embeddings=tie)
    torch.manual_seed(seed)
    model = transformers.LlavaOnevisionForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    kw = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(str(path), save_original_format=original_format, **kw)
    return model


def _lm_params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in model.language_model.named_parameters()}


@pytest.mark.parametrize("original_format,shard,expect", [
    (True, None, "transformers-original"), (False, None, "transformers"),
    (True, "60KB", "transformers-original"), (False, "60KB", "transformers")],
    ids=["original", "internal", "original-sharded", "internal-sharded"])
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_every_transformers_save_format_loads_the_same_model(tmp_path, original_format, shard,
                                                             expect, tie):
    make_llava_ov(tmp_path / "src", tie=tie, original_format=original_format, shard=shard)
    model = from_hf(tmp_path / "src")
    assert model.hf_layout == expect
    # the hub layout written by to_hf reloads to identical weights
    to_hf(model, tmp_path / "hub")
    again = from_hf(tmp_path / "hub")
    assert again.hf_layout == "hub"
    a, b = dict(model.named_parameters()), dict(again.named_parameters())
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # and transformers reads the exported directory back to the same logits
    ref = transformers.LlavaOnevisionForConditionalGeneration.from_pretrained(
        str(tmp_path / "src")).eval()
    ids = torch.randint(0, 126, (1, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(input_ids=ids).logits
        got = again(input_ids=ids)
    assert (got - want).abs().max().item() <= 1e-4


def test_unknown_layout_names_what_was_looked_for():
    with pytest.raises(ValueError, match="unrecognised multimodal checkpoint layout"):
        detect_layout(["foo.embed_tokens.weight"], multimodal=True)
    names = [lay.name for lay in LAYOUTS]
    assert names.index("legacy") < names.index("transformers-original")


def test_depth_cut_loads_the_first_layers(tmp_path):
    ref = make_llava_ov(tmp_path, tie=True, layers=3)
    cut = from_hf(tmp_path, num_layers=1, vision_num_layers=2)
    assert cut.cfg.lm.num_layers == 1 and cut.cfg.vision.num_layers == 2
    assert cut.cfg.vision.feature_layer == 2  # the last kept tower layer feeds the projector
    assert cut.cfg.lm.hidden_size == 64 and cut.cfg.lm.vocab_size == 128
    sd = ref.state_dict()
    got = cut.language_model.layers[0].self_attn.o_proj.weight
    want = next(v for k, v in sd.items() if k.endswith("layers.0.self_attn.o_proj.weight")
                and "language_model" in k)
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="num_layers must be in"):
        from_hf(tmp_path, num_layers=4)


def test_missing_checkpoint_path_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        from_hf(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither model.safetensors"):
        from_hf(tmp_path / "empty")


def test_loaded_and_built_models_carry_the_same_tp_attributes(tmp_path):
    make_llava_ov(tmp_path, tie=False)
    loaded = from_hf(tmp_path)
    built = build_model(loaded.cfg)

    def attrs(m):
        return {k: (getattr(p, "tensor_model_parallel", False), getattr(p, "partition_dim", None))
                for k, p in m.named_parameters()}

    a = attrs(loaded)
    assert a == attrs(built)
    assert a["language_model.layers.0.self_attn.o_proj.weight"] == (True, 1)
    assert a["language_model.embed_tokens.weight"] == (True, 0)
    assert a["language_model.layers.0.input_layernorm.weight"][0] is False
