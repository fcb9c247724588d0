"""Calibration documents: the built-in set is deterministic and varied (a screen recording among the
pages); user folders with PDFs and clips load; bad ones fail in one line."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from PIL import Image

from qvl_export.calibration.documents import KINDS, builtin_documents
from qvl_export.calibration.sources import folder_documents
from qvl_export.core.errors import QvlError


def digest(img: Image.Image) -> str:
    return hashlib.sha256(img.tobytes()).hexdigest()


def content(doc) -> str:
    return digest(doc.image) if doc.image is not None else hashlib.sha256(doc.video.tobytes()).hexdigest()


def test_builtin_set_is_deterministic_and_covers_every_kind():
    a, b = builtin_documents(), builtin_documents()
    assert [content(d) for d in a] == [content(d) for d in b]
    assert len(a) == len(KINDS)
    names = {d.name.split("-", 1)[1] for d in a}
    for kind in ("invoice", "screen_recording", "form", "table", "bar_chart", "line_chart", "receipt",
                 "small_print", "ui_screenshot", "mixed_zh_en", "banner_wide", "tall_strip"):
        assert kind in names
    pages = [d for d in a if d.video is None]
    aspects = [d.image.width / d.image.height for d in pages]
    assert min(aspects) < 0.3 and max(aspects) > 5  # extreme portrait and landscape
    for d in a:
        assert d.prompt.strip()
        assert np.asarray(d.image if d.video is None else d.video).std() > 5  # not blank


def test_builtin_screen_recording_pairs_different_frames():
    """The recording is second (any set of 2+ documents has video), 8 frames [T, H, W, 3] uint8 at 2 fps,
    and the two frames of every temporal patch differ (typing, scrolling, pointer)."""
    docs = builtin_documents(2)
    rec = docs[1]
    assert rec.name == "01-screen_recording" and rec.image is None and rec.fps == 2.0
    assert rec.video.shape == (8, 336, 560, 3) and rec.video.dtype == np.uint8
    for t in range(0, 8, 2):
        changed = np.abs(rec.video[t].astype(int) - rec.video[t + 1]).max(axis=-1) > 0
        assert changed.mean() > 0.02, t  # a real share of the pixels moves inside each temporal patch


def test_folder_with_images_pdf_and_prompts(tmp_path):
    Image.new("RGB", (300, 200), (200, 10, 10)).save(tmp_path / "a.png")
    Image.new("RGB", (200, 300), (10, 200, 10)).save(tmp_path / "b.webp")
    pages = [Image.new("RGB", (400, 500), c) for c in ((255, 255, 255), (0, 0, 255))]
    pages[0].save(tmp_path / "c.pdf", save_all=True, append_images=pages[1:])
    (tmp_path / "b.txt").write_text("What colour is this?")
    (tmp_path / "prompts.txt").write_text("Default question one\n")
    (tmp_path / "notes.md").write_text("ignored")
    docs = folder_documents(tmp_path)
    assert [d.name for d in docs] == ["a.png", "b.webp", "c.pdf#p1", "c.pdf#p2"]
    assert docs[1].prompt == "What colour is this?"
    assert docs[0].prompt == "Default question one"
    assert docs[3].image.getpixel((10, 10))[2] > 200  # second PDF page rendered


@pytest.mark.parametrize("setup,words", [
    (lambda p: None, "no PNG"),
    (lambda p: (p / "x.pdf").write_bytes(b"%PDF-1.4 broken"), "not a readable PDF"),
])
def test_bad_folders(tmp_path, setup, words):
    setup(tmp_path)
    with pytest.raises(QvlError, match=words):
        folder_documents(tmp_path)
    with pytest.raises(QvlError, match="not a folder"):
        folder_documents(tmp_path / "missing")


def write_clip(path, frames=6, size=(96, 64), rate=4):
    """A small H.264 clip written with PyAV: a bar moving over a colour ramp."""
    av = pytest.importorskip("av")
    w, h = size
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for i in range(frames):
            img = np.zeros((h, w, 3), np.uint8)
            img[:] = (i * 30 % 256, 200 - i * 20, 90)
            img[:, 8 * i:8 * i + 10] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def test_folder_with_clips(tmp_path):
    """Clips are documents whose ``video`` is the file (decoded later by the runtime's video path); a gif
    counts as a clip; a sidecar gives a clip its prompt; a folder of frames inside is not a clip."""
    write_clip(tmp_path / "a.mp4")
    frames = [Image.new("RGB", (64, 48), (40 * i, 90, 200 - 40 * i)) for i in range(4)]
    frames[0].save(tmp_path / "b.gif", save_all=True, append_images=frames[1:], duration=250, loop=0)
    (tmp_path / "b.txt").write_text("What colour comes last?")
    Image.new("RGB", (120, 90), "white").save(tmp_path / "c.png")
    (tmp_path / "frames").mkdir()
    frames[0].save(tmp_path / "frames" / "0001.png")
    docs = folder_documents(tmp_path)
    assert [d.name for d in docs] == ["a.mp4", "b.gif", "c.png"]
    assert docs[0].image is None and docs[0].video == tmp_path / "a.mp4" and docs[0].fps is None
    assert "recording" in docs[0].prompt and docs[1].prompt == "What colour comes last?"
    assert docs[2].video is None and docs[2].image.size == (120, 90)
    assert [d.name for d in folder_documents(tmp_path, limit=1)] == ["a.mp4"]


@pytest.mark.parametrize("content,words", [(b"", "is empty"), (b"\x00\x01 not a video at all" * 40, "not a readable video")])
def test_bad_clip_fails_before_anything_runs(tmp_path, content, words):
    Image.new("RGB", (120, 90), "white").save(tmp_path / "a.png")
    (tmp_path / "b.mp4").write_bytes(content)
    with pytest.raises(QvlError, match=words) as err:
        folder_documents(tmp_path)
    assert "\n" not in str(err.value) and "b.mp4" in str(err.value)


@pytest.mark.parametrize("user_clips", [False, True])
def test_template_without_video_items(user_clips, checkpoint, tmp_path):
    """A checkpoint whose chat template has no video items calibrates on pages only: the built-in
    recording is dropped with a warning, user clips are refused in one line, before anything is traced."""
    from pathlib import Path

    from qvl_export.building.plan import STAGES, Stage, run_build
    from qvl_export.building.settings import BuildOptions, Reporter

    template = Path(__file__).parents[1] / "data" / "chat_templates" / "custom_reader.jinja"
    docs = None
    if user_clips:
        docs = tmp_path / "docs"
        docs.mkdir()
        write_clip(docs / "a.mp4")
    seen, warned = [], []
    stages = tuple(s for s in STAGES if s.name in ("check_request", "validate_checkpoint", "load_documents"))
    stages += (Stage("seen", lambda ctx: seen.append(ctx.documents), "test: the documents loaded"),)
    settings = BuildOptions(precision="int8", calib_limit=3, chat_template=template, calib_docs=docs).settings()
    run = lambda: run_build(checkpoint("qwen2_vl"), tmp_path / "out", settings,  # noqa: E731
                            Reporter(say=lambda m: None, warn=warned.append), stages)
    if user_clips:
        with pytest.raises(QvlError, match=r"holds clips \(a.mp4\) but the chat template") as err:
            run()
        assert "\n" not in str(err.value) and not seen
        return
    run()
    assert [d.name for d in seen[0]] == ["00-invoice", "02-form"]
    assert any("without the built-in screen recording" in w for w in warned)
