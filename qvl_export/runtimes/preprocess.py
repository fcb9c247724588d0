"""Host-side image loading and pre-processing for the thin runtime (numpy + Pillow only).

The thin runtime has neither torch nor transformers, so this module re-implements, operation for
operation, what transformers' PIL image processor for Qwen2-VL / Qwen2.5-VL
(``Qwen2VLImageProcessorPil``) does, so that the patches we feed the exported vision graph are the
ones the reference model sees (the tests compare against transformers itself):

1. RGB conversion as ``transformers.image_transforms.convert_to_rgb``: images with an alpha band
   or a ``transparency`` entry are composited onto opaque white, everything else goes through
   ``PIL.Image.convert("RGB")`` (palette, L, LA, CMYK, ...).
2. ``smart_resize``: both sides rounded to multiples of 28 (patch x merge), area clamped to
   ``[min_pixels, max_pixels]`` keeping the aspect ratio.
3. Resize with Pillow's BICUBIC filter on the uint8 RGB image (transformers converts its uint8
   array back to a PIL image and calls ``Image.resize``; it always resizes, even to the same size).
4. Rescale in float64 (x * 1/255), cast to float32; normalise in float32 ((x - mean) / std).
5. Patchify merge-unit-major: rows ordered (h/2, w/2, 2, 2), each row (C, T, 14, 14) with the single
   frame duplicated over the temporal patch size.

Steps 3-5 are bit-identical to transformers (max abs diff 0.0 in the tests).

``load_image`` adds what a runtime facing user files needs: every bad input (missing or empty
file, not an image, truncated data, zero size, decompression bomb, aspect ratio above 200:1) is a
:class:`~qvl_export.core.errors.QvlError` with a one-line message saying what to do.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps

from qvl_export.core.errors import QvlError
from qvl_export.core.spec import PreprocessSpec, VisionSpec

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image]

# Decompression-bomb guard: images above this many pixels are refused before they are decoded.
# Pillow's own hard limit (2 x Image.MAX_IMAGE_PIXELS, ~179 MP by default) still applies at open
# time, so raising ``max_image_pixels`` above it has no effect.
DEFAULT_MAX_IMAGE_PIXELS = 64 * 1024 * 1024
# transformers' smart_resize refuses images whose long side is more than 200x the short side.
MAX_ASPECT_RATIO = 200


def _describe(source: ImageSource) -> str:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"The image bytes ({len(source)} bytes)"
    if isinstance(source, Image.Image):
        return "The image"
    if isinstance(source, (str, os.PathLike)):
        return f"Image file {os.fspath(source)}"
    return f"The {type(source).__name__} input"


def _check_size(image: Image.Image, what: str, max_image_pixels: int) -> None:
    """Refuse zero-size, over-large and over-elongated images (size from the header only)."""
    width, height = image.size
    if width <= 0 or height <= 0:
        raise QvlError(f"{what} has zero size ({width}x{height} pixels); pass a non-empty image.")
    if width * height > max_image_pixels:
        raise QvlError(
            f"{what} is {width}x{height} = {width * height / 1e6:.1f} megapixels, above the "
            f"{max_image_pixels / 1e6:.1f}-megapixel limit that guards against decompression bombs; "
            "downscale it first or raise max_image_pixels."
        )
    ratio = max(width, height) / min(width, height)
    if ratio > MAX_ASPECT_RATIO:
        raise QvlError(
            f"{what} is {width}x{height} pixels: its aspect ratio {ratio:.0f}:1 exceeds the "
            f"{MAX_ASPECT_RATIO}:1 that Qwen2-VL models accept; crop or pad it first."
        )


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB copy of ``image`` exactly as transformers' ``convert_to_rgb`` makes it.

    Transparency (an alpha band, or a ``transparency`` entry of P / L / RGB images) is composited
    onto opaque white; other modes go through ``Image.convert("RGB")``.
    """
    if image.mode == "RGB" and image.info.get("transparency") is None:
        return image
    try:
        # "A" in getbands() is case-sensitive as in transformers: premultiplied "RGBa"/"La" are
        # converted without compositing, exactly like the reference.
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return image.convert("RGB")
    except Exception as err:  # noqa: BLE001 - any Pillow failure is a bad input
        raise QvlError(f"The image (mode {image.mode}) cannot be converted to RGB ({err}); "
                       "save it as an 8-bit RGB PNG or JPEG first.") from None


