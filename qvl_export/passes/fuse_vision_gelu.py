"""Merger exact (erf) GELU -> ``com.microsoft.Gelu``.

The merger MLP's ``nn.GELU()`` traces to ``Div(x, sqrt 2) -> Erf -> Add 1 -> Mul x -> Mul 0.5`` (five
kernels over [S/4, 4C]); onnxruntime's own optimizer leaves it unfused (checked on ORT 1.31,
ORT_ENABLE_ALL). onnxscript's rule set matches it as it is (onnxscript/rewriter/ort_fusions/erfgelu.py
``erf_gelu_pattern_1/2``), so this pass runs those rules rather than patterns of ours. Same formula
(erf, not the tanh approximation). onnxruntime only; the trt target keeps the five ops.
"""

from __future__ import annotations

import onnx_ir as ir

from qvl_export.passes.base import GraphPass, use_contrib_domain


class FuseVisionGelu(GraphPass):
    name = "fuse_vision_gelu"
    description = "merger erf GELU -> com.microsoft.Gelu (onnxscript erfgelu rules)"
    targets = ("ort",)
    parts = ("merger",)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from onnxscript.rewriter.ort_fusions.erfgelu import rules

        count = rules.apply_to_model(model)
        self.last_details = {"gelu": count}
        if count:
            use_contrib_domain(model)
        return ir.passes.PassResult(model, bool(count))
