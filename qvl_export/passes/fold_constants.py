"""Constant folding (onnxscript's optimizer), nothing else.

Valid for every target and part: it only evaluates subgraphs whose inputs are all constants. Large
initializers are not folded into new large constants (64 K elements in and out), so a Transpose of a
weight is left for the runtime to pre-pack. What folding leaves unread (the folded producers, unused
initializers) stays until ``remove_unused`` runs; identities and duplicates are the next passes' work.
"""

from __future__ import annotations

import onnx_ir as ir

from qvl_export.passes.base import GraphPass, GraphPassResult

SIZE_LIMIT = 1 << 16  # elements: inputs and outputs of a folded node


class FoldConstants(GraphPass, name="fold_constants"):
    description = "constant folding (onnxscript optimizer; no CSE, no dead-node removal)"

    def call(self, model: ir.Model) -> GraphPassResult:
        from onnxscript.optimizer import fold_constants

        before = len(model.graph)
        fold = fold_constants(model, onnx_shape_inference=False, input_size_limit=SIZE_LIMIT,
                              output_size_limit=SIZE_LIMIT)
        return GraphPassResult(model, bool(fold.modified) or len(model.graph) != before)


class FoldConstantsAfterFusions(FoldConstants, name="fold_constants_after_fusions"):
    """The fusions' rewrites build small constant subgraphs (``CastLike`` of constants into the group ids'
    dtype, shape constants): folded here, as the traced graph's were."""

    description = "fold_constants again after the fusions: the constant subgraphs their rewrites built"
