"""``manifest.json``: the one contract between the build and the runtime, as a versioned schema.

Pure Python. Format 3 has typed sections:

- ``source``: the checkpoint (path, sha256 of its weights, architecture);
- ``spec``: the model spec (``core.spec.ModelSpec``);
- ``target``, ``precision`` (the label and each part's precision), ``build`` (layout choices);
- ``parts``: each part's files, inputs / outputs with shapes and ONNX dtype names
  (``float32``, ``bfloat16``, ``float8e4m3fn``, ...), the passes that ran, TensorRT lint findings,
  and its engine when one was built;
- ``calibration``: the documents, settings and per-part quantization summaries (quantized builds);
- ``tensorrt``: device, shape ranges, memory estimate, TensorRT version and GPU (trt target);
- ``versions``: library versions of the build; ``files``: the sha256 of every file of the folder,
  checked when the runtime loads it.

Readers ignore keys they do not know and name the known key that is missing. Formats 1 and 2 (an
untyped ``options`` dict, lint findings among the passes) are migrated on read; format 1 has no
checksums and loads only with verification off. Nothing that differs between two identical builds
(timings, temporary paths) is written: timings go to ``build_log.json``. ``ArtifactStore``
(building) is the only writer.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qvl_export.core.errors import QvlError
from qvl_export.core.parts import PARTS
from qvl_export.core.spec import ModelSpec

FORMAT = "qvl-export/3"
READABLE_FORMATS = ("qvl-export/1", "qvl-export/2", FORMAT)  # format 1: no checksums
MANIFEST = "manifest.json"
REPORT = "report.json"
BUILD_LOG = "build_log.json"  # timings and other per-run facts: not part of the checksummed contents
UNSEALED = (MANIFEST, REPORT, BUILD_LOG)  # files of the folder that ``files`` does not cover
PART_NAMES = PARTS


@dataclass
class TensorInfo:
    name: str
    shape: list[int | str]  # ints for fixed axes, names for dynamic ones
    dtype: str  # ONNX element type, lower case: float32, float16, bfloat16, int64, float8e4m3fn, ...


@dataclass
class PartInfo:
    name: str
    file: str
    external_data: str | None
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    precision: str
    passes: list[dict[str, Any]] = field(default_factory=list)
    lint: list[dict[str, Any]] = field(default_factory=list)  # TensorRT-rules findings (trt target)
    engine: str | None = None  # TensorRT engine file, when built

    def input(self, name: str) -> TensorInfo:
        return next(t for t in self.inputs if t.name == name)


@dataclass
class Source:
    path: str
    sha256: str
    architecture: str


@dataclass
class Calibration:
    documents: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    quantization: dict[str, dict[str, Any]] = field(default_factory=dict)  # part -> summary


@dataclass
class TensorRT:
    device: str
    ranges: dict[str, int]  # building.devices.Ranges as a dict: the runtime enforces what the engines cover
    memory_estimate: dict[str, float] = field(default_factory=dict)
    version: str | None = None  # of the TensorRT that built the engines
    compute_capability: str | None = None  # of the GPU they were built on, "8.9"


@dataclass
class BuildSettings:
    window_attention: str = "fused"
    chat_template: str = ""  # where the chat template came from


@dataclass
class Manifest:
    spec: ModelSpec
    parts: dict[str, PartInfo]
    target: str
    precisions: dict[str, str]  # part -> precision name (core.precisions)
    source: Source
    versions: dict[str, str] = field(default_factory=dict)
    build: BuildSettings = field(default_factory=BuildSettings)
    calibration: Calibration | None = None
    tensorrt: TensorRT | None = None
    files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256
    format: str = FORMAT

    @property
    def precision(self) -> str:
        """One word when every part has the same precision, else ``vision=..,merger=..,decoder=..``."""
        values = set(self.precisions.values())
        return values.pop() if len(values) == 1 else ",".join(f"{k}={v}" for k, v in self.precisions.items())

    def to_json(self) -> str:
        d = {
            "format": self.format,
            "target": self.target,
            "precision": {"label": self.precision, "parts": self.precisions},
            "source": dataclasses.asdict(self.source),
            "build": dataclasses.asdict(self.build),
            "versions": self.versions,
            "spec": self.spec.to_dict(),
            "parts": {k: dataclasses.asdict(p) for k, p in self.parts.items()},
            "calibration": dataclasses.asdict(self.calibration) if self.calibration else None,
            "tensorrt": dataclasses.asdict(self.tensorrt) if self.tensorrt else None,
            "files": dict(sorted(self.files.items())),
        }
        return json.dumps(d, indent=2)

    def write(self, folder: Path) -> None:
        """Write ``manifest.json`` atomically (ArtifactStore calls this; nobody else should)."""
        tmp = Path(folder) / f".{MANIFEST}.tmp"
        tmp.write_text(self.to_json())
        tmp.replace(Path(folder) / MANIFEST)

    def seal(self, folder: Path) -> None:
        """Record the sha256 of every file in ``folder`` (hidden temporary files, the manifest, the
        report and the build log excepted); call when the folder is complete, then ``write``."""
        folder = Path(folder)
        self.files = {p.relative_to(folder).as_posix(): file_sha256(p) for p in sorted(folder.rglob("*"))
                      if p.is_file() and p.name not in UNSEALED and not p.name.startswith(".")}
        self.format = FORMAT

    def verify(self, folder: Path) -> None:
        """Refuse a folder whose files differ from what the build recorded (one line naming the file)."""
        folder = Path(folder)
        if not self.files:
            raise QvlError(f"{folder / MANIFEST} (format {self.format}) has no file checksums: it was written by an "
                           "older qvl-export; rebuild the artifacts, or pass --skip-verify to load it unchecked.")
        needed = {p.file for p in self.parts.values()} | {p.external_data for p in self.parts.values()} | \
            {p.engine for p in self.parts.values()}
        unlisted = sorted(n for n in needed if n and n not in self.files)
        if unlisted:
            raise QvlError(f"{folder / MANIFEST} lists no checksum for {unlisted[0]}; the manifest was edited: "
                           "rebuild the artifacts.")
        for name, want in sorted(self.files.items()):
            path = folder / name
            if not path.is_file():
                raise QvlError(f"{path} is missing from the artifacts folder; copy the folder whole or rebuild it.")
            if file_sha256(path) != want:
                raise QvlError(f"{path} does not match the manifest (sha256 differs): the folder was modified or "
                               "mixed with another build; rebuild it or copy it whole (--skip-verify loads it "
                               "unchecked).")

    @classmethod
    def read(cls, folder: str | Path) -> "Manifest":
        path = Path(folder) / MANIFEST
        if not Path(folder).is_dir():
            raise QvlError(f"{folder} is not a folder; pass an artifacts folder made by 'qvl-export build'.")
        if not path.exists():
            raise QvlError(f"{folder} has no {MANIFEST}; pass an artifacts folder made by 'qvl-export build'.")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as err:
            raise QvlError(f"{path} is unreadable ({err}); rebuild the artifacts.") from None
        if not isinstance(d, dict):
            raise QvlError(f"{path} does not hold a JSON object; rebuild the artifacts.")
        if d.get("format") not in READABLE_FORMATS:
            raise QvlError(f"{path} has format {d.get('format')!r}, this qvl-export reads "
                           f"{', '.join(READABLE_FORMATS)}; rebuild the artifacts with this version.")
        if d["format"] != FORMAT:
            d = migrate(d)
        return _Reader(path).manifest(d)


def migrate(d: dict) -> dict:
    """Formats 1 and 2 -> format 3: the untyped ``options`` dict becomes the typed sections, lint
    findings leave the pass records, the precision label gains its per-part table."""
    d = dict(d)
    options = d.pop("options", None) or {}
    parts = d.get("parts")
    if isinstance(parts, dict):
        new_parts = {}
        for name, p in parts.items():
            if isinstance(p, dict):
                p = dict(p)
                passes = p.get("passes") or []
                lint = [r for r in passes if isinstance(r, dict) and r.get("pass") == "trt_lint"]
                p["passes"] = [r for r in passes if r not in lint]
                p["lint"] = [f for r in lint for f in r.get("findings") or []]
            new_parts[name] = p
        d["parts"] = new_parts
    label = d.get("precision")
    per_part = options.get("precisions")
    if not isinstance(per_part, dict) and isinstance(parts, dict):
        per_part = {k: p.get("precision") for k, p in parts.items() if isinstance(p, dict)}
    d["precision"] = {"label": label, "parts": per_part} if label is not None else None
    d["build"] = {"window_attention": options.get("window_attention", "fused"),
                  "chat_template": options.get("chat_template", "")}
    if "quantization" in options or "calibration" in options:
        calib = options.get("calibration") or {}
        d["calibration"] = {"documents": calib.get("documents", []), "settings": calib.get("settings", {}),
                            "quantization": options.get("quantization") or {}}
    trt = options.get("tensorrt") or {}
    if "ranges" in options or trt:
        d["tensorrt"] = {"device": trt.get("device", "x86-gpu"), "ranges": options.get("ranges") or trt.get("ranges")
                         or {}, "memory_estimate": trt.get("memory_estimate", {}), "version": trt.get("version"),
                         "compute_capability": trt.get("compute_capability")}
    return d


class _Reader:
    """Tolerant reads of a manifest: unknown keys are ignored, a missing known key is named."""

    def __init__(self, path: Path):
        self.path = path

    def manifest(self, d: dict) -> Manifest:
        parts = {}
        for k, p in self.need(d, "parts", dict).items():
            where = f"parts.{k}"
            p = dict(self.fields(PartInfo, p, where))
            p["inputs"] = [TensorInfo(**self.fields(TensorInfo, t, f"{where}.inputs"))
                           for t in self.need(p, "inputs", list, where)]
            p["outputs"] = [TensorInfo(**self.fields(TensorInfo, t, f"{where}.outputs"))
                            for t in self.need(p, "outputs", list, where)]
            parts[k] = PartInfo(**p)
        missing = [n for n in PARTS if n not in parts]
        if missing:
            raise QvlError(f"{self.path} has no 'parts.{missing[0]}'; the manifest is damaged: rebuild the artifacts.")
        try:
            spec = ModelSpec.from_dict(self.need(d, "spec", dict))
        except QvlError as err:
            raise QvlError(f"{self.path}: {err}") from None
        precision = self.need(d, "precision", dict)
        precisions = self.need(precision, "parts", dict, "precision")
        calib, trt = d.get("calibration"), d.get("tensorrt")
        files = d.get("files") or {}
        return Manifest(
            spec=spec, parts=parts, target=self.need(d, "target", str),
            precisions={str(k): str(v) for k, v in precisions.items()},
            source=Source(**self.fields(Source, self.need(d, "source", dict), "source")),
            versions=d.get("versions") or {},
            build=BuildSettings(**self.fields(BuildSettings, d.get("build") or {}, "build")),
            calibration=Calibration(**self.fields(Calibration, calib, "calibration")) if calib else None,
            tensorrt=TensorRT(**self.fields(TensorRT, trt, "tensorrt")) if trt else None,
            files={str(k): str(v) for k, v in files.items()}, format=d["format"])

    def need(self, d: dict, key: str, kind: type, where: str = ""):
        value = d.get(key) if isinstance(d, dict) else None
        if not isinstance(value, kind):
            name = f"{where}.{key}" if where else key
            raise QvlError(f"{self.path} has no valid '{name}'; the manifest is damaged or incomplete: rebuild the "
                           "artifacts.")
        return value

    def fields(self, klass, d: Any, where: str) -> dict:
        if not isinstance(d, dict):
            raise QvlError(f"{self.path}: '{where}' must be an object; rebuild the artifacts.")
        known = {f.name: f for f in dataclasses.fields(klass)}
        required = [n for n, f in known.items()
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        for n in required:
            if n not in d:
                raise QvlError(f"{self.path} has no '{where}.{n}'; the manifest is damaged or incomplete: rebuild "
                               "the artifacts.")
        return {k: v for k, v in d.items() if k in known}


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()
