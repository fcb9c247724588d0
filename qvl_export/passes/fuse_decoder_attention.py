"""Decoder attention -> ``com.microsoft.GroupQueryAttention`` over a KV cache updated in place.

What the traced decoder computes per layer (``qvl_export.models.decoder.DecoderAttention``)::

    q/k/v [B, T, H*Dh] -> Reshape [B, T, H, Dh] -> Transpose [B, H, T, Dh]
    q, k  -> x * cos + rotate_half(x) * sin                     (fp32, M-RoPE folded into cos/sin [B, 1, T, Dh])
    present_k/v = Concat(past_k/v [B, Hkv, P, Dh], k/v, axis=2)  (the whole cache is copied every step)
    q grouped [B, Hkv, G*T, Dh]; softmax(Where(causal, q k^T * scale, f32 min)) v; back to [B, T, H*Dh]

What this pass makes of it::

    q/k [B, T, H*Dh] -> com.microsoft.RotaryEmbedding (per-token table: row b*T + t of cos/sin[..., :Dh/2])
    -> GroupQueryAttention(q, k, v [B, T, Hkv*Dh], past_k, past_v, seqlens_k, total_sequence_length)

GQA does the causal softmax attention itself and writes the new rows of K/V into ``present``; when
the caller binds ``present.{i}.*`` to the same buffer as ``past_key_values.{i}.*`` (onnxruntime
IOBinding, ``runtimes/onnxrt.py``) nothing else is copied: the cache stays in place and grows by T
rows a step. No Transpose is left: q/k/v stay [B, T, heads*Dh] from the projections to GQA.

Graph IO after the pass (the runtime picks the cache layout from ``seqlens_k`` being an input):

- ``seqlens_k [B] int32`` = valid cache rows after this step - 1; ``total_sequence_length [] int32`` = its max;
- ``past_key_values.{i}.key/value [B, Hkv, C, Dh]``: fixed-capacity buffers (C = ``kv_capacity``), the
  first P = total - T rows valid; ``present.{i}.key/value`` the same shape (the same buffer when bound).

M-RoPE: the graph still computes cos/sin [B, 1, T, Dh] once per forward from ``position_ids`` (t/h/w
per frequency, fp32); RotaryEmbedding indexes that per-token table (its two halves are equal, checked),
so image tokens in prefill keep their 3-D positions. GQA's own rotary (``do_rotary=1``) cannot: it
indexes one 1-D position per token in a cos/sin cache of >= total_sequence_length rows (ORT 1.31
rejects a per-token table in decode, and needs head_dim % 16 == 0). Checked by measurement too
(real width: hidden 2048, 16/2 heads, Dh 128, ORT 1.31 CPU fp32, 2 threads, one layer's attention,
interleaved runs): prefill of 298 tokens 62 ms traced -> 52 ms GQA + our rotary ops -> 40 ms GQA +
RotaryEmbedding; a decode step at 300 cached tokens 0.23 ms -> 0.3 ms (GQA's CPU kernel walks K/V
once per query head; ours reads it once per KV head), i.e. < 0.1% of a decode step at that width.

Qwen3 text (q/k RMSNorm per head): q/k go Reshape [B, T, H, Dh] -> RMSNorm over Dh -> Transpose. The
variant rule (``NormedAttentionToGQA``) keeps the norms where they are and feeds GQA's path
``Reshape(norm output, [B, T, H*Dh])``: the same per-token layout, the rest of the layer as above
(transformers' Qwen3VLTextAttention: q_norm/k_norm, then the rotary, then attention).

Valid when: the head dim is a multiple of 8 (onnxruntime's GQA CPU kernel refuses others when it runs),
every layer has exactly this structure, cos/sin are float32 and q/k/v float32 - or float16 with the
rotary and the scores computed in float32 between Casts, as the float16 trace has them (the ``half``
rules: RotaryEmbedding stays between those Casts, GQA takes the float16 tensors and cache; bfloat16 is
left plain, onnxruntime's CPU GQA has no bfloat16 kernel) - and the mask is the decoder's own causal mask
with the past length read from the past K/V (checked; a partial match raises, as it would mix two cache
layouts).
Limits inherited from GQA: a multi-token step on a non-empty cache needs batch 1 (prefill always
starts from an empty cache); batches must not hold padding (as for the plain graph). onnxruntime
only: the trt target keeps the plain graph.

onnxscript's own ``ort_fusions.gqa`` does not match our graph: it expects HF's repeat_kv Expand,
an additive mask from an ``attention_mask`` input and ``RotaryEmbedding`` produced by its cos/sin
cache fusion (onnxscript/rewriter/ort_fusions/gqa.py, ``GroupQueryAttention.pattern``). The rotate-half
sub-pattern below mirrors onnxscript/rewriter/ort_fusions/rotary_embedding.py ``_rotate_half_pattern``.
"""

