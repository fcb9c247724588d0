"""Pass infrastructure: a graph pass is an onnx-ir in-place pass with a name, a one-line description
and the (target, part) pairs it is valid for. ``run_passes`` applies an ordered list and records,
per pass, whether it changed the model and the op counts before and after (kept in the manifest).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import ClassVar

import onnx_ir as ir

log = logging.getLogger(__name__)

TARGETS = ("ort", "trt")
PARTS = ("vision", "merger", "decoder")


class GraphPass(ir.passes.InPlacePass):
    """Subclasses set ``name``, ``description``, ``targets``, ``parts`` and implement ``call``."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    targets: ClassVar[tuple[str, ...]] = TARGETS
    parts: ClassVar[tuple[str, ...]] = PARTS
    # contrib-op fusions set this: in int8/fp8 builds they run after Q/DQ placement
    after_quantization: ClassVar[bool] = False

    def applies_to(self, target: str, part: str) -> bool:
        return target in self.targets and part in self.parts


def match_failure_reasons(tracer, limit: int = 5) -> list[str]:
    """Why the best candidates of an onnxscript rewrite did not match (``pattern.MatchingTracer``):
    distinct reasons, failed checks first (they went furthest), then how far the rest got."""
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
    """Apply ``passes`` in order; returns the model and one record per pass."""
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
        extra = getattr(p, "last_details", None)
        if extra:
            rec["details"] = extra
        log.info("pass %s: modified=%s %s", p.name, rec["modified"], rec["op_changes"])
        records.append(rec)
    return model, records
