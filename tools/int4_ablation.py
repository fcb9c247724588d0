"""int4 ablation on a trained checkpoint: round to nearest vs AWQ scales vs AWQ clipping vs both,
each calibrated on the built-in documents and (optionally) on the user's own documents - for our
trained checkpoints, ``--task-docs N`` writes N pages of the checkpoint's own task (seeds apart from
its training and held-out pages) as that folder.

    python tools/int4_ablation.py --model DIR [--calib-docs DIR | --task-docs N] [--out results.json]

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
            gated = st["steps"].get("max_kl_outside_ties")
            cases[case["name"]] = {"all": round(float(st["steps"]["max_kl"]), 6),  # near-ties included
                                   "outside_ties": None if gated is None else round(float(gated), 6)}
    summary = manifest.calibration.quantization["decoder"] if manifest.calibration else {}
    info = summary.get("awq") or {}
    return {"variant": variant, "calibration": calibration, "exact_match": exact, "steps_max_kl": cases,
            "gate_passed": report.passed, "gate_failures": report.failure_summary(), "awq_groups": info.get("groups"), "alpha_mean": info.get("alpha_mean"),
            "weights_clipped": info.get("weights_clipped"), "build_seconds": round(seconds, 1)}


OWN_SEED_OFFSET = 5_000_000  # past every training seed, before the held-out pages (10_000_000)


def task_documents(model: Path, n: int, folder: Path) -> Path:
    """``n`` pages of the trained checkpoint's task with their prompts (a ``--calib-docs`` folder)."""
    from qvl_export.demo.tasks import task_for

    task = task_for(json.loads((model / "eval.json").read_text()).get("task"))
    if task is None:
        raise SystemExit(f"{model}/eval.json names no task of ours; pass --calib-docs instead")
    lines = []
    for i in range(n):
        image, prompt, _ = task.make_example(OWN_SEED_OFFSET + i)
        image.save(folder / f"{task.key}{i:03d}.png")
        lines.append(f"{task.key}{i:03d}.png\t{prompt}")
    (folder / "prompts.txt").write_text("\n".join(lines) + "\n")
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="checkpoint (default: the built-in demo model)")
    parser.add_argument("--calib-docs", type=Path, default=None, help="also calibrate on this folder")
    parser.add_argument("--task-docs", type=int, default=0,
                        help="also calibrate on N pages of the checkpoint's own task (trained checkpoints)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None, help="write the rows here (JSON)")
    args = parser.parse_args(argv)
    if args.model is None:
        from qvl_export.demo import checkpoint_dir

        args.model = checkpoint_dir()
    with tempfile.TemporaryDirectory() as tmp:
        if args.task_docs:
            args.calib_docs = task_documents(args.model, args.task_docs, Path(tmp))
        rows = run(args.model, args.calib_docs, args.variants.split(","), args.threads)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        own = f"{args.task_docs} pages of the model's task (seeds {OWN_SEED_OFFSET}+)" if args.task_docs \
            else str(args.calib_docs)
        args.out.write_text(json.dumps({"model": str(args.model), "own_calibration": own, "rows": rows},
                                       indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
