"""ONNX Runtime backend of the thin runtime: one InferenceSession per part."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from qvl_export.errors import QvlError
from qvl_export.manifest import Manifest

log = logging.getLogger(__name__)


class OrtBackend:
    """Runs the parts named in the manifest with onnxruntime (CPU unless providers say otherwise)."""

    name = "onnxruntime"

    def __init__(self, folder: str | Path, manifest: Manifest, threads: int | None = None,
                 providers: list[str] | None = None):
        import onnxruntime as ort

        self.folder = Path(folder)
        self.manifest = manifest
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.providers = providers or ["CPUExecutionProvider"]
        self.sessions = {}
        for name, part in manifest.parts.items():
            path = self.folder / part.file
            if not path.exists():
                raise QvlError(f"{path} is missing; the artifacts folder is incomplete: rebuild it.")
            try:
                self.sessions[name] = ort.InferenceSession(str(path), opts, providers=self.providers)
            except Exception as err:
                raise QvlError(f"onnxruntime could not load {path.name} ({str(err).splitlines()[0]}); "
                               "rebuild the artifacts.") from None
        self.output_names = {n: [o.name for o in s.get_outputs()] for n, s in self.sessions.items()}

    def run(self, part: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Outputs of ``part`` in manifest order."""
        return self.sessions[part].run(self.output_names[part], feeds)
