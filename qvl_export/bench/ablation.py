"""Leave-one-out pass ablation: what each graph pass is worth on its own, measured paired.

For one benchmark shape (random weights at the real widths, ``--layers`` cut), build the artifacts
with every pass of the ort target, then once more per pass with only that pass skipped, and time
both builds alternately in one process on the same inputs (pairs in alternating order, so a burst
of background load hits both sides of a pair alike):

- passes on the vision or merger part: ``Pipeline.encode_images`` on a ``page`` x ``page`` page;
- passes on the decoder: prefill of the page's image tokens + 32 text tokens, and decode steps.

The figure of a pass is the median of the paired ratios time(without it) / time(with all passes)
(> 1: the pass pays) with its inter-quartile range, and both sides must agree numerically (max
abs difference of the outputs is reported). A pass that changed nothing on this shape (per the
manifest's pass records) is reported as such and not timed.

    python -m qvl_export.bench.ablation --model qwen2-vl-2b --layers 2 -o ablation-out
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

VISION_PARTS = ("vision", "merger")


def _paired(a: Callable[[], object], b: Callable[[], object], runs: int) -> dict:
    """Median and IQR of time(b) / time(a) over ``runs`` alternating pairs, plus both medians."""
    a(), b()  # warm-up
    ta, tb = [], []
    for i in range(runs):
        order = ((a, ta), (b, tb)) if i % 2 == 0 else ((b, tb), (a, ta))
        for fn, acc in order:
            t = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t)
    ratios = sorted(y / x for x, y in zip(ta, tb))
    q = len(ratios) // 4
    return {"ratio": statistics.median(ratios), "iqr": [ratios[q], ratios[-1 - q]], "runs": runs,
            "with_ms": statistics.median(ta) * 1e3, "without_ms": statistics.median(tb) * 1e3}


def _vision_pair(with_all: Path, without: Path, page: int, threads: int, runs: int) -> dict:
    from qvl_export.bench.ort_engine import open_pipeline
    from qvl_export.bench.worker import page_patches

    a, _ = open_pipeline(with_all, VISION_PARTS, threads)
    b, _ = open_pipeline(without, VISION_PARTS, threads)
    patches, grid, _ = page_patches(a.spec, page)
    out_a = a.encode_images([patches], [grid]).image_embeds
    out_b = b.encode_images([patches], [grid]).image_embeds
    fig = _paired(lambda: a.encode_images([patches], [grid]), lambda: b.encode_images([patches], [grid]), runs)
    return {"vision": {**fig, "tokens": len(patches), "max_abs_diff": float(np.abs(out_a - out_b).max())}}


def _decoder_pair(with_all: Path, without: Path, page: int, threads: int, prefills: int, steps: int) -> dict:
    from qvl_export.bench.ort_engine import open_pipeline
    from qvl_export.bench.worker import deepstack_inputs, llm_inputs
    from qvl_export.runtimes import indexing

    a, _ = open_pipeline(with_all, ("decoder",), threads)
    b, _ = open_pipeline(without, ("decoder",), threads)
    ids, positions, delta, embeds, _ = llm_inputs(a.spec, page, 32)
    deep = deepstack_inputs(a.spec, embeds)
    no_image = np.zeros((0, a.spec.text.hidden_size), np.float32)

    def prefill(pipe, cache):
        return pipe.decoder_step(ids[None], embeds, positions[:, None, :], cache, deep)[0]

    def fresh(pipe):
        return pipe.new_cache(capacity=len(ids) + steps + 8)

    logits_a, logits_b = prefill(a, fresh(a)), prefill(b, fresh(b))
    out = {"prefill": {**_paired(lambda: prefill(a, fresh(a)), lambda: prefill(b, fresh(b)), prefills),
                       "tokens": len(ids), "max_abs_diff": float(np.abs(logits_a - logits_b).max())}}
    caches = {}
    token = int(np.argmax(logits_a))
    for name, pipe in (("a", a), ("b", b)):
        caches[name] = fresh(pipe)
        prefill(pipe, caches[name])

    def step(pipe, cache):  # steps + 1 calls per side: the caches hold them all
        pos = indexing.decode_positions(cache.length, delta, 1)
        return pipe.decoder_step(np.asarray([[token]], np.int64), no_image, pos[:, None, :], cache)

    out["decode"] = {**_paired(lambda: step(a, caches["a"]), lambda: step(b, caches["b"]), steps),
                     "context": len(ids)}
    return out


def run_ablation(model: str = "qwen2-vl-2b", layers: int | None = 2, threads: int = 2,
                 out_dir: str | Path = "ablation-out", page: int = 448, prefills: int = 6, steps: int = 32,
                 vision_runs: int = 6, passes: list[str] | None = None,
                 progress: Callable[[str], None] | None = None) -> dict:
    """Run the ablation and write ``ablation.json`` + ``ablation.txt`` into ``out_dir``."""
    from qvl_export.bench.checkpoint import make_bench_checkpoint
    from qvl_export.bench.configs import bench_model
    from qvl_export.building.artifacts import BuildOptions, build
    from qvl_export.core.manifest import Manifest
    from qvl_export.passes import QUANTIZED, all_passes, stage_of

    say = progress or (lambda m: None)
    out = Path(out_dir)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    spec = bench_model(model, layers)
    say(f"checkpoint {model} ({layers or 'full'} layers)")
    checkpoint = make_bench_checkpoint(work / "checkpoint", spec)
    base = work / "all-passes"
    say("build with every pass")
    build(checkpoint, base, BuildOptions(force=True))
    records = {name: {r["pass"]: r for r in part.passes} for name, part in Manifest.read(base).parts.items()}
    chosen = [p for p in all_passes() if "ort" in p.targets and (passes is None or p.name in passes)]
    results: dict[str, dict] = {}
    try:
        for p in chosen:
            changed = {part: records[part][p.name]["op_changes"] for part in records
                       if p.name in records[part] and records[part][p.name]["modified"]}
            entry: dict = {"description": p.description, "parts": sorted(changed), "op_changes": changed}
            results[p.name] = entry
            if not changed:
                entry["skipped"] = "changed nothing on this shape"
                continue
            if stage_of(p.name) == QUANTIZED:
                entry["skipped"] = "runs on quantized builds only"
                continue
            without = work / f"without-{p.name}"
            say(f"build without {p.name}")
            build(checkpoint, without, BuildOptions(force=True, skip_passes=[p.name]))
            say(f"time {p.name}: {', '.join(sorted(changed))}")
            if set(changed) & set(VISION_PARTS):
                entry.update(_vision_pair(base, without, page, threads, vision_runs))
            if "decoder" in changed:
                entry.update(_decoder_pair(base, without, page, threads, prefills, steps))
            shutil.rmtree(without, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = {"model": model, "layers": layers, "threads": threads, "page": page, "prefills": prefills,
              "steps": steps, "vision_runs": vision_runs, "config": spec.describe(),
              "rule": "ratio = time without the pass / time with every pass (paired, alternating; > 1: "
                      "the pass pays); iqr = inter-quartile range of the paired ratios",
              "passes": results}
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.json").write_text(json.dumps(report, indent=1))
    text = table(report)
    (out / "ablation.txt").write_text(text + "\n")
    return report


def table(report: dict) -> str:
    lines = [f"pass ablation: {report['model']} ({report['layers'] or 'full'} layers), {report['threads']} threads, "
             f"{report['page']}x{report['page']} page; speedup = without / with (paired median [IQR])"]
    for name, e in report["passes"].items():
        if "skipped" in e:
            lines.append(f"  {name:<24} {e['skipped']}")
            continue
        figs = []
        for stage in ("vision", "prefill", "decode"):
            if stage in e:
                f = e[stage]
                figs.append(f"{stage} {f['ratio']:.3f}x [{f['iqr'][0]:.2f}-{f['iqr'][1]:.2f}] "
                            f"({f['without_ms']:.1f} -> {f['with_ms']:.1f} ms)")
        lines.append(f"  {name:<24} " + "; ".join(figs))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen2-vl-2b")
    parser.add_argument("--layers", type=int, default=2, help="0 = full depth")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("-o", "--output", default="ablation-out")
    parser.add_argument("--page", type=int, default=448)
    parser.add_argument("--prefills", type=int, default=6)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--vision-runs", type=int, default=6)
    parser.add_argument("--passes", default=None, help="comma-separated passes (default: every ort pass)")
    args = parser.parse_args(argv)
    report = run_ablation(args.model, args.layers or None, args.threads, args.output, args.page, args.prefills,
                          args.steps, args.vision_runs, args.passes.split(",") if args.passes else None,
                          progress=lambda m: print(f"[ablation] {m}", file=sys.stderr, flush=True))
    print(table(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
