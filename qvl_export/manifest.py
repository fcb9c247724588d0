"""``manifest.json``: what an artifacts folder holds and how it was made.

Pure Python; the thin runtime reads it to find the parts, the model spec and the tokenizer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qvl_export.errors import QvlError
from qvl_export.loading.config import ModelSpec

FORMAT = "qvl-export/1"
MANIFEST = "manifest.json"
REPORT = "report.json"
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
        }, indent=2)

    def write(self, folder: Path) -> None:
        (Path(folder) / MANIFEST).write_text(self.to_json())

    @classmethod
    def read(cls, folder: str | Path) -> "Manifest":
        path = Path(folder) / MANIFEST
        if not Path(folder).is_dir():
            raise QvlError(f"{folder} is not a folder; pass an artifacts folder made by 'qvl-export build'.")
        if not path.exists():
            raise QvlError(f"{folder} has no {MANIFEST}; pass an artifacts folder made by 'qvl-export build'.")
        try:
            d = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise QvlError(f"{path} is unreadable ({err}); rebuild the artifacts.") from None
        if d.get("format") != FORMAT:
            raise QvlError(f"{path} has format {d.get('format')!r}, this qvl-export reads {FORMAT!r}; "
                           "rebuild the artifacts with this version.")
        parts = {}
        for k, p in d["parts"].items():
            p = dict(p)
            p["inputs"] = [TensorInfo(**t) for t in p["inputs"]]
            p["outputs"] = [TensorInfo(**t) for t in p["outputs"]]
            parts[k] = PartInfo(**p)
        return cls(spec=ModelSpec.from_dict(d["spec"]), parts=parts, target=d["target"],
                   precision=d["precision"], source=d["source"], versions=d["versions"],
                   options=d.get("options", {}), format=d["format"])
