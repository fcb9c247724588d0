"""W8A8 Q/DQ placement by TensorRT's rules, written without a copy of the part in memory.

Activation scales are static (calibrated) everywhere but in the int8 decoder on the ort target, whose
activations are quantized per run (``activation_mode``: ``DynamicQuantizeLinear``); what follows
describes the static form, which TensorRT takes.

Placement (TensorRT explicit quantization): only weighted MatMul/Gemm nodes (B is a constant) are
quantized - both inputs, weights per output channel for int8 (axis 1 of a [K, N] MatMul weight,
axis 0 of a transB Gemm's [N, K]) and per tensor for fp8 (the form every fp8 TensorRT GEMM takes),
activations per tensor, symmetric (zero point 0); their outputs stay unquantized; attention
MatMuls (both inputs activations) stay in float; the precision guard's nodes are excluded. On the
ort target an int8 Gemm's bias becomes int32 (scale = activation scale x weight scale), the form
onnxruntime fuses into QGemm; TensorRT takes float biases.

The graph is the one onnxruntime's ``quantize_static`` writes (QDQ format, one Q/DQ pair per
activation tensor, per-channel weights, the same names), and the numbers are computed with its own
rules: activation ranges come from its calibration collectors (``calibration/taps.py``) and scales
from ``quant_utils.compute_scale_zp``; weights are quantized the way ``quantize_data`` does it, per
channel, vectorised (a test checks both give the same bytes). What differs is memory:
``quantize_static`` loads the whole part, then builds its quantized copy and an augmented copy for
calibration - three times the part in RAM (a 2B decoder did not fit 24 GB). Here the part is read
lazily (``onnx_ir.load``), each quantized weight is a ``LazyTensor`` computed from its float tensor
when the part is saved, and the float weight is dropped: one weight in flight.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from qvl_export.calibration.taps import WeightedNode, release, weighted_nodes
from qvl_export.core import precisions as registry
from qvl_export.core.errors import QvlError

log = logging.getLogger(__name__)

CALIBRATORS = ("max", "percentile", "entropy", "distribution")
ACTIVATIONS = ("auto", "static", "dynamic")
FP8_MAX = 448.0  # largest finite float8e4m3fn
INT8_QMIN, INT8_QMAX = -127, 127  # symmetric int8 (onnxruntime's get_qmin_qmax_for_qType(INT8, symmetric=True))


@dataclass
class QuantReport:
    part: str
    precision: str
    calibrator: str
    quantized: list[str] = field(default_factory=list)  # scopes
    kept: dict[str, str] = field(default_factory=dict)  # scope -> why it stays in float
    activations: str = "static"  # or "dynamic" (activation_mode)

    def to_dict(self) -> dict:
        return {"part": self.part, "precision": self.precision, "calibrator": self.calibrator,
                "activations": self.activations, "quantized_count": len(self.quantized),
                "kept_high_precision": self.kept}


def activation_scale(precision: str, low: float, high: float) -> np.ndarray:
    """Per-tensor activation scale [] float32: int8 from the calibrated range by onnxruntime's own
    rule; fp8 the max-calibrated amax / 448 (see ``weight_scales``)."""
    if precision == "fp8":
        amax = max(abs(low), abs(high))
        return np.array(amax / FP8_MAX if amax > 0 else 1.0, dtype=np.float32)
    from onnxruntime.quantization.quant_utils import compute_scale_zp

    _, scale = compute_scale_zp(np.array(low, np.float32), np.array(high, np.float32), np.array(INT8_QMIN, np.int8),
                                np.array(INT8_QMAX, np.int8), symmetric=True)
    return np.asarray(scale, dtype=np.float32)


def weight_scales(precision: str, w: np.ndarray, axis: int) -> np.ndarray:
    """int8: one scale per output channel ([N] float32, ``axis`` is the channel axis), as
    ``quantize_data`` computes it per channel: range made symmetric around 0, scale =
    2 absmax / 254 in float64, stored as float32 (1.0 for an all-zero channel).

    fp8: one scale [] = amax / 448 per tensor. onnxruntime's own float8 scale matches the tensor's
    standard deviation to the E4M3 grid's, assuming both are Gaussian: it clips at about 4 standard
    deviations, which cuts the outlier channels of SwiGLU down-projections and RMSNorm outputs
    (activations at 10-45x their RMS on the demo model; its exact match fell 6 points). E4M3 keeps 3
    mantissa bits over 2^15 of range, so scaling the max into 448 loses nothing at the top and little
    at the bottom - the max calibration TensorRT's and ModelOpt's fp8 recipes use."""
    if precision == "fp8":
        amax = float(np.abs(w).max(initial=0.0))
        return np.array(amax / FP8_MAX if amax > 0 else 1.0, dtype=np.float32)
    other = 1 - axis
    lo = np.minimum(w.min(axis=other), np.float32(0))
    hi = np.maximum(w.max(axis=other), np.float32(0))
    absmax = np.maximum(np.abs(lo), np.abs(hi)).astype(np.float64)
    scale = 2.0 * absmax / float(INT8_QMAX - INT8_QMIN)
    stored = scale.astype(np.float32)
    return np.where(scale < np.finfo(np.float32).tiny, np.float32(1.0), stored).astype(np.float32)


def quantize_weight(precision: str, w: np.ndarray, scale: np.ndarray, axis: int) -> np.ndarray:
    """The stored weight: int8 round-half-to-even of w / scale (per channel), or E4M3 with saturation."""
    s = scale if scale.ndim == 0 else np.expand_dims(scale, 1 - axis)
    q = w.astype(np.float32) / s
    if precision == "fp8":
        import ml_dtypes

        return np.clip(q, -FP8_MAX, FP8_MAX).astype(ml_dtypes.float8_e4m3fn)
    return np.clip(q.round(), -128, 127).astype(np.int8)


def quantize_bias(bias: np.ndarray, x_scale: np.ndarray, w_scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int32 bias, its float32 scale) for an int8 Gemm on onnxruntime: scale = x_scale * w_scale."""
    scale = (x_scale * w_scale).astype(np.float32)
    q = np.round(np.asarray(bias, np.float64) / np.asarray(scale, np.float64))
    info = np.iinfo(np.int32)
    return np.clip(q, info.min, info.max).astype(np.int32), scale.reshape(-1)


