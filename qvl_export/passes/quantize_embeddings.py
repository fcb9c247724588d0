"""Weight-only int8 for token-embedding tables in quantized builds (decoder, ort target).

After W8A8 quantization the token table is still float: read by a Gather, which static
quantization leaves alone. It is the largest tensor of the model (151936 x 1536 for Qwen2-VL-2B),
so an int8 build would stay far above a third of the fp32 bytes. This pass stores it as int8 with
one scale per token (per row of the lookup axis) and dequantizes after the lookup.

- A table that is also the lm_head weight (tied embeddings: ``lm_head.weight_t`` [H, V], looked up
  on axis 1) already has an int8 copy with per-vocab-column scales from the lm_head's Q/DQ: the
  Gather is rewired to its own DequantizeLinear of that same int8 initializer, and the float
  table is dropped.
- An untied table ([V, H], looked up on axis 0) is quantized here, symmetric per row.

Skipped (no change) when the graph has no DequantizeLinear (fp32/fp16 builds): the pass only
applies to quantized decoders. Per-row symmetric int8 keeps each token's vector to 1/254 of its
own largest value - the lookup is exact up to that rounding.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qvl_export.passes.base import GraphPass


def _quantize_rows(table: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    amax = np.abs(table).max(axis=1 - axis)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    shaped = scale[:, None] if axis == 0 else scale[None, :]
    return np.clip(np.round(table / shaped), -127, 127).astype(np.int8), scale


def _shared_quantized(graph: ir.Graph, table: ir.Value, axis: int):
    """Inputs and axis of a DequantizeLinear that already holds ``table`` as int8 with one scale per
    looked-up row (the lm_head's per-channel Q/DQ of a tied table), or None."""
    init = graph.initializers.get(f"{table.name}_quantized")
    if init is None:
        return None
    for use in init.uses():
        node = use.node
        if node.op_type == "DequantizeLinear" and use.idx == 0:
            rank = len(table.shape)
            dq_axis = (node.attributes["axis"].as_int() if "axis" in node.attributes else 1) % rank
            if dq_axis == axis % rank:  # scales run along the looked-up axis: one per token
                return list(node.inputs), dq_axis
    return None


class QuantizeEmbeddings(GraphPass):
    name = "quantize_embeddings"
    description = "int8 weight-only token table in quantized builds (shares the lm_head's int8 copy when tied)"
    targets = ("ort",)
    parts = ("decoder",)
    after_quantization = True

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        nodes = list(graph)
        if not any(n.op_type == "DequantizeLinear" for n in nodes):
            return ir.passes.PassResult(model, False)
        modified = False
        for gather in nodes:
            if gather.op_type != "Gather":
                continue
            table = gather.inputs[0]
            if table is None or table.const_value is None or table.name not in graph.initializers:
                continue
            axis = gather.attributes["axis"].as_int() if "axis" in gather.attributes else 0
            if len(table.shape or ()) != 2 or table.dtype != ir.DataType.FLOAT:
                continue
            ir_table = table.const_value.numpy()
            if ir_table.size < 1 << 16:  # small lookups are not worth it
                continue
            shared = _shared_quantized(graph, table, axis)
            if shared is not None:
                inputs, dq_axis = shared
            else:
                q_arr, s_arr = _quantize_rows(ir_table, axis)
                q = ir.Value(name=f"{table.name}_int8", const_value=ir.tensor(q_arr, name=f"{table.name}_int8"))
                scale = ir.Value(name=f"{table.name}_scale", const_value=ir.tensor(s_arr, name=f"{table.name}_scale"))
                graph.register_initializer(q)
                graph.register_initializer(scale)
                inputs, dq_axis = [q, scale], axis
            dq = ir.node("DequantizeLinear", inputs, attributes={"axis": dq_axis},
                         name=f"{gather.name}_dequantize_table")
            graph.insert_before(gather, dq)
            gather.replace_input_with(0, dq.outputs[0])
            if not table.uses():
                graph.initializers.pop(table.name, None)
            modified = True
        return ir.passes.PassResult(model, modified)
