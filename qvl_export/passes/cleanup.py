"""The cleanup passes the declared lists compose around the rewrites (onnx-ir's common passes, named).

Valid for every target and part: none changes what the graph computes.

- ``eliminate_identities``: Identity nodes removed (graph outputs keep their names);
- ``remove_unused``: nodes and initializers nothing reads (the graph's inputs and outputs are kept);
- ``cse``: common-subexpression elimination - equal nodes on equal inputs merged into one. The
  fusions build per-layer copies of shared subgraphs (the decoder's rotary tables, the vision
  attention's mask columns, one per block) that it merges back. Never after ``unshare_dequantize``:
  it would merge the Q/DQ copies that pass makes on purpose.

The list entries after the fusions are the same passes under their own names
(``cse_after_fusions``, ``remove_unused_after_fusions``), so ``--skip-pass`` can leave out either run.
"""

from __future__ import annotations

from typing import ClassVar

import onnx_ir as ir
import onnx_ir.passes.common as common

from qvl_export.passes.base import GraphPass, GraphPassResult


class _CommonPass(GraphPass):
    """An onnx-ir common pass under our name."""

    common_pass: ClassVar[type[ir.passes.PassBase]]

    def call(self, model: ir.Model) -> GraphPassResult:
        return GraphPassResult(model, bool(self.common_pass()(model).modified))


class EliminateIdentities(_CommonPass, name="eliminate_identities"):
    description = "Identity nodes removed"
    common_pass = common.IdentityEliminationPass


class RemoveUnused(_CommonPass, name="remove_unused"):
    description = "nodes and initializers nothing reads removed"
    common_pass = common.RemoveUnusedNodesPass


class EliminateCommonSubexpressions(_CommonPass, name="cse"):
    description = "equal nodes on equal inputs merged (common-subexpression elimination)"
    common_pass = common.CommonSubexpressionEliminationPass


class CseAfterFusions(EliminateCommonSubexpressions, name="cse_after_fusions"):
    description = "cse again after the fusions: merges the per-layer copies they made"


class RemoveUnusedAfterFusions(RemoveUnused, name="remove_unused_after_fusions"):
    description = "remove_unused again after the fusions: drops what they left unread"
