"""AWQ: activation-aware scales for the decoder's int4 weights (``--int4-method awq``).

Round-to-nearest int4 gives every input channel of a weight the same grid, yet a few channels carry
most of the activation mass (SwiGLU down-projections, the channels a norm amplifies). AWQ (Lin et
al., 2023) scales those weight rows up before quantizing - ``W' = diag(s) W``, so their rounding
error shrinks relative to their size - and divides the activation by the same ``s``, so the float
function is unchanged. ``s = mean|x|^alpha`` per input channel, ``alpha`` searched on a grid per
group of weights that read the same activation, by the output error of the quantized group on the
calibration rows - on each pool of rows apart: the two halves of the context tokens (prefill: page
and prompt; different documents) and the generated tokens (decode steps, ~1 row in 100 of the stream,
so pooled together they would not count), the alpha whose worst pool gains most. ``alpha = 0`` is
round to nearest, so the search never picks worse than RTN on any pool. ``s`` comes from the mean of
the context's and the generated tokens' mean |x| per channel.

The division is folded into whatever produces the activation, so the graph gains no op:

- a norm (``SimplifiedLayerNormalization``, ``SkipSimplifiedLayerNormalization``, their LayerNorm
  forms, or a ``Mul`` by a constant vector): its scale (and bias) is divided by ``s``
  (q/k/v after the input norm, gate/up after the post-attention norm);
- the SwiGLU product ``act(gate) * up``: the up projection's output columns are divided by ``s``
  (down_proj). A column scale leaves int4 blocks along K unchanged, so the up weight quantizes
  exactly as before.

Then, as AWQ does, each block's clipping range is searched (``clip``: the weights of a block are
clamped to ``ratio x`` its largest magnitude before quantizing, the ratio per block and output
column minimising that block's output error on the calibration rows, each pool's weighing alike); q/k projections keep their
full range (their errors pass through the softmax), as in AWQ.

Groups whose producer is neither (o_proj after attention) and the lm_head stay round to nearest, but
still get the clipping search.
Inputs: the decoder's calibration statistics (``taps.ActivationStats``: mean |x| per channel over
every calibration row, and the sampled rows); weights are read one group at a time from the lazy
float part. The grid searched is the packer's: on the ort target onnxruntime's block quantizer
(``building/weight_only.py``; the block's signed extreme maps to -8, written here in numpy as
``round_trip``, a test holds the two equal), on the trt target TensorRT's symmetric int4 (a positive
scale ``max|w| / 7`` per block, ``positive=True``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

GRID = 20  # alphas 0, 0.05, ..., 0.95
CLIP_GRID = 20  # clipping ratios 1.0, 0.975, ..., 0.525
MAX_ROWS = 512  # calibration rows per group in the search (evenly spaced over the sample)
CLIP_COLUMNS = 1024  # output columns per step of the clipping search (bounds its memory)
NO_CLIP = ("q_proj", "k_proj")  # scopes whose range is kept whole
NORMS = {"SimplifiedLayerNormalization": (1, None), "SkipSimplifiedLayerNormalization": (2, None),
         "LayerNormalization": (1, 2), "SkipLayerNormalization": (2, 3)}  # op -> (scale input, bias input)


@dataclass
class Fold:
    """Where a group's ``1 / s`` goes: a norm's scale (and bias) vectors, or a slice of columns of the
    MatMul weight that produces the activation."""

    kind: str  # "norm" or "columns"
    targets: tuple[str, ...]  # norm: scale (and bias) initializers; columns: the producing weight
    start: int = 0  # columns: first column of the slice that becomes this activation


@dataclass
class Group:
    activation: str
    weights: list[str]
    scopes: list[str]
    fold: Fold
    alpha: float = 0.0
    loss_rtn: float = 0.0
    loss_awq: float = 0.0


@dataclass
class AwqPlan:
    """The scales found: weights to quantize as ``W * s[:, None]`` with ``1 / s`` folded upstream."""

    row_scale: dict[str, np.ndarray] = field(default_factory=dict)  # weight -> s [K]
    column_divide: dict[str, list[tuple[int, np.ndarray]]] = field(default_factory=dict)  # weight -> (start, s)
    vector_divide: dict[str, np.ndarray] = field(default_factory=dict)  # norm scale / bias -> s
    # weight -> the block's extreme kept [blocks, N]: signed on onnxruntime's grid (which end maps to -8)
    clip: dict[str, np.ndarray] = field(default_factory=dict)
    block_size: int = 32
    positive: bool = False  # the grid: TensorRT's positive scales (max|w| / 7) or onnxruntime's (extreme / -8)
    groups: list[Group] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # activation -> why it stays round to nearest

    def weight(self, name: str, w: np.ndarray, clip: bool = True) -> np.ndarray:
        """Weight ``name`` [K, N] as it is to be quantized (float function unchanged with the folds);
        ``clip=False``: as it is to stay in float beside the folds (a weight the quantizer keeps)."""
        s = self.row_scale.get(name)
        slices = self.column_divide.get(name, ())
        if s is None and not slices and (name not in self.clip or not clip):
            return w
        w = np.array(w, dtype=np.float32, copy=True)
        if s is not None:
            w *= s[:, None]
        bound = self.clip.get(name) if clip else None  # found on the row-scaled weight
        if bound is not None:
            limit = np.repeat(bound, self.block_size, axis=0)[:w.shape[0]]  # [K, N]
            if self.positive:  # TensorRT's grid: +-bound are +-7 x the block's scale
                np.clip(w, -limit, limit, out=w)
            else:  # onnxruntime's: the searched end whole (it maps to -8), the other at 7/8 of it (+7)
                low = np.where(limit >= 0, -limit * 7 / 8, limit)
                np.clip(w, low, np.where(limit >= 0, limit, -limit * 7 / 8), out=w)
        for start, d in slices:  # a column scale moves each block's grid with it
            w[:, start:start + d.size] /= d[None, :]
        return w

    def summary(self) -> dict:
        gain = [g.loss_rtn / g.loss_awq for g in self.groups if g.loss_awq > 0]
        return {"groups": len(self.groups), "weights_scaled": len(self.row_scale), "weights_clipped": len(self.clip),
                "alpha_mean": round(float(np.mean([g.alpha for g in self.groups])), 3) if self.groups else None,
                "error_ratio_rtn_to_awq_median": round(float(np.median(gain)), 3) if gain else None,
                "kept_rtn": dict(self.skipped),
                "per_group": {g.scopes[0]: {"alpha": g.alpha, "loss_rtn": float(f"{g.loss_rtn:.4g}"),
                                            "loss_awq": float(f"{g.loss_awq:.4g}")} for g in self.groups}}


def search(model, stats, bits: int = 4, block_size: int = 32, grid: int = GRID, clip_grid: int = CLIP_GRID,
           max_rows: int = MAX_ROWS, release: Callable = lambda t: None, positive: bool = False) -> AwqPlan:
    """AWQ scales and clipping ranges for ``model``'s constant 2-D MatMul weights (an onnx-ir model,
    read lazily, one group's weights at a time), from the part's calibration ``stats``, for symmetric
    ``bits``-bit blocks of ``block_size`` along K (the packer's grid: ``round_trip``; TensorRT's with
    ``positive``)."""
    from qvl_export.calibration.taps import weighted_nodes

    plan = AwqPlan(block_size=block_size, positive=positive)
    nodes = {n.name: n for n in model.graph}
    by_activation: dict[str, list] = {}
    for wn in weighted_nodes(model):
        node = nodes[wn.name]
        if wn.op_type == "MatMul" and len(node.inputs[1].const_value.shape) == 2:
            by_activation.setdefault(wn.activation, []).append((wn, node))
    for activation, members in by_activation.items():
        why = _refuse(members, stats, activation)
        if why:
            plan.skipped[activation] = why
            continue
        fold = _fold(members[0][1].inputs[0])
        t = stats.tensors[activation]
        pools = _pools(t, max_rows)
        rows = np.concatenate(pools)
        weights: dict[str, np.ndarray] = {}
        scopes: dict[str, str] = {}
        for wn, node in members:
            if wn.weight not in weights:
                # a copy: the lazily read tensor's memory map is released right away
                weights[wn.weight] = np.array(node.inputs[1].const_value.numpy(), dtype=np.float32, copy=True)
                scopes[wn.weight] = wn.scope
                release(node.inputs[1].const_value)
        s = np.ones(rows.shape[1], np.float32)
        if fold is None:
            plan.skipped[activation] = "scales: its producer takes none (not a norm or the SwiGLU product)"
        else:
            group = Group(activation, list(weights), [wn.scope for wn, _ in members], fold)
            means = [p.channel_mean() for p in (t, t.generated) if p is not None and p.channel_mean() is not None]
            mean = np.maximum(np.mean(means, axis=0).astype(np.float32), 1e-8)  # each pool counts alike
            s = _search_scales(group, pools, mean, list(weights.values()), bits, block_size, grid, positive)
            if group.alpha == 0.0:
                plan.skipped[activation] = "scales: none gained on every pool of calibration rows"
                s = np.ones_like(s)
            else:
                plan.groups.append(group)
                for w in group.weights:
                    plan.row_scale[w] = s
                if fold.kind == "norm":
                    for target in fold.targets:
                        plan.vector_divide[target] = s
                else:
                    plan.column_divide.setdefault(fold.targets[0], []).append((fold.start, s))
        for name, w in weights.items():
            if clip_grid and not any(k in scopes[name] for k in NO_CLIP):
                plan.clip[name] = _search_clip([p / s[None, :] for p in pools], w * s[:, None], bits, block_size,
                                               clip_grid, positive)
        del weights
    return plan


def round_trip(blocks: np.ndarray, bits: int = 4, positive: bool = False) -> np.ndarray:
    """Symmetric ``bits``-bit round trip of weight blocks ``[..., block, N]`` (each block and column
    its own scale), as onnxruntime's block quantizer rounds: the block's largest-magnitude value maps
    to ``-2^(bits-1)`` (its signed value / -2^(bits-1) is the scale), the rest round to nearest and
    clip to ``[-2^(bits-1), 2^(bits-1) - 1]``. ``positive``: TensorRT's grid, scale ``max|w| / (2^(bits-1)
    - 1)`` (``block_scales``)."""
    if positive:
        return _on_grid(blocks, block_scales(blocks, bits), bits)
    hi = blocks.max(axis=-2, keepdims=True)
    lo = blocks.min(axis=-2, keepdims=True)
    return _on_grid(blocks, np.where(hi >= -lo, hi, lo) / -float(1 << (bits - 1)), bits)


def block_scales(blocks: np.ndarray, bits: int = 4) -> np.ndarray:
    """TensorRT's symmetric scale of each block and column ``[..., 1, N]``: ``max|w| / (2^(bits-1) - 1)``."""
    return np.abs(blocks).max(axis=-2, keepdims=True) / float((1 << (bits - 1)) - 1)


