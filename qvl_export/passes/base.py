"""Pass infrastructure: a graph pass is an onnx-ir in-place pass with a name, a one-line description
and the (target, part) pairs it is valid for; its ``call`` returns a ``GraphPassResult`` (the model,
whether it changed, and details for the manifest). ``run_passes`` applies an ordered list and records,
per pass, whether it changed the model, the op counts before and after, and the pass's details.

A pass does one thing: fusions do not clean up after themselves (no CSE, no dead-node removal); the
declared lists in ``passes/__init__.py`` put the cleanup passes where they are needed.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import onnx_ir as ir

from qvl_export.core.parts import PARTS, TARGETS

log = logging.getLogger(__name__)


@dataclass
class GraphPassResult(ir.passes.PassResult):
    """``PassResult`` plus what the pass wants recorded (counts of rewrites, why candidates did not match)."""

    details: dict[str, Any] = field(default_factory=dict)


class GraphPass(ir.passes.InPlacePass):
    """Subclasses are declared as ``class FuseX(GraphPass, name="fuse_x", targets=("ort",), parts=("vision",))``
    (targets and parts default to all), set ``description`` and implement ``call``."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    targets: ClassVar[tuple[str, ...]] = TARGETS
    parts: ClassVar[tuple[str, ...]] = PARTS

    def __init_subclass__(cls, *, name: str | None = None, targets: tuple[str, ...] | None = None,
                          parts: tuple[str, ...] | None = None, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        for attr, value in (("name", name), ("targets", targets), ("parts", parts)):
            if value is not None:
                setattr(cls, attr, value)

    def applies_to(self, target: str, part: str) -> bool:
        return target in self.targets and part in self.parts


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The constant behind ``value`` (an initializer, a folded value or a Constant node), else None."""
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


def why_not_matched(model: ir.Model, rules, limit: int = 5) -> list[str]:
    """Why the best candidates of the onnxscript ``rules`` (a rule or a ``RewriteRuleSet``) do not match in
    ``model``: distinct reasons, failed checks first (they went furthest), then how far the rest got.
    Applies the rules under a ``MatchingTracer``; call it when they matched nothing (or not everywhere),
    so nothing is left to rewrite."""
    from onnxscript.rewriter import pattern

    tracer = pattern.MatchingTracer()
    rules.apply_to_model(model, tracer=tracer)
    infos = [i for infos in tracer.best_matches_map.values() for i in infos]
    infos.sort(key=lambda i: -int(i.status.value))
    out: list[str] = []
    for info in infos:
        reason = info.match_result.reason or info.status.name
        if reason not in out:
            out.append(reason)
    return out[:limit]


def use_contrib_domain(model: ir.Model) -> None:
    """Declare onnxruntime's com.microsoft domain (version 1) on a model a fusion put contrib ops into."""
    for opsets in (model.opset_imports, model.graph.opset_imports):
        opsets.setdefault("com.microsoft", 1)


def op_counts(model: ir.Model) -> dict[str, int]:
    """Op type -> count over the main graph (``domain:op`` for non-default domains)."""
    counts: Counter[str] = Counter()
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        counts[f"{node.domain}:{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type] += 1
    return dict(sorted(counts.items()))


def count_diff(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    keys = set(before) | set(after)
    return {k: after.get(k, 0) - before.get(k, 0) for k in sorted(keys) if after.get(k, 0) != before.get(k, 0)}


def run_passes(model: ir.Model, passes: list[GraphPass]) -> tuple[ir.Model, list[dict]]:
    """Apply ``passes`` in order; returns the model and one record per pass (``pass``, ``modified``,
    ``seconds``, ``nodes_before``, ``nodes_after``, ``op_changes`` and, when the pass gave any, ``details``)."""
    records = []
    for p in passes:
        before = op_counts(model)
        t0 = time.perf_counter()
        result = p(model)
        model = result.model
        after = op_counts(model)
        rec = {"pass": p.name, "modified": bool(result.modified), "seconds": round(time.perf_counter() - t0, 3),
               "nodes_before": sum(before.values()), "nodes_after": sum(after.values()),
               "op_changes": count_diff(before, after)}
        details = getattr(result, "details", None)
        if details:
            rec["details"] = details
        log.info("pass %s: modified=%s %s", p.name, rec["modified"], rec["op_changes"])
        records.append(rec)
    return model, records
