"""Weight-only int8 for token-embedding tables in quantized builds (decoder, ort target).

After W8A8 quantization the token table is still float: read by a Gather, which static
quantization leaves alone. It is the largest tensor of the model (151936 x 1536 for Qwen2-VL-2B),
so an int8 build would stay far above a third of the fp32 bytes. This pass stores it as int8 with
one scale per token (per row of the lookup axis) and dequantizes after the lookup: the Gather
reads the int8 rows of the step's tokens and their scales, then ``Cast`` + ``Mul`` - a handful of
rows per decode step. (A DequantizeLinear in front of the Gather would be the textbook form, but
onnxruntime keeps DequantizeLinear out of constant folding in QDQ graphs, so it would dequantize
the whole table on every step.)

- A table that is also the lm_head weight (tied embeddings: ``lm_head.weight_t`` [H, V], looked up
  on axis 1) already has an int8 copy with per-vocab-column scales from the lm_head's Q/DQ (the
  quantizer may even feed the Gather from that DequantizeLinear): the lookup reads that same int8
  initializer and its scales, and the float table is dropped.
- An untied table ([V, H], looked up on axis 0) is quantized here, symmetric per row.

Skipped (no change) when the graph has no DequantizeLinear or MatMulNBits (fp32/fp16 builds): the
pass only applies to quantized decoders (int8/fp8 Q/DQ, int4 weight-only). Per-row symmetric int8
keeps each token's vector to 1/254 of its own largest value - the lookup is exact up to that rounding.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qvl_export.passes.base import GraphPass, GraphPassResult


def _quantize_rows(table: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    amax = np.abs(table).max(axis=1 - axis)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    shaped = scale[:, None] if axis == 0 else scale[None, :]
    return np.clip(np.round(table / shaped), -127, 127).astype(np.int8), scale


def _shared_quantized(graph: ir.Graph, table: ir.Value, axis: int):
    """[int8 table, per-row scales] of a DequantizeLinear that already holds ``table`` as int8 with one
    scale per looked-up row (the lm_head's per-channel Q/DQ of a tied table), or None."""
    init = graph.initializers.get(f"{table.name}_quantized")
    if init is None:
        return None
    for use in init.uses():
        if use.node.op_type == "DequantizeLinear" and use.idx == 0:
            rows = _dequantized_rows(use.node, axis)
            if rows is not None:
                return rows
    return None


def _dequantized_rows(dq: ir.Node, axis: int):
    """[int8 table, per-row scales] of a DequantizeLinear that holds a 2-D int8 initializer with one scale per
    looked-up row and zero points 0, or None."""
    q_table, scale = dq.inputs[0], dq.inputs[1]
    if q_table is None or q_table.const_value is None or scale is None or scale.const_value is None:
        return None
    if q_table.dtype != ir.DataType.INT8 or len(q_table.shape or ()) != 2:
        return None
    dq_axis = dq.attributes["axis"].as_int() if "axis" in dq.attributes else 1
    if dq_axis % 2 != axis % 2 or scale.const_value.numpy().shape != (q_table.shape[axis % 2],):
        return None
    zero = dq.inputs[2] if len(dq.inputs) > 2 else None
    if zero is not None and (zero.const_value is None or np.any(zero.const_value.numpy() != 0)):
        return None
    return [q_table, scale]


class QuantizeEmbeddings(GraphPass, name="quantize_embeddings", targets=("ort",), parts=("decoder",)):
    description = "int8 weight-only token table in quantized builds (shares the lm_head's int8 copy when tied)"

    def call(self, model: ir.Model) -> GraphPassResult:
        graph = model.graph
        nodes = list(graph)
        if not any(n.op_type in ("DequantizeLinear", "MatMulNBits") for n in nodes):
            return GraphPassResult(model, False)
        modified = False
        for gather in nodes:
            if gather.op_type != "Gather":
                continue
            table = gather.inputs[0]
            axis = gather.attributes["axis"].as_int() if "axis" in gather.attributes else 0
            if table is None or gather.outputs[0].is_graph_output():
                continue
            dq = table.producer()
            if dq is not None and dq.op_type == "DequantizeLinear":
                # the quantizer already put the (tied) table behind the lm_head's Q/DQ
                inputs = _dequantized_rows(dq, axis)
                if inputs is None:
                    continue
            else:
                if table.const_value is None or table.name not in graph.initializers:
                    continue
                if len(table.shape or ()) != 2 or table.dtype != ir.DataType.FLOAT:
                    continue
                if table.const_value.size < 1 << 14:  # small lookups are not worth it
                    continue
                inputs = _shared_quantized(graph, table, axis)
                if inputs is None:
                    q_arr, s_arr = _quantize_rows(table.const_value.numpy(), axis)
                    q = ir.Value(name=f"{table.name}_int8", const_value=ir.tensor(q_arr, name=f"{table.name}_int8"))
                    scale = ir.Value(name=f"{table.name}_scale",
                                     const_value=ir.tensor(s_arr, name=f"{table.name}_scale"))
                    graph.register_initializer(q)
                    graph.register_initializer(scale)
                    inputs = [q, scale]
            q_table, scales = inputs[0], inputs[1]
            ids = gather.inputs[1]
            rows = ir.node("Gather", [q_table, ids], attributes={"axis": axis}, name=f"{gather.name}_int8_rows")
            row_scales = ir.node("Gather", [scales, ids], attributes={"axis": 0}, name=f"{gather.name}_row_scales")
            as_float = ir.node("Cast", [rows.outputs[0]], attributes={"to": ir.DataType.FLOAT},
                               name=f"{gather.name}_to_float")
            new_nodes = [rows, row_scales, as_float]
            scale_out = row_scales.outputs[0]
            if axis % 2 == 0:  # [V, H] table: rows [..., H], scales [...] -> [..., 1]
                minus_one = ir.Value(name=f"{gather.name}_last_axis",
                                     const_value=ir.tensor(np.array([-1], np.int64), name=f"{gather.name}_last_axis"))
                graph.register_initializer(minus_one)
                unsq = ir.node("Unsqueeze", [scale_out, minus_one], name=f"{gather.name}_scale_axis")
                new_nodes.append(unsq)
                scale_out = unsq.outputs[0]
            # [H, V] table looked up on axis 1: rows [H, ...] broadcast against scales [...] as they are
            mul = ir.node("Mul", [as_float.outputs[0], scale_out], name=f"{gather.name}_dequantize_rows")
            new_nodes.append(mul)
            graph.insert_before(gather, new_nodes)
            gather.outputs[0].replace_all_uses_with(mul.outputs[0])
            graph.remove(gather, safe=True)
            if not table.uses():
                if dq is not None and dq.op_type == "DequantizeLinear":
                    graph.remove(dq, safe=True)
                else:
                    graph.initializers.pop(table.name, None)
            modified = True
        return GraphPassResult(model, modified)
