"""Exact-match drift of built artifacts against transformers on more held-out pages than the gate's 250.

    python tools/heldout_drift.py MODEL_DIR ARTIFACTS [ARTIFACTS ...] [--pages 1000] [--skip 250] [--out FILE]

A trained checkpoint's task gate scores its builds on the 250 held-out pages of its ``eval.json``; at an
exact match near 0.4 one such figure carries about +-3 points of binomial noise, so a 1-point goal cannot
be read off it. This reads ``--pages`` further held-out pages (after the first ``--skip``, so they are
pages no gate has seen) with transformers' fp32 greedy reader and with each artifacts folder's runtime,
and reports per folder: exact match, the paired difference to transformers with its 95% interval
(page-level differences, normal approximation), the answers identical, and the pages broken / fixed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from qvl_export.core.manifest import Manifest
    from qvl_export.demo import task_for
    from qvl_export.demo.accuracy import agreement, exact_match, pipeline_reader
    from qvl_export.parity.reference import TorchReference
    from qvl_export.runtimes.pipeline import Pipeline

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("artifacts", type=Path, nargs="+")
    ap.add_argument("--pages", type=int, default=1000)
    ap.add_argument("--skip", type=int, default=250, help="held-out pages to pass over (the gate's own)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    evaluation = json.loads((args.model / "eval.json").read_text())
    task = task_for(evaluation["task"])
    offset = task.heldout_seed_offset + args.skip
    t0 = time.perf_counter()
    ref = exact_match(TorchReference(args.model).reader(task.max_new_tokens), args.pages, offset, task=task)
    print(f"transformers fp32: exact {ref['exact_match']:.4f} on {args.pages} pages ({time.perf_counter() - t0:.0f} s)",
          flush=True)
    rows = {"model": str(args.model), "task": task.key, "pages": args.pages, "seed_offset": offset,
            "transformers_exact": ref["exact_match"], "builds": {}}
    right_ref = set(ref["correct_indices"])
    for folder in args.artifacts:
        t0 = time.perf_counter()
        ours = exact_match(pipeline_reader(Pipeline.load(folder), task.max_new_tokens), args.pages, offset, task=task)
        right = set(ours["correct_indices"])
        diffs = [(i in right) - (i in right_ref) for i in range(args.pages)]
        mean = sum(diffs) / args.pages
        sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (args.pages - 1))
        half = 1.96 * sd / math.sqrt(args.pages)
        changes = agreement(ours, ref, args.pages)
        same = changes["answer_agreement"]
        row = {"precision": Manifest.read(folder).precision, "exact": ours["exact_match"],
               "drift_points": round(100 * mean, 2), "drift_95": [round(100 * (mean - half), 2),
                                                                 round(100 * (mean + half), 2)],
               "answers_identical": round(same, 4), "broke": len(changes["broke"]), "fixed": len(changes["fixed"])}
        rows["builds"][folder.name] = row
        print(f"{folder.name} ({row['precision']}): exact {row['exact']:.4f}, drift {row['drift_points']:+.2f} points "
              f"(95% {row['drift_95'][0]:+.2f} .. {row['drift_95'][1]:+.2f}), identical {same:.3f}, "
              f"broke {row['broke']} / fixed {row['fixed']} ({time.perf_counter() - t0:.0f} s)", flush=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
