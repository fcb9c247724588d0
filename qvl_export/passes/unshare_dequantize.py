"""One Q/DQ pair per consumer in quantized builds (ort target), so every quantized MatMul fuses.

The quantizer writes one Q/DQ pair per activation tensor. Where one activation feeds several
weighted MatMuls - the q, k and v projections all read the same normed hidden state - that pair
has three consumers, and onnxruntime's QDQ fusion (Q -> DQ -> MatMul into MatMulIntegerToFloat)
takes a pair only when it belongs to one node: the three projections stayed float MatMuls on
dequantized weights, every step (measured: 9 of 19 weighted MatMuls of a 3-layer decoder). This
pass gives each consumer its own QuantizeLinear -> DequantizeLinear copy (same inputs, same
numbers); a dynamically quantized activation (``DynamicQuantizeLinear``, int8 decoders on the ort
target) gets its own DynamicQuantizeLinear -> DequantizeLinear, which onnxruntime fuses with the
MatMul into ``DynamicQuantizeMatMul``. onnxruntime's common-subexpression elimination would merge the copies back, so the
runtime opens quantized parts with that optimizer off (``runtimes/onnxrt.py``).

Skipped (no change) when no DequantizeLinear has more than one consumer.
"""

from __future__ import annotations

import onnx_ir as ir

from qvl_export.passes.base import GraphPass, GraphPassResult


class UnshareDequantize(GraphPass, name="unshare_dequantize", targets=("ort",)):
    description = "one Q/DQ pair per consumer (int8/fp8 builds), so onnxruntime fuses every quantized MatMul"

    def call(self, model: ir.Model) -> GraphPassResult:
        graph = model.graph
        copies = 0
        for dq in list(graph):
            if dq.op_type != "DequantizeLinear" or dq.outputs[0].is_graph_output():
                continue
            uses = list(dq.outputs[0].uses())
            q = dq.inputs[0].producer() if dq.inputs[0] is not None else None
            pair = q is not None and q.op_type == "QuantizeLinear"
            dynamic = q is not None and q.op_type == "DynamicQuantizeLinear"
            for k, use in enumerate(uses[1:], start=1):
                new = []
                source = dq.inputs[0]
                if pair:  # an activation: its own quantize step too
                    q_twin = ir.node("QuantizeLinear", list(q.inputs), attributes=dict(q.attributes),
                                     name=f"{dq.outputs[0].name}_quantize_for_{k}")
                    new.append(q_twin)
                    source = q_twin.outputs[0]
                params = list(dq.inputs[1:])
                if dynamic:  # the activation's scale and zero point come from its own run
                    q_twin = ir.node("DynamicQuantizeLinear", list(q.inputs), num_outputs=3,
                                     name=f"{dq.outputs[0].name}_quantize_for_{k}")
                    new.append(q_twin)
                    source, params = q_twin.outputs[0], list(q_twin.outputs[1:])
                twin = ir.node("DequantizeLinear", [source, *params], attributes=dict(dq.attributes),
                               name=f"{dq.outputs[0].name}_dequantize_for_{k}")
                new.append(twin)
                graph.insert_before(use.node, new)
                use.node.replace_input_with(use.idx, twin.outputs[0])
                copies += 1
        return GraphPassResult(model, copies > 0, {"copies": copies})
