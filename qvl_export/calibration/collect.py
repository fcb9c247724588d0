"""Calibration feeds: realistic inputs of every part, recorded while the fp32 artifacts run.

For each document: the vision encoder and merger see the page; the decoder sees the prefill of
page + prompt, then decode steps along the fp32 model's own greedy answer (the reference answer,
since the fp32 artifacts pass the parity gate). Decode steps are sampled every ``decode_stride``
tokens so the KV caches of long answers don't dominate memory.

The feeds are cached on disk (``--calib-cache DIR``): a later build with the same source
checkpoint, documents and settings reuses them instead of running the model again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from qvl_export.calibration.documents import Document
from qvl_export.core.errors import QvlError

log = logging.getLogger(__name__)
CACHE_FORMAT = "qvl-calib/1"


@dataclass
class CalibSettings:
    max_new_tokens: int = 16
    decode_stride: int = 4
    max_pixels: int | None = None  # cap calibration pages (default: the preprocessor's)


def documents_key(docs: list[Document], settings: CalibSettings, source_sha: str) -> str:
    h = hashlib.sha256(f"{CACHE_FORMAT}|{source_sha}|{settings}".encode())
    for d in docs:
        h.update(d.name.encode())
        h.update(d.prompt.encode())
        h.update(d.image.tobytes())
    return h.hexdigest()


def collect_feeds(pipe, docs: list[Document], settings: CalibSettings,
                  progress: Callable[[int, int], None] | None = None) -> dict[str, list[dict[str, np.ndarray]]]:
    """Run ``pipe`` (fp32 artifacts) over ``docs``; returns part -> list of feed dicts."""
    feeds: dict[str, list[dict[str, np.ndarray]]] = {"vision": [], "merger": [], "decoder": []}
    step = {"n": 0}

    def record(part: str, f: dict[str, np.ndarray]) -> None:
        if part == "decoder":
            is_prefill = f["input_ids"].shape[1] > 1
            keep = is_prefill or step["n"] % settings.decode_stride == 0
            step["n"] = 0 if is_prefill else step["n"] + 1
            if not keep:
                return
        feeds[part].append({k: np.array(v, copy=True) for k, v in f.items()})

    inner = pipe.backend
    pipe.backend = _Recording(inner, record)
    try:
        for i, doc in enumerate(docs):
            pipe.generate([doc.image], doc.prompt, max_new_tokens=settings.max_new_tokens,
                          max_pixels=settings.max_pixels, temperature=0.0, repetition_penalty=1.0)
            if progress:
                progress(i + 1, len(docs))
    finally:
        pipe.backend = inner
    return feeds


class _Recording:
    """Wraps a runtime backend: every part run is recorded (feeds copied) before it executes."""

    def __init__(self, inner, record: Callable[[str, dict[str, np.ndarray]], None]):
        self._inner = inner
        self._record = record

    def run(self, part: str, feeds: dict[str, np.ndarray]):
        self._record(part, feeds)
        return self._inner.run(part, feeds)

    def __getattr__(self, name):
        return getattr(self._inner, name)


def save_cache(folder: Path, key: str, feeds: dict[str, list[dict[str, np.ndarray]]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / ".writing"
    tmp.mkdir(exist_ok=True)
    counts = {}
    for part, items in feeds.items():
        for i, f in enumerate(items):
            np.savez(tmp / f"{part}_{i:04d}.npz", **f)
        counts[part] = len(items)
    (tmp / "index.json").write_text(json.dumps({"format": CACHE_FORMAT, "key": key, "counts": counts}))
    for p in tmp.iterdir():
        p.replace(folder / p.name)
    tmp.rmdir()


def load_cache(folder: Path, key: str) -> dict[str, list[dict[str, np.ndarray]]] | None:
    index = folder / "index.json"
    if not index.exists():
        return None
    try:
        meta = json.loads(index.read_text())
    except ValueError:
        return None
    if meta.get("format") != CACHE_FORMAT or meta.get("key") != key:
        log.info("calibration cache %s is for other documents or settings; recollecting", folder)
        return None
    feeds = {}
    try:
        for part, n in meta["counts"].items():
            feeds[part] = []
            for i in range(n):
                with np.load(folder / f"{part}_{i:04d}.npz") as z:
                    feeds[part].append({k: z[k] for k in z.files})
    except (OSError, ValueError, KeyError) as err:
        raise QvlError(f"Calibration cache {folder} is damaged ({err}); delete it and rebuild.") from None
    return feeds
