"""Vision attention -> ``com.microsoft.MultiHeadAttention`` on its flash path, the mask folded into Q.K.

What the traced vision encoder computes per block (``qvl_export.models.vision.VisionAttention``)::

    q, k, v [S, N, hd]                                  (q, k rotated; S = padded sequence)
    window blocks: Reshape [W, L, N, hd] -> Transpose -> softmax(Where(key_mask [W, 1, 1, L], q k^T * scale, f32 min)) v
    full blocks:   Transpose [N, S, hd]  -> softmax(Where(same_image [S, S], q k^T * scale, f32 min)) v
    -> Transpose -> Reshape [S, N*hd]

onnxruntime's CPU MultiHeadAttention takes its flash-attention kernel (MLAS, O(S) memory, no S x S
scores) only when it gets no mask and no bias (onnxruntime/contrib_ops/cpu/bert/multihead_attention.cc,
the ``key_padding_mask == nullptr && extra_add_qk == nullptr`` branch); with a mask it materialises
[B, N, S, S] scores. So this pass moves the mask into the dot product: e extra columns are appended to
every head of q and k so that ``q_aug . k_aug = q . k`` for an allowed pair (the extra terms add exact
zeros) and ``~ -1e30`` for a masked one (exp() of it is exactly 0)::

    window blocks (mask = key_mask from ``valid [S]``), e = 1:      q_x = 1,              k_x = 0 if valid else -1e30
    full blocks (mask = same image_ids & valid key), e = images:  q_x[j] = (id_q == j),  k_x[j] = 0 if id_k == j else -1e30

and the block becomes ``MultiHeadAttention(q_aug [B, L, N*(hd+e)], k_aug, v [B, L, N*hd], scale=hd**-0.5)``
with B = windows (L = window length) or B = 1 (L = S). No Transpose copies are left around it.

The same function for every row the runtime keeps (real tokens), up to float32 rounding (max abs
difference ~3e-6 on the real-width encoder): allowed pairs get the same scores, masked keys get zero
weight in both forms. Rows of padding slots (``image_ids < 0``) differ and stay finite: the
traced full blocks give them a uniform average (all keys masked), the fused ones attend to every key;
the runtime drops those rows, and padding keys stay masked for every real query in both forms.

Skipped (``check`` says why): masks of another form - notably the dense ``S x S`` window mask of
``--window-attention dense``, whose group ids are computed in the graph (a one-hot over windows would
cost S/L extra columns; that export is the peers' baseline and stays as traced) - non-constant or
non-scalar scales. onnxruntime only: the trt target keeps the standard-ONNX graph (TensorRT fuses
MatMul-Softmax-MatMul itself).

float16 parts (the vision tower of an fp8 build) trace the scores in float32 as well - q and k cast up
after their head transposes, the probabilities cast back down before ``probs @ v`` - and fuse the same
way: q, k and v are cast to float32 in front of the fused block and its output back to float16, so the
block runs onnxruntime's float32 flash path (the -1e30 key bias needs float32). Left unfused, a float16
block materialises its masked [N, S, S] scores: the 4-layer cut of the 3B tower held 7.4 GB for one
5632-patch calibration page; one full-attention block at 16384 patches would hold 17 GB.

Measured (2 threads, real width 1280 / 16 heads of 80): one full block at 896^2 (S = 4096) 3.35 s
traced -> 1.14 s fused; one window block 159 ms -> 91 ms. The whole-encoder gains are in the
issue report (Qwen2-VL: every block is full attention, the largest gain).
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import pattern

from qvl_export.passes.base import GraphPass, GraphPassResult, const_array, use_contrib_domain, why_not_matched

MASKED = -1e30  # k_x of a masked key; times q_x = 1 it sends the score to ~-1e29 after scaling: exp() == 0


def _producer(value: ir.Value | None, op_type: str) -> ir.Node | None:
    node = value.producer() if value is not None else None
    return node if node is not None and node.op_type == op_type and node.domain in ("", "ai.onnx") else None


def _unsqueezed(value: ir.Value, axis: int) -> ir.Value | None:
    """``x`` if ``value = Unsqueeze(x, [axis])`` (axis may be given negative), else None."""
    node = _producer(value, "Unsqueeze")
    if node is None:
        return None
    axes = const_array(node.inputs[1])
    rank = value.shape.rank() if value.shape is not None else None
    if axes is None or axes.size != 1 or rank is None:
        return None
    if int(axes.reshape(-1)[0]) % rank != axis % rank:
        return None
    return node.inputs[0]


def _key_valid_of(value: ir.Value | None) -> ir.Value | None:
    """``ids`` if ``value = GreaterOrEqual(ids, 0)`` (a per-slot "not padding" flag), else None."""
    node = _producer(value, "GreaterOrEqual")
    if node is None:
        return None
    zero = const_array(node.inputs[1])
    if zero is None or zero.size != 1 or zero.reshape(-1)[0] != 0:
        return None
    return node.inputs[0]


def classify_mask(mask: ir.Value, window: int | None) -> tuple[str, ir.Value] | str:
    """``("key", valid [S] bool)`` / ``("image", ids [S] int64)``, or a string saying why neither."""
    if window is not None:  # window blocks: Reshape(valid [S], [-1, 1, 1, L])
        node = _producer(mask, "Reshape")
        if node is None:
            return "window mask is not a Reshape of a per-slot flag"
        shape = const_array(node.inputs[1])
        if shape is None or shape.tolist()[1:] != [1, 1, window]:
            return f"window mask is not reshaped to [W, 1, 1, {window}]"
        valid = node.inputs[0]
        if valid.dtype != ir.DataType.BOOL or valid.shape is None or valid.shape.rank() != 1:
            return "window mask does not come from a [S] bool flag"
        return "key", valid
    # full blocks: And(Equal(ids[:, None], ids[None, :]), (ids >= 0)[None, :])
    node = _producer(mask, "And")
    if node is None:
        return "full-attention mask is not And(same group, valid key)"
    equal, valid_row = node.inputs
    if _producer(equal, "Equal") is None:
        equal, valid_row = valid_row, equal
    eq = _producer(equal, "Equal")
    if eq is None:
        return "full-attention mask has no Equal(ids[:, None], ids[None, :])"
    col, row = _unsqueezed(eq.inputs[0], 1), _unsqueezed(eq.inputs[1], 0)
    if col is None or row is None or col is not row:
        return "full-attention mask does not compare one id vector with itself"
    ids = col
    if not ids.is_graph_input():
        return (f"group ids '{ids.name}' are computed in the graph, not an image_ids input (the dense window "
                "baseline); a one-hot over them would add S/L columns per head")
    valid = _unsqueezed(valid_row, 0)
    if valid is None or _key_valid_of(valid) is not ids:
        return "full-attention mask does not drop exactly the keys with id < 0"
    if ids.dtype not in (ir.DataType.INT64, ir.DataType.INT32):
        return "group ids are not integers"
    return "image", ids


# (q, k^T, output) permutations: window blocks work on [W, L, N, hd], full blocks on [S, N, hd]
PERMS = {True: ((0, 2, 1, 3), (0, 2, 3, 1), (0, 2, 1, 3)), False: ((1, 0, 2), (1, 2, 0), (1, 0, 2))}


class VisionAttentionToMHA(pattern.RewriteRuleClassBase):
    """One attention block (window blocks: ``windowed``; full blocks: not) -> MultiHeadAttention with the
    mask folded into extra q/k columns; the check says why a candidate is left."""

    def __init__(self, windowed: bool, low: bool = False):
        super().__init__(name=("window_attention" if windowed else "full_attention") + ("_fp16" if low else ""))
        self.windowed, self.low = windowed, low

    def pattern(self, op, q, k, v, q_shape, k_shape, v_shape, scale, mask, fill, out_shape):
        perm_q, perm_k, perm_out = PERMS[self.windowed]
        if self.windowed:  # [S, N, hd] -> [W, L, N, hd]
            q, k, v = op.Reshape(q, q_shape), op.Reshape(k, k_shape), op.Reshape(v, v_shape)
        if self.low:  # float16: heads transposed, cast to float32, k^T last
            last_two = tuple(range(len(perm_k) - 2)) + (len(perm_k) - 1, len(perm_k) - 2)
            qt = op.Cast(op.Transpose(q, perm=perm_q))
            kt = op.Transpose(op.Cast(op.Transpose(k, perm=perm_q)), perm=last_two)
        else:
            qt, kt = op.Transpose(q, perm=perm_q), op.Transpose(k, perm=perm_k)
        masked = op.Where(mask, op.Mul(op.MatMul(qt, kt), scale), fill)
        probs = op.Softmax(masked, axis=-1)
        ctx = op.MatMul(op.Cast(probs) if self.low else probs, op.Transpose(v, perm=perm_q))
        return op.Reshape(op.Transpose(ctx, perm=perm_out), out_shape)

    def check(self, context, q, k, v, q_shape, k_shape, v_shape, scale, mask, fill, out_shape, **_):
        result = pattern.MatchResult()
        shapes = [x.shape for x in (q, k, v)]
        if any(s is None or s.rank() != 3 for s in shapes):
            return result.fail("q/k/v are not [S, N, hd]", q)
        heads, head_dim = shapes[0][1], shapes[0][2]
        if not (isinstance(heads, int) and isinstance(head_dim, int)):
            return result.fail("heads / head dim are not static", q)
        if any(s[1] != heads or s[2] != head_dim for s in shapes):
            return result.fail("q, k and v differ in heads or head dim", k)
        want = ir.DataType.FLOAT16 if self.low else ir.DataType.FLOAT
        if any(x.dtype != want for x in (q, k, v)):
            return result.fail(f"q/k/v are {q.dtype}/{k.dtype}/{v.dtype}, not {want}", q)
        s = const_array(scale)
        if s is None or s.size != 1:
            return result.fail("attention scale is not a constant scalar", scale)
        f = const_array(fill)
        if f is None or f.size != 1 or f.reshape(-1)[0] > -1e30:
            return result.fail("masked scores are not set to a large negative constant", fill)
        window = None
        if self.windowed:
            shape_consts = [const_array(x) for x in (q_shape, k_shape, v_shape)]
            if any(c is None or c.size != 4 for c in shape_consts):
                return result.fail("window reshapes are not constant [-1, L, N, hd]", q_shape)
            window = int(shape_consts[0][1])
            if any(c.tolist() != [-1, window, heads, head_dim] for c in shape_consts):
                return result.fail("window reshapes are not [-1, L, N, hd] with one L", q_shape)
        out = const_array(out_shape)
        if out is None or out.size != 2 or out[1] != heads * head_dim:
            return result.fail("attention output is not reshaped to [S, N*hd]", out_shape)
        kind = classify_mask(mask, window)
        if isinstance(kind, str):
            return result.fail(kind, mask)
        self._kind, self._source = kind
        self._heads, self._head_dim, self._window = heads, head_dim, window
        self._scale = float(s.reshape(-1)[0])
        return result

    def rewrite(self, op, q, k, v, **_):
        n, hd = self._heads, self._head_dim
        f32 = ir.DataType.FLOAT
        if self.low:  # the block runs in float32 (the -1e30 key bias needs it), its output cast back
            q, k, v = op.Cast(q, to=f32), op.Cast(k, to=f32), op.Cast(v, to=f32)
        if self._kind == "key":  # e = 1: q_x = 1 (Pad), k_x = 0 / -1e30 per key
            q_aug = op.Pad(q, op.Constant(value_ints=[0, 0, 0, 0, 0, 1]), op.Constant(value_float=1.0))
            k_x = op.Where(self._source, op.Constant(value_float=0.0), op.Constant(value_float=MASKED))
        else:  # e = number of images: one-hot of the image id
            ids = self._source
            count = op.Add(op.ReduceMax(ids, keepdims=0), op.CastLike(op.Constant(value_int=1), ids))
            images = op.Range(op.CastLike(op.Constant(value_int=0), ids), count,
                              op.CastLike(op.Constant(value_int=1), ids))  # [n]
            onehot = op.Equal(op.Unsqueeze(ids, op.Constant(value_ints=[1])), images)  # [S, n]
            q_x = op.Expand(op.Unsqueeze(op.Cast(onehot, to=f32), op.Constant(value_ints=[1])),
                            op.Constant(value_ints=[1, n, 1]))  # [S, N, n]
            q_aug = op.Concat(q, q_x, axis=-1)
            k_x = op.Where(onehot, op.Constant(value_float=0.0), op.Constant(value_float=MASKED))  # [S, n]
        k_x = op.Expand(op.Unsqueeze(k_x, op.Constant(value_ints=[1] if self._kind == "image" else [1, 2])),
                        op.Constant(value_ints=[1, n, 1]))  # [S, N, e]
        k_aug = op.Concat(k, k_x, axis=-1)
        if self._kind == "key":  # [W, L, N*(hd+1)]: batch = windows
            rows = op.Constant(value_ints=[-1, self._window, n * (hd + 1)])
            q_in, k_in = op.Reshape(q_aug, rows), op.Reshape(k_aug, rows)
            v_in = op.Reshape(v, op.Constant(value_ints=[-1, self._window, n * hd]))
        else:  # [1, S, N*(hd+n)]: one batch row
            flat, batch = op.Constant(value_ints=[0, -1]), op.Constant(value_ints=[0])
            q_in = op.Unsqueeze(op.Reshape(q_aug, flat), batch)
            k_in = op.Unsqueeze(op.Reshape(k_aug, flat), batch)
            v_in = op.Unsqueeze(op.Reshape(v, flat), batch)
        ctx = op.MultiHeadAttention(q_in, k_in, v_in, num_heads=n, scale=self._scale, _domain="com.microsoft")
        out = op.Reshape(ctx, op.Constant(value_ints=[-1, n * hd]))
        return op.Cast(out, to=ir.DataType.FLOAT16) if self.low else out


# the rules alone (a test can apply either to a graph of its own)
WINDOW_ATTENTION = pattern.RewriteRuleSet([VisionAttentionToMHA.rule(True), VisionAttentionToMHA.rule(True, True)])
FULL_ATTENTION = pattern.RewriteRuleSet([VisionAttentionToMHA.rule(False), VisionAttentionToMHA.rule(False, True)])
RULES = pattern.RewriteRuleSet([*WINDOW_ATTENTION.rules, *FULL_ATTENTION.rules])


class FuseVisionAttention(GraphPass, name="fuse_vision_attention", targets=("ort",), parts=("vision",)):
    description = ("vision attention -> com.microsoft.MultiHeadAttention (flash path: window / image mask "
                   "folded into extra q.k columns)")

    def call(self, model: ir.Model) -> GraphPassResult:
        details = {"window": WINDOW_ATTENTION.apply_to_model(model), "full": FULL_ATTENTION.apply_to_model(model)}
        leftover = [n for n in model.graph if n.op_type == "Softmax"]
        if leftover:  # say why the remaining attention blocks stayed as traced
            details["not_fused"] = len(leftover)
            details["why_not"] = why_not_matched(model, RULES)
        modified = bool(details["window"] or details["full"])
        if modified:  # every block builds its own q_x / k_x columns: cse_after_fusions shares them
            use_contrib_domain(model)
        return GraphPassResult(model, modified, details)


__all__ = ["FULL_ATTENTION", "MASKED", "WINDOW_ATTENTION", "FuseVisionAttention", "classify_mask"]