# divisors of max|w| tried per block by ``least_error_scales`` (7: TensorRT's / ModelOpt's own scale)
SCALE_DIVISORS = (7.0, 7.25, 7.5, 7.75, 8.0)


def least_error_scales(blocks: np.ndarray, scale_dtype, bits: int = 4, divisors=SCALE_DIVISORS,
                       columns: int = CLIP_COLUMNS) -> np.ndarray:
    """Per block and column of ``blocks [..., block, N]``, the positive scale ``max|w| / d`` (``d`` in
    ``divisors``, rounded to ``scale_dtype`` as it is stored) whose grid - the integers
    ``[-2^(bits-1), 2^(bits-1) - 1]`` times the scale - reconstructs the block with the least squared
    error -> ``[..., 1, N]`` in ``scale_dtype``. ``d`` = 7 puts the block's extreme at +-7 (15 levels);
    a larger ``d`` is a finer step that clips the extremes a little and lets a negative extreme take -8,
    the level a positive scale otherwise leaves unused. Ties keep 7. Data-free: weights only. Computed
    ``columns`` output columns at a time (bounds the temporaries of a large weight)."""
    amax = np.abs(blocks).max(axis=-2, keepdims=True)
    out = np.empty(amax.shape, dtype=scale_dtype)
    for c0 in range(0, blocks.shape[-1], columns):
        part = np.asarray(blocks[..., c0:c0 + columns], dtype=np.float32)
        best = best_err = None
        for d in divisors:
            scale = (amax[..., c0:c0 + columns] / d).astype(scale_dtype)
            scale[scale == 0] = 1  # an all-zero block: 0 on any grid
            q = _on_grid(part, scale.astype(np.float32), bits)
            q -= part
            err = np.einsum("...kn,...kn->...n", q, q)[..., None, :]
            if best is None:
                best, best_err = scale, err
            else:
                better = err < best_err
                best, best_err = np.where(better, scale, best), np.where(better, err, best_err)
        out[..., c0:c0 + columns] = best
    return out


