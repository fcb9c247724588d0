"""Merger exact (erf) GELU -> ``com.microsoft.Gelu``.

The merger MLP's ``nn.GELU()`` traces to ``Div(x, sqrt 2) -> Erf -> Add 1 -> Mul x -> Mul 0.5`` (five
kernels over [S/4, 4C]); onnxruntime's own optimizer leaves it unfused (checked on ORT 1.31,
ORT_ENABLE_ALL). onnxscript's rule set matches it as it is (onnxscript/rewriter/ort_fusions/erfgelu.py
``erf_gelu_pattern_1/2``), so this pass runs those rules rather than patterns of ours. Same formula
(erf, not the tanh approximation). onnxruntime only; the trt target keeps the five ops.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter.ort_fusions.erfgelu import rules as ERF_GELU

from qvl_export.passes.base import GraphPass, GraphPassResult, use_contrib_domain


class FuseVisionGelu(GraphPass, name="fuse_vision_gelu", targets=("ort",), parts=("merger",)):
    description = "merger erf GELU -> com.microsoft.Gelu (onnxscript erfgelu rules)"

    def call(self, model: ir.Model) -> GraphPassResult:
        count = ERF_GELU.apply_to_model(model)
        if count:
            use_contrib_domain(model)
        return GraphPassResult(model, bool(count), {"gelu": count})
