"""The trt target: lint every graph, check the device's rules and memory, write the bundle's files,
and build the engines of an artifacts folder or a bundle.

``qvl-export build --target trt`` on a GPU machine builds the engines into the artifacts folder.
``--bundle`` writes a self-contained folder (ONNX with its Q/DQ already in the graphs, manifest with
the device and ranges, tokenizer, ``BUILD_ON_DEVICE.md``, ``trt_build.json``) to copy to the device,
where ``qvl-export engine BUNDLE`` builds the engines - engines are not portable across GPUs or
TensorRT versions, so they are always built where they run.

``build_engines`` runs on the device from a runtime-only install (numpy, tensorrt, cuda-python; no
torch, no onnx-ir): it imports only ``core`` and ``runtimes.trt``. Only ``lint_part`` needs onnx-ir,
and only the build machine calls it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from pathlib import Path

from qvl_export.core.devices import (
    Ranges,
    check_memory,
    check_precision,
    estimate_memory,
    get_device,
    profiles,
)
from qvl_export.core.errors import QvlError
from qvl_export.core.manifest import Manifest, TensorRT
from qvl_export.core.spec import ModelSpec
from qvl_export.core.store import ArtifactStore

log = logging.getLogger(__name__)
BUILD_CONFIG = "trt_build.json"  # a readable copy of the manifest's tensorrt section (device, ranges)
README = "BUILD_ON_DEVICE.md"
TIMING_CACHE = "timing.cache"
DEFAULT_DEVICE = "x86-gpu"


def lint_part(ir_model, name: str) -> list[dict]:
    """Lint one graph; raise with every error listed when TensorRT would reject it. Returns the
    findings as data for ``PartInfo.lint``. Build machines only (onnx-ir)."""
    from qvl_export.building.trt_lint import lint_errors, lint_model

    findings = lint_model(ir_model, name)
    errors = lint_errors(findings)
    if errors:
        shown = "; ".join(str(e) for e in errors[:5])
        more = f" (+{len(errors) - 5} more)" if len(errors) > 5 else ""
        raise QvlError(f"The {name} graph breaks TensorRT's rules: {shown}{more}. Use --target ort for contrib "
                       "ops, or skip the pass that added them (--skip-pass).")
    return [{"level": f.level, "rule": f.rule, "node": f.node, "message": f.message} for f in findings]


def check_device(spec: ModelSpec, precisions: dict[str, str], device_name: str, ranges: Ranges,
                 warn: Callable[[str], None], sm: tuple[int, int] | None = None) -> TensorRT:
    """Refuse what ``device_name`` cannot run (precisions, ranges, memory); the manifest's tensorrt
    section for it. ``sm``: the GPU present, on the device itself (else the device's own)."""
    device = get_device(device_name)
    if sm is not None and device.sm is not None and sm != device.sm:
        warn(f"the bundle was made for {device.name} (SM {device.sm[0]}.{device.sm[1]}); this GPU is SM "
             f"{sm[0]}.{sm[1]}: the engines are built for this GPU")
    check_precision(device, precisions, sm)
    ranges.validate(spec)
    est = estimate_memory(spec, precisions, ranges)
    check_memory(device, est, warn)
    return TensorRT(device=device.name, ranges=dataclasses.asdict(ranges), memory_estimate=est.to_dict())


def write_bundle_files(store: ArtifactStore, device: TensorRT, final_name: str) -> None:
    """``BUILD_ON_DEVICE.md`` and ``trt_build.json`` of a bundle, through its store. ``device``: what
    ``check_device`` returned; ``final_name``: the folder's name once committed (never the store's
    temporary folder)."""
    store.write_text(BUILD_CONFIG, json.dumps(dataclasses.asdict(device), indent=2))
    store.write_text(README, bundle_readme(device.device, final_name))


def bundle_readme(device: str, name: str) -> str:
    return (
        f"# Build the TensorRT engines on the device ({device})\n\n"
        f"Copy the folder `{name}` to the device whole, then run there, in the folder that holds it:\n\n"
        "    pip install qvl-export    # the thin runtime: numpy, onnxruntime, tokenizers, pillow, click, jinja2\n"
        "    pip install cuda-python   # CUDA buffers for TensorRT (no torch needed)\n"
        "    # TensorRT's Python package comes with JetPack (Jetson: sudo apt install python3-libnvinfer; in a\n"
        "    # virtual environment, make it with --system-site-packages so it sees it); x86: pip install tensorrt\n"
        "    # bf16 parts also need: pip install ml-dtypes\n"
        f"    qvl-export engine {name}\n"
        f"    qvl-export run {name} --image page.png --prompt \"What is the total?\"\n\n"
        "No torch, transformers or onnx-ir is needed there. The ONNX parts already hold their Q/DQ nodes\n"
        "(calibration is done); 'qvl-export engine' checks every file against the manifest's sha256 first,\n"
        "builds the engines with TensorRT on this GPU and records them in the manifest. trt_build.json and\n"
        "the manifest's 'tensorrt' section hold the device and the shape ranges the engines cover; the\n"
        "runtime refuses inputs outside them.\n")


def build_engines(folder_or_store: str | Path | ArtifactStore, warn: Callable[[str], None],
                  say: Callable[[str], None], verify: bool = True) -> Manifest:
    """Build an engine per part and record them in the manifest.

    A folder (a bundle copied to the device, or finished trt artifacts) is opened in place - its
    checksums verified first when ``verify`` - and committed: the engines, the timing cache and the
    manifest are renamed into place together. A store (a build in progress) is written to and left
    for its owner to commit. The checks that need no GPU (target, checksums, device rules) run before
    TensorRT is looked for."""
    from qvl_export.runtimes.trt.loaders import (
        EngineBytesFromNetwork,
        NetworkFromOnnxPath,
        require_tensorrt,
    )
    from qvl_export.runtimes.trt.settings import engine_settings, trt_major

    owned = not isinstance(folder_or_store, ArtifactStore)
    store = ArtifactStore.open(folder_or_store, verify=verify) if owned else folder_or_store
    manifest = store.manifest
    if manifest.target != "trt":
        raise QvlError(f"{store.path} was built for target {manifest.target!r}; rebuild it with --target trt.")
    recorded = manifest.tensorrt or _read_build_config(store.path)
    ranges = Ranges(**{k: v for k, v in recorded.ranges.items() if k in Ranges.__dataclass_fields__})
    try:
        trt, sm = require_tensorrt(on_device=owned)
        info = check_device(manifest.spec, manifest.precisions, recorded.device, ranges, warn, sm=sm)
        cache_path = store.file(TIMING_CACHE)
        timing = {"bytes": cache_path.read_bytes() if cache_path.is_file() else None}
        device = get_device(recorded.device)
        for name, part in manifest.parts.items():
            precision = manifest.precisions.get(name, part.precision)
            settings = engine_settings(precision, profiles(manifest.spec, name, ranges), trt_major(trt.__version__),
                                       usable_memory_gb=device.usable_gb if device.jetson else None)
            say(f"building the {name} engine ({settings.describe()})")
            network = NetworkFromOnnxPath(store.file(part.file), settings)
            data = EngineBytesFromNetwork(network, settings, timing["bytes"],
                                          save_timing_cache=lambda b: timing.__setitem__("bytes", b))()
            store.write_bytes(f"{name}.engine", data)
            part.engine = f"{name}.engine"
        if timing["bytes"]:
            store.write_bytes(TIMING_CACHE, timing["bytes"])
        manifest.tensorrt = dataclasses.replace(info, version=trt.__version__, compute_capability=f"{sm[0]}.{sm[1]}")
    except BaseException:
        if owned:
            store.abort()
        raise
    return store.commit() if owned else manifest


def _read_build_config(folder: Path) -> TensorRT:
    """Bundles whose manifest has no tensorrt section (format 2) recorded the device in trt_build.json."""
    path = Path(folder) / BUILD_CONFIG
    if not path.is_file():
        return TensorRT(device=DEFAULT_DEVICE, ranges={})
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise QvlError(f"{path} is unreadable ({err}); rebuild the bundle.") from None
    return TensorRT(device=d.get("device", DEFAULT_DEVICE), ranges=d.get("ranges") or {})
