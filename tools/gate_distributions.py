"""Measure the parity gate's metrics over several random seeds of the tiny test checkpoints and the demo
model, per precision, so the thresholds in ``qvl_export/parity/gates.json`` are set from distributions
(README "Gate rules"). A source-checkout tool, not shipped.

    python tools/gate_distributions.py --out gate_distributions.json --seeds 3 --precisions int8 fp8 int4

Each (checkpoint, precision) is built as ``qvl-export build`` builds it (calibration limit 6) and gated on
the build's quick cases; every case's gated metrics are written out, then summarised (min / p10 / median
per metric and precision).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

METRICS = [("vision", "cosine"), ("merger", "cosine"), ("video_merger", "cosine"), ("prefill", "cosine"),
           ("prefill", "top1_equal"), ("prefill", "top1_decisive"), ("prefill", "kl"), ("steps", "min_cosine"), ("steps", "max_kl"),
           ("steps", "mean_kl"), ("steps", "top1_agreement"), ("steps", "top1_decisive"), ("steps", "decisive_steps"),
           ("greedy", "match_fraction"), ("greedy", "decisive_prefix"), ("greedy", "decisive_match")]


def tiny_dims():
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import TINY  # the suite's tiny checkpoints

    return TINY


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--families", nargs="*", default=["qwen2_vl", "qwen2_5_vl"])
    ap.add_argument("--precisions", nargs="+", default=["fp32", "int8", "fp8", "int4"])
    ap.add_argument("--demo", action="store_true", help="also the trained demo model")
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args()

    from qvl_export.building.artifacts import BuildOptions, build
    from qvl_export.loading.synthetic import make_checkpoint
    from qvl_export.parity.gate import run_parity

    rows = json.loads(args.out.read_text()) if args.out.exists() else []
    done = {(r["checkpoint"], r["precision"]) for r in rows}
    work = Path(tempfile.mkdtemp(prefix="gate-dist-"))
    models = []
    for family in args.families:
        base = tiny_dims()[family]
        for k in range(args.seeds):
            models.append((f"{family}-s{k}", lambda base=base, k=k, family=family: make_checkpoint(
                work / f"{family}-s{k}", replace(base, seed=base.seed + 100 * k))))
    if args.demo:
        from qvl_export.demo import checkpoint_dir

        models.append(("demo", lambda: checkpoint_dir()))
    for name, make in models:
        todo = [p for p in args.precisions if (name, p) not in done]
        if not todo:
            continue
        ckpt = make()
        for precision in todo:
            t0 = time.time()
            out = work / f"{name}-{precision}"
            flag = "decoder=int4" if precision == "int4" else precision  # int4 is decoder weight-only
            build(ckpt, out, BuildOptions(precision=flag, calib_limit=6, calib_cache=work / f"calib-{name}"))
            report = run_parity(out, ckpt, quick=True, max_new_tokens=args.tokens, task_pages=0)
            for case in report.cases:
                row = {"checkpoint": name, "precision": precision, "case": case["name"],
                       "failed": [f"{c['stage']}.{c['metric']}" for c in case["checks"] if not c["passed"]]}
                for stage, metric in METRICS:
                    v = case["stages"].get(stage, {}).get(metric)
                    row[f"{stage}.{metric}"] = v
                rows.append(row)
            print(f"{name} {precision}: {time.time() - t0:.0f}s passed={report.passed}", flush=True)
            args.out.write_text(json.dumps(rows, indent=1))
    print(summary(rows))


def summary(rows: list[dict]) -> str:
    lines = []
    for precision in sorted({r["precision"] for r in rows}):
        for kind in ("random", "demo"):
            sel = [r for r in rows if r["precision"] == precision and (r["checkpoint"] == "demo") == (kind == "demo")]
            if not sel:
                continue
            lines.append(f"{precision} {kind}: {len(sel)} cases")
            for stage, metric in METRICS:
                key = f"{stage}.{metric}"
                vals = np.array([r[key] for r in sel if r.get(key) is not None], dtype=float)
                if vals.size:
                    lines.append(f"  {key:<22} n={vals.size:<3} min={vals.min():.4g} p10={np.percentile(vals, 10):.4g} "
                                 f"median={np.median(vals):.4g} max={vals.max():.4g}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
