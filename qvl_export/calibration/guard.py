"""Precision guard and sensitivity: which weighted ops must stay in higher precision, and why.

From the calibration feeds, every weighted MatMul/Gemm's input activation is captured (its
absolute max and RMS), and the op's *local* quantization error is measured with numpy: the
relative error of ``Q(x) @ Q(W)`` against ``x @ W`` with per-tensor activation and per-channel
weight scales (int8: max-calibrated symmetric grid; fp8: E4M3 rounding). Ops whose error exceeds
the precision's budget stay in float, and so does any activation that would overflow fp16.
This finds, on a trained model, the ops the field knows to be fragile - the Qwen2.5-VL merger and
SwiGLU down-projections with outlier activations, the last down_proj, lm_head - without naming
them by hand. ``--sensitivity`` prints the table for every op.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from qvl_export.calibration.taps import release, weighted_nodes
from qvl_export.core import precisions as registry

log = logging.getLogger(__name__)

FP16_MAX = 65504.0
FP16_HEADROOM = 4.0  # keep an op when an activation comes within 4x of the fp16 maximum


@dataclass
class OpSensitivity:
    scope: str
    node: str
    abs_max: float
    rms: float
    rel_error: float
    activation: str = ""  # the op's activation input tensor
    weight: str = ""  # its weight initializer
    weight_abs_max: float = 0.0
    # squared norm of each input channel's weight row [K]: how much an error in that activation channel
    # moves the op's output (the range search's weights, ``qdq.search_ranges``)
    channel_weight: np.ndarray | None = None

    @property
    def outlier_ratio(self) -> float:
        return self.abs_max / self.rms if self.rms > 0 else 0.0


def fake_quant_int8(x: np.ndarray, axis: int | None) -> np.ndarray:
    amax = np.abs(x).max(axis=axis, keepdims=axis is not None)
    scale = np.where(amax > 0, amax / 127.0, 1.0)
    return np.clip(np.round(x / scale), -127, 127) * scale


def fake_quant_fp8(x: np.ndarray, axis: int | None) -> np.ndarray:
    import ml_dtypes

    amax = np.abs(x).max(axis=axis, keepdims=axis is not None)
    scale = np.where(amax > 0, amax / 448.0, 1.0)
    return (x / scale).astype(ml_dtypes.float8_e4m3fn).astype(np.float32) * scale


def measure(model, stats, precision: str) -> list[OpSensitivity]:
    """Every weighted op's local quantization error, from the calibration statistics of its input
    (``taps.ActivationStats``: absolute max over every run, rows sampled from the first runs) and its
    weight, read from the onnx-ir ``model`` one op at a time."""
    quant = fake_quant_fp8 if precision == "fp8" else fake_quant_int8
    weight_axis = None if precision == "fp8" else 0  # fp8: per-tensor weight scales (see qdq.py)
    values = {n.name: n for n in model.graph}
    result = []
    for n in weighted_nodes(model):
        t = stats.tensors[n.activation]
        x = t.sample()
        const = values[n.name].inputs[1].const_value
        w = const.numpy().astype(np.float32)
        release(const)
        if n.trans_b:
            w = w.T
        rel = 0.0
        if x.size:
            ref = x @ w
            err = quant(x, None) @ quant(w, weight_axis)  # activation per tensor
            denom = np.linalg.norm(ref)
            rel = float(np.linalg.norm(err - ref) / denom) if denom > 0 else 0.0
        result.append(OpSensitivity(n.scope, n.name, t.abs_max, t.rms, rel, n.activation, n.weight,
                                    float(np.abs(w).max(initial=0.0)), np.einsum("ij,ij->i", w, w)))
        del w
    return result


def guard(sens: list[OpSensitivity], precision: str, fp16: bool = False) -> dict[str, str]:
    """scope -> reason, for every op that stays in higher precision."""
    keep = {}
    budget = registry.get(precision).guard_budget  # relative local error above which an op stays float
    for s in sens:
        if budget is not None and s.rel_error > budget:
            keep[s.scope] = (f"{precision} local error {s.rel_error:.3f} > {budget} (activation |max| "
                             f"{s.abs_max:.3g}, {s.outlier_ratio:.0f}x its RMS)")
        elif fp16 and s.abs_max * FP16_HEADROOM > FP16_MAX:
            keep[s.scope] = f"activation |max| {s.abs_max:.3g} within {FP16_HEADROOM}x of the fp16 limit"
    return keep


def sensitivity_table(part: str, sens: list[OpSensitivity], top: int | None = None) -> str:
    rows = sorted(sens, key=lambda s: -s.rel_error)[:top]
    lines = [f"{part}: {'op':<40} {'rel_err':>8} {'|max|':>10} {'max/rms':>8}"]
    lines += [f"{part}: {s.scope:<40} {s.rel_error:>8.4f} {s.abs_max:>10.3g} {s.outlier_ratio:>8.1f}" for s in rows]
    return "\n".join(lines)
