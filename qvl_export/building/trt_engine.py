"""ONNX part -> TensorRT engine through the TensorRT Python API (needs an NVIDIA GPU).

Strongly typed networks: precision comes from the graph (fp16/bf16 casts and Q/DQ nodes), never
from builder flags - TensorRT 11 removed those flags and TensorRT 10 honours the explicit types
only in strongly typed mode. Optimization profiles come from ``devices.profiles``; a timing cache
is kept beside the engines so rebuilds are fast.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from qvl_export.building.devices import Profile
from qvl_export.core.errors import QvlError
from qvl_export.runtimes.cuda import gpu_compute_capability

log = logging.getLogger(__name__)

TIMING_CACHE = "timing.cache"


@dataclass(frozen=True)
class EngineSettings:
    """Everything a TensorRT builder config is given, decided without TensorRT (a unit test checks it);
    ``build_engine`` only applies it, as Polygraphy's CreateConfig records settings before building."""

    strongly_typed_flag: bool  # set NetworkDefinitionCreationFlag.STRONGLY_TYPED (TensorRT 10; always on in 11)
    tf32: bool  # leave BuilderFlag.TF32 set
    workspace_bytes: int
    profiles: tuple[Profile, ...]
    precision: str


def engine_settings(precision: str, profiles: list[Profile], trt_major: int, workspace_gb: float = 4.0,
                    allow_tf32: bool = False) -> EngineSettings:
    """TF32 is cleared unless asked for: TensorRT enables it by default on Ampere and newer, where it
    runs fp32 MatMuls with 10-bit mantissas - an fp32 engine would then fail the fp32 parity gate
    (cosine 0.99999, 64 identical tokens), and the fp32 islands of fp16/int8/fp8 graphs (norm
    statistics, rotary, softmax) are fp32 for accuracy. Strongly typed always: precision comes from
    the graph."""
    if workspace_gb <= 0:
        raise QvlError("The TensorRT workspace must be larger than 0 GB.")
    if not profiles:
        raise QvlError("A TensorRT engine needs at least one optimization profile.")
    return EngineSettings(strongly_typed_flag=trt_major < 11, tf32=bool(allow_tf32),
                          workspace_bytes=int(workspace_gb * (1 << 30)), profiles=tuple(profiles),
                          precision=precision)


def require_tensorrt():
    """(tensorrt module, (major, minor) compute capability); a one-line error without GPU or TensorRT."""
    try:
        import tensorrt as trt
    except ImportError:
        raise QvlError("TensorRT engines need the tensorrt Python package and an NVIDIA GPU; neither is "
                       "usable here. Build with --bundle and run 'qvl-export engine BUNDLE' on the target "
                       "device.") from None
    sm = gpu_compute_capability()
    if sm is None:
        raise QvlError("No NVIDIA GPU is visible (CUDA reports none); engines must be built on the GPU that runs "
                       "them. Build with --bundle and run 'qvl-export engine BUNDLE' on the target device.")
    return trt, sm


def build_engine(onnx_path: Path, engine_path: Path, profiles: list[Profile], workspace_gb: float = 4.0,
                 timing_cache: Path | None = None, precision: str = "fp32") -> dict:
    """Parse ``onnx_path`` into a strongly typed network and write the serialized engine."""
    trt, sm = require_tensorrt()
    settings = engine_settings(precision, profiles, int(trt.__version__.split(".")[0]), workspace_gb)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if settings.strongly_typed_flag and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise QvlError(f"TensorRT could not parse {onnx_path.name}: {errors[:500]}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_bytes)
    if not settings.tf32 and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)
    for prof in settings.profiles:
        p = builder.create_optimization_profile()
        for name, (lo, opt, hi) in prof.shapes.items():
            p.set_shape(name, lo, opt, hi)
        if config.add_optimization_profile(p) < 0:
            raise QvlError(f"TensorRT rejected the {prof.name} profile of {onnx_path.name}: {prof.shapes}")
    cache_bytes = timing_cache.read_bytes() if timing_cache and timing_cache.exists() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    log.info("building %s (%d profile(s))", engine_path.name, len(settings.profiles))
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise QvlError(f"TensorRT failed to build {engine_path.name}; rerun with --verbose for its log.")
    engine_path.write_bytes(bytes(serialized))
    if timing_cache is not None:
        timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    return {"engine": engine_path.name, "tensorrt": trt.__version__, "compute_capability": f"{sm[0]}.{sm[1]}",
            "profiles": [p.name for p in settings.profiles], "tf32": settings.tf32}
