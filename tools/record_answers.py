"""Record transformers' fp32 answer on every held-out page in a trained checkpoint's ``eval.json``
(``"answers"``: ``[text, stopped]`` per page), so builds of it are compared page by page - answers
identical, pages broken and fixed - not only by exact match (``qvl_export.demo.accuracy.agreement``).
Checkpoints trained by ``tools/train_demo.py`` record them when they are evaluated; this adds them to
one trained before that. The exact match recomputed from the answers must equal the recorded one.

    python tools/record_answers.py MODEL_DIR [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from qvl_export.demo import task_reference
    from qvl_export.demo.accuracy import exact_match
    from qvl_export.demo.tasks import task_for
    from qvl_export.parity.reference import TorchReference

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    record = task_reference(args.model)
    if record is None:
        print(f"{args.model} has no eval.json naming one of our tasks", file=sys.stderr)
        return 2
    task = task_for(record["task"])
    ref = TorchReference(args.model, num_threads=args.threads)
    result = exact_match(ref.reader(task.max_new_tokens), int(record["heldout"]),
                         int(record["heldout_seed_offset"]), task=task)
    if abs(result["exact_match"] - float(record["exact_match"])) > 1e-9:
        print(f"exact match {result['exact_match']} differs from the recorded {record['exact_match']}: not written",
              file=sys.stderr)
        return 1
    path = args.model / "eval.json"
    data = json.loads(path.read_text())
    data["answers"] = result["answers"]
    path.write_text(json.dumps(data, indent=2) + "\n")
    print(f"{path}: {len(result['answers'])} answers, exact match {result['exact_match']:.3f} as recorded")
    return 0


if __name__ == "__main__":
    sys.exit(main())
