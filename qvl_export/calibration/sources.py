"""User calibration documents: a folder of PNG/JPEG/WebP images and PDF files (pages rendered with
pypdfium2), with optional prompts: ``prompts.txt`` (one per line, used in rotation) or a sidecar
``<file>.txt`` beside a document.
"""

from __future__ import annotations

from pathlib import Path

from qvl_export.calibration.documents import Document
from qvl_export.core.errors import QvlError
from qvl_export.runtimes.preprocess import load_image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
DEFAULT_PROMPT = "Read this document and answer: what is the most important number on it?"
PDF_SCALE = 150 / 72  # render at 150 dpi
MAX_PDF_PAGES = 8  # per file


def folder_documents(folder: str | Path, limit: int | None = None) -> list[Document]:
    folder = Path(folder)
    if not folder.is_dir():
        raise QvlError(f"--calib-docs {folder} is not a folder; pass a folder of PNG/JPEG/WebP/PDF files.")
    prompts_file = folder / "prompts.txt"
    prompts = [p.strip() for p in prompts_file.read_text().splitlines() if p.strip()] if prompts_file.exists() else []
    docs: list[Document] = []
    for path in sorted(folder.iterdir()):
        suffix = path.suffix.lower()
        if suffix not in IMAGE_SUFFIXES + (".pdf",):
            continue
        sidecar = path.with_suffix(".txt")
        prompt = sidecar.read_text().strip() if sidecar.exists() else (
            prompts[len(docs) % len(prompts)] if prompts else DEFAULT_PROMPT)
        if suffix == ".pdf":
            for i, page in enumerate(render_pdf(path)):
                docs.append(Document(f"{path.name}#p{i + 1}", page, prompt))
        else:
            docs.append(Document(path.name, load_image(path), prompt))
        if limit and len(docs) >= limit:
            break
    if not docs:
        raise QvlError(f"--calib-docs {folder} holds no PNG/JPEG/WebP/PDF files; add some documents.")
    return docs[:limit] if limit else docs


def render_pdf(path: Path, max_pages: int = MAX_PDF_PAGES):
    try:
        import pypdfium2 as pdfium
    except ImportError:
        raise QvlError("PDF calibration documents need pypdfium2: pip install pypdfium2.") from None
    try:
        pdf = pdfium.PdfDocument(str(path))
    except Exception as err:
        raise QvlError(f"{path.name} is not a readable PDF ({err}); remove it or fix it.") from None
    pages = []
    try:
        for i in range(min(len(pdf), max_pages)):
            pages.append(pdf[i].render(scale=PDF_SCALE).to_pil().convert("RGB"))
    finally:
        pdf.close()
    return pages
