"""ONNX part -> TensorRT engine through the TensorRT Python API (needs an NVIDIA GPU).

Strongly typed networks: precision comes from the graph (fp16/bf16 casts and Q/DQ nodes), never
from builder flags - TensorRT 11 removed those flags and TensorRT 10 honours the explicit types
only in strongly typed mode. Optimization profiles come from ``devices.profiles``; a timing cache
is kept beside the engines so rebuilds are fast.
"""

from __future__ import annotations

import logging
from pathlib import Path

from qvl_export.building.devices import Profile
from qvl_export.errors import QvlError

log = logging.getLogger(__name__)

TIMING_CACHE = "timing.cache"


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


def gpu_compute_capability() -> tuple[int, int] | None:
    """Compute capability of GPU 0 through the CUDA runtime (cuda-python), or None without a GPU."""
    try:
        from qvl_export.runtimes.cuda import cudart_call, get_cudart
    except ImportError:
        return None
    cudart = get_cudart()
    if cudart is None:
        return None
    try:
        count = cudart_call(cudart.cudaGetDeviceCount())
        if not count:
            return None
        props = cudart_call(cudart.cudaGetDeviceProperties(0))
        return int(props.major), int(props.minor)
    except Exception:  # no driver / no device
        return None


def build_engine(onnx_path: Path, engine_path: Path, profiles: list[Profile], workspace_gb: float = 4.0,
                 timing_cache: Path | None = None) -> dict:
    """Parse ``onnx_path`` into a strongly typed network and write the serialized engine."""
    trt, sm = require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    major = int(trt.__version__.split(".")[0])
    if major < 11 and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)  # always on from 11
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise QvlError(f"TensorRT could not parse {onnx_path.name}: {errors[:500]}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    for prof in profiles:
        p = builder.create_optimization_profile()
        for name, (lo, opt, hi) in prof.shapes.items():
            p.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(p)
    cache_bytes = timing_cache.read_bytes() if timing_cache and timing_cache.exists() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    log.info("building %s (%d profile(s))", engine_path.name, len(profiles))
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise QvlError(f"TensorRT failed to build {engine_path.name}; rerun with --verbose for its log.")
    engine_path.write_bytes(bytes(serialized))
    if timing_cache is not None:
        timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    return {"engine": engine_path.name, "tensorrt": trt.__version__, "compute_capability": f"{sm[0]}.{sm[1]}",
            "profiles": [p.name for p in profiles]}
