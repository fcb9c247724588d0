"""Quantization as stages of the build: calibration documents, calibration feeds, then one
quantizer per precision kind.

``QUANTIZERS`` is the one table from a ``core.precisions`` kind to its quantizer: calibrated W8A8
(int8, fp8: feeds -> precision guard -> Q/DQ placement, ``calibration/qdq.py``) and weight-only
(int4: ``building/weight_only.py``, its AWQ scales searched on the same calibration statistics,
``calibration/awq.py``). A quantizer reads the part's saved float graph and returns the
quantized onnx-ir model with a summary for the manifest; the ``save_part`` stage writes it. Adding a
precision means a registry row and, for a new kind, a quantizer here.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from qvl_export.core import precisions as registry
from qvl_export.core.errors import QvlError
from qvl_export.core.manifest import Calibration
from qvl_export.core.precisions import Precision

if TYPE_CHECKING:
    from qvl_export.building.context import BuildContext

log = logging.getLogger(__name__)


def calibrated_parts(ctx: BuildContext) -> dict[str, str]:
    """part -> calibrator of every part that needs activation statistics: int8 / fp8 parts (the
    build's calibrator) and weight-only parts with AWQ scales (``awq``: channel means and rows spread
    over every run; no histogram)."""
    parts = {p: ctx.settings.calibration.calibrator for p in ctx.of_kind(registry.CALIBRATED)}
    if ctx.settings.calibration.int4_method == "awq":
        parts.update({p: "awq" for p in ctx.of_kind(registry.WEIGHT_ONLY)})
    return {p: parts[p] for p in sorted(parts)}


def is_calibrated(ctx: BuildContext, part: str | None = None) -> bool:
    return bool(calibrated_parts(ctx))


def load_documents(ctx: BuildContext) -> None:
    """Calibrated builds: the calibration documents (a bad --calib-docs fails before tracing)."""
    from qvl_export.calibration.documents import builtin_documents
    from qvl_export.calibration.sources import folder_documents

    from qvl_export.runtimes.chat import video_support

    c = ctx.settings.calibration
    ctx.documents = (folder_documents(c.docs, limit=c.limit) if c.docs is not None
                     else builtin_documents(c.limit))
    clips = [d.name for d in ctx.documents if d.video is not None]
    why = video_support(ctx.template) if clips else None
    if why and c.docs is not None:
        raise QvlError(f"--calib-docs {c.docs} holds clips ({', '.join(clips[:3])}) but {why}: remove the clips "
                       "or pass a --chat-template that renders video items.")
    if why:  # a checkpoint trained on images only: calibrate on its kind of input
        ctx.documents = [d for d in ctx.documents if d.video is None]
        ctx.warn(f"calibrating without the built-in screen recording: {why}")


def calibrate(ctx: BuildContext) -> None:
    """Calibrated builds: activation statistics of every int8/fp8 part, taken while the float
    artifacts run over the documents (``calibration/taps.py``), or read back from --calib-cache."""
    from qvl_export.calibration import collect

    c = ctx.settings.calibration
    methods = calibrated_parts(ctx)
    settings = collect.CalibSettings()
    ranges = ctx.manifest.tensorrt.ranges if ctx.manifest.tensorrt else None  # caps the frames a clip feeds
    docs_key = collect.documents_key(ctx.documents, settings, f"{ctx.manifest.source.sha256}|{ranges}")
    keys = collect.part_keys(docs_key, methods)
    stats = collect.load_cache(Path(c.cache), keys) if c.cache else {}
    if stats:
        ctx.say(f"reusing the calibration feeds in {c.cache} ({', '.join(sorted(stats))})")
    todo = [p for p in methods if p not in stats]
    if todo:
        ctx.say(f"calibrating on {len(ctx.documents)} documents (float artifacts with activation taps: "
                f"{', '.join(todo)})")
        stats.update(collect.collect_stats(ctx.store.path, ctx.manifest, todo, ctx.documents, settings,
                                           {p: methods[p] for p in todo},
                                           progress=lambda i, n: ctx.say(f"calibration document {i}/{n}")))
        if c.cache:
            collect.save_cache(Path(c.cache), keys, {p: stats[p] for p in todo})
            ctx.say(f"calibration statistics cached in {c.cache}")
    ctx.stats = stats
    section = _calibration(ctx)
    section.documents = [d.name for d in ctx.documents]
    section.settings = vars(settings)


def quantize(ctx: BuildContext, name: str) -> None:
    """A quantized part: its precision kind's quantizer replaces the float graph in memory."""
    prec = registry.get(ctx.precisions[name])
    if not prec.quantized:
        return
    model, summary = QUANTIZERS[prec.kind](ctx, name, prec)
    ctx.replace_model(name, model)
    ctx.quantized_parts.add(name)
    _calibration(ctx).quantization[name] = summary


