"""Calibration documents: the built-in set is deterministic and varied; user folders with PDFs load."""

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


def test_builtin_set_is_deterministic_and_covers_every_kind():
    a, b = builtin_documents(), builtin_documents()
    assert [digest(d.image) for d in a] == [digest(d.image) for d in b]
    assert len(a) == len(KINDS)
    names = {d.name.split("-", 1)[1] for d in a}
    for kind in ("invoice", "form", "table", "bar_chart", "line_chart", "receipt", "small_print",
                 "ui_screenshot", "mixed_zh_en", "banner_wide", "tall_strip"):
        assert kind in names
    aspects = [d.image.width / d.image.height for d in a]
    assert min(aspects) < 0.3 and max(aspects) > 5  # extreme portrait and landscape
    for d in a:
        assert d.prompt.strip()
        assert np.asarray(d.image).std() > 5  # not blank


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
