"""The trt target: lint every graph, check device rules and memory, then build engines or a bundle.

``qvl-export build --target trt`` on a GPU machine builds the engines into the artifacts folder.
``--bundle`` writes a self-contained folder (ONNX with its Q/DQ already in the graphs, manifest,
tokenizer, ``trt_build.json`` with device and ranges) to copy to the device, where
``qvl-export engine BUNDLE`` builds the engines - engines are not portable across GPUs or TensorRT
versions, so they are always built where they run.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from qvl_export.building.devices import Ranges, check_memory, check_precision, estimate_memory, get_device, profiles
from qvl_export.core.errors import QvlError
from qvl_export.core.manifest import Manifest

log = logging.getLogger(__name__)
BUILD_CONFIG = "trt_build.json"


def lint_part(model, name: str) -> list[dict]:
    """Lint one graph; raise with every error listed when TensorRT would reject it."""
    from qvl_export.building.trt_lint import lint_errors, lint_model  # onnx-ir: build machines only

    findings = lint_model(model, name)
    errors = lint_errors(findings)
    if errors:
        shown = "; ".join(str(e) for e in errors[:5])
        more = f" (+{len(errors) - 5} more)" if len(errors) > 5 else ""
        raise QvlError(f"The {name} graph breaks TensorRT's rules: {shown}{more}. Use --target ort for contrib "
                       "ops, or skip the pass that added them (--skip-pass).")
    return [{"level": f.level, "rule": f.rule, "node": f.node, "message": f.message} for f in findings]


def check_device(manifest_or_spec, precisions: dict[str, str], device_name: str, ranges: Ranges,
                 warn: Callable[[str], None], sm: tuple[int, int] | None = None) -> dict:
    spec = manifest_or_spec.spec if isinstance(manifest_or_spec, Manifest) else manifest_or_spec
    device = get_device(device_name)
    check_precision(device, precisions, sm)
    ranges.validate(spec)
    est = estimate_memory(spec, precisions, ranges)
    check_memory(device, est, warn)
    return {"device": device.name, "ranges": asdict(ranges), "memory_estimate": est.to_dict()}


def write_build_config(folder: Path, device_info: dict) -> None:
    (folder / BUILD_CONFIG).write_text(json.dumps(device_info, indent=2))


def build_engines(folder: Path, warn: Callable[[str], None], say: Callable[[str], None],
                  verify: bool = True) -> Manifest:
    """Build an engine per part in ``folder`` (an artifacts folder or a bundle) and update its manifest.

    ``verify``: check the folder against its manifest's checksums first (a bundle copied to the device
    whole); the engines and the new checksums are recorded at the end."""
    from qvl_export.building.trt_engine import TIMING_CACHE, build_engine, require_tensorrt

    folder = Path(folder)
    manifest = Manifest.read(folder)
    if manifest.target != "trt":
        raise QvlError(f"{folder} was built for target {manifest.target!r}; rebuild with --target trt.")
    if verify:
        manifest.verify(folder)
    cfg_path = folder / BUILD_CONFIG
    cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {"device": "x86-gpu", "ranges": {}}
    ranges = Ranges(**cfg.get("ranges", {}))
    trt, sm = require_tensorrt()
    precisions = {name: part.precision for name, part in manifest.parts.items()}
    info = check_device(manifest, precisions, cfg["device"], ranges, warn, sm=sm)
    built = {}
    for name, part in manifest.parts.items():
        if not verify:  # a verified bundle holds exactly the graphs that were linted when it was built
            import onnx_ir as ir

            lint_part(ir.load(folder / part.file), name)
        say(f"building the {name} engine")
        tmp = folder / f".{name}.engine.tmp"
        built[name] = build_engine(folder / part.file, tmp, profiles(manifest.spec, name, ranges),
                                   timing_cache=folder / TIMING_CACHE, precision=part.precision)
    for name, meta in built.items():  # all engines built: move them into place together
        os.replace(folder / f".{name}.engine.tmp", folder / f"{name}.engine")
        manifest.parts[name].engine = f"{name}.engine"
    first = next(iter(built.values()))
    manifest.options["tensorrt"] = {"version": first["tensorrt"], "compute_capability": first["compute_capability"],
                                    **info}
    manifest.seal(folder)
    manifest.write(folder)
    return manifest


def copy_bundle_readme(folder: Path, device: str, name: str) -> None:
    """``name``: the bundle folder's final name (``folder`` is still the temporary one)."""
    (folder / "BUILD_ON_DEVICE.md").write_text(
        f"# Build the TensorRT engines on the device ({device})\n\n"
        "Copy this folder to the device whole, then run there:\n\n"
        "    pip install qvl-export        # the runtime: numpy, onnxruntime, tokenizers, pillow, click, jinja2\n"
        "    # TensorRT's Python package comes with JetPack; CUDA buffers need cuda-python:\n"
        "    pip install cuda-python\n"
        f"    qvl-export engine {name}\n"
        f"    qvl-export run {name} --image page.png --prompt \"What is the total?\"\n\n"
        "No torch, transformers or onnx-ir is needed there. The ONNX parts already hold their Q/DQ nodes\n"
        "(calibration is done); 'qvl-export engine' checks every file against the manifest's sha256,\n"
        "builds the engines with TensorRT on this GPU and records them. trt_build.json holds the device\n"
        "and the shape ranges the engines cover; the runtime refuses inputs outside them.\n")