from __future__ import annotations

import logging
import re

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from qvl_export.core.errors import QvlError
from qvl_export.passes.base import GraphPass, GraphPassResult, const_array, why_not_matched

log = logging.getLogger(__name__)

SEQLENS_K = "seqlens_k"
TOTAL_SEQUENCE_LENGTH = "total_sequence_length"
CAPACITY_DIM = "kv_capacity"
_PAST = re.compile(r"past_key_values\.(\d+)\.(key|value)$")
_PRESENT = re.compile(r"present\.(\d+)\.(key|value)$")


def _is_const(value: ir.Value | None, expected) -> bool:
    arr = const_array(value)
    return (arr is not None and arr.size == np.size(expected)
            and bool((arr.reshape(-1) == np.reshape(expected, -1)).all()))


def _rotary_pattern(op, x, cos, sin, hi_start, hi_end, axes, steps, lo_start, lo_end, lo_axes, lo_steps):
    """x * cos + rotate_half(x) * sin, rotate_half(x) = Concat(-x[..., Dh/2:], x[..., :Dh/2])."""
    hi = op.Slice(x, hi_start, hi_end, axes, steps)
    lo = op.Slice(x, lo_start, lo_end, lo_axes, lo_steps)
    rotated = op.Concat(op.Neg(hi), lo, axis=-1)
    return op.Add(op.Mul(x, cos), op.Mul(rotated, sin))


def _rotary_vars(prefix: str) -> dict:
    names = ("hi_start", "hi_end", "axes", "steps", "lo_start", "lo_end", "lo_axes", "lo_steps")
    return {n: pattern.Var(f"{prefix}_{n}") for n in names}


class CausalMask(pattern.PatternBase):
    """allowed [G*T, P+T] = Tile(k_pos[None, :] <= q_pos[:, None], [G, 1]) as ``Decoder.forward`` traces it
    (``tiled``: with the Tile over query groups; not: without it, for G = 1)."""

    def __init__(self, tiled: bool):
        super().__init__(f"CausalMask{'Tiled' if tiled else ''}")
        self.tiled = tiled

    def pattern(self, op, seq_len, past_len, zero, one, zero2, one2, axes_row, axes_col, expand_shape,
                repeats):
        q_pos = op.Add(op.Range(zero, seq_len, one), past_len)
        k_pos = op.Range(zero2, op.Add(seq_len, past_len), one2)
        causal = op.LessOrEqual(op.Unsqueeze(k_pos, axes_row), op.Unsqueeze(q_pos, axes_col))
        if not self.tiled:
            return op.Expand(causal, expand_shape)
        expanded = pattern.OrValue([op.Expand(causal, expand_shape), causal])
        return op.Tile(expanded, repeats)

    def check(self, context, zero, one, zero2, one2, axes_row, axes_col, **_):
        result = pattern.MatchResult()
        if not (_is_const(zero, 0) and _is_const(zero2, 0) and _is_const(one, 1) and _is_const(one2, 1)):
            return result.fail("positions are not Range(0, n, 1)")
        if not (_is_const(axes_row, [0]) and _is_const(axes_col, [1])):
            return result.fail("not k_pos[None, :] <= q_pos[:, None]")
        return result


CAUSAL_MASKS = (CausalMask(True), CausalMask(False))


