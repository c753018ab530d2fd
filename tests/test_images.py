"""Image processor and token counter (:mod:`r4b.data.images`) against transformers'
LLaVA-OneVision processor: placeholder counts for every size and for multi-image prompts,
bit-identical pixels, the fixed-tile layout unchanged, config validation and speed."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest

from r4b.data.images import (ImageLayout, anyres_grid, num_image_tokens, process_image,
                             process_prompt_images, prompt_image_tokens, select_best_resolution)
from r4b.models import ModelConfig, get_preset

transformers = pytest.importorskip("transformers")
Image = pytest.importorskip("PIL.Image")

R4B = get_preset("r4b-4b")
SIGLIP = dict(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
#: (width, height) -> R-4B's placeholder count, as transformers' processor gives it.
R4B_COUNTS = {(384, 384): 1485, (640, 480): 2929, (1024, 768): 4725, (1920, 1080): 7269}


def _hf_image_processor(**kw):
    """transformers' PIL-backed LLaVA-OneVision image processor (SigLIP normalisation unless
    overridden, as R-4B's preprocessor_config.json sets it)."""
    return transformers.LlavaOnevisionImageProcessorPil(**{**SIGLIP, **kw})


@pytest.fixture(scope="module")
def hf_processor():
    """A local LlavaOnevisionProcessor: the image processor above and a word-level tokenizer
    with ``<image>`` / ``<video>`` tokens, built here (nothing is downloaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "a": 1, "<image>": 2, "<video>": 3}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]",
                                               additional_special_tokens=["<image>", "<video>"])

    class Processor(transformers.LlavaOnevisionProcessor):
        # Its video processor needs torchvision; this test passes none and uses no videos.
        def check_argument_for_proper_class(self, name, arg):
            if name == "video_processor" and arg is None:
                return None
            return super().check_argument_for_proper_class(name, arg)

    return Processor(image_processor=_hf_image_processor(), tokenizer=tok, video_processor=None,
                     num_image_tokens=729, vision_feature_select_strategy="full",
                     vision_aspect_ratio="anyres_max_9")


def _blank(w: int, h: int):
    return Image.fromarray(np.full((h, w, 3), 128, dtype=np.uint8))


def _hf_count(proc, text: str, images) -> int:
    out = proc(text=[text], images=images, return_tensors="np")
    return int((out["input_ids"] == proc.image_token_id).sum())


# ---------------------------------------------------------------- token counts
@pytest.mark.parametrize("size", list(R4B_COUNTS), ids=lambda s: f"{s[0]}x{s[1]}")
def test_r4b_token_counts_equal_transformers_processor(hf_processor, size):
    w, h = size
    got = num_image_tokens(h, w, R4B)
    assert got == R4B_COUNTS[size]  # the numbers R-4B's processor gives, literally
    assert got == _hf_count(hf_processor, "a <image> a", [_blank(w, h)])
    assert prompt_image_tokens([(h, w)], R4B) == [got]


def test_two_image_prompt_counts_equal_transformers_processor(hf_processor):
    sizes = [(480, 640), (1080, 1920)]  # (height, width): a lone image would take 2929 / 7269
    counts = prompt_image_tokens(sizes, R4B)
    assert counts == [730, 730]  # multi-image form: one 729-feature view + image_newline each
    want = _hf_count(hf_processor, "a <image> a <image> a", [[_blank(w, h) for h, w in sizes]])
    assert sum(counts) == want
    # and two one-image prompts in one batch take AnyRes each
    out = hf_processor(text=["<image> a", "a <image>"], images=[[_blank(640, 480)], [_blank(1920, 1080)]])
    per_row = [sum(t == hf_processor.image_token_id for t in row) for row in out["input_ids"]]
    assert per_row == [2929, 7269] == prompt_image_tokens(sizes[:1], R4B) + prompt_image_tokens(sizes[1:], R4B)


def test_token_counts_equal_transformers_for_many_sizes(hf_processor):
    """The counter against transformers' own size-only formula, on sizes that hit every
    branch: unpad along either axis, the anyres_max_9 downscale, extreme aspect ratios."""
    rng = np.random.default_rng(0)
    sizes = [(1, 1), (20, 30), (30, 20), (517, 333), (333, 517), (100, 2000), (2000, 100),
             (3, 5000), (4000, 4000), (2304, 2304), (383, 385), (768, 384)]
    sizes += [tuple(int(x) for x in rng.integers(1, 4000, 2)) for _ in range(60)]
    want = hf_processor._get_num_multimodal_tokens(image_sizes=sizes)["num_image_tokens"]
    got = [num_image_tokens(h, w, R4B) for h, w in sizes]
    assert got == want
    assert len(set(got)) > 30  # the sizes really exercise the formula


def test_geometry_of_a_1920x1080_image():
    assert select_best_resolution(1080, 1920, R4B.image_grid_pinpoints) == (1152, 1920)
    g = anyres_grid(1080, 1920, R4B)
    assert (g.rows, g.cols, g.num_tiles) == (3, 5, 16)
    assert g.crop == (3, 78, 0, 135) and g.window == (75, 135)  # 6 rows of padding dropped
    assert g.downscaled and g.out_size == (60, 108)  # 75*135 > 1.1^2 * 9 * 729
    assert 729 + g.grid_tokens == 7269
    # without the budget ("anyres") nothing is downscaled
    free = dataclasses.replace(R4B, vision_aspect_ratio="anyres")
    assert num_image_tokens(1080, 1920, free) == 729 + 75 * 136
    # a custom pinpoint list changes the fit
    one = dataclasses.replace(R4B, image_grid_pinpoints=((384, 384),))
    assert anyres_grid(1080, 1920, one).num_tiles == 2


# ---------------------------------------------------------------- pixels
def _u8(rng, w: int, h: int, gray: bool = False) -> np.ndarray:
    return rng.integers(0, 256, (h, w) if gray else (h, w, 3), dtype=np.uint8)


def _as_reader_image(u8: np.ndarray) -> np.ndarray:
    """What r4b.data.readers returns for a uint8 image: float32 [C, H, W] = u8 / 255."""
    arr = u8[None] if u8.ndim == 2 else u8.transpose(2, 0, 1)
    return (arr.astype(np.float32) / 255).astype(np.float32)


@pytest.mark.parametrize("size", [(384, 384), (640, 480), (1920, 1080), (333, 517), (517, 333),
                                  (20, 30), (2000, 100), (100, 2000), (1, 1)],
                         ids=lambda s: f"{s[0]}x{s[1]}")
def test_pixels_equal_transformers_image_processor(size):
    """Bit-identical (tolerance 0): both resize 8-bit RGB with Pillow's bicubic and take the same
    float32 roundings for rescale and normalisation, so any difference is a real bug."""
    w, h = size
    rng = np.random.default_rng(w * 10_000 + h)
    u8 = _u8(rng, w, h)
    want = _hf_image_processor()(images=[Image.fromarray(u8)], return_tensors="np")
    ref = want["pixel_values"][0]
    for form in (_as_reader_image(u8), u8, Image.fromarray(u8)):
        got = process_image(form, R4B)
        assert got.pixel_values.dtype == np.float32
        assert got.pixel_values.shape == ref.shape == (anyres_grid(h, w, R4B).num_tiles, 3, 384, 384)
        assert np.array_equal(got.pixel_values, ref), np.abs(got.pixel_values - ref).max()
        assert got.image_size == (h, w) == tuple(want["image_sizes"][0])
        assert got.num_tokens == num_image_tokens(h, w, R4B)


def test_grayscale_is_repeated_to_rgb():
    rng = np.random.default_rng(1)
    g = _u8(rng, 333, 517, gray=True)
    ref = _hf_image_processor()(images=[Image.fromarray(g, "L")], return_tensors="np")["pixel_values"][0]
    for form in (_as_reader_image(g), g, Image.fromarray(g, "L")):
        got = process_image(form, R4B).pixel_values
        assert np.array_equal(got, ref)
        assert np.array_equal(got[:, 0], got[:, 2])


def test_multi_image_prompt_pixels_equal_transformers():
    rng = np.random.default_rng(2)
    ims = [_u8(rng, 640, 480), _u8(rng, 100, 2000), _u8(rng, 384, 384)]
    ref = _hf_image_processor()(images=[[Image.fromarray(u) for u in ims]], return_tensors="np")
    got = process_prompt_images([_as_reader_image(u) for u in ims], R4B)
    assert [g.num_tiles for g in got] == [1, 1, 1] and [g.num_tokens for g in got] == [730] * 3
    for i, g in enumerate(got):
        assert np.array_equal(g.pixel_values[0], ref["pixel_values"][i, 0])
    # the padding colour is the configured mean: CLIP's mean/std, as transformers' default
    clip_mean, clip_std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    cfg = dataclasses.replace(R4B, image_mean=clip_mean, image_std=clip_std)
    ref = _hf_image_processor(image_mean=list(clip_mean), image_std=list(clip_std))(
        images=[[Image.fromarray(u) for u in ims[:2]]], return_tensors="np")["pixel_values"]
    got = process_prompt_images(ims[:2], cfg)
    assert np.array_equal(got[1].pixel_values[0], ref[1, 0])
    assert not np.array_equal(got[1].pixel_values[0], process_prompt_images(ims[:2], R4B)[1].pixel_values[0])


def test_base_tile_comes_first_then_crops_row_by_row():
    # A 768x1152 (height x width) image fits the 768x1152 pinpoint exactly: crops are plain
    # 384-px squares of the image, so each must equal the normalised source square.
    rng = np.random.default_rng(3)
    u8 = _u8(rng, 1152, 768)
    got = process_image(u8, R4B).pixel_values
    assert got.shape == (7, 3, 384, 384)
    for k in range(6):
        r, c = divmod(k, 3)
        square = u8[r * 384:(r + 1) * 384, c * 384:(c + 1) * 384].transpose(2, 0, 1)
        want = ((square.astype(np.float64) / 255).astype(np.float32) - np.float32(0.5)) / np.float32(0.5)
        assert np.array_equal(got[1 + k], want), k


def test_processing_a_1920x1080_image_takes_well_under_a_second():
    x = _as_reader_image(_u8(np.random.default_rng(4), 1920, 1080))
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        process_image(x, R4B)
        times.append(time.perf_counter() - t0)
    assert min(times) < 1.0, times  # ~0.1 s on a 2-core CPU


# ---------------------------------------------------------------- the tile layout
def test_tile_layout_passes_images_through_unchanged():
    cfg = get_preset("tiny", vocab_size=64)
    assert cfg.image_layout == "tile"
    x = np.random.default_rng(5).random((3, 16, 16), dtype=np.float32)
    got = process_image(x, cfg)
    assert got.pixel_values.shape == (1, 3, 16, 16) and np.array_equal(got.pixel_values[0], x)
    assert got.num_tokens == cfg.tokens_per_image == num_image_tokens(16, 16, cfg) == 16
    assert prompt_image_tokens([(16, 16), (16, 16)], cfg) == [16, 16]  # no multi-image form
    assert [p.num_tokens for p in process_prompt_images([x, x], cfg)] == [16, 16]
    with pytest.raises(ValueError, match=r"image_layout='tile' takes float images of shape "
                                         r"\(3, 16, 16\) .* got shape \(3, 16, 17\)"):
        process_image(np.zeros((3, 16, 17), np.float32), cfg)
    with pytest.raises(ValueError, match=r"takes values in \[0, 1\], got \[2.0, 2.0\]"):
        process_image(np.full((3, 16, 16), 2.0, np.float32), cfg)
    with pytest.raises(ValueError, match="takes 16x16 images .* got height x width 20x16"):
        num_image_tokens(20, 16, cfg)


# ---------------------------------------------------------------- errors and config
def test_bad_images_name_the_problem():
    with pytest.raises(ValueError, match=r"float image must hold values in \[0, 1\], got \[-1.0"):
        process_image(np.full((3, 4, 4), -1.0, np.float32), R4B)
    with pytest.raises(ValueError, match="float image must hold values in"):
        process_image(np.full((3, 4, 4), np.nan, np.float32), R4B)
    with pytest.raises(ValueError, match=r"\[C, H, W\] with C in \(1, 3\) .* got shape \(4, 4, 4\)"):
        process_image(np.zeros((4, 4, 4), np.float32), R4B)
    with pytest.raises(ValueError, match=r"uint8 image must be \[H, W\] or \[H, W, 3\] .* \(3, 4, 5, 1\)"):
        process_image(np.zeros((3, 4, 5, 1), np.uint8), R4B)
    with pytest.raises(ValueError, match="got dtype int16"):
        process_image(np.zeros((4, 4), np.int16), R4B)
    with pytest.raises(TypeError, match="got list"):
        process_image([[0.0]], R4B)
    with pytest.raises(ValueError, match="height must be a positive int .* got 0"):
        num_image_tokens(0, 5, R4B)
    with pytest.raises(ValueError, match="text-only model takes no images"):
        num_image_tokens(5, 5, get_preset("tiny", vision=False))


def test_model_config_validates_the_image_fields():
    tiny = get_preset("tiny", vocab_size=64, image_size=16)
    ok = dataclasses.replace(tiny, image_layout="anyres", image_newline=True,
                             image_grid_pinpoints=[[16, 32], [32, 16]])
    assert ok.image_grid_pinpoints == ((16, 32), (32, 16))  # lists become (height, width) tuples
    assert ImageLayout.of(ok).pinpoints == ((16, 32), (32, 16))
    with pytest.raises(ValueError, match="image_layout must be one of"):
        dataclasses.replace(tiny, image_layout="pad")
    with pytest.raises(ValueError, match="set image_newline=True"):
        dataclasses.replace(tiny, image_layout="anyres")
    with pytest.raises(ValueError, match=r"image_grid_pinpoints must be .* multiples of "
                                         r"vision.image_size=16.*offending: \[\(16, 20\)\]"):
        dataclasses.replace(ok, image_grid_pinpoints=((16, 16), (16, 20)))
    with pytest.raises(ValueError, match="image_grid_pinpoints must be .* got \\[\\]"):
        dataclasses.replace(ok, image_grid_pinpoints=())
    with pytest.raises(ValueError, match="vision_aspect_ratio must be 'anyres' or 'anyres_max_N'"):
        dataclasses.replace(ok, vision_aspect_ratio="anyres_max_0")
    with pytest.raises(ValueError, match="image_std values must be > 0"):
        dataclasses.replace(ok, image_std=(0.5, 0.0, 0.5))
    with pytest.raises(ValueError, match="image_mean must hold 3 values"):
        dataclasses.replace(ok, image_mean=(0.5,))
    with pytest.raises(ValueError, match="image_layout='anyres' needs a vision config"):
        ModelConfig(image_layout="anyres")
    # the tile layout ignores the anyres-only fields
    assert dataclasses.replace(tiny, vision_aspect_ratio="whatever").image_layout == "tile"


def test_r4b_preset_image_layout():
    assert R4B.image_layout == "anyres" and R4B.image_newline
    assert R4B.vision_aspect_ratio == "anyres_max_9"
    assert R4B.image_mean == R4B.image_std == (0.5, 0.5, 0.5)
    pins = transformers.LlavaOnevisionConfig().image_grid_pinpoints
    assert [list(p) for p in R4B.image_grid_pinpoints] == pins  # the same list, the same order
