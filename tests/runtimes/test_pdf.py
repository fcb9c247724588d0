"""PDF pages as images: page ranges, limits checked from the page sizes before rendering, and
``run --image doc.pdf [--pages]`` / PDF image items in ``--messages`` giving exactly the tokens of
the same pages passed as PNG files."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image, ImageDraw

from qvl_export.cli import main
from qvl_export.core.errors import QvlError
from qvl_export.core.manifest import Manifest, TensorRT
from qvl_export.runtimes import pdf

pytest.importorskip("pypdfium2")


def write_pdf(path, count=3, size=(200, 150)):
    """A PDF written by Pillow: page k is a colour with its number drawn on it (72 dpi: points = pixels)."""
    pages = []
    for k in range(count):
        img = Image.new("RGB", size, (60 * k % 256, 180, 255 - 50 * k % 256))
        ImageDraw.Draw(img).text((20, 20), f"PAGE {k + 1}", fill="black")
        pages.append(img)
    pages[0].save(path, save_all=True, append_images=pages[1:], resolution=72.0)
    return path


def invoke(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.output, result.stderr


def one_line_error(code, err, *words):
    lines = [line for line in err.strip().splitlines() if not line.startswith("[qvl-export]")]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for w in words:
        assert w.lower() in lines[0].lower(), lines[0]


@pytest.mark.parametrize("spec,pages", [(None, [0, 1, 2, 3]), ("1-3", [0, 1, 2]), ("2", [1]), ("1,3-4", [0, 2, 3]),
                                        (" 4 , 1 ", [3, 0])])
def test_page_ranges(spec, pages):
    assert pdf.parse_pages(spec, 4) == pages


@pytest.mark.parametrize("spec,words", [("3-1", "not a valid range"), ("0", "not a valid range"), ("a", "not a page"),
                                        ("1-", "not a page"), ("5", "has 4 pages"), ("", "empty")])
def test_bad_page_ranges(spec, words):
    with pytest.raises(QvlError, match=words):
        pdf.parse_pages(spec, 4)


def test_pages_render_at_150_dpi_in_the_order_given(tmp_path):
    doc = write_pdf(tmp_path / "doc.pdf")
    pages = pdf.render_pdf(doc, [2, 0])
    assert [p.size for p in pages] == [(417, 313)] * 2  # 200 x 150 points at 150 / 72
    assert pages[0].getpixel((5, 5)) == (120, 180, 155) and pages[1].getpixel((5, 5)) == (0, 180, 255)
    with pdf.open_pdf(doc) as opened:
        assert pdf.page_sizes(opened, [0, 1]) == [(417, 313)] * 2


def test_limits_are_checked_before_rendering(tmp_path, artifacts):
    """trt: the engines' max images; every target: the context, and at most MAX_PAGES pages."""
    doc = write_pdf(tmp_path / "doc.pdf", count=4)
    manifest = Manifest.read(artifacts("qwen2_5_vl"))
    trt = pdf.PageLimits.of(dataclasses.replace(manifest, tensorrt=TensorRT(device="x", ranges={"max_images": 2})))
    assert trt.max_images == 2 and trt.context == manifest.spec.text.max_position_embeddings
    assert len(pdf.expand([doc], trt, "2-3")) == 2
    with pytest.raises(QvlError, match=r"doc.pdf pages 1-3: 3 images .* at most 2 .*--pages 1-2"):
        pdf.expand([doc], trt, "1-3")
    with pytest.raises(QvlError, match=r"doc.pdf \(4 pages\): 5 images .*--max-images"):
        pdf.expand([tmp_path / "a.png", doc], trt)  # another image counts too
    ort = pdf.PageLimits.of(manifest)
    assert ort.max_images is None and ort.tokens(417, 313) == 15 * 11  # smart-resized page, merged tokens
    small = pdf.PageLimits(None, context=4 * 165, tokens=ort.tokens)
    with pytest.raises(QvlError, match=r"660 image tokens .* context of 660"):
        pdf.expand([doc], small)
    with pytest.raises(QvlError, match="more than the 3 the runtime renders"):
        pdf.expand([doc], pdf.PageLimits(None, 10**6, ort.tokens, max_pages=3))


@pytest.mark.parametrize("content,words", [(b"%PDF-1.4 broken", "not a readable PDF"), (b"", "is empty"),
                                           (None, "does not exist")])
def test_unreadable_pdf_is_one_line(tmp_path, artifacts, content, words):
    path = tmp_path / "bad.pdf"
    if content is not None:
        path.write_bytes(content)
    code, _, err = invoke("run", artifacts("qwen2_5_vl"), "--image", path, "--prompt", "hi")
    one_line_error(code, err, words)


def test_run_pdf_pages_are_the_pages_as_images(tmp_path, artifacts):
    """--image doc.pdf --pages 1,3 runs exactly as the two rendered pages given as PNG files, and a PDF
    image item with "pages" in --messages as well; bad ranges and too many pages are one line."""
    art = artifacts("qwen2_5_vl")
    doc = write_pdf(tmp_path / "doc.pdf")
    pngs = []
    for k, page in zip((1, 3), pdf.render_pdf(doc, [0, 2])):
        pngs.append(tmp_path / f"p{k}.png")
        page.save(pngs[-1])
    common = ("--prompt", "Read the pages.", "--greedy", "--max-new-tokens", "6", "--json")
    code, out, err = invoke("run", art, "--image", pngs[0], "--image", pngs[1], *common)
    assert code == 0, err
    want = json.loads(out)
    code, out, err = invoke("run", art, "--image", doc, "--pages", "1,3", *common)
    assert code == 0, err
    got = json.loads(out)
    assert got["token_ids"] == want["token_ids"] and got["prompt_tokens"] == want["prompt_tokens"]
    code, out, err = invoke("run", art, "--image", doc, *common)  # every page: one more image
    assert code == 0, err
    assert json.loads(out)["prompt_tokens"] == want["prompt_tokens"] + 165 + 2

    chat = [{"role": "user", "content": [{"type": "image", "image": "doc.pdf", "pages": "1,3"},
                                         {"type": "text", "text": "Read the pages."}]}]
    (tmp_path / "chat.json").write_text(json.dumps(chat))
    code, out, err = invoke("run", art, "--messages", tmp_path / "chat.json", *common[2:])
    assert code == 0, err
    assert json.loads(out)["token_ids"] == want["token_ids"]

    code, _, err = invoke("run", art, "--image", doc, "--pages", "2-7", "--prompt", "hi")
    one_line_error(code, err, "has 3 pages")
    code, _, err = invoke("run", art, "--image", pngs[0], "--pages", "1", "--prompt", "hi")
    one_line_error(code, err, "no --image is a PDF")
    big = write_pdf(tmp_path / "big.pdf", count=30, size=(600, 800))  # 256 tokens a page, context 4096
    code, _, err = invoke("run", art, "--image", big, "--prompt", "hi")
    one_line_error(code, err, "big.pdf (30 pages)", "context of 4096", "--pages")
    assert np.asarray(pdf.render_pdf(big, [29])[0]).std() > 5