SEARCH_STEPS = 8  # candidate clipping points from the calibrator's range up to the absolute max
SEARCH_TIE = 1.01  # a candidate must lower the estimated error by more than 1% to replace the calibrator's


def search_ranges(ranges: dict[str, tuple[float, float]], stats, sens) -> tuple[dict[str, tuple[float, float]], dict]:
    """Static int8 activation ranges searched per tensor between the calibrator's range and the
    tensor's absolute max, by the error the quantized activation puts into its consumers' outputs.

    The percentile calibrator clips the rarest values to buy resolution for the rest - right for a long
    tail, wrong for the few channels that carry the massive activations of SwiGLU down-projections
    (50-60x their tensor's RMS on the trained chart reader's vision tower: clipped, they shifted its
    decode-step KL from 5e-3 to 6.7e-2). For each candidate clip ``a`` (geometric steps from the
    calibrator's to the absolute max) the sampled rows are fake-quantized on the symmetric grid of
    ``a`` and the squared error of each input channel is weighted by the squared norm of that channel's
    weight row, summed over the tensor's consumers: ``sum_j e_j^2 |W_j|^2`` estimates the output error
    ``|e W|^2`` without the matmul. The calibrator's own range wins ties (within 1%). ``sens`` is the guard's
    ``measure`` (it carries each op's channel weights). Returns the ranges and a summary."""
    weights: dict[str, np.ndarray] = {}
    for s in sens:
        if s.channel_weight is not None and s.activation in ranges:
            w = weights.get(s.activation)
            weights[s.activation] = s.channel_weight if w is None else w + s.channel_weight
    out, widened = dict(ranges), {}
    for name, cw in weights.items():
        t = stats.tensors.get(name)
        base = max(abs(v) for v in ranges[name])
        if t is None or base <= 0 or t.abs_max <= base * (1 + 1e-6):  # nothing clipped: nothing to search
            continue
        x = t.sample()
        if not x.size or x.shape[-1] != cw.size:
            continue
        candidates = base * (t.abs_max / base) ** np.linspace(0.0, 1.0, SEARCH_STEPS)
        errors = [_weighted_error(x, a, cw) for a in candidates]
        best = int(np.argmin(errors))
        if best and errors[best] * SEARCH_TIE < errors[0]:
            a = float(candidates[best])
            out[name] = (-a, a)
            widened[name] = {"calibrator": round(base, 6), "searched": round(a, 6),
                             "error_ratio": round(errors[0] / errors[best], 3) if errors[best] > 0 else None}
    return out, {"tensors": len(weights), "widened": len(widened), "ranges": widened}


