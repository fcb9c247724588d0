"""Every trained checkpoint of ours at every precision: ``qvl-export build`` with its default gate,
then the exact match of the build's task case on the checkpoint's held-out pages, next to
transformers' fp32 exact match (``eval.json``).

    python tools/trained_matrix.py [--models demo,form,chart] [--precisions fp32,int8,...] [--out FILE] [--merge]

A precision is ``--precision`` text, then optionally ``awq`` / ``rtn`` (``--int4-method``) and ``trt``
(``--target trt --bundle``: the ONNX graphs TensorRT is given, gated and scored on onnxruntime CPU).
``--merge`` replaces the rows it runs in an existing result file and keeps the others.

Each row is one real build through the command line (calibrated on the built-in documents, the
default calibrator and activation scales), its exit code, the gate checks that failed, the ops the
precision guard kept in float, the wall time and peak memory the build printed - and, page by page
against transformers' fp32 answers recorded in ``eval.json``, the fraction of answers identical and the
pages it broke (fp32 right, ours wrong) and fixed (the reverse).
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = {
    "demo": None,  # the built-in demo checkpoint (qvl_export/demo/checkpoint)
    "form": ROOT / "tests" / "data" / "trained" / "form_reader",
    "chart": ROOT / "tests" / "data" / "trained" / "chart_reader",
}
PRECISIONS = ("fp32", "int8", "fp8", "decoder=int4", "decoder=int4 awq", "decoder=int4 trt", "decoder=int4 awq trt")


def build_row(model: str, precision: str, out: Path) -> dict:
    from qvl_export.demo import CHECKPOINT, task_reference

    source = MODELS[model] or CHECKPOINT
    text, *extra = precision.split(" ")
    flags = ["--force", "--precision", text]
    for word in extra:
        flags += ["--target", "trt", "--bundle"] if word == "trt" else ["--int4-method", word]
    shown = source.relative_to(ROOT) if source.is_relative_to(ROOT) else source
    t0 = time.perf_counter()
    proc = subprocess.run(["qvl-export", "build", str(source), "-o", str(out), *flags], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    report = json.loads((out / "report.json").read_text()) if (out / "report.json").is_file() else None
    manifest = json.loads((out / "manifest.json").read_text()) if (out / "manifest.json").is_file() else {}
    row = {"model": model, "precision": precision, "exit_code": proc.returncode, "wall_s": round(wall, 1),
           "command": " ".join(["qvl-export", "build", str(shown), "-o", f"build/{out.name}", *flags])}
    peak = re.findall(r"peak memory ([0-9.]+) GiB", proc.stdout + proc.stderr)
    row["build_peak_gib"] = float(peak[-1]) if peak else None
    record = task_reference(source)
    row["fp32_transformers_exact_match"] = record["exact_match"] if record else None
    if report is None:
        row["error"] = (proc.stderr or proc.stdout).strip().splitlines()[-1:]
        return row
    row["gate_passed"] = report["passed"]
    row["gate_failures"] = [f"{c['name']}/{k['stage']}.{k['metric']}={k['value']:.4g} (needs {k['kind']} "
                            f"{k['threshold']})" for c in report["cases"] for k in c.get("checks", [])
                            if not k["passed"]]
    tasks = [c for c in report["cases"] if c["name"].endswith("-task")]
    if tasks:
        stage = tasks[0]["stages"]["task"]
        row.update(exact_match=stage["exact_match"], pages=stage["pages"])
        if "answer_agreement" in stage:  # page by page against transformers' fp32 answers
            row.update(answer_agreement=stage["answer_agreement"], broke=len(stage["broke"]),
                       fixed=len(stage["fixed"]))
    quant = (manifest.get("calibration") or {}).get("quantization") or {}
    row["kept_in_float"] = {part: sorted(q.get("kept_high_precision", {})) for part, q in quant.items()
                            if q.get("kept_high_precision")}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--precisions", default=",".join(PRECISIONS))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "trained-readers.json")
    ap.add_argument("--merge", action="store_true", help="keep the rows of --out that this run does not redo")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            for precision in args.precisions.split(","):
                rows.append(build_row(model, precision, Path(tmp) / f"{model}-{precision.replace(' ', '-')}"))
                print(json.dumps(rows[-1]), flush=True)
    import onnxruntime
    import torch
    import transformers

    if args.merge and args.out.is_file():
        redone = {(r["model"], r["precision"]) for r in rows}
        kept = [r for r in json.loads(args.out.read_text())["rows"] if (r["model"], r["precision"]) not in redone]
        rows = kept + rows
    result = {"what": __doc__.split("\n\n")[0], "rows": rows,
              "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores",
              "versions": {"python": sys.version.split()[0], "onnxruntime": onnxruntime.__version__,
                           "torch": torch.__version__, "transformers": transformers.__version__}}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