def _halves_equal(table: ir.Value) -> bool:
    """``table`` is ``Cos/Sin(Unsqueeze?(Concat(f, f, axis=-1)))``: its two halves on the last axis are equal."""
    node = table.producer()
    if node is None or node.op_type not in ("Cos", "Sin"):
        return False
    node = node.inputs[0].producer()
    if node is not None and node.op_type == "Unsqueeze":
        node = node.inputs[0].producer()
    return (node is not None and node.op_type == "Concat" and len(node.inputs) == 2
            and node.inputs[0] is node.inputs[1] and node.attributes.get_int("axis", 0) in (-1, 2))


def _past_length_source(value: ir.Value) -> ir.Value | None:
    """The graph input whose axis 2 ``value`` is (``Squeeze(Shape(past, start=2, end=3))``), else None."""
    node = value.producer()
    if node is not None and node.op_type == "Squeeze":
        node = node.inputs[0].producer()
    if node is None or node.op_type != "Shape":
        return None
    start = node.attributes.get_int("start", 0)
    end = node.attributes.get_int("end", None)
    if start != 2 or end != 3:
        return None
    return node.inputs[0]


def _scalar(value: ir.Value | None) -> float | None:
    """A constant one-element float (attention scale, mask fill), else None."""
    arr = const_array(value)
    if arr is None or arr.size != 1 or arr.dtype.kind != "f":
        return None
    return float(arr.reshape(-1)[0])


