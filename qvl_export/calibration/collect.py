"""Calibration: activation statistics of every part to quantize, taken while the float artifacts run.

For each document: the vision encoder and merger see the page - or a clip's temporal patches (two
frames each), decoded and sampled as the runtime samples a ``--video`` (``runtimes/video.py``) - the
decoder sees the prefill of page (or clip) + prompt, then decode steps along the fp32 model's own greedy answer (the reference answer,
since the fp32 artifacts pass the parity gate). Decode steps count every ``decode_stride`` tokens,
as the prefill does. The parts run their tap graphs (``calibration/taps.py``): statistics are
accumulated as the runs go, nothing is recorded, so memory does not grow with the documents.

The statistics are cached on disk (``--calib-cache DIR``): a later build with the same source
checkpoint, documents, settings and calibrator reuses them instead of running the model again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from qvl_export.calibration.documents import Document
from qvl_export.calibration.taps import ActivationStats, TappingBackend, write_tap_graph
from qvl_export.core.errors import QvlError

log = logging.getLogger(__name__)
CACHE_FORMAT = "qvl-calib/5"  # AWQ: generated-token pool (4: per-part keys; 3: one key for the set; 2: no |x| sums; 1: feeds)


@dataclass
class CalibSettings:
    max_new_tokens: int = 16
    decode_stride: int = 4
    max_pixels: int | None = None  # cap calibration pages (default: the preprocessor's)
    video_max_frames: int = 32  # frames kept per clip (evenly spaced), at most; sampling and sizes as the runtime's


def documents_key(docs: list[Document], settings: CalibSettings, source_sha: str) -> str:
    """What a part's statistics depend on besides its calibrator: the checkpoint, the settings and
    every document's bytes (hashed once per build; ``part_keys`` adds each part's calibrator)."""
    h = hashlib.sha256(f"{CACHE_FORMAT}|{source_sha}|{settings}".encode())
    for d in docs:
        h.update(d.name.encode())
        h.update(d.prompt.encode())
        if d.image is not None:
            h.update(d.image.tobytes())
        if isinstance(d.video, np.ndarray):  # frames [T, H, W, 3] uint8
            h.update(f"{d.video.shape}|{d.fps}".encode())
            h.update(np.ascontiguousarray(d.video).tobytes())
        elif d.video is not None:  # a clip file: its bytes
            h.update(f"{d.fps}".encode())
            with open(d.video, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()


def part_keys(documents: str, methods: dict[str, str]) -> dict[str, str]:
    """part -> cache key. Every part is tapped on the float artifacts, so one part's statistics do
    not depend on which other parts are calibrated or at what precision: an fp8 build (decoder only)
    reuses the decoder statistics an int8 build (every part) collected with the same calibrator."""
    return {part: hashlib.sha256(f"{documents}|{part}|{method}".encode()).hexdigest()
            for part, method in methods.items()}


def collect_stats(folder: Path, manifest, parts: list[str], docs: list[Document], settings: CalibSettings,
                  method: str | dict[str, str], threads: int | None = None,
                  progress: Callable[[int, int], None] | None = None) -> dict[str, ActivationStats]:
    """Run the float artifacts in ``folder`` over ``docs`` with the tap graphs of ``parts``; returns
    part -> ActivationStats. ``method`` is the calibrator, or part -> calibrator. The tap graphs are
    written beside the parts and removed afterwards."""
    from qvl_export.runtimes.onnxrt import OrtBackend
    from qvl_export.runtimes.pipeline import Pipeline

    folder = Path(folder)
    taps, files = {}, {}
    for name in parts:
        files[name] = f".{name}.tap.onnx"
        taps[name] = write_tap_graph(folder / manifest.parts[name].file, folder / files[name])
    try:
        tapped = dataclasses.replace(manifest, parts={
            n: dataclasses.replace(p, file=files[n]) if n in files else p for n, p in manifest.parts.items()})
        # weights mapped once, taps reduced early; one part's session open at a time, so the vision
        # tower's weights and attention activations are never resident beside the decoder's
        backend = OrtBackend(folder, tapped, threads=threads, lean=True, max_open=1)
        methods = method if isinstance(method, dict) else dict.fromkeys(parts, method)
        stats = {n: ActivationStats(taps[n], methods[n]) for n in parts}
        plain = {n: len(manifest.parts[n].outputs) for n in parts}
        step = {"n": 0}

        def keep(part: str, feeds: dict) -> bool:
            if part != "decoder":
                return True
            is_prefill = feeds["input_ids"].shape[1] > 1
            # AWQ keeps every decode step: the generated tokens' rows are its second pool (awq.py)
            kept = is_prefill or step["n"] % settings.decode_stride == 0 or methods[part] == "awq"
            step["n"] = 0 if is_prefill else step["n"] + 1
            return kept

        pipe = Pipeline(folder, TappingBackend(backend, stats, plain, keep), manifest)
        max_frames = settings.video_max_frames
        if pipe.ranges:  # trt: each temporal patch counts one image of the engines' range
            max_frames = min(max_frames, pipe.spec.vision.temporal_patch_size * int(pipe.ranges.get("max_images", 1)))
        for i, doc in enumerate(docs):
            media = {"videos": [doc.video], "fps": doc.fps, "max_frames": max_frames} if doc.video is not None \
                else {"images": [doc.image]}
            pipe.generate(prompt=doc.prompt, max_new_tokens=settings.max_new_tokens, max_pixels=settings.max_pixels,
                          temperature=0.0, repetition_penalty=1.0, **media)
            if progress:
                progress(i + 1, len(docs))
        del pipe, backend
    finally:
        for f in files.values():
            (folder / f).unlink(missing_ok=True)
    return stats


def _read_index(folder: Path) -> dict:
    try:
        meta = json.loads((folder / "index.json").read_text())
    except (OSError, ValueError):
        return {}
    return meta if meta.get("format") == CACHE_FORMAT and isinstance(meta.get("parts"), dict) else {}


def save_cache(folder: Path, keys: dict[str, str], stats: dict[str, ActivationStats]) -> None:
    """One npz per part (statistics, row samples, collector histograms) and an index of part ->
    (key, description). Parts already cached under other keys stay; the index is replaced last, so
    an interrupted write leaves the earlier cache readable."""
    folder.mkdir(parents=True, exist_ok=True)
    entries = _read_index(folder).get("parts", {})
    tmp = folder / ".writing"
    tmp.mkdir(exist_ok=True)
    for part, st in stats.items():
        np.savez(tmp / f"{part}.npz", **st.to_arrays())
        entries[part] = {"key": keys[part], "info": st.describe()}
    (tmp / "index.json").write_text(json.dumps({"format": CACHE_FORMAT, "parts": entries}))
    for part in stats:
        (tmp / f"{part}.npz").replace(folder / f"{part}.npz")
    (tmp / "index.json").replace(folder / "index.json")
    tmp.rmdir()


def load_cache(folder: Path, keys: dict[str, str]) -> dict[str, ActivationStats]:
    """The cached statistics of the parts whose key matches (the rest are collected again)."""
    entries = _read_index(folder).get("parts", {})
    out = {}
    for part, key in keys.items():
        entry = entries.get(part)
        if not isinstance(entry, dict) or entry.get("key") != key:
            continue
        try:
            with np.load(folder / f"{part}.npz") as z:
                out[part] = ActivationStats.from_arrays(entry["info"], {k: z[k] for k in z.files})
        except (OSError, ValueError, KeyError) as err:
            raise QvlError(f"Calibration cache {folder} is damaged ({err}); delete it and rebuild.") from None
    if entries and len(out) < len(keys):
        log.info("calibration cache %s lacks %s for these documents and settings; collecting them", folder,
                 ", ".join(sorted(set(keys) - set(out))))
    return out
