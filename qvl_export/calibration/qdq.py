"""Q/DQ placement: static W8A8 quantization of one part with onnxruntime.quantization, by TensorRT's rules.

The quantizer of the registry's calibrated precisions (int8, fp8); ``building/quantize_stage.py``
calls it with the calibration feeds and the precision guard's exclusions.

Why onnxruntime.quantization (and not ModelOpt's ONNX PTQ): it runs here on CPU with the same
onnxruntime the parity gate uses, supports int8 and float8 (E4M3) QDQ, per-channel weights and
per-tensor activations, MinMax / Percentile / Entropy / Distribution calibrators, and its QDQ
output is what TensorRT's explicit quantization reads. ModelOpt's ONNX PTQ follows the same rules
but pulls a CUDA stack into the build and gives nothing more on CPU.

Placement (TensorRT explicit quantization): only weighted MatMul/Gemm nodes (B is a constant) are
quantized - both inputs, weights per output channel (axis 1 of a [K, N] MatMul weight),
activations per tensor, symmetric (zero point 0); their outputs stay unquantized; attention
MatMuls (both inputs activations) stay in float. The precision guard's nodes are excluded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qvl_export.core import precisions as registry
from qvl_export.core.errors import QvlError

log = logging.getLogger(__name__)

CALIBRATORS = ("max", "percentile", "entropy", "distribution")


@dataclass
class WeightedNode:
    name: str  # ONNX node name
    scope: str  # module path from the exporter's metadata, e.g. "layers.3.mlp.down_proj"
    weight: str  # initializer name of the constant input
    produces_output: bool = False  # feeds a graph output directly (lm_head)


@dataclass
class QuantReport:
    part: str
    precision: str
    calibrator: str
    quantized: list[str] = field(default_factory=list)  # scopes
    kept: dict[str, str] = field(default_factory=dict)  # scope -> why it stays in float

    def to_dict(self) -> dict:
        return {"part": self.part, "precision": self.precision, "calibrator": self.calibrator,
                "quantized_count": len(self.quantized), "kept_high_precision": self.kept}


def weighted_nodes(model) -> list[WeightedNode]:
    """MatMul/Gemm nodes of an onnx.ModelProto whose second input is an initializer."""
    inits = {i.name for i in model.graph.initializer}
    outputs = {o.name for o in model.graph.output}
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    out = []
    for n in model.graph.node:
        if n.op_type not in ("MatMul", "Gemm") or len(n.input) < 2 or n.input[1] not in inits:
            continue
        scope = _scope(n) or n.name
        feeds_out = any(o in outputs for o in n.output) or any(
            o2 in outputs for c in consumers.get(n.output[0], []) for o2 in c.output if c.op_type in ("Add",))
        out.append(WeightedNode(n.name, scope, n.input[1], feeds_out))
    return out


def _scope(node) -> str | None:
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = [s.strip(" '\"") for s in p.value.strip("[]").split(",")]
            except ValueError:
                return None
            modules = [s for s in scopes if s and "." in s or s in ("lm_head",)]
            return modules[-1] if modules else None
    return None


class _Reader:
    """onnxruntime CalibrationDataReader over a list of feed dicts (only the model's inputs)."""

    def __init__(self, feeds: list[dict[str, np.ndarray]], input_names: list[str]):
        self.feeds = [{k: v for k, v in f.items() if k in input_names} for f in feeds]
        self.i, self.end = 0, len(self.feeds)

    def __len__(self) -> int:
        return len(self.feeds)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.i, self.end = start_index, min(end_index, len(self.feeds))

    def get_next(self):
        if self.i >= self.end:
            return None
        self.i += 1
        return self.feeds[self.i - 1]

    def rewind(self):
        self.i, self.end = 0, len(self.feeds)


FP8_MAX = 448.0  # largest finite float8e4m3fn


def fp8_overrides(ranges: list) -> dict[str, list[dict]]:
    """onnxruntime ``TensorQuantOverrides`` giving every fp8 Q/DQ the max-calibrated scale amax / 448.

    onnxruntime's own float8 scale (``compute_scale_zp_float8``) matches the tensor's standard
    deviation to the E4M3 grid's, assuming both are Gaussian: it clips at about 4 standard
    deviations, which cuts the outlier channels of SwiGLU down-projections and RMSNorm outputs
    (activations at 10-45x their RMS on the demo model; its exact match fell 6 points). E4M3 keeps
    3 mantissa bits over 2^15 of range, so scaling the max into 448 loses nothing at the top and
    little at the bottom - the max calibration TensorRT's and ModelOpt's fp8 recipes use. Weights
    get one scale per tensor, the form every fp8 TensorRT GEMM takes.
    """
    import ml_dtypes

    zero = np.array(0, dtype=ml_dtypes.float8_e4m3fn)
    out: dict[str, list[dict]] = {}
    for r in ranges:
        for name, amax in ((r.activation, r.abs_max), (r.weight, r.weight_abs_max)):
            scale = np.array(amax / FP8_MAX if amax > 0 else 1.0, dtype=np.float32)
            out[name] = [{"scale": scale, "zero_point": zero}]
    return out


def place_qdq(src: Path, dst: Path, feeds: list[dict[str, np.ndarray]], precision: str, part: str,
                  calibrator: str = "percentile", exclude: dict[str, str] | None = None,
                  external_data: bool = False, ranges: list | None = None, target: str = "trt") -> QuantReport:
    """Quantize ``src`` into ``dst`` calibrated on ``feeds``; ``exclude`` maps scopes to reasons.

    fp8 needs ``ranges`` (``guard.measure``'s per-op activation and weight ``abs_max``): E4M3 scales
    are set to amax / 448 per tensor, for activations and weights (see ``fp8_overrides``)."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    if registry.get(precision).kind != registry.CALIBRATED:
        raise ValueError(f"{precision} is not a calibrated precision")
    if calibrator not in CALIBRATORS:
        raise QvlError(f"Unknown calibrator {calibrator!r}; use one of {', '.join(CALIBRATORS)}.")
    if not feeds:
        raise QvlError(f"No calibration data for the {part} part; give documents with --calib-docs.")
    model = onnx.load(str(src), load_external_data=False)
    nodes = weighted_nodes(model)
    exclude = exclude or {}
    report = QuantReport(part, precision, calibrator)
    chosen = []
    for n in nodes:
        reason = exclude.get(n.scope) or exclude.get(n.name)
        if reason:
            report.kept[n.scope] = reason
        else:
            chosen.append(n.name)
            report.quantized.append(n.scope)
    if not chosen:
        raise QvlError(f"Nothing to quantize in {part}: every weighted op is guarded.")
    input_names = [i.name for i in model.graph.input]
    del model
    overrides = {}
    if precision == "fp8":
        if not ranges:
            raise ValueError("fp8 quantization needs the measured ranges (guard.measure)")
        # onnxruntime insists on its distribution calibrator for float types; every fp8 scale comes
        # from the overrides, so what it measures is not used
        qtype, method = QuantType.QFLOAT8E4M3FN, CalibrationMethod.Distribution
        overrides = fp8_overrides([r for r in ranges if r.node in chosen])
        report.calibrator = "max"
    else:
        qtype = QuantType.QInt8
        method = {"max": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                  "entropy": CalibrationMethod.Entropy,
                  "distribution": CalibrationMethod.Distribution}[calibrator]
    extra = {
        "ActivationSymmetric": True,
        "WeightSymmetric": True,
        "MatMulConstBOnly": True,
        # TensorRT takes float biases. onnxruntime fuses a Q/DQ Gemm into QGemm only with an int32
        # bias (a float one leaves it a float Gemm on dequantized weights): int8 on the ort target
        "QuantizeBias": target == "ort" and precision == "int8",
        "OpTypesToExcludeOutputQuantization": ["MatMul", "Gemm"],
        "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1},
        "CalibPercentile": 99.999,
        # feeds have ragged shapes (sequence lengths): collect one feed at a time, the histogram
        # calibrators stack a chunk's outputs into one array
        "CalibStridedMinMax": 1,
    }
    if overrides:
        extra["TensorQuantOverrides"] = overrides
    quantize_static(
        str(src), str(dst), _Reader(feeds, input_names), quant_format=QuantFormat.QDQ,
        op_types_to_quantize=["MatMul", "Gemm"], per_channel=precision == "int8", reduce_range=False,
        activation_type=qtype, weight_type=qtype, nodes_to_quantize=chosen, calibrate_method=method,
        use_external_data_format=external_data, extra_options=extra,
    )
    return report
