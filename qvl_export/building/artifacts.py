"""``qvl-export build``: checkpoint -> artifacts folder (ONNX parts, tokenizer, manifest).

Everything is written to a temporary folder beside the destination and moved into place only when
complete, so a failed or interrupted build never leaves a half-written artifacts folder and never
damages a previous one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from qvl_export.core.errors import QvlError
from qvl_export.core.spec import ModelSpec
from qvl_export.loading.config import parse_model_config
from qvl_export.core.manifest import BUILD_LOG, MANIFEST, PART_NAMES, Manifest, PartInfo, TensorInfo

log = logging.getLogger(__name__)

TARGETS = ("ort", "trt")
PRECISIONS = ("fp32", "fp16", "bf16", "int8", "fp8", "int4")
QUANTIZED = ("int8", "fp8")  # calibrated W8A8 (Q/DQ)
WEIGHT_ONLY = ("int4",)  # decoder weight-only (MatMulNBits, ort target), no calibration
# files copied next to the parts so the runtime needs nothing from the checkpoint; the chat template
# is written as the one resolved file chat_template.jinja (runtimes/chat.py)
COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "generation_config.json",
                "config.json")
EXTERNAL_DATA_THRESHOLD = 512 << 20  # parts above this keep weights in <part>.onnx.data


@dataclass
class BuildOptions:
    target: str = "ort"
    precision: str = "fp32"
    window_attention: str = "fused"  # Qwen2.5-VL window blocks: "fused" (per window) or "dense" (S x S mask)
    passes: list[str] | None = None  # only these passes (None: the target's full list)
    skip_passes: list[str] = field(default_factory=list)
    device: str = "x86-gpu"  # trt target: device profile (devices.DEVICES)
    bundle: bool = False  # trt target: write a bundle to build engines on the device
    ranges: "Ranges | None" = None  # trt target: shape ranges of the engines  # noqa: F821
    warn: Callable[[str], None] | None = None
    calib_docs: Path | None = None  # folder of PNG/JPEG/WebP/PDF (default: the built-in documents)
    calib_limit: int | None = None  # at most this many calibration documents
    calib_cache: Path | None = None  # reuse / store the calibration feeds here
    calibrator: str = "percentile"
    sensitivity: bool = False  # print every quantized op's local error
    force: bool = False
    progress: Callable[[str], None] | None = None
    chat_template: Path | None = None  # a Jinja file replacing the checkpoint's chat template
    assume_default_preprocessing: bool = False  # a checkpoint without preprocessor_config.json


def validate_checkpoint(model_dir: Path, assume_default_preprocessing: bool = False,
                        chat_template: Path | None = None) -> tuple[ModelSpec, "CheckpointWeights", "ChatTemplate"]:  # noqa: F821
    """Everything the build will rely on, checked before anything is traced: config, pre-processing
    settings, tokenizer (loaded, special token ids), chat template (compiles, carries images) and
    every weight's exact shape and dtype."""
    from qvl_export.loading.validate import check_tokenizer, check_weights
    from qvl_export.loading.weights import CheckpointWeights

    if not model_dir.exists():
        raise QvlError(f"{model_dir} does not exist; pass a local Hugging Face checkpoint folder.")
    if not model_dir.is_dir():
        raise QvlError(f"{model_dir} is not a folder; pass a local Hugging Face checkpoint folder.")
    spec = parse_model_config(model_dir, assume_default_preprocessing=assume_default_preprocessing)
    if not (model_dir / "tokenizer.json").exists():
        raise QvlError(f"{model_dir} has no tokenizer.json; copy it from the original checkpoint.")
    check_tokenizer(model_dir, spec)
    template = load_chat_template(model_dir, chat_template)
    weights = CheckpointWeights(model_dir)
    check_weights(spec, weights)
    return spec, weights, template


def load_chat_template(model_dir: Path, override: Path | None = None):
    """The checkpoint's chat template (or ``override``), compiled and checked to carry images."""
    from qvl_export.runtimes.chat import ChatTemplate, probe, resolve_template, special_tokens

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


def _tensor_infos(values) -> list[TensorInfo]:
    out = []
    for v in values:
        shape = [d if isinstance(d, int) else str(d) for d in (v.shape or [])]
        out.append(TensorInfo(v.name, shape, v.dtype.numpy().name if v.dtype is not None else "unknown"))
    return out


