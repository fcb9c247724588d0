"""``manifest.json``: what an artifacts folder holds and how it was made.

Pure Python; the thin runtime reads it to find the parts, the model spec and the tokenizer.

Format 2 adds ``files``: the sha256 of every file of the folder (parts, external data, engines,
tokenizer, chat template, configs), checked when the runtime loads the folder, so a part swapped
in from another build or a damaged copy is refused instead of run. Readers ignore keys they do not
know and name the known key that is missing. Nothing that differs between two identical builds
(timings, temporary paths) is written here: two builds of the same checkpoint with the same
options give byte-identical folders (timings go to ``build_log.json``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qvl_export.errors import QvlError
from qvl_export.loading.config import ModelSpec

FORMAT = "qvl-export/2"
READABLE_FORMATS = ("qvl-export/1", FORMAT)  # format 1: no checksums (loads only with verification off)
MANIFEST = "manifest.json"
REPORT = "report.json"
BUILD_LOG = "build_log.json"  # timings and other per-run facts: not part of the checksummed contents
UNSEALED = (MANIFEST, REPORT, BUILD_LOG)  # files of the folder that ``files`` does not cover
PART_NAMES = ("vision", "merger", "decoder")


@dataclass
class TensorInfo:
    name: str
    shape: list[int | str]  # ints for fixed axes, names for dynamic ones
    dtype: str


@dataclass
class PartInfo:
    name: str
    file: str
    external_data: str | None
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    precision: str
    passes: list[dict[str, Any]] = field(default_factory=list)
    engine: str | None = None  # TensorRT engine file, when built

    def input(self, name: str) -> TensorInfo:
        return next(t for t in self.inputs if t.name == name)


@dataclass
class Manifest:
    spec: ModelSpec
    parts: dict[str, PartInfo]
    target: str
    precision: str
    source: dict[str, Any]
    versions: dict[str, str]
    options: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256 (format 2)
    format: str = FORMAT

    def to_json(self) -> str:
        def part(p: PartInfo) -> dict:
            d = dict(p.__dict__)
            d["inputs"] = [t.__dict__ for t in p.inputs]
            d["outputs"] = [t.__dict__ for t in p.outputs]
            return d

        return json.dumps({
            "format": self.format,
            "target": self.target,
            "precision": self.precision,
            "source": self.source,
            "versions": self.versions,
            "options": self.options,
            "spec": self.spec.to_dict(),
            "parts": {k: part(p) for k, p in self.parts.items()},
            "files": dict(sorted(self.files.items())),
        }, indent=2)

    def write(self, folder: Path) -> None:
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
        reader = _Reader(path)
        parts = {}
        for k, p in reader.need(d, "parts", dict).items():
            where = f"parts.{k}"
            p = dict(reader.fields(PartInfo, p, where))
            p["inputs"] = [TensorInfo(**reader.fields(TensorInfo, t, f"{where}.inputs"))
                           for t in reader.need(p, "inputs", list, where)]
            p["outputs"] = [TensorInfo(**reader.fields(TensorInfo, t, f"{where}.outputs"))
                            for t in reader.need(p, "outputs", list, where)]
            parts[k] = PartInfo(**reader.fields(PartInfo, p, where))
        missing = [n for n in PART_NAMES if n not in parts]
        if missing:
            raise QvlError(f"{path} has no 'parts.{missing[0]}'; the manifest is damaged: rebuild the artifacts.")
        try:
            spec = ModelSpec.from_dict(reader.need(d, "spec", dict))
        except QvlError as err:
            raise QvlError(f"{path}: {err}") from None
        files = d.get("files") or {}
        return cls(spec=spec, parts=parts, target=reader.need(d, "target", str),
                   precision=reader.need(d, "precision", str), source=reader.need(d, "source", dict),
                   versions=d.get("versions") or {}, options=d.get("options") or {},
                   files={str(k): str(v) for k, v in files.items()}, format=d["format"])


class _Reader:
    """Tolerant reads of a manifest: unknown keys are ignored, a missing known key is named."""

    def __init__(self, path: Path):
        self.path = path

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
