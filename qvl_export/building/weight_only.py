"""Weight-only quantizer (``--precision decoder=int4``): MatMulNBits on onnxruntime, int4
DequantizeLinear blocks for TensorRT.

Decode is memory-bound: every step streams all decoder weights once, so bytes per weight set the
speed. onnxruntime's ``MatMulNBitsQuantizer`` stores each weighted MatMul's weights as
``Precision.bits``-bit blocks (``BLOCK_SIZE`` values share an fp32 scale, symmetric, round to
nearest) in one ``MatMulNBits`` contrib op; ``accuracy_level`` 4 lets the CPU kernel quantize the
activations to int8 per block and run integer dot products (VNNI/AMX). No calibration data is
needed for round to nearest; ``--int4-method awq`` first searches activation-aware scales on the
calibration documents (``calibration/awq.py``) and quantizes each weight through them. The token
table is looked up as int8 rows by the ``quantize_embeddings`` pass that follows.

MatMulNBits is a contrib op, for the ort target. The trt target gets the form TensorRT's weight-only
quantization takes (``qdq_weights``): each weight an INT4 initializer read by a ``DequantizeLinear``
with ``block_size`` 64 along K and a positive fp16 scale per block (symmetric, no zero point; round
to nearest searches each block's scale among ``max|w| / d``, d from 7 to 8, for the least squared
error - d = 7 alone left the 16th level unused and cost the demo reader 4.65 points; AWQ keeps
``max|w| / 7``, the grid its search assumes), feeding the MatMul in an fp16 graph (opset 21: blocked DQ and INT4). onnxruntime runs
that graph on the CPU, so it passes the parity gate here before it goes to TensorRT.

The registry's weight-only precisions come here (``building/quantize_stage.QUANTIZERS``); this module
reads a part and returns the quantized model, it writes nothing.
"""

from __future__ import annotations

from pathlib import Path

from qvl_export.core.precisions import Precision

BLOCK_SIZE = 32  # values per fp32 scale (demo model: exact match 0.896 vs fp32 0.900)
ACCURACY_LEVEL = 4  # int8 activations inside the kernel
# TensorRT's int4 block sizes take 64 and 128; 64 is used: on the trained demo reader (250 held-out pages, max|w| / 7 grid,
# fp32 0.900) round to nearest read 0.860 with 64 and 0.844 with 128, AWQ 0.900 and 0.892 (0.896 with 64 after
# the clipping fix), for 1/64 of a byte more scale per weight
TRT_BLOCK_SIZE = 64
# --int4-block: onnxruntime's MatMulNBits takes powers of two from 16; TensorRT 64 and 128 (trt_lint.INT4_BLOCK_SIZES).
# Larger blocks decode faster on CPU (fewer scales per weight: 1536 x 8960 weights streamed from memory, int8
# activations, AMD EPYC Zen 4: 35 G weights/s with 32, 48 with 128) and round coarser.
ORT_BLOCK_SIZES = (16, 32, 64, 128, 256)
QDQ_OPSET = 21  # DequantizeLinear with block_size and INT4 inputs


def block_size_for(target: str, requested: int | None = None) -> int:
    """The int4 block of a ``target`` build: ``requested`` (``--int4-block``) when the target's kernels
    take it, else the target's default; an impossible request is refused in one line."""
    from qvl_export.building.trt_lint import INT4_BLOCK_SIZES
    from qvl_export.core.errors import QvlError

    default, allowed = (TRT_BLOCK_SIZE, INT4_BLOCK_SIZES) if target == "trt" else (BLOCK_SIZE, ORT_BLOCK_SIZES)
    if requested is None:
        return default
    if requested not in allowed:
        engine = "TensorRT" if target == "trt" else "onnxruntime's MatMulNBits"
        raise QvlError(f"--int4-block {requested}: {engine} takes blocks of {', '.join(map(str, allowed))} "
                       f"(default {default}).")
    return requested