def load_image(source: ImageSource, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Open, validate and decode an image; return it upright (EXIF orientation applied) in RGB.

    ``source`` is a path, the encoded file's bytes, or a PIL image. Every bad input raises
    :class:`QvlError`; no other exception type escapes.
    """
    what = _describe(source)
    if isinstance(source, Image.Image):
        image = source
        _check_size(image, what, max_image_pixels)
        try:
            image.load()
        except Exception as err:  # noqa: BLE001
            raise QvlError(f"{what} cannot be decoded ({err}); re-save it as PNG or JPEG.") from None
    else:
        if isinstance(source, (bytes, bytearray, memoryview)):
            data = bytes(source)
            if not data:
                raise QvlError(f"{what} are empty; pass the full contents of an image file.")
            stream: io.BytesIO | Path = io.BytesIO(data)
        elif isinstance(source, (str, os.PathLike)):
            path = Path(os.fspath(source))
            if not path.exists():
                raise QvlError(f"{what} does not exist; check the path.")
            if not path.is_file():
                raise QvlError(f"{what} is not a file; pass the path of an image file.")
            try:
                size = path.stat().st_size
            except OSError as err:
                raise QvlError(f"{what} cannot be read ({err.strerror or err}); check its permissions.") from None
            if size == 0:
                raise QvlError(f"{what} is empty (0 bytes); re-save or re-download the image.")
            stream = path
        else:
            raise QvlError(f"Unsupported image input of type {type(source).__name__}; "
                           "pass a file path, the image file's bytes or a PIL image.")
        try:
            with warnings.catch_warnings():
                # Our own limit (checked right below from the header) replaces Pillow's warning.
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = Image.open(stream)
        except Image.DecompressionBombError as err:
            raise QvlError(f"{what} is too large to decode safely ({err}); downscale it first.") from None
        except PermissionError as err:
            raise QvlError(f"{what} cannot be read ({err.strerror}); check its permissions.") from None
        except Exception as err:  # noqa: BLE001 - UnidentifiedImageError, OSError, SyntaxError, ...
            raise QvlError(f"{what} is not a readable image ({type(err).__name__}: {err}); "
                           "pass a PNG, JPEG, WebP, BMP, GIF or TIFF file.") from None
        _check_size(image, what, max_image_pixels)
        try:
            image.load()
        except Exception as err:  # noqa: BLE001 - truncated / corrupt data
            raise QvlError(f"{what} is corrupt or truncated ({type(err).__name__}: {err}); "
                           "re-save or re-download the image.") from None
    try:
        # As transformers.image_utils.load_image: apply the EXIF orientation tag.
        upright = ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - a broken EXIF block is not fatal; keep the stored orientation
        upright = image
    if upright is not None:
        image = upright
    _check_size(image, what, max_image_pixels)
    return to_rgb(image)


def smart_resize(
    height: int,
    width: int,
    factor: int = 28,
    min_pixels: int = 56 * 56,
    max_pixels: int = 14 * 14 * 4 * 1280,
) -> tuple[int, int]:
    """Target (height, width): multiples of ``factor``, area in [min_pixels, max_pixels], aspect kept.

    Same arithmetic as ``transformers.models.qwen2_vl.image_processing_qwen2_vl.smart_resize``
    (Python's round-half-to-even included); bad sizes raise QvlError instead of ValueError.
    """
    if height <= 0 or width <= 0:
        raise QvlError(f"Image size {width}x{height} is empty; pass a non-empty image.")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise QvlError(
            f"Image size {width}x{height}: aspect ratio {max(height, width) / min(height, width):.0f}:1 "
            f"exceeds the {MAX_ASPECT_RATIO}:1 that Qwen2-VL models accept; crop or pad it first."
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def patchify(image_chw: np.ndarray, vision: VisionSpec) -> tuple[np.ndarray, tuple[int, int, int]]:
    """``image_chw [C, H, W] float32`` -> ``patches [grid_h*grid_w, patch_dim] float32``, (1, gh, gw).

    Merge-unit-major rows (gh/m, gw/m, m, m); each row is (C, T, p, p) with the one frame repeated
    over the temporal patch size, as transformers lays out a still image.
    """
    p, m, t = vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size
    channels, height, width = image_chw.shape
    if height % (p * m) or width % (p * m):
        raise QvlError(f"Resized image {width}x{height} is not a multiple of {p * m}; this is a bug in smart_resize.")
    grid_h, grid_w = height // p, width // p
    x = image_chw.reshape(channels, grid_h // m, m, p, grid_w // m, m, p)
    x = x.transpose(1, 4, 2, 5, 0, 3, 6)  # (gh/m, gw/m, m, m, C, p, p)
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], t, p, p))  # duplicate the frame over T
    patches = np.ascontiguousarray(x.reshape(grid_h * grid_w, channels * t * p * p), dtype=np.float32)
    return patches, (1, grid_h, grid_w)


def preprocess_image(
    image: ImageSource,
    vision: VisionSpec,
    pp: PreprocessSpec,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """One image -> ``(patches [grid_t*grid_h*grid_w, patch_dim] float32, (grid_t, grid_h, grid_w))``.

    Equal to ``Qwen2VLImageProcessorPil`` output (``pixel_values``, ``image_grid_thw``) for the same
    min/max pixels, mean, std and rescale factor. ``image`` is anything :func:`load_image` takes;
    a PIL image is converted to RGB like the processor does (no EXIF rotation is applied to
    in-memory PIL images here, as the processor applies none).
    """
    if isinstance(image, Image.Image):
        _check_size(image, "The image", max_image_pixels)
        rgb = to_rgb(image)
    else:
        rgb = load_image(image, max_image_pixels=max_image_pixels)
    if vision.in_channels != 3:
        raise QvlError(f"The vision tower expects {vision.in_channels} input channels; only RGB (3) is supported.")
    lo = pp.min_pixels if min_pixels is None else int(min_pixels)
    hi = pp.max_pixels if max_pixels is None else int(max_pixels)
    if lo <= 0 or hi < lo:
        raise QvlError(f"min_pixels={lo} / max_pixels={hi} are invalid; need 0 < min_pixels <= max_pixels.")
    width, height = rgb.size
    new_h, new_w = smart_resize(height, width, factor=vision.patch_size * vision.spatial_merge_size,
                                min_pixels=lo, max_pixels=hi)
    try:
        resized = rgb.resize((new_w, new_h), resample=Image.Resampling.BICUBIC)
    except Exception as err:  # noqa: BLE001
        raise QvlError(f"The image cannot be resized to {new_w}x{new_h} ({err}); re-save it as PNG or JPEG.") from None
    pixels = np.asarray(resized, dtype=np.uint8)  # [H, W, 3] uint8
    # transformers' rescale: float64 multiply, then float32; normalise in float32.
    x = (pixels.astype(np.float64) * pp.rescale_factor).astype(np.float32)
    mean = np.asarray(pp.image_mean, dtype=np.float32)
    std = np.asarray(pp.image_std, dtype=np.float32)
    x = (x - mean) / std  # [H, W, 3] float32
    return patchify(np.ascontiguousarray(x.transpose(2, 0, 1)), vision)