class AttentionToGQA(pattern.RewriteRuleClassBase):
    """One decoder layer's attention -> RotaryEmbedding x 2 + GroupQueryAttention over the graph inputs
    ``seqlens_k`` / ``total_sequence_length`` (``add_cache_inputs`` adds them first); the check says why a
    candidate is left.

    ``half``: the decoder traced in float16 (``models.common``: the rotary and the scores run in float32
    between Casts, the probabilities are cast back before ``probs @ v``). The rewrite keeps the rotary in
    float32 (RotaryEmbedding between the same Casts) and gives GroupQueryAttention the float16 q/k/v and
    cache; its kernels compute q k^T, the softmax and probs @ v in float32 (onnxruntime's CPU kernel widens
    each head's q/k/v; it skips the traced graph's rounding of the probabilities to float16)."""

    def __init__(self, half: bool = False):
        super().__init__(f"{type(self).__name__}{'Half' if half else ''}")
        self.half = half
        self.dtype = ir.DataType.FLOAT16 if half else ir.DataType.FLOAT

    def _widen(self, op, x):
        return op.Cast(x, to=ir.DataType.FLOAT) if self.half else x

    def _narrow(self, op, x):
        return op.Cast(x, to=ir.DataType.FLOAT16) if self.half else x

    def pattern(self, op, q_lin, k_lin, v_lin, q_shape, k_shape, v_shape, cos, sin, past_key, past_value,
                allowed, scale, min_value, grouped_shape, heads_shape, out_shape):
        q = op.Transpose(op.Reshape(q_lin, q_shape, _outputs=["q_bsnh"]), perm=[0, 2, 1, 3])
        k = op.Transpose(op.Reshape(k_lin, k_shape, _outputs=["k_bsnh"]), perm=[0, 2, 1, 3])
        return self.attention(op, q, k, v_lin, v_shape, cos, sin, past_key, past_value, allowed, scale, min_value,
                              grouped_shape, heads_shape, out_shape)

    def attention(self, op, q, k, v_lin, v_shape, cos, sin, past_key, past_value, allowed, scale, min_value,
                  grouped_shape, heads_shape, out_shape):
        """The layer's attention from q [B, H, T, Dh] and k [B, Hkv, T, Dh] on (both rules share it)."""
        qv, kv = _rotary_vars("q"), _rotary_vars("k")
        v = op.Transpose(op.Reshape(v_lin, v_shape), perm=[0, 2, 1, 3])
        q_rot = self._narrow(op, _rotary_pattern(op, self._widen(op, q), cos, sin, **qv))
        k_rot = self._narrow(op, _rotary_pattern(op, self._widen(op, k), cos, sin, **kv))
        present_key = op.Concat(past_key, k_rot, axis=2)
        present_value = op.Concat(past_value, v, axis=2)
        q_grouped = op.Reshape(q_rot, grouped_shape, _outputs=["q_grouped"])
        keys_t = op.Transpose(self._widen(op, present_key), perm=[0, 1, 3, 2])
        scores = op.Mul(op.MatMul(self._widen(op, q_grouped), keys_t), scale)
        probs = self._narrow(op, op.Softmax(op.Where(allowed, scores, min_value), axis=-1))
        context = op.MatMul(probs, present_value)
        heads = op.Transpose(op.Reshape(context, heads_shape), perm=[0, 2, 1, 3])
        return op.Reshape(heads, out_shape), present_key, present_value

    def check(self, context, q_bsnh, k_bsnh, q_grouped, cos, sin, past_key, past_value, allowed, scale,
              min_value, **bindings):
        result = pattern.MatchResult()
        graph = context.graph_or_function
        inputs = {v.name: v for v in graph.inputs}
        if SEQLENS_K not in inputs or TOTAL_SEQUENCE_LENGTH not in inputs:
            return result.fail(f"no {SEQLENS_K} / {TOTAL_SEQUENCE_LENGTH} graph inputs (add_cache_inputs adds them)")
        for past in (past_key, past_value):
            if past not in graph.inputs or not _PAST.match(past.name or ""):
                return result.fail("past K/V is not a past_key_values.* graph input", past)
        shapes = {"q": q_bsnh.shape, "k": k_bsnh.shape, "q_grouped": q_grouped.shape, "cos": cos.shape,
                  "sin": sin.shape}
        if any(s is None or s.rank() != 4 for s in shapes.values()):
            return result.fail(f"rank-4 shapes needed, got {shapes}")
        heads, head_dim = q_bsnh.shape[2], q_bsnh.shape[3]
        kv_heads = k_bsnh.shape[2]
        if not all(isinstance(d, int) for d in (heads, head_dim, kv_heads)) or heads % kv_heads:
            return result.fail(f"heads {heads} / kv heads {kv_heads} / head dim {head_dim} not static")
        if head_dim % 8:
            return result.fail(f"head dim {head_dim} is not a multiple of 8: GroupQueryAttention's CPU kernel "
                               "refuses it at run time")
        if q_grouped.shape[1] != kv_heads or q_grouped.shape[3] != head_dim:
            return result.fail("queries are not grouped as [B, kv_heads, groups*T, head_dim]", q_grouped)
        for name in ("cos", "sin"):
            s = shapes[name]
            if s[1] != 1 or s[3] != head_dim:
                return result.fail(f"{name} is not [B, 1, T, head_dim]", cos if name == "cos" else sin)
        if q_bsnh.dtype != self.dtype or cos.dtype != ir.DataType.FLOAT:
            return result.fail(f"q is {q_bsnh.dtype}, cos {cos.dtype}: this rule takes {self.dtype} q/k/v with "
                               "float32 rotary tables")
        for table in (cos, sin):
            if not _halves_equal(table):
                return result.fail("cos/sin are not cat(freqs, freqs): a [.., Dh/2] table cannot hold them",
                                   table)
        half = head_dim // 2
        for prefix in ("q", "k"):
            b = {n: bindings[f"{prefix}_{n}"] for n in ("hi_start", "hi_end", "axes", "steps", "lo_start",
                                                        "lo_end", "lo_axes", "lo_steps")}
            last = (lambda v: _is_const(v, [-1]) or _is_const(v, [3]))
            if not (_is_const(b["hi_start"], [half]) and const_array(b["hi_end"]) is not None
                    and int(const_array(b["hi_end"]).reshape(-1)[0]) >= head_dim
                    and _is_const(b["lo_start"], [0]) and _is_const(b["lo_end"], [half])
                    and last(b["axes"]) and last(b["lo_axes"])
                    and _is_const(b["steps"], [1]) and _is_const(b["lo_steps"], [1])):
                return result.fail(f"{prefix}: not rotate_half on the last axis at head_dim/2 = {half}")
        scale_value = _scalar(scale)
        if not isinstance(scale_value, float):
            return result.fail("attention scale is not a constant scalar", scale)
        floor = _scalar(min_value)
        if not isinstance(floor, float) or floor > -1e30:
            return result.fail("masked scores are not set to a large negative constant", min_value)
        mask_node = allowed.producer()
        match = None
        for causal_mask in CAUSAL_MASKS if mask_node is not None else ():
            match = match or causal_mask.match(context.model, graph, mask_node,
                                               check_nodes_are_removable=False)
        if not match:
            return result.fail("the mask is not the decoder's causal mask", allowed)
        if _past_length_source(match.bindings["past_len"]) is None:
            return result.fail("the causal mask's past length is not the past K/V length (axis 2)")
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.seqlens_k, self.total_len = inputs[SEQLENS_K], inputs[TOTAL_SEQUENCE_LENGTH]
        self.scale = float(scale_value)
        return result

    def rewrite(self, op, q_lin, k_lin, v_lin, cos, sin, past_key, past_value, **_):
        # per-token rotary table [B*T, Dh/2] (the first half of cos/sin: the halves are equal) and each
        # token's row in it; built per layer here, shared by cse_after_fusions
        half = self.head_dim // 2
        first_half = [op.Constant(value_ints=[v]) for v in (0, half, 3)]
        rows = op.Constant(value_ints=[-1, half])
        cos_table, sin_table = (op.Reshape(op.Slice(c, *first_half), rows) for c in (cos, sin))
        batch_seq = op.Shape(q_lin, start=0, end=2)
        count = op.ReduceProd(batch_seq, keepdims=0)
        row_of_token = op.Reshape(op.Range(op.Constant(value_int=0), count, op.Constant(value_int=1)),
                                  batch_seq)  # [B, T]
        q, k = (self._narrow(op, op.RotaryEmbedding(self._widen(op, x), row_of_token, cos_table, sin_table,
                                                    num_heads=heads, rotary_embedding_dim=self.head_dim,
                                                    interleaved=0, _domain="com.microsoft"))
                for x, heads in ((q_lin, self.heads), (k_lin, self.kv_heads)))
        return op.GroupQueryAttention(
            q, k, v_lin, past_key, past_value, self.seqlens_k, self.total_len,
            num_heads=self.heads, kv_num_heads=self.kv_heads, scale=self.scale, do_rotary=0,
            _domain="com.microsoft", _outputs=3)