def quantize_calibrated(ctx: BuildContext, name: str, prec: Precision):
    """int8 / fp8: measure every weighted op's local error on the calibration statistics, keep the
    fragile ones in float (the precision guard), place Q/DQ on the rest. The float part is read
    lazily and the quantized weights are computed when the part is saved."""
    from qvl_export.calibration.guard import guard, measure, sensitivity_table
    from qvl_export.calibration.qdq import activation_mode, place_qdq, search_ranges

    c = ctx.settings.calibration
    stats = ctx.stats[name]
    model = ctx.model(name)
    sens = measure(model, stats, prec.name)
    keep = guard(sens, prec.name)
    if c.sensitivity:
        ctx.say("sensitivity (local quantization error per op)\n" + sensitivity_table(name, sens))
    for scope, why in keep.items():
        ctx.say(f"{name}: keeping {scope} in float: {why}")
    mode = activation_mode(c.activations, ctx.settings.target, prec.name, name)
    search = None
    if prec.name == "fp8":  # max-calibrated: amax / 448 (calibration/qdq.py)
        ranges = {n: (-t.abs_max, t.abs_max) for n, t in stats.tensors.items()}
    else:
        ranges = stats.ranges()
        if mode == "static" and c.range_search:
            ranges, search = search_ranges(ranges, stats, sens)
            ctx.say(f"{name}: range search widened {search['widened']} of {search['tensors']} activation ranges "
                    f"from the {c.calibrator} calibrator's toward their max")
    report = place_qdq(model, ranges, prec.name, name, calibrator=c.calibrator, exclude=keep,
                       target=ctx.settings.target, activations=mode)
    worst = sorted(sens, key=lambda s: -s.rel_error)[:5]
    ctx.say(f"{name}: {prec.name}, {len(report.quantized)} ops quantized ({mode} activation scales), "
            f"{len(report.kept)} kept in float")
    summary = {**report.to_dict(), "calibration_runs": stats.runs,
               "worst_ops": {s.scope: round(s.rel_error, 4) for s in worst}}
    if search is not None:
        summary["range_search"] = search
    return model, summary


def quantize_weight_only(ctx: BuildContext, name: str, prec: Precision):
    """int4: the decoder's weights in blocks - MatMulNBits on the ort target, int4 DequantizeLinear
    blocks on the trt target (TensorRT's weight-only form) - through AWQ scales searched on the
    calibration statistics on the same grid (``--int4-method awq``) or rounded to nearest (``rtn``)."""
    import onnx_ir as ir

    from qvl_export.building.weight_only import ACCURACY_LEVEL, block_size_for, pack_weights, qdq_weights
    from qvl_export.calibration import awq
    from qvl_export.calibration.taps import release

    model = ir.load(ctx.store.file(ctx.store.part(name).file))
    trt = ctx.settings.target == "trt"
    block = block_size_for(ctx.settings.target, ctx.settings.calibration.int4_block)
    plan = None
    if ctx.stats is not None and name in ctx.stats:
        plan = awq.search(model, ctx.stats[name], prec.bits, block, release=release, positive=trt)
        info = plan.summary()
        ctx.say(f"{name}: AWQ scales for {info['groups']} weight groups (mean alpha {info['alpha_mean']}, "
                f"median output error {info['error_ratio_rtn_to_awq_median']}x lower than round to nearest on "
                f"the calibration rows), clipping ranges for {info['weights_clipped']} weights")
    if trt:
        model, summary = qdq_weights(model, prec, name, plan, block)
        kept = summary["kept_high_precision"]
        ctx.say(f"{name}: {prec.name} weight-only, {summary['quantized_count']} weights as int4 DequantizeLinear "
                f"blocks of {block} for TensorRT" + (f", {len(kept)} MatMuls kept in float" if kept else ""))
        return model, summary
    model, summary = pack_weights(model, prec, name, plan, block)
    ctx.say(f"{name}: {prec.name} weight-only, {summary['quantized_count']} MatMuls packed into MatMulNBits "
            f"(blocks of {block}, accuracy level {ACCURACY_LEVEL})")
    return model, summary


# precision kind -> quantizer(ctx, part name, precision) -> (onnx-ir model, manifest summary)
QUANTIZERS: dict[str, Callable] = {
    registry.CALIBRATED: quantize_calibrated,
    registry.WEIGHT_ONLY: quantize_weight_only,
}


def _calibration(ctx: BuildContext) -> Calibration:
    """The manifest's calibration section, made when the first quantized part needs it."""
    if ctx.calibration is None:
        ctx.calibration = Calibration()
        ctx.store.update_manifest(calibration=ctx.calibration)
    return ctx.calibration
