"""Images for the vision tower: pixels and placeholder-token counts, both from ``ModelConfig``.

One configuration (``ModelConfig.image_layout`` and the fields beside it) decides both what the
processor makes of an image and how many ``image_token_id`` placeholders the model fills for
it, so the chat template (which only needs :func:`num_image_tokens`) and the model can never
disagree.  Two layouts:

``tile`` (the embedded default)
    An image is already one ``num_channels x image_size x image_size`` tile with values in
    [0, 1]; it passes through unchanged (no resize, no normalisation) and fills
    ``vision.tokens_per_image`` placeholders.

``anyres`` (R-4B, LLaVA-OneVision's AnyRes with ``vision_aspect_ratio="anyres_max_9"``)
    With tile side ``S = vision.image_size`` and ``p = S // vision.patch_size`` patches per
    tile side (R-4B: S = 384, p = 27, 729 patches per tile), an image of ``H x W`` pixels
    (height x width) becomes:

    1. **Best fit.**  For every ``(h, w)`` of ``image_grid_pinpoints`` (multiples of ``S``):
       ``s = min(w / W, h / H)``, effective resolution ``min(int(W s) * int(H s), W * H)``,
       waste ``h * w - effective``.  The pinpoint with the largest effective resolution wins;
       ties go to the least waste, then to the first listed.
    2. **Grid crops.**  The image is resized, keeping its aspect ratio, to fit the best
       ``(h, w)`` (the limiting side becomes exactly ``h`` or ``w``, the other
       ``min(ceil(side * scale), limit)``), centred on a black ``h x w`` canvas (the odd
       pixel of padding goes right / bottom) and cut into ``(h / S) x (w / S)`` crops, row by
       row.
    3. **Base view.**  The whole image resized to ``S x S`` (aspect ratio not kept).
    4. **Tiles** ``[base, crop(0, 0), crop(0, 1), ...]``; every resize is Pillow's bicubic on
       8-bit RGB; pixels are then rescaled by 1/255 and normalised ``(x - image_mean) /
       image_std`` per channel (SigLIP: 0.5 / 0.5, i.e. to [-1, 1]).  Grayscale is repeated
       to three channels.

    Token count, ``rows x cols`` the grid: the base tile gives ``p^2`` features.  The crops'
    features form a ``rows p x cols p`` map, which is *unpadded* to the image's aspect ratio:
    if ``W / H > cols / rows`` the height shrinks to ``rows p - 2 floor((rows p - n) / 2)``
    with ``n = int(round(H * cols p / W, 7))``, otherwise the width likewise.  With
    ``anyres_max_N``, a map of ``h' x w'`` features with ``r = sqrt(h' w' / (N p^2)) > 1.1``
    is downscaled (bilinear) to ``int(h' // r) x int(w' // r)``.  One ``image_newline``
    feature ends every row, so::

        tokens = p^2 + h'' * (w'' + 1)          (h'' x w'': the map after unpad / downscale)

    R-4B's numbers (default pinpoints, width x height): 384x384 -> 1,485; 640x480 -> 2,929;
    1024x768 -> 4,725; 1920x1080 -> 7,269.

    **Several images in one prompt** take LLaVA-OneVision's multi-image form instead: each is
    padded to a square with the mean colour (``int(255 * image_mean)``), resized to ``S x S``
    and gives one tile of ``p^2`` features plus one ``image_newline``: ``p^2 + 1`` tokens
    (730 for R-4B), whatever its size.  :func:`process_prompt_images` and
    :func:`prompt_image_tokens` apply that rule; the model tells the two forms apart by the
    tile count (1 tile: multi-image form).

Public API (``cfg`` is the model's ``ModelConfig``)::

    num_image_tokens(height, width, cfg, multi_image=False) -> int     # no pixels touched
    prompt_image_tokens([(h, w), ...], cfg) -> [int, ...]              # one prompt's images
    process_image(image, cfg, multi_image=False) -> ProcessedImage
    process_prompt_images([image, ...], cfg) -> [ProcessedImage, ...]

Images are float ``[C, H, W]`` in [0, 1] with C in {1, 3} (what :mod:`r4b.data.readers`
returns; numpy or torch), uint8 ``[H, W]`` / ``[H, W, 3]`` arrays, or PIL images.  Float
images are quantised to 8 bits (``round(255 x)``, exact for the readers' ``uint8 / 255``
values) before resizing, as every resize here works on 8-bit RGB.  This module needs numpy,
and Pillow for the ``anyres`` layout (imported at first use); it imports neither torch nor
the model package.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import numpy as np


class ImageConfig(Protocol):
    """The fields of a model configuration this module reads (``r4b.models.ModelConfig`` has
    them; the model package is not imported here: it needs torch and megatron)."""

    vision: Any  # .image_size, .patch_size, .num_channels; None for a text-only model
    image_layout: str
    image_grid_pinpoints: Sequence[tuple[int, int]]
    vision_aspect_ratio: str
    image_mean: Sequence[float]
    image_std: Sequence[float]

__all__ = [
    "ProcessedImage", "AnyresGrid", "ImageLayout", "num_image_tokens", "prompt_image_tokens",
    "process_image", "process_prompt_images", "select_best_resolution", "anyres_grid",
    "parse_vision_aspect_ratio",
]

#: Above this ratio of features to the ``anyres_max_N`` budget the grid map is downscaled
#: (LLaVA-OneVision's threshold: a 10% overshoot is tolerated).
DOWNSCALE_THRESHOLD = 1.1

_ASPECT_RE = re.compile(r"anyres(?:_max_(\d+))?")


def parse_vision_aspect_ratio(value: str) -> int | None:
    """Tile budget of a ``vision_aspect_ratio``: ``"anyres_max_9"`` -> 9, ``"anyres"`` ->
    ``None`` (never downscale); ``ValueError`` naming the value otherwise."""
    m = _ASPECT_RE.fullmatch(value) if isinstance(value, str) else None
    if m is None or (m.group(1) is not None and int(m.group(1)) < 1):
        raise ValueError(f"vision_aspect_ratio must be 'anyres' or 'anyres_max_N' with N >= 1, "
                         f"got {value!r}")
    return None if m.group(1) is None else int(m.group(1))


# ---------------------------------------------------------------- configuration
@dataclass(frozen=True)
class ImageLayout:
    """What the processor and the model read from ``ModelConfig`` (see :meth:`of`)."""

    mode: str
    """``tile`` or ``anyres``."""
    tile_size: int
    """Side ``S`` of a tile in pixels (``vision.image_size``)."""
    patches_per_side: int
    """``p = S // vision.patch_size``: features per tile side."""
    num_channels: int
    """Channels of a tile (``vision.num_channels``)."""
    pinpoints: tuple[tuple[int, int], ...]
    """``(height, width)`` resolutions AnyRes chooses from."""
    max_tiles: int | None
    """``N`` of ``anyres_max_N``; ``None``: never downscale."""
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def tokens_per_tile(self) -> int:
        """``p^2``."""
        return self.patches_per_side ** 2

    @classmethod
    def of(cls, cfg: "ImageConfig | ImageLayout") -> "ImageLayout":
        """The layout of a ``ModelConfig`` (an ``ImageLayout`` passes through)."""
        if isinstance(cfg, ImageLayout):
            return cfg
        vision = getattr(cfg, "vision", None)
        if vision is None:
            raise ValueError("cfg must describe a model with a vision tower (ModelConfig.vision "
                             "is None: a text-only model takes no images)")
        mode = getattr(cfg, "image_layout", "tile")
        return cls(mode=mode, tile_size=int(vision.image_size),
                   patches_per_side=int(vision.image_size) // int(vision.patch_size),
                   num_channels=int(vision.num_channels),
                   pinpoints=tuple((int(h), int(w)) for h, w in cfg.image_grid_pinpoints),
                   max_tiles=parse_vision_aspect_ratio(cfg.vision_aspect_ratio),
                   mean=tuple(float(x) for x in cfg.image_mean),
                   std=tuple(float(x) for x in cfg.image_std))


