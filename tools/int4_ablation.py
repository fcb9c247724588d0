"""int4 ablation on a trained checkpoint: round to nearest vs AWQ scales vs AWQ clipping vs both,
each calibrated on the built-in documents and (optionally) on the user's own documents.

    python tools/int4_ablation.py --model DIR [--calib-docs DIR] [--out results.json] [--threads 2]

Each variant is a real ``decoder=int4`` build of the checkpoint followed by the build's quick parity
gate against transformers (per-case logit KL / cosine) and, for our trained checkpoints, the exact
match on the task's held-out pages (``eval.json``). The variants are ``calibration/awq.search``
with its grids switched off (``alpha`` grid of 1 = no scales, clip grid of 0 = no clipping).
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import tempfile
import time
from pathlib import Path

VARIANTS = {  # name -> (int4 method, awq.search overrides)
    "rtn": ("rtn", {}),
    "awq-scales": ("awq", {"clip_grid": 0}),
    "awq-clip": ("awq", {"grid": 1}),
    "awq": ("awq", {}),
}


def run(model: Path, calib_docs: Path | None, variants: list[str], threads: int | None) -> list[dict]:
    from qvl_export.building.artifacts import BuildOptions, build
    from qvl_export.calibration import awq
    from qvl_export.parity.gate import run_parity

    search = awq.search
    cache: dict = {}
    rows = []
    sets = [("built-in", None)] + ([("own", calib_docs)] if calib_docs else [])
    with tempfile.TemporaryDirectory() as tmp:
        for set_name, docs in sets:
            for variant in variants:
                if variant == "rtn" and set_name != "built-in":
                    continue  # no calibration: one row
                method, overrides = VARIANTS[variant]
                awq.search = functools.partial(search, **overrides)
                out = Path(tmp) / f"{variant}-{set_name}"
                t0 = time.perf_counter()
                try:
                    manifest = build(model, out, BuildOptions(precision="decoder=int4", int4_method=method,
                                                              calib_docs=docs, force=True))
                finally:
                    awq.search = search
                seconds = time.perf_counter() - t0
                report = run_parity(out, model, quick=True, reference_cache=cache, threads=threads)
                rows.append(_row(variant, set_name if method == "awq" else "-", manifest, report, seconds))
                print(json.dumps(rows[-1]), flush=True)
                shutil.rmtree(out)
    return rows


def _row(variant: str, calibration: str, manifest, report, seconds: float) -> dict:
    cases = {}
    exact = None
    for case in report.cases:
        st = case["stages"]
        if "task" in st:
            exact = st["task"]["exact_match"]
        elif "steps" in st:
            cases[case["name"]] = round(float(st["steps"]["max_kl"]), 6)
    summary = manifest.calibration.quantization["decoder"] if manifest.calibration else {}
    info = summary.get("awq") or {}
    return {"variant": variant, "calibration": calibration, "exact_match": exact, "steps_max_kl": cases,
            "gate_passed": report.passed, "awq_groups": info.get("groups"), "alpha_mean": info.get("alpha_mean"),
            "weights_clipped": info.get("weights_clipped"), "build_seconds": round(seconds, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="checkpoint (default: the built-in demo model)")
    parser.add_argument("--calib-docs", type=Path, default=None, help="also calibrate on this folder")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None, help="write the rows here (JSON)")
    args = parser.parse_args(argv)
    if args.model is None:
        from qvl_export.demo import checkpoint_dir

        args.model = checkpoint_dir()
    rows = run(args.model, args.calib_docs, args.variants.split(","), args.threads)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"model": str(args.model), "calib_docs": str(args.calib_docs),
                                        "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
