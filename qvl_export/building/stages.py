"""The stages of a build that are not quantization (``quantize_stage.py``): checks, tracing, passes,
saving, the TensorRT side, the commit. ``plan.STAGES`` puts them in order.

Each takes the ``BuildContext`` (per-part stages also the part's name) and returns nothing: it reads
what earlier stages left in the context and adds its own. Only the ``ArtifactStore`` writes files.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from qvl_export.core import precisions as registry
from qvl_export.core.errors import QvlError
from qvl_export.core.manifest import BuildSettings, Manifest, Source, TensorRT
from qvl_export.core.parts import TARGETS
from qvl_export.core.store import ArtifactStore, check_destination

if TYPE_CHECKING:
    from qvl_export.building.context import BuildContext

log = logging.getLogger(__name__)

# files copied next to the parts so the runtime needs nothing from the checkpoint; the chat template
# is written as the one resolved file chat_template.jinja (runtimes/chat.py)
COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "generation_config.json",
                "config.json")
GRAPH, QUANTIZED = "graph", "quantized"  # the two pass lists (passes.select_passes)


# -- checks, before any work ---------------------------------------------------------------------

def check_request(ctx: BuildContext) -> None:
    """Refuse what cannot be built before anything is read or traced: target, precisions (the
    registry's per-part and per-target rules), destination, pass names, --bundle, TensorRT here."""
    s = ctx.settings
    if s.target not in TARGETS:
        raise QvlError(f"Unknown target {s.target!r}; use one of {', '.join(TARGETS)}.")
    ctx.precisions = registry.parse(s.precision)
    check_destination(ctx.out_dir, s.force)
    from qvl_export.passes import check_pass_names

    check_pass_names(_list(s.passes), _list(s.skip_passes))  # unknown pass names fail before any work
    if s.tensorrt.bundle and s.target != "trt":
        raise QvlError("--bundle is for --target trt (engines built on the device).")
    if s.target == "trt" and not s.tensorrt.bundle:
        from qvl_export.runtimes.trt.loaders import require_tensorrt

        require_tensorrt()  # fail before any tracing when engines cannot be built here
    registry.check(ctx.precisions, s.target)
    if s.calibration.activations != "auto":  # an impossible --activations fails here, not after tracing
        from qvl_export.calibration.qdq import activation_mode

        for part, name in ctx.precisions.items():
            if registry.get(name).calibrated:
                activation_mode(s.calibration.activations, s.target, name, part)
    if s.calibration.docs is not None and not ctx.of_kind(registry.CALIBRATED) and not (
            ctx.of_kind(registry.WEIGHT_ONLY) and s.calibration.int4_method == "awq"):
        ctx.warn("--calib-docs is only used by int8/fp8 and AWQ int4 builds; ignoring it")
    if s.calibration.int4_method != "rtn" and not ctx.of_kind(registry.WEIGHT_ONLY):
        ctx.warn(f"--int4-method {s.calibration.int4_method} applies to int4 parts only; no part is int4")
    if s.calibration.int4_block is not None:
        from qvl_export.building.weight_only import block_size_for

        block_size_for(s.target, s.calibration.int4_block)  # an impossible block fails before tracing
        if not ctx.of_kind(registry.WEIGHT_ONLY):
            ctx.warn(f"--int4-block {s.calibration.int4_block} applies to int4 parts only; no part is int4")


def validate_checkpoint(ctx: BuildContext) -> None:
    """Everything the build will rely on, checked before anything is traced: config, pre-processing
    settings, tokenizer (loaded, special token ids), chat template (compiles, carries images) and
    every weight's exact shape and dtype."""
    from qvl_export.loading.config import parse_model_config
    from qvl_export.loading.validate import check_tokenizer, check_weights
    from qvl_export.loading.weights import CheckpointWeights

    model_dir = ctx.model_dir
    if not model_dir.exists():
        raise QvlError(f"{model_dir} does not exist; pass a local Hugging Face checkpoint folder.")
    if not model_dir.is_dir():
        raise QvlError(f"{model_dir} is not a folder; pass a local Hugging Face checkpoint folder.")
    spec = parse_model_config(model_dir, assume_default_preprocessing=ctx.settings.assume_default_preprocessing)
    if not (model_dir / "tokenizer.json").exists():
        raise QvlError(f"{model_dir} has no tokenizer.json; copy it from the original checkpoint.")
    check_tokenizer(model_dir, spec)
    ctx.template = load_chat_template(model_dir, ctx.settings.chat_template)
    ctx.weights = CheckpointWeights(model_dir)
    check_weights(spec, ctx.weights)
    ctx.spec = spec


def load_chat_template(model_dir: Path, override: Path | None = None):
    """The checkpoint's chat template (or ``override``), compiled and checked to carry images."""
    from qvl_export.runtimes.chat import (
        ChatTemplate,
        probe,
        resolve_template,
        special_tokens,
    )

    if override is not None:
        try:
            source, origin = Path(override).read_text(encoding="utf-8"), str(override)
        except (OSError, UnicodeDecodeError) as err:
            raise QvlError(f"--chat-template {override} is unreadable ({err}); pass a UTF-8 Jinja file.") from None
    else:
        source, origin = resolve_template(model_dir)
    template = ChatTemplate(source, special_tokens(model_dir), origin=origin)
    probe(template, "<|image_pad|>")
    return template


def is_trt(ctx: BuildContext, part: str | None = None) -> bool:
    return ctx.settings.target == "trt"


def check_device(ctx: BuildContext) -> None:
    """trt target: the device takes every precision, the ranges fit the model, the memory estimate
    fits the device."""
    from qvl_export.building.trt_target import check_device as check
    from qvl_export.core.devices import Ranges

    t = ctx.settings.tensorrt
    info = check(ctx.spec, ctx.precisions, t.device, t.ranges or Ranges(), ctx.warn)
    ctx.tensorrt = info if isinstance(info, TensorRT) else TensorRT(**info)


def open_store(ctx: BuildContext) -> None:
    """A temporary folder beside the destination; the ``commit`` stage moves it into place."""
    s = ctx.spec
    ctx.say(f"checkpoint: {s.architecture} (vision {s.vision.depth}x{s.vision.hidden_size}, "
            f"LLM {s.text.num_hidden_layers}x{s.text.hidden_size})")
    ctx.store = ArtifactStore.create(ctx.out_dir, ctx.settings.force)


# -- per part: trace, graph passes, save ---------------------------------------------------------

def trace(ctx: BuildContext, name: str) -> None:
    """The part's export-ready torch module -> ONNX (torch.onnx dynamo), in its precision's traced
    dtype (fp16 / bf16 parts in theirs, everything else in float32)."""
    from qvl_export.export.parts import (
        decoder_part,
        merger_part,
        trace_part,
        vision_part,
    )

    makers = {
        "vision": lambda: vision_part(ctx.spec, ctx.weights, ctx.settings.window_attention),
        "merger": lambda: merger_part(ctx.spec, ctx.weights),
        "decoder": lambda: decoder_part(ctx.spec, ctx.weights),
    }
    ctx.say(f"tracing {name}")
    ctx.replace_model(name, trace_part(makers[name](), registry.get(ctx.precisions[name]).traced(ctx.settings.target)))


def graph_passes(ctx: BuildContext, name: str) -> None:
    """The target's graph passes on the traced float graph (``passes.select_passes(.., "graph")``)."""
    chosen = pass_list(ctx, name, GRAPH)
    if chosen:
        ctx.say(f"passes on {name}: {', '.join(p.name for p in chosen)}")
    _run(ctx, name, chosen)


def quantized_passes(ctx: BuildContext, name: str) -> None:
    """Builds that quantize any part: the passes that need Q/DQ or packed weights in place, on every part."""
    chosen = pass_list(ctx, name, QUANTIZED) if ctx.quantizes else []
    if chosen:
        ctx.say(f"passes on {name} after quantization: {', '.join(p.name for p in chosen)}")
        _run(ctx, name, chosen)


def _run(ctx: BuildContext, name: str, chosen: list) -> None:
    from qvl_export.passes import run_passes

    model, records = run_passes(ctx.model(name), chosen)
    ctx.replace_model(name, model)
    ctx.build_log["passes"].setdefault(name, []).extend(_split_timings(records))
    ctx.passes.setdefault(name, []).extend(records)


def lint(ctx: BuildContext, name: str) -> None:
    """trt target: the final graph against TensorRT's rules (errors refuse the build, findings are kept)."""
    from qvl_export.building.trt_target import lint_part

    ctx.lint[name] = lint_part(ctx.model(name), name)


def save_part(ctx: BuildContext, name: str) -> None:
    """Write the part through the store when it changed, then free it; a part only read (to lint)
    gets its findings recorded."""
    model = ctx.models.pop(name, None)
    if name in ctx.changed:
        ctx.changed.discard(name)
        ctx.store.save_part(name, model, _stored_precision(ctx, name), passes=ctx.passes.get(name, []),
                            lint=ctx.lint.get(name, []))
    elif name in ctx.lint:
        ctx.store.annotate(name, lint=ctx.lint[name])


def _stored_precision(ctx: BuildContext, name: str) -> str:
    """What the part holds now: its precision once quantized, else the float precision it was traced in."""
    prec = registry.get(ctx.precisions[name])
    if prec.quantized and name in ctx.quantized_parts:
        return prec.name
    return next(p.name for p in registry.REGISTRY.values()
                if p.kind == registry.FLOAT and p.trace_dtype == prec.traced(ctx.settings.target))


# -- the folder ----------------------------------------------------------------------------------

def write_manifest(ctx: BuildContext) -> None:
    """Checkpoint files, the resolved chat template and the (unsealed) manifest: the float folder is
    complete and loadable (calibration runs it)."""
    from qvl_export.building.versions import library_versions
    from qvl_export.runtimes.chat import TEMPLATE_FILE

    store = ctx.store
    for fname in COPIED_FILES:
        if (ctx.model_dir / fname).exists():
            store.copy_in(ctx.model_dir / fname, fname)
    store.write_text(TEMPLATE_FILE, ctx.template.source)
    ctx.say("hashing the source checkpoint")
    s = ctx.settings
    store.set_manifest(Manifest(
        spec=ctx.spec, parts={}, target=s.target, precisions=dict(ctx.precisions),
        source=Source(str(ctx.model_dir.resolve()), ctx.weights.fingerprint(), ctx.spec.architecture),
        versions=library_versions(),
        build=BuildSettings(s.window_attention, ctx.template.origin if s.chat_template is None else "--chat-template"),
        tensorrt=ctx.tensorrt))
    store.write_manifest()


def engines(ctx: BuildContext) -> None:
    """trt target: the bundle's ``BUILD_ON_DEVICE.md`` and ``trt_build.json``, or the engines built here."""
    from qvl_export.building.trt_target import build_engines, write_bundle_files

    if ctx.settings.tensorrt.bundle:
        write_bundle_files(ctx.store, ctx.tensorrt, ctx.out_dir.name)
    else:
        build_engines(ctx.store, ctx.warn, ctx.say, verify=False)


def commit(ctx: BuildContext) -> None:
    """Seal the checksums, write the manifest and the build log, move the folder into place. The
    build's peak resident memory goes to the build log (not the manifest: two identical builds
    give byte-identical manifests) and is printed."""
    peak = peak_rss_bytes()
    ctx.build_log["peak_rss_bytes"] = peak
    ctx.store.commit(ctx.build_log)
    ctx.say(f"artifacts written to {ctx.out_dir} (peak memory {peak / (1 << 30):.2f} GiB)")
    t = ctx.settings.tensorrt
    if t.bundle:
        ctx.say(f"bundle written to {ctx.out_dir}: copy it to the {t.device} and run "
                f"'qvl-export engine {ctx.out_dir.name}' there")


# -- helpers -------------------------------------------------------------------------------------

def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports kilobytes, macOS bytes)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)

def pass_list(ctx: BuildContext, name: str, stage: str) -> list:
    """The passes of ``stage`` (GRAPH: on the traced float graph; QUANTIZED: after Q/DQ placement or
    weight packing) for part ``name``, as ``--passes`` / ``--skip-pass`` filter them."""
    from qvl_export.passes import select_passes

    s = ctx.settings
    return select_passes(s.target, name, stage, only=_list(s.passes), skip=_list(s.skip_passes))


def _list(names) -> list[str] | None:
    return None if names is None else list(names)


def _split_timings(records: list[dict]) -> list[dict]:
    """Take the per-pass seconds out of the manifest's records (two identical builds must be
    byte-identical); returns them for the build log."""
    return [{"pass": r["pass"], "seconds": r.pop("seconds", None)} for r in records]