def block_quantizer(bits: int, block_size: int = BLOCK_SIZE):
    """onnxruntime's weight-only block quantizer with the settings the packed weights use, for
    ``bits``-bit blocks of ``block_size``."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                                 DefaultWeightOnlyQuantizer)

    config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True, accuracy_level=ACCURACY_LEVEL,
                                          bits=bits)
    return DefaultWeightOnlyQuantizer(config)


def pack_weights(src: Path, precision: Precision, name: str, plan=None, block_size: int = BLOCK_SIZE):
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
    quantizer = block_quantizer(precision.bits, block_size)
    graph = model.graph
    packed: dict[str, tuple] = {}  # weight -> (blocks value, scales value, K, N)
    matmuls = [n for n in graph if n.op_type == "MatMul" and n.domain in ("", "ai.onnx")]
    for node, w in weighted_matmuls(graph):
        if w.name not in packed:
            k, n = (int(d) for d in w.const_value.shape)
            weight = np.asarray(w.const_value.numpy(), dtype=np.float32)
            if plan is not None:
                weight = plan.weight(w.name, weight)
            blocks, scales, _ = quantizer.qbits_block_quant(np.ascontiguousarray(weight))
            del weight
            release(w.const_value)
            values = [_initializer(graph, w.name + suffix, array)
                      for suffix, array in ((f"_Q{precision.bits}", blocks), ("_scales", scales))]
            packed[w.name] = (*values, k, n)
        blocks, scales, k, n = packed[w.name]
        attrs = {"K": k, "N": n, "bits": precision.bits, "block_size": block_size}
        if ACCURACY_LEVEL:
            attrs["accuracy_level"] = ACCURACY_LEVEL
        new = ir.node("MatMulNBits", [node.inputs[0], blocks, scales], attributes=attrs, domain="com.microsoft",
                      name=f"{node.name}_Q{precision.bits}")
        out = node.outputs[0]
        ir.convenience.replace_nodes_and_values(graph, node, [node], [new], [out], [new.outputs[0]])
    _finish(model, packed, plan, name, len(matmuls))
    model.opset_imports.setdefault("com.microsoft", 1)
    count = sum(1 for n in graph if n.op_type == "MatMulNBits")
    method = "AWQ scales, symmetric" if plan is not None else "RTN, symmetric"
    summary = {"part": name, "precision": precision.name, "method": f"MatMulNBits weight-only ({method})",
               "bits": precision.bits, "block_size": block_size, "accuracy_level": ACCURACY_LEVEL,
               "quantized_count": count, "kept_high_precision": {}}
    if plan is not None:
        summary["awq"] = plan.summary()
    return model, summary


def weighted_matmuls(graph):
    """(node, weight value) of every default-domain MatMul whose second input is a constant 2-D initializer."""
    out = []
    for node in list(graph):
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
            continue
        w = node.inputs[1]
        if w is not None and w.is_initializer() and w.const_value is not None and len(w.const_value.shape) == 2:
            out.append((node, w))
    return out


def _initializer(graph, name: str, array):
    """A new initializer ``name`` holding ``array``, registered in ``graph``."""
    import onnx_ir as ir

    tensor = ir.tensor(array, name=name)
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
    graph.register_initializer(value)
    return value


def int4_blocks(w, block_size: int, scale_dtype, search: bool = False) -> tuple:
    """``w [K, N]`` (K a multiple of ``block_size``) -> (int4 values [K, N] as ml_dtypes.int4, scales
    [K / block, N] in ``scale_dtype``): TensorRT's symmetric grid, rounded against the stored scale.
    ``search``: each block's scale is the one of ``awq.least_error_scales`` (round to nearest builds);
    without it ``max|w| / 7``, the grid AWQ's search assumes."""
    import ml_dtypes
    import numpy as np

    from qvl_export.calibration.awq import block_scales, least_error_scales

    k, n = w.shape
    blocks = np.asarray(w, dtype=np.float32).reshape(k // block_size, block_size, n)
    scale = least_error_scales(blocks, scale_dtype) if search else block_scales(blocks).astype(scale_dtype)
    scale[scale == 0] = 1  # an all-zero block (its values are 0 on any grid)
    q = np.divide(blocks, scale.astype(np.float32), dtype=np.float32)
    np.rint(q, out=q)
    np.clip(q, -8, 7, out=q)
    return q.reshape(k, n).astype(ml_dtypes.int4), scale.reshape(k // block_size, n)


def qdq_weights(src, precision: Precision, name: str, plan=None, block_size: int = TRT_BLOCK_SIZE):
    """TensorRT's int4 weight-only form of the part at ``src`` (a path or a lazily read onnx-ir model):
    every constant 2-D MatMul weight becomes an INT4 initializer dequantized in blocks along K by a
    ``DequantizeLinear`` (fp16 scales in an fp16 graph) -> (onnx-ir model, summary). Streamed like
    ``pack_weights``: one float weight in flight. A weight whose K is not a multiple of the block stays
    float (named in the summary). With an AWQ ``plan`` (searched on the same grid, ``positive=True``)
    each weight is quantized as the plan scales it and the inverse scales are folded upstream."""
    import numpy as np
    import onnx_ir as ir

    from qvl_export.calibration.awq import SCALE_DIVISORS
    from qvl_export.calibration.taps import release

    if precision.bits != 4:
        raise RuntimeError(f"{name}: TensorRT's weight-only form is int4 (got {precision.bits} bits)")
    model = src if isinstance(src, ir.Model) else ir.load(str(src))
    graph = model.graph
    block = block_size
    done: dict[str, ir.Value] = {}  # weight -> the DequantizeLinear output that replaces it
    kept: dict[str, str] = {}
    unscaled: set[str] = set()  # kept weights already given the plan's folds
    matmuls = weighted_matmuls(graph)
    for node, w in matmuls:
        if w.name not in done:
            k, n = (int(d) for d in w.const_value.shape)
            if k % block:
                kept[node.name] = f"K = {k} is not a multiple of TensorRT's {block}-value int4 blocks"
                if plan is not None and w.name not in unscaled:  # kept in float, it still takes the folds
                    _set_float(w, plan.weight(w.name, np.asarray(w.const_value.numpy(), np.float32), clip=False))
                    unscaled.add(w.name)
                continue
            scale_dtype = w.const_value.dtype.numpy()
            weight = np.asarray(w.const_value.numpy(), dtype=np.float32)
            if plan is not None:
                weight = plan.weight(w.name, weight)
            q, scale = int4_blocks(weight, block, scale_dtype, search=plan is None)
            del weight
            release(w.const_value)
            values = [_initializer(graph, w.name + suffix, array) for suffix, array in (("_Q4", q), ("_scale", scale))]
            dq = ir.node("DequantizeLinear", values, attributes={"axis": 0, "block_size": block},
                         name=f"{w.name}_DequantizeLinear")
            dq.outputs[0].name = f"{w.name}_dequantized"
            dq.outputs[0].shape, dq.outputs[0].dtype = ir.Shape([k, n]), w.dtype
            graph.insert_before(node, dq)
            done[w.name] = dq.outputs[0]
        if w.name in done:
            node.replace_input_with(1, done[w.name])
    if not done:
        from qvl_export.core.errors import QvlError

        raise QvlError(f"No {name} weight has an input width (K) that is a multiple of {block}, the "
                       "smallest int4 block TensorRT takes: build this model's decoder with int8 or fp16 for "
                       "TensorRT, or decoder=int4 with --target ort.")
    _finish(model, done, plan, name, len(matmuls))
    model.opset_imports[""] = max(model.opset_imports.get("", QDQ_OPSET), QDQ_OPSET)
    model.ir_version = max(model.ir_version or 0, 10)  # INT4 tensors
    method = "AWQ scales" if plan is not None else "RTN"
    summary = {"part": name, "precision": precision.name,
               "method": f"int4 DequantizeLinear blocks for TensorRT ({method}, symmetric, " + (
                   "scale max|w| / 7)" if plan is not None else "each block's scale max|w| / d, d in "
                   f"{list(SCALE_DIVISORS)}, least squared error)"),
               "bits": 4, "block_size": block, "quantized_count": len(done), "kept_high_precision": kept}
    if plan is not None:
        summary["awq"] = plan.summary()
    return model, summary


def _set_float(value, array) -> None:
    """Replace a float initializer's data (its dtype kept), releasing the lazily read original."""
    import onnx_ir as ir

    from qvl_export.calibration.taps import release

    dtype = value.const_value.dtype.numpy()
    release(value.const_value)
    value.const_value = ir.tensor(array.astype(dtype), name=value.name)


def _finish(model, quantized: dict, plan, name: str, matmuls: int) -> None:
    """After either form: refuse a part with nothing quantized, drop the float weights no op reads any
    more (a tied token table's Gather keeps its own), fold an AWQ plan's inverse scales upstream."""
    graph = model.graph
    if not quantized:
        raise RuntimeError(f"{name}: no MatMul with constant weights to quantize ({matmuls} MatMuls)")
    for weight in quantized:
        value = graph.initializers.get(weight)
        if value is not None and not value.uses() and not value.is_graph_output():
            del graph.initializers[weight]
    if plan is not None:
        from qvl_export.calibration.awq import fold_vectors

        fold_vectors(model, plan)  # the norms that read 1 / s into the activation