class NormedAttentionToGQA(AttentionToGQA):
    """Qwen3: q/k normed per head ([B, T, H, Dh] -> RMSNorm -> Transpose) before the rotary; GQA's path
    takes the norms' outputs flattened to [B, T, H*Dh]. The norms themselves are left in place."""

    def pattern(self, op, q_bsnh, k_bsnh, v_lin, v_shape, cos, sin, past_key, past_value, allowed, scale,
                min_value, grouped_shape, heads_shape, out_shape):
        q = op.Transpose(q_bsnh, perm=[0, 2, 1, 3])
        k = op.Transpose(k_bsnh, perm=[0, 2, 1, 3])
        return self.attention(op, q, k, v_lin, v_shape, cos, sin, past_key, past_value, allowed, scale, min_value,
                              grouped_shape, heads_shape, out_shape)

    def check(self, context, q_bsnh, k_bsnh, **bindings):
        for name, value in (("q", q_bsnh), ("k", k_bsnh)):
            producer = value.producer()
            if producer is None or producer.op_type == "Reshape":
                return pattern.MatchResult().fail(f"{name} comes straight from its projection (no per-head norm): "
                                                  "the plain rule's case", value)
        return super().check(context, q_bsnh=q_bsnh, k_bsnh=k_bsnh, **bindings)

    def rewrite(self, op, q_bsnh, k_bsnh, v_lin, cos, sin, past_key, past_value, **_):
        flat = op.Constant(value_ints=[0, 0, -1])  # [B, T, H, Dh] -> [B, T, H*Dh]
        return super().rewrite(op, op.Reshape(q_bsnh, flat), op.Reshape(k_bsnh, flat), v_lin, cos, sin, past_key,
                               past_value)


# the rules alone (a test can apply them to a graph of its own, after add_cache_inputs)
ATTENTION_TO_GQA = AttentionToGQA.rule()
NORMED_ATTENTION_TO_GQA = NormedAttentionToGQA.rule()
ATTENTION_RULES = pattern.RewriteRuleSet([ATTENTION_TO_GQA, NORMED_ATTENTION_TO_GQA,
                                          AttentionToGQA.rule(half=True), NormedAttentionToGQA.rule(half=True)])


