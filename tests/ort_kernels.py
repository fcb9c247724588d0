"""What onnxruntime makes of a quantized build's parts: the graphs it optimizes (as the runtime opens
them), read back - shared by the int8 tests of every architecture."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import onnx

INTEGER_KERNELS = ("DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QGemm")


def optimized_ops(art: Path, manifest, tmp_path: Path) -> dict[str, tuple[list[str], Counter]]:
    """part -> (the MatMul/Gemm nodes left in float on a dequantized weight, count of each integer kernel)
    in onnxruntime's optimized graph, with the runtime's own session options."""
    import onnxruntime as ort

    from qvl_export.runtimes.onnxrt import session_options

    found = {}
    for name, part in manifest.parts.items():
        opts, disabled = session_options(part, 1)
        opts.optimized_model_filepath = str(tmp_path / f"{name}.opt.onnx")
        ort.InferenceSession(str(art / part.file), opts, providers=["CPUExecutionProvider"],
                             disabled_optimizers=disabled)
        model = onnx.load(tmp_path / f"{name}.opt.onnx", load_external_data=False)
        producers = {o: n.op_type for n in model.graph.node for o in n.output}
        float_on_dq = [n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm")
                       and len(n.input) > 1 and producers.get(n.input[1]) == "DequantizeLinear"]
        found[name] = float_on_dq, Counter(n.op_type for n in model.graph.node if n.op_type in INTEGER_KERNELS)
    return found
