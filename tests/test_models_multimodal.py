"""Multimodal composition: image features spliced at the placeholders, LLaVA-OneVision / R-4B
checkpoint layout round trips, packed and cached paths with images, and clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from r4b.models import HFLoadError, ImageBatch, LMConfig, ModelConfig, build_model, from_hf, to_hf
from r4b.models.vision import VisionConfig

VOCAB, IMG = 64, 63  # image placeholder id = last id
TPI = 4  # 8-px tiles, 4-px patches


def tiny_mm(seed: int = 0, *, tie: bool = True, pre_norm: bool = True, newline: bool = False):
    cfg = ModelConfig(
        lm=LMConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=64,
                    tie_word_embeddings=tie),
        vision=VisionConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                            patch_size=4, image_size=8, feature_layer=2),
        image_token_id=IMG, projector_pre_norm=pre_norm, image_newline=newline)
    torch.manual_seed(seed)
    model = build_model(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name == "image_newline":
                p.uniform_(0.5, 1.5)
    return model


def _ids_with_images(n_text: int, n_img: int, g: torch.Generator, tiles=None) -> torch.Tensor:
    """Text tokens with ``n_img`` placeholder runs (``tiles[i] * TPI`` tokens each) spread out."""
    tiles = tiles or [1] * n_img
    parts = [torch.randint(0, IMG, (2,), generator=g)]
    for t in tiles:
        parts += [torch.full((t * TPI,), IMG), torch.randint(0, IMG, (n_text,), generator=g)]
    return torch.cat(parts)


def _layer_input(model, **kw):
    """Run the model and return the hidden states entering the first decoder layer."""
    got = {}

    def keep(module, args):
        got["x"] = args[0].detach().clone()

    h = model.language_model.layers[0].register_forward_pre_hook(keep)
    try:
        out = model(**kw)
    finally:
        h.remove()
    return got["x"], out


def test_image_features_land_at_placeholders_in_order():
    model = tiny_mm(1).eval()
    g = torch.Generator().manual_seed(0)
    rows = [_ids_with_images(3, 2, g), _ids_with_images(3, 1, g)]
    rows[1] = torch.cat([rows[1], torch.randint(0, IMG, (rows[0].numel() - rows[1].numel(),), generator=g)])
    ids = torch.stack(rows)  # [2, S]: 2 images in row 0, 1 in row 1
    pixels = torch.randn(3, 3, 8, 8, generator=g)
    with torch.no_grad():
        x, logits = _layer_input(model, input_ids=ids, images=pixels)
        feats = model.projector(model.vision_tower(pixels)).reshape(-1, 64)  # [3*TPI, H]
        emb = model.language_model.embed_tokens.weight
    flat = ids.reshape(-1)
    ph = (flat == IMG).nonzero().squeeze(1)
    assert ph.numel() == 3 * TPI
    torch.testing.assert_close(x[ph], feats, rtol=0, atol=0)
    text = (flat != IMG).nonzero().squeeze(1)
    torch.testing.assert_close(x[text], emb[flat[text]], rtol=0, atol=0)
    assert logits.shape == (2, ids.shape[1], VOCAB)
    # a per-sample list of images is the same batch
    with torch.no_grad():
        x2, _ = _layer_input(model, input_ids=ids, images=[pixels[:2], pixels[2:]])
    torch.testing.assert_close(x2, x, rtol=0, atol=0)


def test_multi_tile_images_fill_tiles_times_tokens():
    model = tiny_mm(2).eval()
    g = torch.Generator().manual_seed(1)
    ids = _ids_with_images(2, 2, g, tiles=[2, 1])[None]
    pixels = torch.randn(3, 3, 8, 8, generator=g)
    batch = ImageBatch(pixels, tiles_per_image=torch.tensor([2, 1]))
    assert batch.num_images == 2 and batch.num_tiles == 3
    with torch.no_grad():
        x, _ = _layer_input(model, input_ids=ids, images=batch)
        feats = model.projector(model.vision_tower(pixels)).reshape(-1, 64)
    torch.testing.assert_close(x[ids[0] == IMG], feats, rtol=0, atol=0)
    with pytest.raises(ValueError, match="tiles_per_image must be positive counts summing to N_tiles=3"):
        ImageBatch(pixels, tiles_per_image=torch.tensor([1, 1]))


def test_placeholder_count_mismatch_raises():
    model = tiny_mm(3)
    g = torch.Generator().manual_seed(2)
    ids = _ids_with_images(3, 2, g)[None]
    with pytest.raises(ValueError, match=r"input_ids hold 8 image tokens .* but 1 images with 1 tiles "
                                         r"need 1 x 4 \(tokens_per_image\) = 4"):
        model(input_ids=ids, images=torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="hold 8 image tokens .* but 0 images"):
        model(input_ids=ids)
    with pytest.raises(ValueError, match=r"pixel_values must have shape \[N, 3, 8, 8\]"):
        model(input_ids=_ids_with_images(1, 1, g)[None], images=torch.randn(1, 3, 16, 16))


def test_packed_multimodal_equals_each_sequence_alone():
    model = tiny_mm(4).eval()
    g = torch.Generator().manual_seed(3)
    seqs = [_ids_with_images(3, 1, g), torch.randint(0, IMG, (5,), generator=g), _ids_with_images(2, 2, g)]
    pix = [torch.randn(1, 3, 8, 8, generator=g), None, torch.randn(2, 3, 8, 8, generator=g)]
    lens = [len(s) for s in seqs]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    with torch.no_grad():
        packed = model(input_ids=torch.cat(seqs), cu_seqlens=cu, images=pix)
        for i, s in enumerate(seqs):
            alone = model(input_ids=s[None], images=pix[i])[0]
            torch.testing.assert_close(packed[cu[i]:cu[i + 1]], alone, rtol=1e-5, atol=1e-5)


def test_kv_cache_with_image_prefill_matches_full_forward():
    model = tiny_mm(5).eval()
    g = torch.Generator().manual_seed(4)
    prompts = [_ids_with_images(3, 1, g), _ids_with_images(1, 2, g)]
    pix = [torch.randn(1, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)]
    cache = model.new_kv_cache(2, 40)
    seqs, last = [p.clone() for p in prompts], {}
    with torch.no_grad():
        for i, p in enumerate(prompts):
            out = model(input_ids=p[None], kv_cache=cache, cache_rows=torch.tensor([i]), images=pix[i])
            torch.testing.assert_close(out, model(input_ids=p[None], images=pix[i]), rtol=1e-5, atol=1e-5)
            last[i] = out[0, -1]
        for _ in range(3):
            nxt = torch.stack([last[i][:IMG].argmax() for i in range(2)])
            out = model(input_ids=nxt[:, None], kv_cache=cache, cache_rows=torch.tensor([0, 1]))
            for i in range(2):
                seqs[i] = torch.cat([seqs[i], nxt[i:i + 1]])
                full = model(input_ids=seqs[i][None], images=pix[i])[0, -1]
                torch.testing.assert_close(out[i, 0], full, rtol=1e-5, atol=1e-5)
                last[i] = out[i, 0]


@pytest.mark.parametrize("tie,pre_norm,newline", [(True, True, False), (False, True, True),
                                                  (True, False, False)],
                         ids=["r4b-tied", "r4b-untied-newline", "llava-ov"])
def test_llava_onevision_layout_round_trip(tmp_path, tie, pre_norm, newline):
    model = tiny_mm(6, tie=tie, pre_norm=pre_norm, newline=newline)
    src, dst = tmp_path / "src", tmp_path / "dst"
    to_hf(model, src)
    sd = load_file(str(src / "model.safetensors"))
    prefixes = ("model.language_model.", "model.vision_tower.vision_model.", "model.multi_modal_projector.")
    assert all(k.startswith(prefixes) or k in ("lm_head.weight", "model.image_newline") for k in sd)
    assert "model.language_model.layers.1.self_attn.q_norm.weight" in sd
    assert "model.vision_tower.vision_model.encoder.layers.1.mlp.fc2.weight" in sd
    assert ("model.multi_modal_projector.pre_norm.weight" in sd) == pre_norm
    assert ("lm_head.weight" in sd) == (not tie)
    assert ("model.image_newline" in sd) == newline
    cfg = json.loads((src / "config.json").read_text())
    assert cfg["architectures"] == ["RForConditionalGeneration" if pre_norm else
                                    "LlavaOnevisionForConditionalGeneration"]
    assert cfg["text_config"]["model_type"] == "qwen3" and cfg["image_token_index"] == IMG
    assert cfg["vision_feature_layer"] == -1 and cfg["vision_config"]["num_hidden_layers"] == 2
    loaded = from_hf(src)
    assert loaded.cfg.projector_pre_norm == pre_norm and loaded.cfg.image_newline == newline
    assert loaded.cfg.vision.feature_layer == 2 and loaded.cfg.lm.tie_word_embeddings == tie
    to_hf(loaded, dst)
    sd2 = load_file(str(dst / "model.safetensors"))
    assert sorted(sd) == sorted(sd2)
    for k in sd:
        assert torch.equal(sd[k], sd2[k]), k
    g = torch.Generator().manual_seed(5)
    ids, pix = _ids_with_images(3, 1, g)[None], torch.randn(1, 3, 8, 8, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, images=pix), model(input_ids=ids, images=pix),
                                   rtol=0, atol=0)


def test_language_model_matches_transformers_on_spliced_embeddings(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = tiny_mm(7, tie=False).eval()
    to_hf(model, tmp_path / "mm")
    sd = load_file(str(tmp_path / "mm" / "model.safetensors"))
    text_cfg = json.loads((tmp_path / "mm" / "config.json").read_text())["text_config"]
    hf_cfg = transformers.Qwen3Config(**{k: v for k, v in text_cfg.items() if k not in ("model_type", "rope_theta")})
    ref = transformers.Qwen3ForCausalLM(hf_cfg).eval()
    lm_sd = {k.replace("model.language_model.", "model."): v for k, v in sd.items()
             if k.startswith("model.language_model.") or k == "lm_head.weight"}
    ref.load_state_dict(lm_sd, strict=True)
    g = torch.Generator().manual_seed(6)
    ids, pix = _ids_with_images(4, 2, g)[None], torch.randn(2, 3, 8, 8, generator=g)
    with torch.no_grad():
        x, got = _layer_input(model, input_ids=ids, images=pix)
        want = ref(inputs_embeds=x[None]).logits
    assert (got - want).abs().max().item() <= 1e-4


def test_vision_key_problems_are_listed(tmp_path):
    model = tiny_mm(8)
    to_hf(model, tmp_path)
    f = tmp_path / "model.safetensors"
    sd = load_file(str(f))
    del sd["model.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.bias"]
    sd["model.multi_modal_projector.linear_1.weight"] = torch.zeros(64, 31)
    sd["model.mm_extra.weight"] = torch.zeros(1)
    save_file(sd, str(f), metadata={"format": "pt"})
    with pytest.raises(HFLoadError) as e:
        from_hf(tmp_path)
    msg = str(e.value)
    assert "encoder.layers.0.self_attn.q_proj.bias" in msg
    assert "linear_1.weight" in msg and "model.mm_extra.weight" in msg


def test_image_token_id_must_be_in_vocab():
    with pytest.raises(ValueError, match="image_token_id must be in"):
        ModelConfig(lm=LMConfig(vocab_size=64), vision=tiny_mm(0).cfg.vision, image_token_id=64)
    with pytest.raises(ValueError, match="image_token_id must be set"):
        ModelConfig(lm=LMConfig(vocab_size=64), vision=tiny_mm(0).cfg.vision)