def add_cache_inputs(graph: ir.Graph) -> tuple[ir.Value, ir.Value]:
    """Add the inputs GQA reads, ``seqlens_k [B] int32`` and ``total_sequence_length [] int32``, after the
    last input that is not a past K/V (the batch dim of ``input_ids``)."""
    batch = next(v for v in graph.inputs if v.name == "input_ids").shape[0]
    seqlens_k = ir.Value(name=SEQLENS_K, type=ir.TensorType(ir.DataType.INT32), shape=ir.Shape([batch]))
    total_len = ir.Value(name=TOTAL_SEQUENCE_LENGTH, type=ir.TensorType(ir.DataType.INT32), shape=ir.Shape([]))
    at = max(i for i, v in enumerate(graph.inputs) if not _PAST.match(v.name or "")) + 1
    graph.inputs.insert(at, total_len)
    graph.inputs.insert(at, seqlens_k)
    return seqlens_k, total_len


class FuseDecoderAttention(GraphPass, name="fuse_decoder_attention", targets=("ort",), parts=("decoder",)):
    description = ("decoder attention -> com.microsoft.GroupQueryAttention; past/present K/V become in-place "
                   "buffers (+ seqlens_k, total_sequence_length inputs)")

    def call(self, model: ir.Model) -> GraphPassResult:
        graph = model.graph
        past = {v.name: v for v in graph.inputs if _PAST.match(v.name or "")}
        if not past or any(v.name in (SEQLENS_K, TOTAL_SEQUENCE_LENGTH) for v in graph.inputs):
            return GraphPassResult(model, False, {"skipped": "no past_key_values inputs" if not past else
                                                  "already fused"})
        layers = len(past) // 2
        seqlens_k, total_len = add_cache_inputs(graph)
        count = ATTENTION_RULES.apply_to_model(model)
        if count == 0:
            details = {"fused": 0, "why_not": why_not_matched(model, ATTENTION_RULES)}
            graph.inputs.remove(seqlens_k)
            graph.inputs.remove(total_len)
            log.warning("fuse_decoder_attention matched no layer: %s", details["why_not"])
            return GraphPassResult(model, False, details)
        if count != layers:
            raise QvlError(f"fuse_decoder_attention fused {count} of {layers} decoder layers; a partial fusion would "
                           "mix two KV cache layouts. Skip the pass (--skip-pass fuse_decoder_attention) and report "
                           "the decoder structure that did not match.")
        self._capacity_axes(graph)
        return GraphPassResult(model, True, {"fused": count, "new_inputs": [SEQLENS_K, TOTAL_SEQUENCE_LENGTH]})

    @staticmethod
    def _capacity_axes(graph: ir.Graph) -> None:
        """past/present K/V axis 2 is the buffer capacity now; nothing may still read it as the past length.
        Nodes the rewrite left unread (the old causal mask's Shape of the past K/V) are not checked: they
        compute nothing the graph outputs, and ``remove_unused_after_fusions`` drops them."""
        live = _live_nodes(graph)
        for value in list(graph.inputs) + list(graph.outputs):
            if _PAST.match(value.name or "") or _PRESENT.match(value.name or ""):
                dims = list(value.shape)
                dims[2] = ir.SymbolicDim(CAPACITY_DIM)
                value.shape = ir.Shape(dims)
            if _PAST.match(value.name or ""):
                for use in value.uses():
                    node = use.node
                    if node not in live or node.op_type == "GroupQueryAttention":
                        continue
                    if node.op_type == "Shape" and node.attributes.get_int("end", 4) <= 2:
                        continue  # batch / heads only
                    raise QvlError(f"After fuse_decoder_attention, node {node.name!r} ({node.op_type}) still reads "
                                   f"{value.name} as if its axis 2 were the past length; the KV buffer layout would "
                                   "be wrong. Skip the pass and report the decoder structure.")


def _live_nodes(graph: ir.Graph) -> set[ir.Node]:
    """The nodes the graph outputs depend on."""
    live: set[ir.Node] = set()
    stack = [v.producer() for v in graph.outputs]
    while stack:
        node = stack.pop()
        if node is None or node in live:
            continue
        live.add(node)
        stack.extend(v.producer() for v in node.inputs if v is not None)
    return live