def _weighted_error(x: np.ndarray, amax: float, channel_weight: np.ndarray) -> float:
    scale = amax / INT8_QMAX
    e = np.clip(np.round(x / scale), INT8_QMIN, INT8_QMAX) * scale - x
    return float(np.einsum("rk,rk,k->", e, e, channel_weight))


def dynamic_allowed(precision: str, target: str) -> bool:
    """Per-run activation scales exist only for int8 on onnxruntime (TensorRT and fp8 take static ones)."""
    return precision == "int8" and target == "ort"


def activation_mode(requested: str, target: str, precision: str, part: str) -> str:
    """How a quantized part's activations get their scales: ``"static"`` (calibrated, per tensor, in the
    graph) or ``"dynamic"`` (``DynamicQuantizeLinear``: per tensor, computed from each run's own values).

    ``auto``: dynamic for an int8 decoder on the ort target, static everywhere else. One static scale
    per tensor has to cover every prompt the decoder will see - a text-only turn of 40 tokens and a page
    of 1000 image tokens whose hidden states sit on another scale - and in decode (one token a step) a
    dynamic scale is that token's own. onnxruntime runs the dynamic form as an integer kernel too
    (DynamicQuantizeLinear -> DequantizeLinear -> MatMul fuses into ``DynamicQuantizeMatMul``; a biased
    Gemm - the vision tower's - it leaves in float on the dequantized weight, so ``auto`` keeps the
    vision parts static).
    TensorRT's int8 and every fp8 GEMM take static scales: asking for dynamic there is refused."""
    if requested not in ACTIVATIONS:
        raise QvlError(f"Unknown --activations {requested!r}; use one of {', '.join(ACTIVATIONS)}.")
    static_only = not dynamic_allowed(precision, target)
    if requested == "dynamic" and static_only:
        why = "TensorRT's int8 takes static Q/DQ scales" if target != "ort" else f"{precision} takes static scales"
        raise QvlError(f"--activations dynamic is for int8 on the ort target; {why}: use --activations static "
                       "(or auto).")
    if requested == "auto":
        return "dynamic" if not static_only and part == "decoder" else "static"
    return requested


def place_qdq(model, ranges: dict[str, tuple[float, float]], precision: str, part: str,
              calibrator: str = "percentile", exclude: dict[str, str] | None = None,
              target: str = "trt", activations: str = "static") -> QuantReport:
    """Quantize the weighted ops of the onnx-ir ``model`` (a float part, weights lazy or in memory) in
    place. ``ranges``: activation tensor -> calibrated (low, high), unused by ``activations="dynamic"``
    (see ``activation_mode``); ``exclude``: scope -> why an op stays in float."""
    if not registry.get(precision).calibrated:
        raise ValueError(precision)
    if calibrator not in CALIBRATORS:
        raise QvlError(f"Unknown calibrator {calibrator!r}; use one of {', '.join(CALIBRATORS)}.")
    exclude = exclude or {}
    if activations not in ("static", "dynamic"):
        raise ValueError(activations)
    dynamic = activations == "dynamic"
    if dynamic and not dynamic_allowed(precision, target):
        raise QvlError("dynamic activation scales are for int8 on the ort target.")
    report = QuantReport(part, precision, "max" if precision == "fp8" else calibrator, activations=activations)
    chosen: list[WeightedNode] = []
    for n in weighted_nodes(model):
        reason = exclude.get(n.scope) or exclude.get(n.name)
        if reason:
            report.kept[n.scope] = reason
        else:
            chosen.append(n)
            report.quantized.append(n.scope)
    if not chosen:
        raise QvlError(f"Nothing to quantize in {part}: every weighted op is guarded.")
    missing = sorted({n.activation for n in chosen} - set(ranges))
    if missing and not dynamic:
        raise QvlError(f"No calibration range for {missing[0]} in {part}; rebuild without --calib-cache.")
    writer = _Writer(model, precision, int8_bias=target == "ort" and precision == "int8" and not dynamic,
                     dynamic=dynamic)
    nodes = {n.name: n for n in model.graph}
    for n in chosen:
        writer.quantize(nodes[n.name], n, None if dynamic else ranges[n.activation])
    writer.drop_unused_weights()
    if precision == "fp8":
        for opsets in (model.opset_imports, model.graph.opset_imports):
            opsets[""] = max(opsets.get("", 19), 19)
    log.info("%s: %d ops quantized (%s), %d kept", part, len(report.quantized), precision, len(report.kept))
    return report


