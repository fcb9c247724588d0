"""RMSNorm -> ``SimplifiedLayerNormalization``; residual Add + RMSNorm -> ``com.microsoft.SkipSimplifiedLayerNormalization``.

Our ``RMSNorm`` (``qvl_export.models.common``) traces to ``Pow(x, 2) -> ReduceMean(-1) -> Add(eps) -> Sqrt ->
Reciprocal -> Mul(x, .) -> Mul(weight, .)``: exactly what onnxscript's own rules match, so this pass runs
them rather than patterns of ours (onnxscript/rewriter/ort_fusions/rms_normalization.py ``RmsNormFusion``,
skip_normalization.py ``SkipRmsNormFusion``). The norm math stays fp32 (``stash_type`` float; a Cast
around the norm in a half-precision graph is part of the pattern). onnxruntime's own graph optimizer
does not fuse this form (it leaves the seven ops; checked on ORT 1.31 with ORT_ENABLE_ALL).

Skip fusion needs [B, S, D] inputs, so it applies to the decoder (the residual Add before each
post-attention norm and before the next layer's input norm: 2L - 1 of the 2L + 1 norms); the vision
tower's [S, C] norms (Qwen2.5-VL) and the merger's get the plain fusion. onnxruntime only: neither op is
standard ONNX, so the trt target keeps the seven ops.

Measured (ORT 1.31 CPU, fp32, 2 threads, interleaved runs): residual Add + norm at D = 2048 over 298
tokens 15-18 ms -> 1.2-1.6 ms (9 norms in a 4-layer prefill: ~0.12 s of ~5 s); one decode token
0.02 ms either way. Qwen2.5-VL vision, C = 1280, 1024 tokens: 26 ms -> 18-21 ms per norm; the whole
vision + merger run with every vision pass on: x0.98 (IQR 0.95-1.02).
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter.ort_fusions.rms_normalization import rms_normalization_ruleset
from onnxscript.rewriter.ort_fusions.skip_normalization import skip_rms_normalization_ruleset

from qvl_export.passes.base import GraphPass, GraphPassResult, why_not_matched


class FuseRmsNorm(GraphPass, name="fuse_rms_norm", targets=("ort",), parts=("vision", "merger", "decoder")):
    description = "RMSNorm -> SimplifiedLayerNormalization, residual Add + RMSNorm -> SkipSimplifiedLayerNormalization"

    def call(self, model: ir.Model) -> GraphPassResult:
        norms = rms_normalization_ruleset.apply_to_model(model)
        skips = skip_rms_normalization_ruleset.apply_to_model(model) if norms else 0
        details = {"rms_norm": norms, "with_residual_add": skips}
        if not norms:
            details["why_not"] = why_not_matched(model, rms_normalization_ruleset)
        return GraphPassResult(model, bool(norms), details)