def _on_grid(blocks: np.ndarray, scale: np.ndarray, bits: int, symmetric: bool = False) -> np.ndarray:
    """``blocks`` rounded onto ``scale`` x the integers of ``bits`` bits (a value past the range clips;
    ``symmetric``: to +-(2^(bits-1) - 1), as a clamp to +-bound does on TensorRT's grid)."""
    half = float(1 << (bits - 1))
    safe = np.where(scale == 0, 1.0, scale).astype(np.float32)
    q = np.divide(blocks, safe, dtype=np.float32)
    np.rint(q, out=q)
    np.clip(q, 1 - half if symmetric else -half, half - 1, out=q)
    q *= scale
    return q


def _blocks(w: np.ndarray, block_size: int) -> np.ndarray:
    """``w [K, N]`` -> ``[K / block, block, N]`` (K zero-padded to a whole block, as the packer pads)."""
    k, n = w.shape
    pad = -k % block_size
    if pad:
        w = np.concatenate([w, np.zeros((pad, n), w.dtype)], axis=0)
    return w.reshape(-1, block_size, n)


def quantized(w: np.ndarray, bits: int, block_size: int, positive: bool = False) -> np.ndarray:
    """``w [K, N]`` through the packer's grid (round to nearest per block along K)."""
    return round_trip(_blocks(w, block_size), bits, positive).reshape(-1, w.shape[1])[:w.shape[0]]


