"""Weight-only quantizer (``--precision decoder=int4``): MatMulNBits on onnxruntime.

Decode is memory-bound: every step streams all decoder weights once, so bytes per weight set the
speed. onnxruntime's ``MatMulNBitsQuantizer`` stores each weighted MatMul's weights as
``Precision.bits``-bit blocks (``BLOCK_SIZE`` values share an fp32 scale, symmetric, round to
nearest) in one ``MatMulNBits`` contrib op; ``accuracy_level`` 4 lets the CPU kernel quantize the
activations to int8 per block and run integer dot products (VNNI/AMX). No calibration data is
needed. The token table is looked up as int8 rows by the ``quantize_embeddings`` pass that follows.

onnxruntime only (a contrib op): TensorRT takes int8 / fp8 Q/DQ graphs instead. The registry's
weight-only precisions come here (``building/quantize_stage.QUANTIZERS``); this module reads a
part and returns the quantized model, it writes nothing.
"""

from __future__ import annotations

from pathlib import Path

from qvl_export.core.precisions import Precision

BLOCK_SIZE = 32  # values per fp32 scale (demo model: exact match 0.896 vs fp32 0.900)
ACCURACY_LEVEL = 4  # int8 activations inside the kernel


def pack_weights(src: Path, precision: Precision, name: str):
    """The part at ``src`` with every constant-weight MatMul packed into MatMulNBits -> (onnx-ir model,
    quantization summary for the manifest)."""
    import onnx
    import onnx_ir as ir
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.load(str(src))
    before = sum(1 for n in model.graph.node if n.op_type == "MatMul")
    quantizer = MatMulNBitsQuantizer(model, bits=precision.bits, block_size=BLOCK_SIZE, is_symmetric=True,
                                     accuracy_level=ACCURACY_LEVEL)
    quantizer.process()
    quantized = quantizer.model.model
    packed = sum(1 for n in quantized.graph.node if n.op_type == "MatMulNBits")
    if not packed:
        raise RuntimeError(f"{name}: no MatMul with constant weights to quantize ({before} MatMuls)")
    summary = {"part": name, "precision": precision.name, "method": "MatMulNBits weight-only (RTN, symmetric)",
               "bits": precision.bits, "block_size": BLOCK_SIZE, "accuracy_level": ACCURACY_LEVEL,
               "quantized_count": packed, "kept_high_precision": {}}
    return ir.from_proto(quantized), summary
