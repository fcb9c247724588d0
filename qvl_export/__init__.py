"""qvl-export: export, optimize and verify Qwen2-VL family models for ONNX Runtime and TensorRT.

Stages, in the order data flows: ``loading`` (checkpoint -> spec + weights), ``models`` (export-ready
torch modules), ``export`` (tracing to ONNX parts), ``passes`` (graph rewrites), ``building``
(artifacts folder + manifest), ``runtimes`` (thin numpy/onnxruntime runtime), ``parity`` (gate
against the transformers reference).
"""

__version__ = "0.1.0"
