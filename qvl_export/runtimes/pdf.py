"""PDF pages as images (pypdfium2 + Pillow): ``run --image doc.pdf [--pages 1-3]``, PDF image items
in ``--messages`` and the PDF calibration documents - the package's one PDF renderer.

Each selected page becomes one image, rendered at ``PDF_DPI`` (150 dpi, so an A4 page is
1240 x 1754 pixels) and then pre-processed like any image. Before a page is rendered the prompt is
checked against what the artifacts take, from the page sizes in the PDF alone: at most
``max_images`` images for a trt build (its engines' range), image tokens (each page smart-resized
with the pixel range in force) below the model's context, and at most ``MAX_PAGES`` pages per
prompt (at 150 dpi 100 A4 pages are 650 MB of pixels before pre-processing).

pypdfium2 is imported only when a PDF is opened (``pip install pypdfium2``); the rest of the
runtime does not need it.
"""

from __future__ import annotations

import math
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

from PIL import Image

from qvl_export.core.errors import QvlError

PDF_DPI = 150
PDF_SCALE = PDF_DPI / 72  # pdfium renders at 72 dpi per unit of scale
MAX_PAGES = 100  # pages per prompt
PAGES_HELP = "pages as 1-3, 2 or 1,3-4 (counted from 1)"


def is_pdf(source: Any) -> bool:
    """A path (str or PathLike) whose name ends in .pdf."""
    return isinstance(source, (str, os.PathLike)) and os.fspath(source).lower().endswith(".pdf")


def parse_pages(spec: str | None, count: int, what: str = "the PDF") -> list[int]:
    """0-based page indices of ``spec`` (``"1-3"``, ``"2"``, ``"1,3-4"``; None: every page), in the
    order given; a malformed range or a page past ``count`` is one line."""
    if spec is None:
        return list(range(count))
    text = str(spec).replace(" ", "")
    if not text:
        raise QvlError(f"--pages is empty; give {PAGES_HELP}.")
    out: list[int] = []
    for part in text.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise QvlError(f"--pages {spec!r}: {part!r} is not a page or a range; give {PAGES_HELP}.")
        first, last = int(m.group(1)), int(m.group(2) or m.group(1))
        if first < 1 or last < first:
            raise QvlError(f"--pages {spec!r}: {part!r} is not a valid range; give {PAGES_HELP}.")
        if last > count:
            raise QvlError(f"--pages {spec!r}: {what} has {count} page{'s' if count != 1 else ''}, "
                           f"so page {last} does not exist.")
        out.extend(range(first - 1, last))
    return out


def _import_pdfium():
    try:
        import pypdfium2 as pdfium
    except ImportError:
        raise QvlError("PDF files need pypdfium2: pip install pypdfium2 (or convert the pages to PNG).") from None
    return pdfium


@contextmanager
def open_pdf(path: str | os.PathLike) -> Iterator[Any]:
    """The open ``pypdfium2.PdfDocument`` of ``path``; a missing, empty, damaged or locked file is one line."""
    path = Path(path)
    if not path.is_file():
        raise QvlError(f"PDF file {path} does not exist; check the path.")
    if path.stat().st_size == 0:
        raise QvlError(f"PDF file {path} is empty (0 bytes); re-save or re-download it.")
    pdfium = _import_pdfium()
    try:
        pdf = pdfium.PdfDocument(str(path))
    except Exception as err:  # noqa: BLE001 - PdfiumError (damaged, password), OSError
        raise QvlError(f"{path.name} is not a readable PDF ({err}); fix it or export its pages as PNG.") from None
    try:
        if len(pdf) == 0:
            raise QvlError(f"{path.name} has no pages.")
        yield pdf
    finally:
        pdf.close()


def page_sizes(pdf, indices: Sequence[int], scale: float = PDF_SCALE) -> list[tuple[int, int]]:
    """(width, height) in pixels of each page of ``indices`` once rendered at ``scale`` (nothing rendered)."""
    out = []
    for i in indices:
        w, h = pdf.get_page_size(i)  # points; rendered sizes round up, as pypdfium2's PdfPage.render
        out.append((max(1, math.ceil(w * scale)), max(1, math.ceil(h * scale))))
    return out


def render(pdf, indices: Sequence[int], scale: float = PDF_SCALE, what: str = "the PDF") -> list[Image.Image]:
    """Pages ``indices`` rendered as RGB images."""
    pages = []
    for i in indices:
        try:
            pages.append(pdf[i].render(scale=scale).to_pil().convert("RGB"))
        except Exception as err:  # noqa: BLE001 - a page pdfium cannot draw
            raise QvlError(f"{what}: page {i + 1} cannot be rendered ({err}); export it as PNG.") from None
    return pages


def render_pdf(path: str | os.PathLike, pages: Sequence[int] | None = None, scale: float = PDF_SCALE,
               max_pages: int | None = None) -> list[Image.Image]:
    """Pages of ``path`` (0-based ``pages``; None: all, at most ``max_pages``) as RGB images."""
    with open_pdf(path) as pdf:
        indices = list(range(len(pdf))) if pages is None else list(pages)
        return render(pdf, indices[:max_pages] if max_pages else indices, scale, Path(path).name)