class _Writer:
    """Builds the Q/DQ nodes and quantized initializers of one model; one activation Q/DQ pair and one
    weight DQ per tensor, shared by its quantized consumers, as ``quantize_static`` writes them."""

    def __init__(self, model, precision: str, int8_bias: bool, dynamic: bool = False):
        import onnx_ir as ir

        self.ir = ir
        self.model, self.graph = model, model.graph
        self.precision = precision
        self.int8_bias = int8_bias
        self.dynamic = dynamic
        self.qtype = ir.DataType.FLOAT8E4M3FN if precision == "fp8" else ir.DataType.INT8
        self.activations: dict[str, tuple] = {}  # tensor -> (dequantized value, scale)
        self.weights: dict[str, tuple] = {}  # weight -> (dequantized value, scale [N] or [])
        self.replaced: set[str] = set()

    def _init(self, name: str, tensor) -> object:
        ir = self.ir
        value = ir.Value(name=name, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype),
                         const_value=tensor)
        self.graph.register_initializer(value)
        return value

    def _zero(self, name: str, shape: tuple[int, ...], dtype):
        ir = self.ir
        if dtype == ir.DataType.INT8:
            return self._init(name, ir.tensor(np.zeros(shape, np.int8), name=name))
        if dtype == ir.DataType.INT32:
            return self._init(name, ir.tensor(np.zeros(shape, np.int32), name=name))
        import ml_dtypes

        return self._init(name, ir.tensor(np.zeros(shape, ml_dtypes.float8_e4m3fn), name=name))

    def _node(self, op: str, inputs, output: str, axis: int | None = None, after=None):
        """A Q or DQ node right after ``after`` (a producer), else at the start of the graph."""
        ir = self.ir
        attrs = [ir.AttrInt64("axis", axis)] if axis is not None else []
        node = ir.Node("", op, inputs, attributes=attrs, name=output.removesuffix("_Output"), num_outputs=1)
        node.outputs[0].name = output
        return self._insert(node, after)

    def _insert(self, node, after):
        """``node`` right after ``after`` (a producer), else at the start of the graph."""
        if after is not None:
            self.graph.insert_after(after, node)
        else:
            self.graph.insert_before(next(iter(self.graph)), node)
        return node

    @staticmethod
    def _reroute(value, new, keep) -> None:
        """Every reader of ``value`` but ``keep`` reads ``new`` - as quantize_static rewrites a quantized
        tensor for all its consumers (the tied token table's Gather reads the dequantized table)."""
        for user, index in list(value.uses()):
            if user is not keep:
                user.replace_input_with(index, new)

    def quantize(self, node, info: WeightedNode, rng: tuple[float, float] | None) -> None:
        _, x_scale = self._activation(node, info.activation, rng)
        _, w_scale = self._weight(node, info.weight, 0 if info.trans_b else 1)
        if self.int8_bias and info.has_bias:
            self._bias(node, x_scale, w_scale)

    def _activation(self, node, name: str, rng):
        if name not in self.activations and self.dynamic:
            self.activations[name] = (self._dynamic_activation(node, name), None)
        if name not in self.activations:
            x = node.inputs[0]
            scale = activation_scale(self.precision, *rng)
            s = self._init(f"{name}_scale", self.ir.tensor(scale, name=f"{name}_scale"))
            z = self._zero(f"{name}_zero_point", (), self.qtype)
            q = self._node("QuantizeLinear", [x, s, z], f"{name}_QuantizeLinear_Output", after=x.producer())
            dq = self._node("DequantizeLinear", [q.outputs[0], s, z], f"{name}_DequantizeLinear_Output", after=q)
            dq.outputs[0].shape, dq.outputs[0].type = x.shape, x.type
            self._reroute(x, dq.outputs[0], keep=q)
            self.activations[name] = (dq.outputs[0], scale)
        return self.activations[name]

    def _dynamic_activation(self, node, name: str):
        """uint8 with a scale and zero point computed per run (asymmetric, over the whole tensor), then
        dequantized: the pair onnxruntime fuses with the weight's DequantizeLinear into an integer
        kernel. The op's output names follow the static pair's."""
        ir = self.ir
        x = node.inputs[0]
        q = ir.Node("", "DynamicQuantizeLinear", [x], name=f"{name}_DynamicQuantizeLinear", num_outputs=3)
        for out, suffix in zip(q.outputs, ("QuantizeLinear_Output", "scale", "zero_point")):
            out.name = f"{name}_{suffix}"
        self._insert(q, x.producer())
        dq = self._node("DequantizeLinear", list(q.outputs), f"{name}_DequantizeLinear_Output", after=q)
        dq.outputs[0].shape, dq.outputs[0].type = x.shape, x.type
        self._reroute(x, dq.outputs[0], keep=q)
        return dq.outputs[0]

    def _weight(self, node, name: str, axis: int):
        ir = self.ir
        if name not in self.weights:
            w = node.inputs[1]
            source = w.const_value
            shape = tuple(source.shape)
            # the scales are needed now (the bias's int32 scale is built from them); the quantized
            # values are computed again from the float tensor when the part is written
            scale = weight_scales(self.precision, source.numpy(), axis)
            release(source)
            precision = self.precision

            def read(source=source, scale=scale, axis=axis, name=name):
                q = quantize_weight(precision, source.numpy(), scale, axis)
                release(source)
                return ir.tensor(q, name=f"{name}_quantized")

            qname = f"{name}_quantized"
            qw = self._init(qname, ir.LazyTensor(read, dtype=self.qtype, shape=ir.Shape(shape), name=qname))
            per_channel = scale.ndim == 1
            s = self._init(f"{name}_scale", ir.tensor(scale, name=f"{name}_scale"))
            z = self._zero(f"{name}_zero_point", scale.shape, self.qtype)
            dq = self._node("DequantizeLinear", [qw, s, z], f"{name}_DequantizeLinear_Output",
                            axis=axis if per_channel else None)
            dq.outputs[0].shape, dq.outputs[0].type = w.shape, w.type
            self._reroute(w, dq.outputs[0], keep=None)
            self.weights[name] = (dq.outputs[0], scale)
            self.replaced.add(name)
        return self.weights[name]

    def _bias(self, node, x_scale, w_scale) -> None:
        ir = self.ir
        b = node.inputs[2]
        q, scale = quantize_bias(b.const_value.numpy(), x_scale, w_scale)
        qname = f"{b.name}_quantized"
        qb = self._init(qname, ir.tensor(q, name=qname))
        s = self._init(f"{qname}_scale", ir.tensor(scale, name=f"{qname}_scale"))
        z = self._zero(f"{qname}_zero_point", scale.shape, ir.DataType.INT32)
        dq = self._node("DequantizeLinear", [qb, s, z], f"{b.name}_DequantizeLinear_Output", axis=0)
        dq.outputs[0].shape, dq.outputs[0].type = b.shape, b.type
        node.replace_input_with(2, dq.outputs[0])
        self.replaced.add(b.name)

    def drop_unused_weights(self) -> None:
        for name in self.replaced:
            value = self.graph.initializers.get(name)
            if value is not None and not value.uses() and value not in self.graph.outputs:
                del self.graph.initializers[name]
