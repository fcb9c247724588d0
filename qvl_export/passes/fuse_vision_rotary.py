"""Vision rotary (rotate-half form) -> ``com.microsoft.RotaryEmbedding``.

What the traced vision encoder computes for q and k of every block (``qvl_export.models.common.apply_rotary``)::

    x [S, N, hd];  cos/sin = Unsqueeze(rope_cos / rope_sin [S, hd], 1)
    x * cos + Concat(-x[..., hd/2:], x[..., :hd/2]) * sin                 (6 kernels, 3 full-size temporaries)

What this pass makes of it::

    Reshape(x, [1, S, N*hd]) -> RotaryEmbedding(position_ids = [0] (offset: positions 0..S-1),
        cos_cache = rope_cos[:, :hd/2], sin_cache = rope_sin[:, :hd/2], num_heads = N) -> Reshape [S, N, hd]

one kernel per tensor; the cache slices are shared by all blocks. Measured alone (2 threads, S = 4096,
16 x 80): 108 ms -> 28 ms per tensor, two tensors per block.

Valid when: cos/sin are the graph inputs ``rope_cos`` / ``rope_sin`` broadcast over heads, and each row
of them is ``cat(f, f)`` - the two halves equal, as the host builds them (``runtimes.indexing.vision_rotary``,
like transformers' ``emb = cat(freqs, freqs)``). That is a contract of the graph's inputs, not visible
in the graph: the pass takes the first half as the cache. The rotate-half sub-pattern mirrors
onnxscript/rewriter/ort_fusions/rotary_embedding.py ``_rotate_half_pattern`` (ours is rank 3 and keyed
on our input tables, so that rule set does not match). onnxruntime only: the trt target keeps the
plain ops.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import pattern

from qvl_export.passes.base import GraphPass, GraphPassResult, const_array, use_contrib_domain, why_not_matched

TABLES = ("rope_cos", "rope_sin")


def _scalar(value: ir.Value | None) -> int | None:
    c = const_array(value)
    return int(c.reshape(-1)[0]) if c is not None and c.size == 1 else None


def table_input(value: ir.Value, head_dim: int) -> ir.Value | str:
    """The graph input [S, hd] behind ``value = Unsqueeze(table, [1])``, or why not."""
    node = value.producer()
    if node is None or node.op_type != "Unsqueeze":
        return f"{value.name} is not an Unsqueeze of a rotary table input"
    axes = const_array(node.inputs[1])
    if axes is None or axes.reshape(-1).tolist() != [1]:
        return f"{value.name} is not broadcast over heads (Unsqueeze axis 1)"
    table = node.inputs[0]
    if not table.is_graph_input() or table.name not in TABLES:
        return f"{table.name} is not one of the graph inputs {TABLES}"
    if table.shape is None or table.shape.rank() != 2 or table.shape[1] != head_dim:
        return f"{table.name} is not [S, {head_dim}]"
    if table.dtype != ir.DataType.FLOAT:
        return f"{table.name} is {table.dtype}, RotaryEmbedding here needs float32"
    return table


class VisionRotaryToRotaryEmbedding(pattern.RewriteRuleClassBase):
    """x * cos + rotate_half(x) * sin on [S, N, hd] with cos/sin = Unsqueeze(rope_cos/rope_sin, 1)
    -> Reshape + RotaryEmbedding + Reshape; the check says why a candidate is left."""

    def pattern(self, op, x, cos, sin, hi_start, hi_end, lo_start, lo_end, axes, steps):
        hi = op.Slice(x, hi_start, hi_end, axes, steps)
        lo = op.Slice(x, lo_start, lo_end, axes, steps)
        return op.Add(op.Mul(x, cos), op.Mul(op.Concat(op.Neg(hi), lo, axis=-1), sin))

    def check(self, context, x, cos, sin, hi_start, hi_end, lo_start, lo_end, axes, steps, **_):
        result = pattern.MatchResult()
        if x.shape is None or x.shape.rank() != 3:
            return result.fail("x is not [S, N, hd]", x)
        heads, head_dim = x.shape[1], x.shape[2]
        if not (isinstance(heads, int) and isinstance(head_dim, int)) or head_dim % 2:
            return result.fail("heads / head dim are not static (even head dim)", x)
        if x.dtype != ir.DataType.FLOAT:
            return result.fail(f"x is {x.dtype}, not float32", x)
        half = head_dim // 2
        if _scalar(axes) not in (2, -1) or _scalar(steps) != 1:
            return result.fail("halves are not sliced on the last axis with step 1", axes)
        hi_end_v, lo_end_v = _scalar(hi_end), _scalar(lo_end)
        if (_scalar(hi_start), _scalar(lo_start), lo_end_v) != (half, 0, half) or hi_end_v is None \
                or hi_end_v < head_dim:
            return result.fail(f"not rotate_half at hd/2 = {half}", hi_start)
        tables = [table_input(t, head_dim) for t in (cos, sin)]
        for t in tables:
            if isinstance(t, str):
                return result.fail(t, cos)
        if [t.name for t in tables] != list(TABLES):
            return result.fail("cos and sin are not rope_cos and rope_sin, in that order", cos)
        self._tables, self._heads, self._head_dim = tables, heads, head_dim
        return result

    def rewrite(self, op, x, **_):
        n, hd = self._heads, self._head_dim
        zero, half, last = (op.Constant(value_ints=[v]) for v in (0, hd // 2, 1))
        cos_cache, sin_cache = (op.Slice(t, zero, half, last) for t in self._tables)  # [S, hd/2]
        rows = op.Reshape(x, op.Constant(value_ints=[1, -1, n * hd]))
        out = op.RotaryEmbedding(rows, zero, cos_cache, sin_cache, num_heads=n, interleaved=0,
                                 _domain="com.microsoft")
        return op.Reshape(out, op.Constant(value_ints=[-1, n, hd]))


# the rule alone (a test can apply it to a graph of its own)
VISION_ROTARY = VisionRotaryToRotaryEmbedding.rule(name="vision_rotary")


class FuseVisionRotary(GraphPass, name="fuse_vision_rotary", targets=("ort",), parts=("vision",)):
    description = "vision q/k rotate-half rotary -> com.microsoft.RotaryEmbedding (cache = first half of rope_cos/sin)"

    def call(self, model: ir.Model) -> GraphPassResult:
        count = VISION_ROTARY.apply_to_model(model)
        if not count:
            return GraphPassResult(model, False, {"rotary": 0, "why_not": why_not_matched(model, VISION_ROTARY)})
        use_contrib_domain(model)  # each block gets its own cos/sin cache slices: cse_after_fusions shares them
        return GraphPassResult(model, True, {"rotary": count})