class PageLimits:
    """What one prompt may hold: ``max_images`` (a trt build's engines; None: no such limit), the
    model's context in tokens, and the image tokens of a page of a given size (``tokens(w, h)``)."""

    def __init__(self, max_images: int | None, context: int, tokens, max_pages: int = MAX_PAGES):
        self.max_images, self.context, self.tokens, self.max_pages = max_images, context, tokens, max_pages

    @classmethod
    def of(cls, manifest, min_pixels: int | None = None, max_pixels: int | None = None) -> "PageLimits":
        """The limits of an artifacts folder's manifest (as its ``Pipeline`` enforces them), with the
        images' pixel range in force (``--min-pixels`` / ``--max-pixels``, else the checkpoint's)."""
        from qvl_export.runtimes.preprocess import smart_resize

        vision, pp = manifest.spec.vision, manifest.spec.preprocess
        lo = pp.min_pixels if min_pixels is None else int(min_pixels)
        hi = pp.max_pixels if max_pixels is None else int(max_pixels)
        factor = vision.patch_size * vision.spatial_merge_size

        def tokens(w: int, h: int) -> int:
            rh, rw = smart_resize(h, w, factor=factor, min_pixels=lo, max_pixels=hi)
            return rh * rw // (factor * factor)

        ranges = manifest.tensorrt.ranges if manifest.tensorrt else None
        max_images = int(ranges["max_images"]) if ranges and "max_images" in ranges else None
        return cls(max_images, int(manifest.spec.text.max_position_embeddings), tokens)


def _span(indices: Sequence[int]) -> str:
    """``[0, 1, 2, 4]`` -> ``"1-3,5"``."""
    parts, start = [], None
    for k, i in enumerate(indices):
        if start is None:
            start = i
        if k + 1 == len(indices) or indices[k + 1] != i + 1:
            parts.append(f"{start + 1}" if start == i else f"{start + 1}-{i + 1}")
            start = None
    return ",".join(parts)


def expand_each(sources: Sequence[Any], limits: PageLimits, pages: str | Sequence[str | None] | None = None,
                other_images: int = 0) -> list[list[Any]]:
    """Per source: ``[source]`` for anything but a PDF, the selected pages (PIL images, in the order
    given) for a PDF. ``pages``: one ``--pages`` spec for every PDF, or one per source (None: every
    page). ``other_images``: images of the prompt that are not in ``sources``. Everything is checked
    from the PDFs' page sizes before any page is rendered."""
    specs = list(pages) if isinstance(pages, (list, tuple)) else [pages] * len(sources)
    chosen: dict[int, list[int]] = {}  # source index -> page indices
    total_pages, page_tokens, kept = 0, 0, other_images + sum(1 for s in sources if not is_pdf(s))
    for n, source in enumerate(sources):
        if not is_pdf(source):
            continue
        name = Path(source).name
        with open_pdf(source) as pdf:
            indices = parse_pages(specs[n], len(pdf), name)
            sizes = page_sizes(pdf, indices)
        chosen[n] = indices
        total_pages += len(indices)
        page_tokens += sum(limits.tokens(w, h) for w, h in sizes)
        what = f"{name} pages {_span(indices)}" if specs[n] is not None else f"{name} ({len(indices)} pages)"
        images = kept + total_pages
        if limits.max_images is not None and images > limits.max_images:
            room = limits.max_images - kept - (total_pages - len(indices))
            hint = "" if room < 1 else f" (e.g. --pages 1{'' if room == 1 else f'-{room}'})"
            raise QvlError(f"{what}: {images} images in one prompt, but these artifacts' engines take at most "
                           f"{limits.max_images} (--max-images at build time): pass --pages with fewer pages"
                           f"{hint} or rebuild with a larger --max-images.")
        if total_pages > limits.max_pages:
            raise QvlError(f"{what}: {total_pages} PDF pages in one prompt, more than the {limits.max_pages} the "
                           "runtime renders at once: pass --pages with fewer pages.")
        if page_tokens >= limits.context:
            raise QvlError(f"{what}: the PDF pages of this prompt are {page_tokens} image tokens at {PDF_DPI} dpi, "
                           f"over the model's context of {limits.context}: pass --pages with fewer pages or a "
                           "smaller --max-pixels.")
    return [render_pdf(source, chosen[n]) if n in chosen else [source] for n, source in enumerate(sources)]


def expand(sources: Sequence[Any], limits: PageLimits, pages: str | None = None) -> list[Any]:
    """``sources`` with every PDF replaced by its selected pages (see :func:`expand_each`)."""
    if pages is not None and not any(is_pdf(s) for s in sources):
        raise QvlError("--pages selects PDF pages, but no --image is a PDF.")
    return [x for group in expand_each(sources, limits, pages) for x in group]


def expand_messages(messages: list[dict], limits: PageLimits, pages: str | None = None) -> list[dict]:
    """``messages`` with every image item whose image is a PDF replaced by one image item per selected
    page (the item's own ``"pages"``, else ``pages``); every other item is kept as it is."""
    from qvl_export.runtimes.chat import IMAGE_TYPES, image_source, item_kind

    items = [(i, j, item) for i, m in enumerate(messages) if isinstance(m.get("content"), list)
             for j, item in enumerate(m["content"]) if isinstance(item, dict) and item_kind(item) in IMAGE_TYPES]
    sources = [image_source(item) for _, _, item in items]
    if not any(is_pdf(s) for s in sources):
        if pages is not None:
            raise QvlError("--pages selects PDF pages, but no image of the chat is a PDF.")
        return messages
    specs = []
    for (_, _, item), source in zip(items, sources):
        spec = item.get("pages", pages) if is_pdf(source) else None
        if spec is not None and not isinstance(spec, str):
            raise QvlError(f"an image item's 'pages' must be a string such as \"1-3\", got {spec!r}.")
        specs.append(spec)
    groups = expand_each(sources, limits, specs)
    pages_of = {(i, j): [{"type": "image", "image": page} for page in group]
                for (i, j, _), source, group in zip(items, sources, groups) if is_pdf(source)}
    out = []
    for i, m in enumerate(messages):
        if isinstance(m.get("content"), list):
            m = {**m, "content": [x for j, item in enumerate(m["content"]) for x in pages_of.get((i, j), [item])]}
        out.append(m)
    return out