def _pools(t, max_rows: int) -> list[np.ndarray]:
    """The row pools a group is judged on: the two halves of the context rows (prefill: page and prompt
    tokens; the rows come in run order, so the halves are different documents) and, when the
    calibration ran decode steps, the generated tokens' rows. At most ``max_rows`` rows in all, evenly
    spaced within each pool, the generated pool at most half of them."""
    def spaced(rows: np.ndarray, n: int) -> np.ndarray:
        return rows if len(rows) <= n else rows[np.linspace(0, len(rows) - 1, n).astype(int)]

    generated = t.generated.sample() if t.generated is not None and t.generated.rows else None
    gen = spaced(generated, max_rows // 2) if generated is not None else None
    context = spaced(t.sample(), max_rows - (len(gen) if gen is not None else 0))
    pools = [context[:len(context) // 2], context[len(context) // 2:]] if len(context) >= 2 else [context]
    return [p for p in pools + ([gen] if gen is not None else []) if len(p)]


def _search_scales(group: Group, pools: list[np.ndarray], mean: np.ndarray, mats: list[np.ndarray], bits: int,
                   block_size: int, grid: int, positive: bool = False) -> np.ndarray:
    """Best ``s`` on the grid for the group's weights, recording alpha and both losses (the mean over
    the pools).

    "Best" is judged on each pool of rows apart (``_pools``: two halves of the context, different
    documents, and the generated tokens): the alpha whose *worst* pool gains most over round to
    nearest (the smallest of the pools' loss ratios to alpha 0 is maximised). A scale that fits some
    documents' activations, or the page tokens', and costs the others' is not taken - alpha 0 (ratio 1
    on every pool) wins then."""
    refs = [[p @ w for w in mats] for p in pools]
    best_s, best_gain, rtn = np.ones_like(mean), None, None
    for i in range(grid):
        alpha = i / grid
        s = np.power(mean, alpha, dtype=np.float32)
        s = s / np.sqrt(s.max() * s.min())
        quant = [quantized(w * s[:, None], bits, block_size, positive) for w in mats]
        losses = np.array([sum(float(np.mean(np.square((p / s[None, :]) @ q - r))) for q, r in zip(quant, ref))
                           for p, ref in zip(pools, refs)])
        if i == 0:
            rtn, group.loss_rtn = losses, float(losses.mean())
        gain = float(np.min(rtn / np.maximum(losses, 1e-30)))
        if best_gain is None or gain > best_gain:
            best_s, best_gain, group.alpha, group.loss_awq = s, gain, alpha, float(losses.mean())
    return best_s.astype(np.float32)


def _search_clip(xs: np.ndarray | list[np.ndarray], w: np.ndarray, bits: int, block_size: int, grid: int,
                 positive: bool = False) -> np.ndarray:
    """Per block and output column, the largest magnitude to keep ``[K / block, N]``: the ratio of the
    block's own largest magnitude (1.0 down to 0.525) whose rounding error, seen through that block's
    calibration inputs, is smallest. The error of a block's column ``d`` over the rows is ``d' G d``
    with ``G`` the block's input Gram matrix (``bs x bs``), so the rows are read once.

    On onnxruntime's grid the bound is signed: the end that maps to -8 (the block's extreme) is kept
    whole and the other end at 7/8 of it, so ``AwqPlan.weight`` clamps the weight to exactly the range
    searched (a symmetric clamp would let the packer pick the other end when both are clipped)."""
    wb = _blocks(w, block_size)  # [B, bs, N]
    gram = 0.0
    for x in xs if isinstance(xs, list) else [xs]:  # pools of rows: each pool's mean Gram counts alike
        xb = _blocks(x.T, block_size)  # [B, bs, R]
        gram = gram + np.matmul(xb, xb.transpose(0, 2, 1)) / max(1, x.shape[0])  # [B, bs, bs]
    hi, lo = wb.max(axis=1), wb.min(axis=1)  # [B, N]
    top = np.maximum(hi, -lo)
    sign = np.where(hi >= -lo, 1.0, -1.0).astype(np.float32)  # which end maps to -2^(bits-1)
    best = top.copy()
    half = float(1 << (bits - 1))
    for c0 in range(0, wb.shape[2], CLIP_COLUMNS):
        cols = slice(c0, c0 + CLIP_COLUMNS)
        part = wb[:, :, cols]
        lowest = np.full(part.shape[::2], np.inf, np.float32)
        for i in range(grid):
            bound = top[:, cols] * (1.0 - 0.5 * i / grid)  # [B, n]
            scale = bound / (half - 1) if positive else sign[:, cols] * bound / -half
            d = _on_grid(part, scale[:, None, :], bits, positive)  # values past bound clip
            d -= part
            loss = np.einsum("bkn,bkn->bn", d, np.matmul(gram, d))
            better = loss < lowest
            lowest = np.where(better, loss, lowest)
            best[:, cols] = np.where(better, bound, best[:, cols])
    return (best if positive else best * sign).astype(np.float32)


def _refuse(members, stats, activation: str) -> str | None:
    if any(wn.scope == "lm_head" or wn.scope.endswith(".lm_head") for wn, _ in members):
        return "lm_head (its table may be shared with the token embedding)"
    t = stats.tensors.get(activation)
    if t is None or t.channel_mean() is None or not t.rows:
        return "no calibration statistics for its activation"
    if any(len(node.inputs[1].uses()) != 1 for _, node in members):
        return "a weight shared with another op"
    readers = {node.name for node, _ in members[0][1].inputs[0].uses()}
    if readers != {node.name for _, node in members}:
        return "its activation is also read by an op without weights"
    return None


def _fold(x) -> Fold | None:
    """Where ``1 / s`` can go for activation ``x`` (an onnx-ir value), or None."""
    p = x.producer()
    if p is None:
        return None
    if p.op_type in NORMS and p.outputs[0] is x:
        scale_at, bias_at = NORMS[p.op_type]
        targets = [p.inputs[scale_at]]
        if bias_at is not None and len(p.inputs) > bias_at and p.inputs[bias_at] is not None:
            targets.append(p.inputs[bias_at])
        if all(_private_vector(v) for v in targets):
            return Fold("norm", tuple(v.name for v in targets))
        return None
    if p.op_type != "Mul" or len(p.inputs) != 2:
        return None
    for v in p.inputs:  # Mul by a constant vector: an unfused norm's scale
        if _private_vector(v) and _width(x) == v.const_value.shape[-1]:
            return Fold("norm", (v.name,))
    for v in p.inputs:  # act(gate) * up: divide the up projection's columns
        columns = _producing_columns(v)
        if columns is not None:
            return columns
    return None


def _private_vector(v) -> bool:
    return (v is not None and v.is_initializer() and v.const_value is not None
            and len(v.const_value.shape) == 1 and len(v.uses()) == 1)


def _width(x) -> int | None:
    return x.shape[-1] if x.shape is not None and isinstance(x.shape[-1], int) else None


def _producing_columns(v) -> Fold | None:
    """``v`` is (a last-axis Split slice of) a constant-weight MatMul's output read by one op only."""
    if len(v.uses()) != 1:
        return None
    p = v.producer()
    start = 0
    if p is not None and p.op_type == "Split":
        axis = p.attributes.get_int("axis", 0)
        src = p.inputs[0]
        shaped = src if src.shape is not None else v  # a pass may leave the split input unshaped
        rank = len(shaped.shape) if shaped.shape is not None else None
        if axis != -1 and (rank is None or axis != rank - 1) or len(src.uses()) != 1:
            return None
        sizes = _split_sizes(p)
        if sizes is None:
            return None
        start = sum(sizes[:list(p.outputs).index(v)])
        v, p = src, src.producer()
    if p is None or p.op_type != "MatMul" or p.domain not in ("", "ai.onnx"):
        return None
    w = p.inputs[1]
    if w is None or not w.is_initializer() or w.const_value is None or len(w.const_value.shape) != 2:
        return None
    if len(w.uses()) != 1:
        return None
    return Fold("columns", (w.name,), start)


def _split_sizes(split) -> list[int] | None:
    if len(split.inputs) > 1 and split.inputs[1] is not None:
        sizes = split.inputs[1].const_value
        return None if sizes is None else [int(s) for s in sizes.numpy().reshape(-1)]
    src = split.inputs[0]
    width = _width(src)
    n = len(split.outputs)
    if width is None or width % n:
        return None
    return [width // n] * n


def fold_into_float(model, plan: AwqPlan) -> None:
    """Write ``plan`` into ``model``'s float weights, unquantized: each weight as ``plan.weight`` gives
    it, each norm vector divided by its scales. Without clipping the function is unchanged (a test
    holds the logits equal); the int4 packer does the same on its way to the blocks."""
    import onnx_ir as ir

    for value in list(model.graph.initializers.values()):
        if value.name in plan.row_scale or value.name in plan.column_divide or value.name in plan.clip:
            old = np.asarray(value.const_value.numpy(), dtype=np.float32)
            value.const_value = ir.tensor(plan.weight(value.name, old), name=value.name)
    fold_vectors(model, plan)


def fold_vectors(model, plan: AwqPlan) -> None:
    """Divide each norm scale / bias vector the plan names by its group's scales, in its own dtype."""
    import onnx_ir as ir

    for name, s in plan.vector_divide.items():
        value = model.graph.initializers[name]
        old = value.const_value.numpy()
        value.const_value = ir.tensor((np.asarray(old, dtype=np.float32) / s).astype(old.dtype), name=name)