def save_part(model, folder: Path, name: str) -> tuple[str, str | None]:
    """Write ``<name>.onnx`` (+ ``<name>.onnx.data`` when large): part-unique data file names.

    ``model`` may hold tensors backed by another file's external data (a quantizer's output): they
    are read from it here, so that file must still exist and can be deleted afterwards."""
    import onnx_ir as ir

    size = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    file = f"{name}.onnx"
    if size > EXTERNAL_DATA_THRESHOLD:
        data = f"{name}.onnx.data"
        ir.save(model, folder / file, external_data=data)
        return file, data
    ir.external_data.load_to_model(model)  # inline: no tensor may keep pointing at another file's data
    ir.save(model, folder / file)
    return file, None


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("qvl-export", "torch", "transformers", "onnx", "onnx-ir", "onnxscript", "onnxruntime", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def parse_precision(text: str) -> dict[str, str]:
    """``int8`` (every part) or ``vision=fp16,decoder=int8`` (unnamed parts: fp32)."""
    text = (text or "fp32").strip()
    if "=" not in text:
        out = {p: text for p in PART_NAMES}
    else:
        out = {p: "fp32" for p in PART_NAMES}
        for item in text.split(","):
            part, _, prec = item.partition("=")
            part, prec = part.strip(), prec.strip()
            if part not in PART_NAMES:
                raise QvlError(f"Unknown part {part!r} in --precision; parts are {', '.join(PART_NAMES)}.")
            out[part] = prec
    for part, prec in out.items():
        if prec not in PRECISIONS:
            raise QvlError(f"Precision {prec!r} ({part}) is not available; use one of {', '.join(PRECISIONS)}.")
    return out


def precision_label(precisions: dict[str, str]) -> str:
    values = set(precisions.values())
    return values.pop() if len(values) == 1 else ",".join(f"{k}={v}" for k, v in precisions.items())


def build(model_dir: str | Path, out_dir: str | Path, options: BuildOptions = BuildOptions()) -> Manifest:
    """Trace every part, run the passes, quantize, write the artifacts folder atomically."""
    from qvl_export.export.parts import decoder_part, merger_part, trace_part, vision_part
    from qvl_export.passes import run_passes, select_passes

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if options.target not in TARGETS:
        raise QvlError(f"Unknown target {options.target!r}; use one of {', '.join(TARGETS)}.")
    precisions = parse_precision(options.precision)
    _check_destination(out_dir, options.force)
    for part_name in PART_NAMES:  # unknown pass names fail before any work
        select_passes(options.target, part_name, options.passes, options.skip_passes)
    say = options.progress or (lambda msg: log.info("%s", msg))
    warn = options.warn or (lambda msg: log.warning("%s", msg))
    if options.bundle and options.target != "trt":
        raise QvlError("--bundle is for --target trt (engines built on the device).")
    if options.target == "trt" and not options.bundle:
        from qvl_export.building.trt_engine import require_tensorrt

        require_tensorrt()  # fail before any tracing when engines cannot be built here
    calibrated = [p for p, prec in precisions.items() if prec in QUANTIZED]
    quantized = calibrated + [p for p, prec in precisions.items() if prec in WEIGHT_ONLY]
    for part, prec in precisions.items():
        if prec in WEIGHT_ONLY and part != "decoder":
            raise QvlError(f"{prec} is weight-only quantization for the decoder (decode is memory-bound; the "
                           f"{part} part is compute-bound): use --precision decoder={prec}, with "
                           f"{part}=fp32, fp16, int8 or fp8.")
        if prec in WEIGHT_ONLY and options.target != "ort":
            raise QvlError(f"{prec} uses onnxruntime's MatMulNBits (ort target only); for TensorRT use int8 or fp8.")
    if "bf16" in precisions.values() and options.target != "trt":
        raise QvlError("onnxruntime's CPU provider has no bf16 kernels, so bf16 parts could not be run or "
                       "checked here: use fp16, or bf16 with --target trt.")
    if options.calib_docs is not None and not calibrated:
        warn("--calib-docs is only used by int8/fp8 builds; ignoring it")

    spec, weights, template = validate_checkpoint(model_dir, options.assume_default_preprocessing,
                                                  options.chat_template)
    trt_info = None
    if options.target == "trt":
        from qvl_export.building.devices import Ranges
        from qvl_export.building.trt import check_device

        trt_info = check_device(spec, precisions, options.device, options.ranges or Ranges(), warn)
    docs = _calibration_documents(options) if calibrated else []  # bad --calib-docs fails before tracing
    say(f"checkpoint: {spec.architecture} (vision {spec.vision.depth}x{spec.vision.hidden_size}, "
        f"LLM {spec.text.num_hidden_layers}x{spec.text.hidden_size})")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        tmp.chmod(0o777 & ~_umask())
        parts: dict[str, PartInfo] = {}
        build_log: dict = {"passes": {}}  # timings: beside the manifest, never in it
        late: dict[str, list] = {}
        makers = {
            "vision": lambda: vision_part(spec, weights, options.window_attention),
            "merger": lambda: merger_part(spec, weights),
            "decoder": lambda: decoder_part(spec, weights),
        }
        for name, make in makers.items():
            say(f"tracing {name}")
            model = trace_part(make(), precisions[name] if precisions[name] in ("fp16", "bf16") else "fp32")
            chosen = select_passes(options.target, name, options.passes, options.skip_passes)
            # contrib-op fusions run after quantization so Q/DQ lands on plain MatMuls
            early = [p for p in chosen if not (quantized and p.after_quantization)]
            late[name] = [p for p in chosen if quantized and p.after_quantization]
            if early:
                say(f"passes on {name}: {', '.join(p.name for p in early)}")
            model, records = run_passes(model, early)
            build_log["passes"][name] = _split_timings(records)
            file, data = save_part(model, tmp, name)
            traced = precisions[name] if precisions[name] in ("fp16", "bf16") else "fp32"
            parts[name] = PartInfo(name, file, data, _tensor_infos(model.graph.inputs),
                                   _tensor_infos(model.graph.outputs), traced, passes=records)
            del model
        for fname in COPIED_FILES:
            if (model_dir / fname).exists():
                shutil.copyfile(model_dir / fname, tmp / fname)
        from qvl_export.runtimes.chat import TEMPLATE_FILE

        (tmp / TEMPLATE_FILE).write_text(template.source, encoding="utf-8")
        say("hashing the source checkpoint")
        manifest = Manifest(
            spec=spec, parts=parts, target=options.target, precision=precision_label(precisions),
            source={"path": str(model_dir.resolve()), "sha256": weights.fingerprint(),
                    "architecture": spec.architecture},
            versions=library_versions(),
            options={"window_attention": options.window_attention, "precisions": precisions,
                     "chat_template": template.origin if options.chat_template is None else "--chat-template"},
        )
        if trt_info is not None:
            manifest.options["ranges"] = trt_info["ranges"]  # the runtime enforces what the engines cover
        manifest.write(tmp)
        if calibrated:
            from qvl_export.building.quantization import quantize_parts

            quantize_parts(tmp, manifest, precisions, docs, options, say)
        if len(quantized) > len(calibrated):
            from qvl_export.building.weight_only import quantize_weight_only

            quantize_weight_only(tmp, manifest, precisions, say)
        if quantized:
            for name, passes in late.items():
                if passes:
                    build_log["passes"][name] += _late_passes(tmp, manifest.parts[name], passes, say)
        if options.target == "trt":
            import onnx_ir as ir

            from qvl_export.building.trt import lint_part

            for name, part in manifest.parts.items():
                part.passes.append({"pass": "trt_lint", "findings": lint_part(ir.load(tmp / part.file), name)})
        manifest.write(tmp)
        if trt_info is not None:
            from qvl_export.building.trt import build_engines, copy_bundle_readme, write_build_config

            write_build_config(tmp, trt_info)
            if options.bundle:
                copy_bundle_readme(tmp, options.device, out_dir.name)
            else:
                manifest = build_engines(tmp, warn, say, verify=False)
        manifest.seal(tmp)
        manifest.write(tmp)
        (tmp / BUILD_LOG).write_text(json.dumps(build_log, indent=2))
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(f"artifacts written to {out_dir}")
    return manifest


def _calibration_documents(options: BuildOptions):
    from qvl_export.calibration.documents import builtin_documents
    from qvl_export.calibration.sources import folder_documents

    if options.calib_docs is not None:
        return folder_documents(options.calib_docs, limit=options.calib_limit)
    return builtin_documents(options.calib_limit)


def _split_timings(records: list[dict]) -> list[dict]:
    """Take the per-pass seconds out of the manifest's records (two identical builds must be
    byte-identical); returns them for the build log."""
    timings = []
    for r in records:
        timings.append({"pass": r["pass"], "seconds": r.pop("seconds", None)})
    return timings


def _late_passes(folder: Path, part: PartInfo, passes, say) -> list[dict]:
    import onnx_ir as ir

    from qvl_export.passes import run_passes

    say(f"passes on {part.name} after quantization: {', '.join(p.name for p in passes)}")
    model = ir.load(folder / part.file)
    model, records = run_passes(model, passes)
    ir.external_data.load_to_model(model)  # the files it was read from are replaced below
    old_data = part.external_data
    for path in (folder / part.file, folder / old_data if old_data else None):
        if path is not None and path.exists():
            path.unlink()
    part.file, part.external_data = save_part(model, folder, part.name)
    part.inputs, part.outputs = _tensor_infos(model.graph.inputs), _tensor_infos(model.graph.outputs)
    timings = _split_timings(records)
    part.passes.extend(records)
    return timings


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _check_destination(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise QvlError(f"{out_dir} exists and is not a folder; choose another output path.")
    if out_dir.exists() and any(out_dir.iterdir()):
        if not (out_dir / MANIFEST).exists():
            raise QvlError(f"{out_dir} exists and is not an artifacts folder; choose an empty or new output path.")
        if not force:
            raise QvlError(f"{out_dir} already holds artifacts; pass --force to replace them.")


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        out_dir.rename(old)
    tmp.rename(out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
