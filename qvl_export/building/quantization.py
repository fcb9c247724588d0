"""int8 / fp8 stage of the build: calibration feeds -> precision guard -> Q/DQ per part."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from qvl_export.core.manifest import Manifest

log = logging.getLogger(__name__)


def quantize_parts(folder: Path, manifest: Manifest, precisions: dict[str, str], docs, options,
                   say: Callable[[str], None]) -> None:
    """Quantize every int8/fp8 part of the fp32 artifacts in ``folder`` in place; updates ``manifest``."""
    import onnx_ir as ir

    from qvl_export.building.artifacts import QUANTIZED, save_part
    from qvl_export.calibration.collect import CalibSettings, collect_feeds, documents_key, load_cache, save_cache
    from qvl_export.calibration.guard import guard, measure, sensitivity_table
    from qvl_export.calibration.quantize import quantize_part
    from qvl_export.runtimes.pipeline import Pipeline

    settings = CalibSettings()
    key = documents_key(docs, settings, manifest.source["sha256"])
    feeds = load_cache(Path(options.calib_cache), key) if options.calib_cache else None
    if feeds is None:
        say(f"calibrating on {len(docs)} documents (fp32 artifacts: vision, merger, prefill and decode steps)")
        pipe = Pipeline.load(folder, verify=False)  # the folder is still being built
        feeds = collect_feeds(pipe, docs, settings,
                              progress=lambda i, n: say(f"calibration document {i}/{n}"))
        del pipe
        if options.calib_cache:
            save_cache(Path(options.calib_cache), key, feeds)
            say(f"calibration feeds cached in {options.calib_cache}")
    else:
        say(f"reusing the calibration feeds in {options.calib_cache}")
    summary = {}
    for name, prec in precisions.items():
        if prec not in QUANTIZED:
            continue
        part = manifest.parts[name]
        src = folder / part.file
        sens = measure(src, feeds[name], prec)
        keep = guard(sens, prec)
        if options.sensitivity:
            say("sensitivity (local quantization error per op)\n" + sensitivity_table(name, sens))
        for scope, why in keep.items():
            say(f"{name}: keeping {scope} in float: {why}")
        tmp_q = folder / f".{name}.quantized.onnx"
        report = quantize_part(src, tmp_q, feeds[name], prec, name, calibrator=options.calibrator, exclude=keep,
                               external_data=part.external_data is not None, ranges=sens,
                               target=options.target)
        model = ir.load(tmp_q)  # its tensors read from tmp_q's data file: delete that after saving
        for path in [src, folder / part.external_data if part.external_data else None]:
            if path is not None and path.exists():
                path.unlink()
        part.file, part.external_data = save_part(model, folder, name)
        del model
        for path in [tmp_q, tmp_q.with_name(tmp_q.name + ".data")]:
            if path.exists():
                path.unlink()
        part.precision = prec
        worst = sorted(sens, key=lambda s: -s.rel_error)[:5]
        summary[name] = {**report.to_dict(), "calibration_feeds": len(feeds[name]),
                         "worst_ops": {s.scope: round(s.rel_error, 4) for s in worst}}
        say(f"{name}: {prec}, {len(report.quantized)} ops quantized, {len(report.kept)} kept in float")
    manifest.options["quantization"] = summary
    manifest.options["calibration"] = {"documents": [d.name for d in docs], "settings": vars(settings)}
