"""``BuildContext``: what the stages of a build hand to each other.

Every stage of ``building.plan.STAGES`` takes the context (and, for per-part stages, the part's
name), reads what earlier stages left and adds its own. Parts travel as in-memory onnx-ir models in
``models`` between ``trace`` and ``save_part``; a later stage that needs a saved part asks
``model(name)``, which reads it back from the store. Files are written by the ``ArtifactStore``
only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qvl_export.building.settings import Reporter, Settings
from qvl_export.core import precisions as registry
from qvl_export.core.manifest import Calibration, Manifest, TensorRT
from qvl_export.core.store import ArtifactStore


@dataclass
class BuildContext:
    model_dir: Path
    out_dir: Path
    settings: Settings
    reporter: Reporter
    precisions: dict[str, str] = field(default_factory=dict)  # part -> precision name (check_request)
    spec: Any = None  # core.spec.ModelSpec (validate_checkpoint)
    weights: Any = None  # loading.weights.CheckpointWeights
    template: Any = None  # runtimes.chat.ChatTemplate
    tensorrt: TensorRT | None = None  # trt target: device, ranges, memory estimate (check_device)
    documents: list = field(default_factory=list)  # calibration documents (calibrated builds)
    stats: dict[str, Any] | None = None  # part -> calibration.taps.ActivationStats (calibrate)
    calibration: Calibration | None = None  # documents, settings, per-part quantization summaries
    quantized_parts: set[str] = field(default_factory=set)  # parts the quantize stage has quantized
    store: ArtifactStore | None = None
    models: dict[str, Any] = field(default_factory=dict)  # part -> onnx_ir.Model being worked on
    changed: set[str] = field(default_factory=set)  # parts whose in-memory model differs from the saved one
    passes: dict[str, list[dict]] = field(default_factory=dict)  # part -> pass records (manifest)
    lint: dict[str, list[dict]] = field(default_factory=dict)  # part -> TensorRT lint findings
    build_log: dict[str, Any] = field(default_factory=lambda: {"passes": {}})  # timings: never in the manifest

    def say(self, msg: str) -> None:
        self.reporter.say(msg)

    def warn(self, msg: str) -> None:
        self.reporter.warn(msg)

    @property
    def manifest(self) -> Manifest | None:
        return self.store.manifest if self.store is not None else None

    def of_kind(self, kind: str) -> dict[str, str]:
        """The parts whose precision is of ``kind`` (core.precisions FLOAT, CALIBRATED, WEIGHT_ONLY)."""
        return registry.of_kind(self.precisions, kind)

    @property
    def quantizes(self) -> bool:
        """Any part quantized (calibrated or weight-only): the quantized pass list runs on every part."""
        return any(registry.get(p).quantized for p in self.precisions.values())

    def model(self, name: str):
        """Part ``name`` as an onnx-ir model: the one in memory, else read back from the store."""
        if name not in self.models:
            import onnx_ir as ir

            self.models[name] = ir.load(self.store.file(self.store.manifest.parts[name].file))
        return self.models[name]

    def replace_model(self, name: str, model) -> None:
        """A stage changed part ``name``: ``save_part`` writes it."""
        self.models[name] = model
        self.changed.add(name)
