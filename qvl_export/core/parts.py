"""Names of the parts an artifacts folder holds and of the targets it is built for, defined once."""

from __future__ import annotations

PARTS = ("vision", "merger", "decoder")  # in the order they run
TARGETS = ("ort", "trt")  # onnxruntime, TensorRT