# ---------------------------------------------------------------- geometry (no pixels)
def _check_size(height, width) -> tuple[int, int]:
    for name, v in (("height", height), ("width", width)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be a positive int (pixels), got {v!r}")
    return int(height), int(width)


def select_best_resolution(height: int, width: int,
                           pinpoints: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The ``(h, w)`` of ``pinpoints`` an ``height x width`` image is resized into (step 1 of
    the module docstring: most effective resolution, then least waste, then first listed)."""
    height, width = _check_size(height, width)
    best, best_eff, best_waste = None, -1, math.inf
    for h, w in pinpoints:
        scale = min(w / width, h / height)
        eff = min(int(width * scale) * int(height * scale), width * height)
        waste = w * h - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (int(h), int(w)), eff, waste
    if best is None:
        raise ValueError("image_grid_pinpoints must hold at least one (height, width), got none")
    return best


def _fit_size(height: int, width: int, target: tuple[int, int]) -> tuple[int, int]:
    """Size of the image resized into ``target`` with its aspect ratio kept (step 2)."""
    th, tw = target
    scale_w, scale_h = tw / width, th / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), th), tw
    return th, min(math.ceil(width * scale_h), tw)


@dataclass(frozen=True)
class AnyresGrid:
    """Where an AnyRes image's grid features go (all sizes in features, not pixels)."""

    rows: int
    """Crops down (best-fit height / S)."""
    cols: int
    """Crops across (best-fit width / S)."""
    crop: tuple[int, int, int, int]
    """``(top, bottom, left, right)``: the unpadded window ``[top:bottom, left:right]`` of the
    ``rows p x cols p`` feature map."""
    out_size: tuple[int, int]
    """``(h'', w'')`` after the ``anyres_max_N`` downscale (= the window's size without it)."""

    @property
    def num_tiles(self) -> int:
        """Tiles of the image: the base view plus the crops."""
        return 1 + self.rows * self.cols

    @property
    def window(self) -> tuple[int, int]:
        """``(h', w')``: the unpadded map's size."""
        top, bottom, left, right = self.crop
        return bottom - top, right - left

    @property
    def downscaled(self) -> bool:
        """Whether the map is resized from :attr:`window` to :attr:`out_size`."""
        return self.window != self.out_size

    @property
    def grid_tokens(self) -> int:
        """Grid features plus one ``image_newline`` per row: ``h'' * (w'' + 1)``."""
        h, w = self.out_size
        return h * (w + 1)


def anyres_grid(height: int, width: int, cfg: "ImageConfig | ImageLayout") -> AnyresGrid:
    """Grid, unpadding window and output size of an ``height x width`` image (see the module
    docstring); the model lays the features out with it and :func:`num_image_tokens` counts."""
    lay = ImageLayout.of(cfg)
    height, width = _check_size(height, width)
    bh, bw = select_best_resolution(height, width, lay.pinpoints)
    rows, cols = bh // lay.tile_size, bw // lay.tile_size
    p = lay.patches_per_side
    cur_h, cur_w = rows * p, cols * p
    top, bottom, left, right = 0, cur_h, 0, cur_w
    # Unpad: the crops hold the image centred with black bars on the long axis of the grid;
    # drop the feature rows (columns) that correspond to the bars.  The rounding to 7 digits
    # keeps float noise from flipping int() at exact ratios.
    if width / height > cur_w / cur_h:
        new_h = int(round(height * (cur_w / width), 7))
        pad = (cur_h - new_h) // 2
        top, bottom = pad, cur_h - pad
    else:
        new_w = int(round(width * (cur_h / height), 7))
        pad = (cur_w - new_w) // 2
        left, right = pad, cur_w - pad
    h, w = bottom - top, right - left
    out = (h, w)
    if lay.max_tiles is not None:
        ratio = math.sqrt(h * w / (lay.max_tiles * p ** 2))
        if ratio > DOWNSCALE_THRESHOLD:
            out = (int(h // ratio), int(w // ratio))
    return AnyresGrid(rows=rows, cols=cols, crop=(top, bottom, left, right), out_size=out)


def num_image_tokens(height: int, width: int, cfg: "ImageConfig | ImageLayout", *,
                     multi_image: bool = False) -> int:
    """Placeholder tokens the model fills for one ``height x width`` image (pixels).

    ``multi_image``: the image shares its prompt with other images (LLaVA-OneVision's
    multi-image form, ``p^2 + 1`` tokens); :func:`prompt_image_tokens` decides it for a
    prompt.  ``tile`` layout: ``tokens_per_image``, for images of exactly
    ``image_size x image_size``.
    """
    lay = ImageLayout.of(cfg)
    height, width = _check_size(height, width)
    if lay.mode == "tile":
        if (height, width) != (lay.tile_size, lay.tile_size):
            raise ValueError(f"image_layout='tile' takes {lay.tile_size}x{lay.tile_size} images "
                             f"(vision.image_size), got height x width {height}x{width}")
        return lay.tokens_per_tile
    if multi_image:
        return lay.tokens_per_tile + 1
    return lay.tokens_per_tile + anyres_grid(height, width, lay).grid_tokens


def prompt_image_tokens(sizes: Sequence[tuple[int, int]],
                        cfg: "ImageConfig | ImageLayout") -> list[int]:
    """Placeholder tokens of each image of one prompt, ``sizes`` its ``(height, width)`` in
    order: a lone image takes AnyRes, two or more take the multi-image form each."""
    multi = len(sizes) > 1
    return [num_image_tokens(h, w, cfg, multi_image=multi) for h, w in sizes]


# ---------------------------------------------------------------- pixels
@dataclass(frozen=True)
class ProcessedImage:
    """One image, ready for the model (``ImageBatch.collate`` takes these directly)."""

    pixel_values: np.ndarray
    """float32 ``[n_tiles, C, S, S]``: the base view then the grid crops row by row (anyres),
    the one square view (multi-image form), or the image itself (tile)."""
    image_size: tuple[int, int]
    """``(height, width)`` of the original image in pixels."""
    num_tokens: int
    """Placeholder tokens the model fills for it (= :func:`num_image_tokens`)."""

    @property
    def num_tiles(self) -> int:
        """Tiles in :attr:`pixel_values`."""
        return int(self.pixel_values.shape[0])


try:  # Pillow: resampling for the anyres layout
    from PIL import Image as _PILImage

    HAVE_PIL = True
except ImportError:  # pragma: no cover - Pillow is installed wherever transformers' vision is
    _PILImage = None
    HAVE_PIL = False


def _require_pil():
    if not HAVE_PIL:
        raise ImportError("image_layout='anyres' resizes images with Pillow: pip install pillow")
    return _PILImage


def _to_numpy(image: Any) -> Any:
    if hasattr(image, "detach") and hasattr(image, "cpu"):  # a torch tensor, without importing torch
        return image.detach().cpu().numpy()
    return image


def _is_pil(image: Any) -> bool:
    return HAVE_PIL and isinstance(image, _PILImage.Image)


def _rgb_uint8(image: Any) -> np.ndarray:
    """``[H, W, 3]`` uint8 RGB of any accepted input."""
    if _is_pil(image):
        pil = _require_pil()
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            # Transparent pixels count as white, as transformers' convert_to_rgb does.
            rgba = image.convert("RGBA")
            image = pil.alpha_composite(pil.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        return np.asarray(image.convert("RGB"))
    arr = _to_numpy(image)
    if not isinstance(arr, np.ndarray):
        raise TypeError(f"image must be a numpy array, torch tensor or PIL image, got "
                        f"{type(image).__name__}")
    if arr.dtype == np.uint8:
        if arr.ndim == 2:
            arr = arr[:, :, None]
        if arr.ndim != 3 or arr.shape[2] not in (1, 3) or 0 in arr.shape:
            raise ValueError(f"a uint8 image must be [H, W] or [H, W, 3] (channels last), got "
                             f"shape {arr.shape}")
        return np.ascontiguousarray(np.repeat(arr, 3, axis=2) if arr.shape[2] == 1 else arr)
    if arr.dtype.kind != "f":
        raise ValueError(f"image must be float in [0, 1] ([C, H, W] or [H, W]) or uint8 "
                         f"([H, W, 3] or [H, W]), got dtype {arr.dtype}")
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or arr.shape[0] not in (1, 3) or 0 in arr.shape:
        raise ValueError(f"a float image must be [C, H, W] with C in (1, 3) or [H, W], got shape "
                         f"{arr.shape}")
    lo, hi = float(arr.min()), float(arr.max())
    if not (0.0 <= lo and hi <= 1.0):  # also catches NaN
        raise ValueError(f"a float image must hold values in [0, 1], got [{lo}, {hi}]")
    # round(255 x); float32 is enough: a uint8 / 255 value comes back within 1e-4 of its integer.
    scaled = np.multiply(arr, np.float32(255), dtype=np.float32)
    u8 = np.rint(scaled, out=scaled).astype(np.uint8)
    if u8.shape[0] == 1:
        u8 = np.repeat(u8, 3, axis=0)
    return np.ascontiguousarray(u8.transpose(1, 2, 0))


def _resize(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """Pillow bicubic resize of ``[H, W, 3]`` uint8 to ``[height, width, 3]``."""
    if rgb.shape[:2] == (height, width):
        return rgb  # Pillow returns an identical copy for a same-size resize
    pil = _require_pil()
    out = pil.fromarray(rgb, "RGB").resize((width, height), resample=pil.Resampling.BICUBIC)
    return np.asarray(out)


def _normalise(tiles: np.ndarray, lay: ImageLayout) -> np.ndarray:
    """uint8 ``[n, S, S, 3]`` -> float32 ``[n, 3, S, S]``: ``(u * (1/255) - mean) / std``.

    A 256-entry table per channel holds the exact float32 value of every uint8 input, computed
    with the rounding transformers' image processors use (rescale in float64, round to
    float32, then subtract and divide in float32), so the output is bit-identical to theirs and
    one gather per channel replaces three full-size float passes.
    """
    levels = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)
    out = np.empty((tiles.shape[0], 3) + tiles.shape[1:3], dtype=np.float32)
    for c in range(3):
        table = (levels - np.float32(lay.mean[c])) / np.float32(lay.std[c])
        np.take(table, tiles[..., c], out=out[:, c])
    return out


def process_image(image: Any, cfg: "ImageConfig | ImageLayout", *,
                  multi_image: bool = False) -> ProcessedImage:
    """Tiles, original size and token count of one image (see the module docstring).

    ``multi_image``: the image shares its prompt with others (multi-image form);
    :func:`process_prompt_images` decides it for a prompt.
    """
    lay = ImageLayout.of(cfg)
    if lay.mode == "tile":
        return _process_tile(image, lay)
    rgb = _rgb_uint8(image)
    height, width = rgb.shape[:2]
    s = lay.tile_size
    if multi_image:
        side = max(height, width)
        canvas = np.empty((side, side, 3), dtype=np.uint8)
        canvas[...] = np.array([int(m * 255) for m in lay.mean], dtype=np.uint8)
        top, left = (side - height) // 2, (side - width) // 2
        canvas[top:top + height, left:left + width] = rgb
        tiles = _resize(canvas, s, s)[None]
    else:
        grid = anyres_grid(height, width, lay)
        bh, bw = grid.rows * s, grid.cols * s
        nh, nw = _fit_size(height, width, (bh, bw))
        canvas = np.zeros((bh, bw, 3), dtype=np.uint8)
        top, left = (bh - nh) // 2, (bw - nw) // 2
        canvas[top:top + nh, left:left + nw] = _resize(rgb, nh, nw)
        tiles = np.empty((grid.num_tiles, s, s, 3), dtype=np.uint8)
        tiles[0] = _resize(rgb, s, s)
        # [rows*S, cols*S, 3] -> [rows, cols, S, S, 3]: crops in row-major grid order.
        tiles[1:] = canvas.reshape(grid.rows, s, grid.cols, s, 3).transpose(0, 2, 1, 3, 4) \
                          .reshape(-1, s, s, 3)
    return ProcessedImage(pixel_values=_normalise(tiles, lay), image_size=(height, width),
                          num_tokens=num_image_tokens(height, width, lay, multi_image=multi_image))


def _process_tile(image: Any, lay: ImageLayout) -> ProcessedImage:
    arr = _to_numpy(image)
    c, s = lay.num_channels, lay.tile_size
    if not isinstance(arr, np.ndarray) or arr.dtype.kind != "f" or arr.shape != (c, s, s):
        shape = getattr(arr, "shape", type(arr).__name__)
        dtype = getattr(arr, "dtype", None)
        raise ValueError(f"image_layout='tile' takes float images of shape ({c}, {s}, {s}) "
                         f"(num_channels, image_size, image_size) in [0, 1], got shape {shape} "
                         f"dtype {dtype}")
    lo, hi = float(arr.min()), float(arr.max())
    if not (0.0 <= lo and hi <= 1.0):
        raise ValueError(f"image_layout='tile' takes values in [0, 1], got [{lo}, {hi}]")
    return ProcessedImage(pixel_values=np.ascontiguousarray(arr, dtype=np.float32)[None],
                          image_size=(s, s), num_tokens=lay.tokens_per_tile)


def process_prompt_images(images: Sequence[Any],
                          cfg: "ImageConfig | ImageLayout") -> list[ProcessedImage]:
    """:func:`process_image` for every image of one prompt: a lone image takes AnyRes, two or
    more take the multi-image form each (as :func:`prompt_image_tokens` counts)."""
    multi = len(images) > 1
    return [process_image(im, cfg, multi_image=multi) for im in images]
