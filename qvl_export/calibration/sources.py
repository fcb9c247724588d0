"""User calibration documents: a folder of PNG/JPEG/WebP images, PDF files (pages rendered by the
runtime's PDF renderer, ``runtimes/pdf.py``) and short video clips (mp4 / webm / mkv / mov / gif), with
optional prompts: ``prompts.txt`` (one per line, used in rotation) or a sidecar ``<file>.txt`` beside
a document.

A clip is calibrated as the runtime would run it (``runtimes/video.py``): sampled at 2 fps, frames
smart-resized in the video pixel budget the model's context sets, at most
``CalibSettings.video_max_frames`` frames. Each clip is opened here (its header read), so a corrupt
or empty one fails before anything is traced. A clip is one file: subfolders are skipped, not read
as folders of frames (``run --video`` takes those), so a folder of page scans never turns into a
video by accident.
"""

from __future__ import annotations

from pathlib import Path

from qvl_export.calibration.documents import Document
from qvl_export.core.errors import QvlError
from qvl_export.runtimes.preprocess import load_image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
CLIP_SUFFIXES = (".mp4", ".webm", ".mkv", ".mov", ".gif")
DEFAULT_PROMPT = "Read this document and answer: what is the most important number on it?"
DEFAULT_CLIP_PROMPT = "Describe what happens in this recording."
MAX_PDF_PAGES = 8  # per file
KINDS_HELP = "PNG/JPEG/WebP/PDF files or mp4/webm/mkv/mov/gif clips"


def folder_documents(folder: str | Path, limit: int | None = None) -> list[Document]:
    from qvl_export.runtimes.pdf import render_pdf
    from qvl_export.runtimes.video import open_video

    folder = Path(folder)
    if not folder.is_dir():
        raise QvlError(f"--calib-docs {folder} is not a folder; pass a folder of {KINDS_HELP}.")
    prompts_file = folder / "prompts.txt"
    prompts = [p.strip() for p in prompts_file.read_text().splitlines() if p.strip()] if prompts_file.exists() else []
    docs: list[Document] = []
    for path in sorted(folder.iterdir()):
        suffix = path.suffix.lower()
        if not path.is_file() or suffix not in IMAGE_SUFFIXES + CLIP_SUFFIXES + (".pdf",):
            continue
        sidecar = path.with_suffix(".txt")
        default = DEFAULT_CLIP_PROMPT if suffix in CLIP_SUFFIXES else DEFAULT_PROMPT
        prompt = sidecar.read_text().strip() if sidecar.exists() else (
            prompts[len(docs) % len(prompts)] if prompts else default)
        if suffix == ".pdf":
            for i, page in enumerate(render_pdf(path, max_pages=MAX_PDF_PAGES)):
                docs.append(Document(f"{path.name}#p{i + 1}", page, prompt))
        elif suffix in CLIP_SUFFIXES:
            open_video(path)  # header only: a corrupt or empty clip is refused here, before tracing
            docs.append(Document(path.name, None, prompt, video=path))
        else:
            docs.append(Document(path.name, load_image(path), prompt))
        if limit and len(docs) >= limit:
            break
    if not docs:
        raise QvlError(f"--calib-docs {folder} holds no {KINDS_HELP}; add some documents.")
    return docs[:limit] if limit else docs
