"""qvl_export.runtimes.preprocess against transformers' own image processor and loaders."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image
from transformers.image_utils import load_image as hf_load_image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

from qvl_export.core.errors import QvlError
from qvl_export.core.spec import PreprocessSpec, VisionSpec
from qvl_export.runtimes.preprocess import load_image, preprocess_image, smart_resize

VISION = VisionSpec(family="qwen2_5_vl", depth=1, hidden_size=64, num_heads=2, intermediate_size=128,
                    hidden_act="silu", out_hidden_size=128)
REAL_PP = PreprocessSpec()  # 56*56 .. 28*28*1280, CLIP mean/std
TINY_PP = PreprocessSpec(min_pixels=56 * 56, max_pixels=28 * 28 * 256)
ODD_PP = PreprocessSpec(min_pixels=100 * 100, max_pixels=300 * 300, image_mean=(0.5, 0.5, 0.5),
                        image_std=(0.25, 0.3, 0.2), rescale_factor=1 / 255)


def _processor(pp: PreprocessSpec) -> Qwen2VLImageProcessorPil:
    return Qwen2VLImageProcessorPil(min_pixels=pp.min_pixels, max_pixels=pp.max_pixels, image_mean=list(pp.image_mean),
                                    image_std=list(pp.image_std), rescale_factor=pp.rescale_factor)


def _reference(image: Image.Image, pp: PreprocessSpec) -> tuple[np.ndarray, tuple[int, int, int]]:
    out = _processor(pp)(images=image, return_tensors="np")
    return out["pixel_values"], tuple(int(v) for v in out["image_grid_thw"][0])


def _random_image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    # Smooth gradients + noise: exercises the bicubic filter more than pure noise would.
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([(xx * 255 // max(width, 1)), (yy * 255 // max(height, 1)), (xx + yy) % 256], axis=-1)
    rgb = np.clip(base + rng.integers(-40, 40, base.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(rgb, mode="RGB")
    if mode == "RGBA":
        alpha = rng.integers(0, 256, (height, width), dtype=np.uint8)
        alpha[: height // 3] = 0  # fully transparent band -> white after compositing
        image = Image.fromarray(np.dstack([rgb, alpha]), mode="RGBA")
    elif mode == "P+transparency":
        image = image.convert("P")
        image.info["transparency"] = 3
    elif mode != "RGB":
        image = image.convert(mode)
    return image


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape and a.dtype == b.dtype == np.float32
    return float(np.abs(a - b).max())


@pytest.mark.parametrize("pp", [REAL_PP, TINY_PP, ODD_PP], ids=["real", "tiny", "odd"])
@pytest.mark.parametrize("size", [
    (640, 480),  # ordinary
    (448, 280),  # already multiples of 28
    (20, 30),  # below min_pixels
    (1, 1),  # a single pixel
    (2400, 1800),  # above max_pixels
    (1000, 50),  # 20:1
    (50, 1000),  # 1:20
    (2000, 10),  # 200:1, the largest ratio transformers accepts
    (333, 777),  # odd sizes, round-half cases
])
def test_matches_transformers_processor(size, pp):
    image = _random_image(*size)
    ref, ref_grid = _reference(image, pp)
    patches, grid = preprocess_image(image, VISION, pp)
    assert grid == ref_grid
    assert patches.shape == (grid[0] * grid[1] * grid[2], VISION.patch_dim)
    assert _max_diff(patches, ref) <= 1e-5  # measured: 0.0 (same ops, same order)


@pytest.mark.parametrize("mode", ["RGBA", "L", "LA", "P", "P+transparency", "CMYK", "1", "I"])
def test_modes_match_transformers(mode):
    image = _random_image(150, 110, mode, seed=1)
    ref, ref_grid = _reference(image, TINY_PP)
    patches, grid = preprocess_image(image, VISION, TINY_PP)
    assert grid == ref_grid
    assert _max_diff(patches, ref) <= 1e-5
    # Through load_image (encoded PNG bytes) the same conversion happens.
    if mode not in ("CMYK", "I"):  # PNG cannot store these two modes as-is
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        patches2, grid2 = preprocess_image(buf.getvalue(), VISION, TINY_PP)
        assert grid2 == ref_grid
        assert _max_diff(patches2, ref) <= 1e-5


def test_rgba_is_composited_on_white():
    image = Image.new("RGBA", (60, 60), (10, 200, 30, 0))
    rgb = load_image(image)
    assert rgb.mode == "RGB" and rgb.getpixel((5, 5)) == (255, 255, 255)


def test_min_max_pixel_overrides_match_transformers():
    image = _random_image(500, 300)
    for lo, hi in [(28 * 28, 28 * 28 * 16), (200 * 200, 200 * 200 * 2)]:
        pp = PreprocessSpec(min_pixels=lo, max_pixels=hi)
        ref, ref_grid = _reference(image, pp)
        patches, grid = preprocess_image(image, VISION, REAL_PP, min_pixels=lo, max_pixels=hi)
        assert grid == ref_grid and _max_diff(patches, ref) <= 1e-5


def test_path_input_matches_transformers(tmp_path):
    path = tmp_path / "photo.jpg"
    _random_image(321, 123).save(path, quality=90)
    ref, ref_grid = _reference(hf_load_image(str(path)), TINY_PP)
    patches, grid = preprocess_image(path, VISION, TINY_PP)
    assert grid == ref_grid and _max_diff(patches, ref) <= 1e-5


def test_exif_orientation_applied_like_transformers(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    _random_image(120, 80).save(path, exif=exif.tobytes())
    ours = load_image(str(path))
    ref = hf_load_image(str(path))
    assert ours.size == ref.size == (80, 120)
    assert np.array_equal(np.asarray(ours), np.asarray(ref))


def test_smart_resize_matches_transformers():
    rng = np.random.default_rng(0)
    sizes = [(1, 1), (28, 28), (14, 42), (56, 56), (4000, 3000), (10, 2000), (2000, 10), (111, 99)]
    sizes += [tuple(int(v) for v in rng.integers(1, 5000, 2)) for _ in range(500)]
    for factor, lo, hi in [(28, 56 * 56, 28 * 28 * 1280), (28, 56 * 56, 28 * 28 * 256), (32, 64 * 64, 1024 * 1024)]:
        for h, w in sizes:
            try:
                want = hf_smart_resize(h, w, factor=factor, min_pixels=lo, max_pixels=hi)
            except ValueError:
                with pytest.raises(QvlError, match="aspect ratio"):
                    smart_resize(h, w, factor=factor, min_pixels=lo, max_pixels=hi)
                continue
            assert smart_resize(h, w, factor=factor, min_pixels=lo, max_pixels=hi) == want, (h, w)


def test_runtime_modules_import_without_torch():
    code = ("import sys; import qvl_export.runtimes.preprocess, qvl_export.runtimes.indexing; "
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------- bad inputs


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims ``width x height`` (1-bit grey) with a tiny, truncated IDAT."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _raises(source, *phrases, **kwargs) -> str:
    with pytest.raises(QvlError) as info:
        load_image(source, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    for phrase in phrases:
        assert phrase in message, message
    return message


def test_missing_path(tmp_path):
    _raises(tmp_path / "nope.png", "does not exist", "check the path")


def test_directory_path(tmp_path):
    _raises(tmp_path, "not a file")


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    _raises(str(path), "empty (0 bytes)")


def test_text_file_named_png(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is not an image\n" * 20)
    _raises(path, "not a readable image", "PNG, JPEG")


def test_random_bytes():
    _raises(np.random.default_rng(0).bytes(1000), "not a readable image")


def test_empty_bytes():
    _raises(b"", "empty")


def test_truncated_file(tmp_path):
    buf = io.BytesIO()
    _random_image(300, 300).save(buf, format="PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    _raises(path, "corrupt or truncated")


def test_decompression_bomb_pil_limit(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(100000, 100000))  # 10 gigapixels, ~100 bytes on disk
    _raises(path, "too large")


def test_decompression_bomb_our_limit():
    # 100 MP: above our 64 MP default but below Pillow's own hard limit, so our check must fire.
    _raises(_png_header_only(10000, 10000), "megapixel", "max_image_pixels")


def test_pixel_limit_override():
    image = _random_image(100, 100)
    _raises(image, "megapixel", max_image_pixels=5000)
    assert load_image(image, max_image_pixels=10000).size == (100, 100)


def test_zero_size_image():
    _raises(Image.new("RGB", (0, 10)), "zero size")
    with pytest.raises(QvlError, match="zero size"):
        preprocess_image(Image.new("RGB", (10, 0)), VISION, TINY_PP)


def test_extreme_aspect_ratio():
    _raises(_random_image(402, 2), "aspect ratio", "200:1")
    with pytest.raises(QvlError, match="aspect ratio"):
        preprocess_image(_random_image(2, 500), VISION, TINY_PP)
    with pytest.raises(ValueError):  # transformers refuses the same image
        _reference(_random_image(2, 500), TINY_PP)


def test_unsupported_type():
    _raises(12345, "Unsupported image input")
