"""The fp8 decoder's local error under the techniques the field uses against quantization error:
per-channel weight scales, SmoothQuant migration, an MSE-searched activation range (README, "The fp8
decoder's error, technique by technique").

    python tools/fp8_error_ablation.py MODEL_DIR [--out FILE]

Runs a real ``qvl-export build MODEL_DIR --precision fp8 --no-parity`` in this process and, where the
build measures its precision guard (``calibration.guard.measure``: the decoder's calibration statistics
and its float weights), also computes each weighted op's relative output error ``|Q(x) Q(W) - x W| / |x W|``
on the sampled calibration rows for every variant. Prints the mean per variant and writes the per-op
table as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from qvl_export.calibration.qdq import FP8_MAX, quantize_weight


def fake_fp8(x: np.ndarray, amax) -> np.ndarray:
    """``x`` through the build's own E4M3 rounding (``qdq.quantize_weight``) and back, with scale
    ``amax / 448``: per tensor for a scalar ``amax``, per output column for an [1, N] one."""
    amax = np.asarray(amax, np.float32)
    scale = amax / FP8_MAX
    return quantize_weight("fp8", x, scale.reshape(-1) if amax.ndim else scale, 1).astype(np.float32) * scale


def variants(x: np.ndarray, w: np.ndarray, x_amax: float) -> dict[str, float]:
    """Relative output error of one op [x: rows x K, w: K x N] per variant."""
    ref = x @ w
    norm = float(np.linalg.norm(ref)) or 1.0

    def err(y):
        return float(np.linalg.norm(y - ref) / norm)

    w_amax = np.abs(w).max()
    out = {"as_built": err(fake_fp8(x, x_amax) @ fake_fp8(w, w_amax)),
           "activation_only": err(fake_fp8(x, x_amax) @ w),
           "weight_only": err(x @ fake_fp8(w, w_amax)),
           "per_channel_weights": err(fake_fp8(x, x_amax) @ fake_fp8(w, np.abs(w).max(axis=0, keepdims=True)))}
    x_ch, w_ch = np.abs(x).max(axis=0) + 1e-12, np.abs(w).max(axis=1) + 1e-12
    for alpha in (0.25, 0.5, 0.75):  # SmoothQuant: x / s, s W with s = max|x|^a / max|W|^(1-a)
        s = x_ch ** alpha / w_ch ** (1 - alpha)
        xs, ws = x / s, w * s[:, None]
        amax = x_amax * float(np.abs(xs).max() / np.abs(x).max())
        out[f"smoothquant_{alpha}"] = err(fake_fp8(xs, amax) @ fake_fp8(ws, np.abs(ws).max()))
    trials = [(err(fake_fp8(x, x_amax * f) @ fake_fp8(w, w_amax)), f) for f in 2.0 ** (-np.arange(8) / 2)]
    out["mse_range"], out["mse_range_factor"] = min(trials)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir")
    ap.add_argument("--out", type=Path, default=Path("fp8-error-ablation.json"))
    args = ap.parse_args()

    import qvl_export.calibration.guard as guard
    from qvl_export.calibration.taps import release, weighted_nodes
    from qvl_export.cli import main as cli

    rows: list[dict] = []
    measure = guard.measure

    def measured(model, stats, precision):
        result = measure(model, stats, precision)
        values = {n.name: n for n in model.graph}
        for n in weighted_nodes(model):
            t = stats.tensors[n.activation]
            x = t.sample()
            const = values[n.name].inputs[1].const_value
            w = const.numpy().astype(np.float32)
            release(const)
            if x.size:
                rows.append({"scope": n.scope, **variants(x, w.T if n.trans_b else w, t.abs_max)})
        return result

    guard.measure = measured
    with tempfile.TemporaryDirectory() as tmp:
        sys.argv = ["qvl-export", "build", args.model_dir, "-o", tmp, "--force", "--precision", "fp8", "--no-parity"]
        try:
            cli(standalone_mode=False)
        finally:
            guard.measure = measure
    means = {k: round(float(np.mean([r[k] for r in rows])), 4) for k in rows[0] if k != "scope"}
    args.out.write_text(json.dumps({"model": args.model_dir, "mean": means, "ops": rows}, indent=1))
    print(json.dumps(means, indent=1))


if __name__ == "__main__":
    main()
