"""Weight-only quantizer (``--precision decoder=int4``): MatMulNBits on onnxruntime.

Decode is memory-bound: every step streams all decoder weights once, so bytes per weight set the
speed. onnxruntime's ``MatMulNBitsQuantizer`` stores each weighted MatMul's weights as
``Precision.bits``-bit blocks (``BLOCK_SIZE`` values share an fp32 scale, symmetric, round to
nearest) in one ``MatMulNBits`` contrib op; ``accuracy_level`` 4 lets the CPU kernel quantize the
activations to int8 per block and run integer dot products (VNNI/AMX). No calibration data is
needed for round to nearest; ``--int4-method awq`` first searches activation-aware scales on the
calibration documents (``calibration/awq.py``) and quantizes each weight through them. The token
table is looked up as int8 rows by the ``quantize_embeddings`` pass that follows.

onnxruntime only (a contrib op): TensorRT takes int8 / fp8 Q/DQ graphs instead. The registry's
weight-only precisions come here (``building/quantize_stage.QUANTIZERS``); this module reads a
part and returns the quantized model, it writes nothing.
"""

from __future__ import annotations

from pathlib import Path

from qvl_export.core.precisions import Precision

BLOCK_SIZE = 32  # values per fp32 scale (demo model: exact match 0.896 vs fp32 0.900)
ACCURACY_LEVEL = 4  # int8 activations inside the kernel


def block_quantizer(precision: Precision):
    """onnxruntime's weight-only block quantizer with the settings the packed weights use."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                                 DefaultWeightOnlyQuantizer)

    config = DefaultWeightOnlyQuantConfig(block_size=BLOCK_SIZE, is_symmetric=True, accuracy_level=ACCURACY_LEVEL,
                                          bits=precision.bits)
    return DefaultWeightOnlyQuantizer(config)


def pack_weights(src: Path, precision: Precision, name: str, plan=None):
    """The part at ``src`` (a path, or an onnx-ir model read lazily) with every constant 2-D MatMul
    weight packed into MatMulNBits -> (onnx-ir model, quantization summary for the manifest). With an
    AWQ ``plan`` (``calibration.awq.AwqPlan``) each weight is quantized as the plan scales it and the
    inverse scales are written into the norms / projections it names.

    Streamed, one weight in flight: the part is read lazily (``onnx_ir.load``: external tensors are
    memory maps), each weight is packed by onnxruntime's own block quantizer
    (``DefaultWeightOnlyQuantizer.qbits_block_quant``, the C++ ``quantize_matmul_4bits`` that
    ``MatMulNBitsQuantizer`` calls) and its map released; only the packed blocks (1/8 of the fp32
    bytes, plus a scale per block) stay in memory. ``MatMulNBitsQuantizer`` itself loads the whole
    part and its quantized copy (a 2B decoder: 1.20x the fp32 weights); a test checks both write the
    same nodes and bytes."""
    import numpy as np
    import onnx_ir as ir

    from qvl_export.calibration.taps import release

    model = src if isinstance(src, ir.Model) else ir.load(str(src))
    quantizer = block_quantizer(precision)
    graph = model.graph
    packed: dict[str, tuple] = {}  # weight -> (blocks value, scales value, K, N)
    matmuls = [n for n in graph if n.op_type == "MatMul" and n.domain in ("", "ai.onnx")]
    for node in matmuls:
        w = node.inputs[1]
        if w is None or not w.is_initializer() or w.const_value is None or len(w.const_value.shape) != 2:
            continue
        if w.name not in packed:
            k, n = (int(d) for d in w.const_value.shape)
            weight = np.asarray(w.const_value.numpy(), dtype=np.float32)
            if plan is not None:
                weight = plan.weight(w.name, weight)
            blocks, scales, _ = quantizer.qbits_block_quant(np.ascontiguousarray(weight))
            del weight
            release(w.const_value)
            values = []
            for suffix, array in ((f"_Q{precision.bits}", blocks), ("_scales", scales)):
                tensor = ir.tensor(array, name=w.name + suffix)
                value = ir.Value(name=tensor.name, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype),
                                 const_value=tensor)
                graph.register_initializer(value)
                values.append(value)
            packed[w.name] = (*values, k, n)
        blocks, scales, k, n = packed[w.name]
        attrs = {"K": k, "N": n, "bits": precision.bits, "block_size": BLOCK_SIZE}
        if ACCURACY_LEVEL:
            attrs["accuracy_level"] = ACCURACY_LEVEL
        new = ir.node("MatMulNBits", [node.inputs[0], blocks, scales], attributes=attrs, domain="com.microsoft",
                      name=f"{node.name}_Q{precision.bits}")
        out = node.outputs[0]
        ir.convenience.replace_nodes_and_values(graph, node, [node], [new], [out], [new.outputs[0]])
    if not packed:
        before = len(matmuls)
        raise RuntimeError(f"{name}: no MatMul with constant weights to quantize ({before} MatMuls)")
    for weight in packed:
        value = graph.initializers.get(weight)
        if value is not None and not value.uses() and not value.is_graph_output():
            del graph.initializers[weight]
    if plan is not None:
        from qvl_export.calibration.awq import fold_vectors

        fold_vectors(model, plan)  # the norms that read 1 / s into the activation
    model.opset_imports.setdefault("com.microsoft", 1)
    count = sum(1 for n in graph if n.op_type == "MatMulNBits")
    method = "AWQ scales, symmetric" if plan is not None else "RTN, symmetric"
    summary = {"part": name, "precision": precision.name, "method": f"MatMulNBits weight-only ({method})",
               "bits": precision.bits, "block_size": BLOCK_SIZE, "accuracy_level": ACCURACY_LEVEL,
               "quantized_count": count, "kept_high_precision": {}}
    if plan is not None:
        summary["awq"] = plan.summary()
    return model, summary
