"""Constant folding and dead-node removal (onnxscript's optimizer + onnx-ir common passes).

Valid for every target and part: it only evaluates subgraphs whose inputs are all constants and
removes nodes whose outputs nothing reads. Large initializers are not folded into new large
constants (size limit), so a Transpose of a weight is left for the runtime to pre-pack.
"""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as common

from qvl_export.passes.base import GraphPass


class FoldConstantsAndCleanup(GraphPass):
    name = "fold_constants"
    description = "constant folding, identity elimination, dead-node and unused-initializer removal"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from onnxscript.optimizer import fold_constants

        before = len(model.graph)
        fold = fold_constants(model, onnx_shape_inference=False, input_size_limit=1 << 16,
                              output_size_limit=1 << 16)
        modified = bool(fold.modified)
        for p in (common.IdentityEliminationPass(), common.RemoveUnusedNodesPass(),
                  common.CommonSubexpressionEliminationPass(), common.RemoveUnusedNodesPass()):
            modified |= p(model).modified
        return ir.passes.PassResult(model, modified or len(model.graph) != before)


class CleanupAfterFusions(FoldConstantsAndCleanup):
    """The same cleanup, run last: fusions build per-layer copies of shared subgraphs (the decoder's
    rotary tables, one per layer) that common-subexpression elimination merges back into one, and
    leave producers nothing reads any more."""

    name = "cleanup_after_fusions"
    description = "fold_constants again after the fusions: merge their per-layer copies (CSE), drop what they left"
