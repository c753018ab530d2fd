"""Multimodal composition: image features spliced at the placeholders, LLaVA-OneVision / R-4B
checkpoint layout round trips, packed and cached paths with images, and clear errors; the
AnyRes layout against transformers' LlavaOnevisionForConditionalGeneration (R-4B's tile
geometry and a small one, logits and gradients), in the packed, cached and TP=2 paths."""

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
    with pytest.raises(ValueError, match="hold 8 image tokens .* but 0 images .*; 8 placeholders "
                                         "from flat position 2 of input_ids are left over after "
                                         "the 0 images"):
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


# ---------------------------------------------------------------- AnyRes (LLaVA-OneVision / R-4B)
SMALL_PINS = tuple((h, w) for h in (8, 16, 24) for w in (8, 16, 24))  # 8-px tiles, 2x2 patches


def tiny_anyres(seed: int = 0, *, aspect: str = "anyres_max_2"):
    """``tiny_mm`` with LLaVA-OneVision AnyRes on 8-px tiles (4 features per tile) and a
    2-tile budget, so small images exercise the grid, the unpadding and the downscale."""
    cfg = ModelConfig(
        lm=LMConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=256),
        vision=VisionConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                            patch_size=4, image_size=8, feature_layer=2),
        image_token_id=IMG, image_newline=True, image_layout="anyres",
        image_grid_pinpoints=SMALL_PINS, vision_aspect_ratio=aspect)
    torch.manual_seed(seed)
    model = build_model(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def _rand_images(g: torch.Generator, sizes) -> list[torch.Tensor]:
    """Float [3, H, W] images in [0, 1] on the 1/255 grid (as the readers return them)."""
    return [torch.randint(0, 256, (3, h, w), generator=g).float() / 255 for h, w in sizes]


def _prompt(g: torch.Generator, counts, n_text: int = 3) -> torch.Tensor:
    parts = [torch.randint(0, IMG, (2,), generator=g)]
    for n in counts:
        parts += [torch.full((n,), IMG), torch.randint(0, IMG, (n_text,), generator=g)]
    return torch.cat(parts)


def test_anyres_image_token_counts_follow_the_processor():
    from r4b.data.images import num_image_tokens, process_prompt_images

    model = tiny_anyres(10)
    g = torch.Generator().manual_seed(10)
    sizes = [(8, 8), (5, 23), (23, 5), (19, 13), (40, 41), (1, 1)]
    for (h, w), im in zip(sizes, _rand_images(g, sizes)):
        p = process_prompt_images([im], model.cfg)[0]
        batch = ImageBatch.collate([p])
        assert batch.image_sizes.tolist() == [[h, w]]
        assert model.image_token_counts(batch) == [p.num_tokens == num_image_tokens(h, w, model.cfg)
                                                   and p.num_tokens]
        with torch.no_grad():
            assert model.encode_images(batch).shape == (p.num_tokens, 64)
    multi = process_prompt_images(_rand_images(g, sizes[:3]), model.cfg)
    assert [p.num_tiles for p in multi] == [1, 1, 1]
    assert model.image_token_counts(ImageBatch.collate(multi)) == [5, 5, 5]


def test_packed_anyres_equals_each_sequence_alone():
    from r4b.data.images import process_prompt_images

    model = tiny_anyres(11).eval()
    g = torch.Generator().manual_seed(11)
    groups = [[(19, 13)], None, [(5, 23), (40, 41)], [(40, 41)]]
    pix = [None if s is None else process_prompt_images(_rand_images(g, s), model.cfg) for s in groups]
    seqs = [torch.randint(0, IMG, (6,), generator=g) if p is None else
            _prompt(g, [q.num_tokens for q in p]) for p in pix]
    lens = [len(s) for s in seqs]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    with torch.no_grad():
        packed = model(input_ids=torch.cat(seqs), cu_seqlens=cu, images=pix)
        for i, s in enumerate(seqs):
            alone = model(input_ids=s[None], images=pix[i])[0]
            torch.testing.assert_close(packed[cu[i]:cu[i + 1]], alone, rtol=1e-5, atol=1e-5)
    # gradients reach the tower, the projector and image_newline through the layout
    packed = model(input_ids=torch.cat(seqs), cu_seqlens=cu, images=pix)
    packed.square().mean().backward()
    for name in ("image_newline", "vision_tower.patch_embedding.weight", "projector.linear_1.weight"):
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_kv_cache_with_anyres_prefill_matches_full_forward():
    from r4b.data.images import process_prompt_images

    model = tiny_anyres(12).eval()
    g = torch.Generator().manual_seed(12)
    pix = [process_prompt_images(_rand_images(g, [(40, 41)]), model.cfg),
           process_prompt_images(_rand_images(g, [(19, 13), (5, 23)]), model.cfg)]
    prompts = [_prompt(g, [p.num_tokens for p in ims]) for ims in pix]
    cache = model.new_kv_cache(2, 128)
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


def test_anyres_placeholder_errors_name_the_image():
    from r4b.data.images import process_prompt_images

    model = tiny_anyres(13)
    g = torch.Generator().manual_seed(13)
    a, b = (process_prompt_images(_rand_images(g, [s]), model.cfg)[0] for s in [(19, 13), (40, 41)])
    assert a.num_tokens != b.num_tokens
    # right total, wrong order: the first image does not fit its run
    ids = _prompt(g, [b.num_tokens, a.num_tokens])[None]
    with pytest.raises(ValueError, match=rf"image 0 \(19x13 pixels, height x width\) needs "
                                         rf"{a.num_tokens} consecutive placeholders, but the run at "
                                         rf"flat position 2 of input_ids holds {b.num_tokens}"):
        model(input_ids=ids, images=[a, b])
    # wrong total: expected and found counts, per image
    ids = _prompt(g, [a.num_tokens - 1])[None]
    with pytest.raises(ValueError, match=rf"input_ids hold {a.num_tokens - 1} image tokens \(id {IMG}\), "
                                         rf"but the 1 images need {a.num_tokens} \(per image: "
                                         rf"\[{a.num_tokens}\]\)"):
        model(input_ids=ids, images=[a])
    ids = _prompt(g, [a.num_tokens, 3])[None]
    with pytest.raises(ValueError, match=r"3 placeholders from flat position \d+ of input_ids are "
                                         r"left over after the 1 images"):
        model(input_ids=ids, images=[a])
    # tiles that do not match the image's size
    short = ImageBatch(torch.from_numpy(a.pixel_values[:-1]), torch.tensor([a.num_tiles - 1]),
                       torch.tensor([a.image_size]))
    with pytest.raises(ValueError, match=rf"image 0 \(19x13 pixels, height x width\) has "
                                         rf"{a.num_tiles - 1} tiles, but AnyRes needs 1 \+ 3 x 2 = "
                                         rf"{a.num_tiles} for its size"):
        model(input_ids=_prompt(g, [a.num_tokens])[None], images=short)
    with pytest.raises(ValueError, match="needs each image's original size: ImageBatch.image_sizes is None"):
        model(input_ids=_prompt(g, [a.num_tokens])[None],
              images=ImageBatch(torch.from_numpy(a.pixel_values), torch.tensor([a.num_tiles])))
    with pytest.raises(ValueError, match=r"image_sizes must be positive \(height, width\) pairs, one per image"):
        ImageBatch(torch.from_numpy(a.pixel_values), torch.tensor([a.num_tiles]), torch.tensor([[19, 13], [1, 1]]))


def test_tile_layout_errors_name_the_image():
    model = tiny_mm(14)
    g = torch.Generator().manual_seed(14)
    ids = _ids_with_images(2, 2, g, tiles=[1, 2])[None]  # runs of 4 then 8 placeholders
    batch = ImageBatch(torch.randn(3, 3, 8, 8, generator=g), tiles_per_image=torch.tensor([2, 1]))
    with pytest.raises(ValueError, match=r"image 0 needs 8 consecutive placeholders, but the run at "
                                         r"flat position 2 of input_ids holds 4"):
        model(input_ids=ids, images=batch)


def test_anyres_config_round_trips_through_checkpoints(tmp_path):
    model = tiny_anyres(15, aspect="anyres_max_3")
    model.cfg.image_mean = (0.25, 0.5, 0.75)
    to_hf(model, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    assert cfg["image_layout"] == "anyres" and cfg["vision_aspect_ratio"] == "anyres_max_3"
    assert cfg["image_grid_pinpoints"] == [list(p) for p in SMALL_PINS]
    loaded = from_hf(tmp_path / "a")
    for f in ("image_layout", "image_grid_pinpoints", "vision_aspect_ratio", "image_mean",
              "image_std", "image_newline"):
        assert getattr(loaded.cfg, f) == getattr(model.cfg, f), f
    assert torch.equal(loaded.image_newline, model.image_newline)
    # a tile model stays tile although its 8-px tiles would divide LLaVA-OneVision's pinpoints
    to_hf(tiny_mm(15, newline=True), tmp_path / "t")
    assert json.loads((tmp_path / "t" / "config.json").read_text())["image_layout"] == "tile"
    assert from_hf(tmp_path / "t").cfg.image_layout == "tile"
    # a transformers-written config (no image_layout) is anyres unless the tower cannot tile it
    for pins, want in ((SMALL_PINS, "anyres"), (((12, 12),), "tile")):
        d = json.loads((tmp_path / "a" / "config.json").read_text())
        d.pop("image_layout", None)
        d["image_grid_pinpoints"] = [list(p) for p in pins]
        (tmp_path / "a" / "config.json").write_text(json.dumps(d))
        assert from_hf(tmp_path / "a").cfg.image_layout == want


# ---------------------------------------------------------------- against transformers
def _hf_llava(path, *, image_size: int, patch_size: int, pinpoints, aspect: str, seed: int,
              max_pos: int):
    """A random transformers LlavaOnevisionForConditionalGeneration saved to ``path``, with
    norm weights near 1 and a non-zero image_newline so every part of the layout shows."""
    transformers = pytest.importorskip("transformers")
    tc = transformers.Qwen3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=max_pos,
        tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    vc = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, patch_size=patch_size,
                                         image_size=image_size, vision_use_head=False)
    cfg = transformers.LlavaOnevisionConfig(
        text_config=tc, vision_config=vc, image_token_index=IMG, vision_feature_layer=-1,
        vision_feature_select_strategy="full", image_grid_pinpoints=[list(p) for p in pinpoints],
        vision_aspect_ratio=aspect)
    torch.manual_seed(seed)
    ref = transformers.LlavaOnevisionForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("image_newline"):
                p.normal_(0, 1)
            else:
                p.normal_(0, 0.1)
    ref.save_pretrained(str(path))
    return ref


def _hf_pixels(images_u8, *, size: int, pinpoints):
    transformers = pytest.importorskip("transformers")
    from PIL import Image

    ip = transformers.LlavaOnevisionImageProcessorPil(
        size={"height": size, "width": size}, image_grid_pinpoints=[list(p) for p in pinpoints],
        image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return ip(images=[[Image.fromarray(u) for u in images_u8]], return_tensors="pt")


def _compare_with_transformers(ours, ref, sizes, g, *, size: int, pinpoints, grads: bool = False):
    """Logits (and optionally gradients) of one prompt holding images of ``sizes``."""
    from r4b.data.images import process_prompt_images

    u8 = [torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy() for h, w in sizes]
    mine = process_prompt_images([torch.from_numpy(u).permute(2, 0, 1).float() / 255 for u in u8],
                                 ours.cfg)
    hf = _hf_pixels(u8, size=size, pinpoints=pinpoints)
    ids = _prompt(g, [p.num_tokens for p in mine])[None]
    with torch.set_grad_enabled(grads):
        want = ref(input_ids=ids, pixel_values=hf["pixel_values"], image_sizes=hf["image_sizes"],
                   batch_num_images=hf["batch_num_images"]).logits
        got = ours(input_ids=ids, images=mine)
    err = (got - want).abs().max().item()
    if grads:
        w = torch.randn(want.shape, generator=g)
        (want * w).sum().backward()
        (got * w).sum().backward()
    return err, got.detach(), want.detach(), mine, hf


def test_anyres_matches_transformers_at_small_geometry(tmp_path):
    """Tiny tiles (8 px) and a 2-tile budget: many grids, both unpad axes and the downscale,
    logits and gradients of the tower, projector and image_newline."""
    ref = _hf_llava(tmp_path, image_size=8, patch_size=4, pinpoints=SMALL_PINS,
                    aspect="anyres_max_2", seed=20, max_pos=256)
    ours = from_hf(tmp_path).eval()
    assert ours.cfg.image_layout == "anyres" and ours.cfg.vision_aspect_ratio == "anyres_max_2"
    assert not ours.cfg.projector_pre_norm and ours.cfg.vision.feature_layer == 2
    g = torch.Generator().manual_seed(20)
    downscaled = 0
    for sizes in [[(8, 8)], [(5, 23)], [(23, 5)], [(19, 13)], [(40, 41)], [(1, 30)], [(19, 13), (40, 41)]]:
        err, got, want, mine, _ = _compare_with_transformers(ours, ref, sizes, g, size=8,
                                                             pinpoints=SMALL_PINS)
        assert err <= 1e-4, (sizes, err)
        assert want.abs().max() > 0.1  # the logits carry signal, so the bound means something
        from r4b.data.images import anyres_grid
        downscaled += len(sizes) == 1 and anyres_grid(*sizes[0], ours.cfg).downscaled
    assert downscaled >= 2
    ours.zero_grad()
    ref.zero_grad()
    err, *_ = _compare_with_transformers(ours, ref, [(19, 13)], g, size=8, pinpoints=SMALL_PINS,
                                         grads=True)
    assert err <= 1e-4
    ref_params = dict(ref.named_parameters())
    pairs = [("image_newline", "image_newline"),
             ("vision_tower.patch_embedding.weight", "embeddings.patch_embedding.weight"),
             ("projector.linear_1.weight", "multi_modal_projector.linear_1.weight")]
    for mine_name, ref_suffix in pairs:
        ref_name = next(k for k in ref_params if k.endswith(ref_suffix))
        a, b = ours.get_parameter(mine_name).grad, ref_params[ref_name].grad
        assert b.abs().sum() > 0, ref_name
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * (1 + b.abs().max().item()))


def test_a_wrong_layout_is_caught_by_the_comparison(tmp_path):
    """The comparison can fail: tiles in the wrong order, or no image_newline, are far off."""
    ref = _hf_llava(tmp_path, image_size=8, patch_size=4, pinpoints=SMALL_PINS,
                    aspect="anyres_max_2", seed=21, max_pos=256)
    ours = from_hf(tmp_path).eval()
    g = torch.Generator().manual_seed(21)
    err, got, want, mine, hf = _compare_with_transformers(ours, ref, [(19, 13)], g, size=8,
                                                          pinpoints=SMALL_PINS)
    assert err <= 1e-4
    ids = _prompt(torch.Generator().manual_seed(0), [mine[0].num_tokens])[None]
    with torch.no_grad():
        want = ref(input_ids=ids, pixel_values=hf["pixel_values"], image_sizes=hf["image_sizes"],
                   batch_num_images=hf["batch_num_images"]).logits
        pv = torch.from_numpy(mine[0].pixel_values)
        swapped = ImageBatch(pv[[0, 2, 1, 3, 4, 5, 6]], torch.tensor([7]), torch.tensor([[19, 13]]))
        assert (ours(input_ids=ids, images=swapped) - want).abs().max() > 1e-2
        ours.image_newline.zero_()
        assert (ours(input_ids=ids, images=mine) - want).abs().max() > 1e-2


@pytest.fixture(scope="module")
def r4b_geometry(tmp_path_factory):
    """A tiny random LLaVA-OneVision checkpoint with R-4B's tile geometry (384-px tiles, 14-px
    patches: 729 features per tile, LLaVA-OneVision's pinpoints, anyres_max_9)."""
    from r4b.models.config import LLAVA_ONEVISION_PINPOINTS

    path = tmp_path_factory.mktemp("r4b_geometry")
    ref = _hf_llava(path, image_size=384, patch_size=14, pinpoints=LLAVA_ONEVISION_PINPOINTS,
                    aspect="anyres_max_9", seed=22, max_pos=8192)
    return ref, from_hf(path).eval()


@pytest.mark.parametrize("sizes,tokens", [
    ([(384, 384)], [1485]), ([(480, 640)], [2929]), ([(768, 1024)], [4725]),
    ([(1080, 1920)], [7269]), ([(480, 640), (100, 2000)], [730, 730])],
    ids=["384x384", "640x480", "1024x768", "1920x1080", "two-images"])
def test_logits_match_transformers_at_r4b_geometry(r4b_geometry, sizes, tokens):
    """Sizes are (height, width); the ids name width x height."""
    from r4b.models.config import LLAVA_ONEVISION_PINPOINTS

    ref, ours = r4b_geometry
    assert ours.cfg.image_layout == "anyres" and ours.cfg.vision.tokens_per_image == 729
    assert ours.cfg.image_grid_pinpoints == LLAVA_ONEVISION_PINPOINTS
    g = torch.Generator().manual_seed(sum(h * w for h, w in sizes))
    err, got, want, mine, hf = _compare_with_transformers(ours, ref, sizes, g, size=384,
                                                          pinpoints=LLAVA_ONEVISION_PINPOINTS)
    assert [p.num_tokens for p in mine] == tokens
    # transformers pads pixel_values to [images, max tiles, ...]: here every image has as many
    assert [p.num_tiles for p in mine] == [hf["pixel_values"].shape[1]] * len(sizes)
    assert want.abs().max() > 0.1
    assert err <= 1e-4, err
    with torch.no_grad():  # the image features themselves, in placeholder order
        got = ours.encode_images(ImageBatch.collate(mine))
        want = torch.cat(ref.model.get_image_features(
            hf["pixel_values"], hf["image_sizes"], batch_num_images=hf["batch_num_images"]).pooler_output)
    assert got.shape == want.shape == (sum(tokens), 64)
    assert (got - want).abs().max().item() <= 1e-5


# ---------------------------------------------------------------- AnyRes under TP=2
def _tp_inputs(cfg):
    """A packed batch: a lone AnyRes image, text only, and a two-image (multi-image form) prompt."""
    from r4b.data.images import process_prompt_images

    g = torch.Generator().manual_seed(30)
    pix = [process_prompt_images(_rand_images(g, [(40, 41)]), cfg), None,
           process_prompt_images(_rand_images(g, [(19, 13), (5, 23)]), cfg)]
    seqs = [torch.randint(0, IMG, (5,), generator=g) if p is None else
            _prompt(g, [q.num_tokens for q in p]) for p in pix]
    cu = torch.tensor([0] + torch.tensor([len(s) for s in seqs]).cumsum(0).tolist(), dtype=torch.int32)
    return torch.cat(seqs), cu, pix, torch.randn(int(cu[-1]), VOCAB, generator=g)


def _tp_worker(root, world: int, rank: int) -> None:
    """Load the checkpoint at TP = ``world``, run forward + backward, save logits and the
    gradients of the replicated image_newline and of a TP-split projector weight."""
    from r4b.models import init_model_parallel

    init_model_parallel(world, 1, backend="gloo")
    model = from_hf(root / "src", tp_size=world)
    ids, cu, pix, w = _tp_inputs(model.cfg)
    logits = model(input_ids=ids, cu_seqlens=cu, images=pix)
    (logits * w).sum().backward()
    save_file({"logits": logits.detach().contiguous(),
               "newline_grad": model.image_newline.grad.contiguous(),
               "linear_2_grad": model.projector.linear_2.weight.grad.contiguous()},
              str(root / f"out_tp{world}_rank{rank}.safetensors"))


def test_anyres_under_tp2_matches_tp1(tmp_path):
    import os
    import subprocess
    import sys

    from r4b.models.parallel import free_port

    to_hf(tiny_anyres(31), tmp_path / "src")
    _tp_worker(tmp_path, 1, 0)
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, __file__, str(tmp_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT,
                              env=dict(os.environ, RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r),
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                                       OMP_NUM_THREADS="1"))
             for r in range(2)]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=240)[0].decode(errors="replace"))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for p, o in zip(procs, outs):
        assert p.returncode == 0, f"TP worker failed (rc={p.returncode}):\n{o[-4000:]}"
    ref = load_file(str(tmp_path / "out_tp1_rank0.safetensors"))
    assert ref["newline_grad"].abs().sum() > 0
    for rank in range(2):
        got = load_file(str(tmp_path / f"out_tp2_rank{rank}.safetensors"))
        torch.testing.assert_close(got["logits"], ref["logits"], rtol=1e-5, atol=1e-5)
        # image_newline is replicated: every rank holds the full gradient
        torch.testing.assert_close(got["newline_grad"], ref["newline_grad"], rtol=1e-4, atol=1e-5)
        # linear_2 is row-parallel: each rank holds its half of the input dimension
        half = ref["linear_2_grad"].shape[1] // 2
        torch.testing.assert_close(got["linear_2_grad"], ref["linear_2_grad"][:, rank * half:(rank + 1) * half],
                                   rtol=1e-4, atol=1e-5)


if __name__ == "__main__":  # a TP worker of test_anyres_under_tp2_matches_tp1
    import os
    import sys
    from pathlib import Path

    _tp_worker(Path(sys.argv[1]), int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"]))
