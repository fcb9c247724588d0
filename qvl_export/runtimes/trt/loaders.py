"""TensorRT loaders, Polygraphy-style: cheap callables that record their configuration when made and
do the work when called, so they chain::

    settings = engine_settings("int8", profiles(spec, "decoder", ranges), trt_major(trt.__version__))
    data = EngineBytesFromNetwork(NetworkFromOnnxPath("decoder.onnx", settings), settings, timing_cache)()
    engine = EngineFromBytes(data)()          # or EngineFromPath("decoder.engine")()

Names read ``<Target>From<Source>``. ``tensorrt`` is imported when a loader is called, never at
import time: this module imports on a machine without TensorRT (the build machine, CI). There is no
``SaveEngine``: engine files are written by the ``ArtifactStore`` of the folder they belong to.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from qvl_export.core.errors import QvlError
from qvl_export.runtimes.trt.cuda import gpu_compute_capability
from qvl_export.runtimes.trt.settings import EngineSettings

log = logging.getLogger(__name__)

NO_TENSORRT = "TensorRT engines need the tensorrt Python package and an NVIDIA GPU; {what} here. "
ELSEWHERE = ("Build with --bundle and run 'qvl-export engine BUNDLE' on the target device (JetPack ships TensorRT; "
             "'pip install cuda-python' adds the CUDA bindings).")
ON_DEVICE = ("Run this on the machine with the GPU, with TensorRT (Jetson: JetPack's python3-libnvinfer; x86: pip "
             "install tensorrt) and cuda-python (pip install cuda-python) installed.")


def require_tensorrt(on_device: bool = False):
    """(tensorrt module, (major, minor) compute capability); a one-line error without GPU or TensorRT.
    ``on_device``: the command already runs where the engines belong (``qvl-export engine``)."""
    advice = ON_DEVICE if on_device else ELSEWHERE
    try:
        import tensorrt as trt
    except ImportError:
        raise QvlError(NO_TENSORRT.format(what="the tensorrt package is not installed") + advice) from None
    sm = gpu_compute_capability()
    if sm is None:
        raise QvlError(NO_TENSORRT.format(what="no NVIDIA GPU is visible (or cuda-python is missing)") + advice)
    return trt, sm


_PROCESS: dict[str, object] = {}  # one logger and one runtime per process, kept alive as long as engines


def _logger(trt):
    if "logger" not in _PROCESS:
        _PROCESS["logger"] = trt.Logger(trt.Logger.WARNING)
    return _PROCESS["logger"]


def _runtime(trt):
    if "runtime" not in _PROCESS:
        _PROCESS["runtime"] = trt.Runtime(_logger(trt))
    return _PROCESS["runtime"]


def _call(x):
    """Loaders accept either a value or a loader that produces it."""
    return x() if callable(x) else x


@dataclass
class Network:
    """What ``NetworkFromOnnxPath`` produces: the builder, the parsed network and its parser (kept
    alive together: the network refers to the parser's weights)."""

    builder: object
    network: object
    parser: object
    source: str


class NetworkFromOnnxPath:
    """Parse an ONNX file (external data beside it) into a network, strongly typed when the settings say."""

    def __init__(self, path: str | Path, settings: EngineSettings):
        self.path = Path(path)
        self.settings = settings

    def __call__(self) -> Network:
        trt, _ = require_tensorrt()
        builder = trt.Builder(_logger(trt))
        flags = 0
        if self.settings.strongly_typed_flag:
            flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
            if flag is None:
                raise QvlError(f"TensorRT {trt.__version__} has no strongly typed networks; install TensorRT 10 or "
                               "newer (JetPack 6.1+).")
            flags |= 1 << int(flag)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, _logger(trt))
        if not parser.parse_from_file(str(self.path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise QvlError(f"TensorRT could not parse {self.path.name}: {errors[:500]}. The bundle was linted for "
                           "TensorRT 10's parser; an older TensorRT may lack an operator.")
        return Network(builder, network, parser, self.path.name)


def create_config(trt, builder, network, settings: EngineSettings):
    """Apply ``settings`` to a new builder config - nothing is decided here. Every TensorRT call that
    reports failure by its return value is checked."""
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_bytes)
    tf32 = getattr(trt.BuilderFlag, "TF32", None)
    if tf32 is not None:
        if settings.tf32:
            config.set_flag(tf32)
        else:
            config.clear_flag(tf32)
    inputs = {network.get_input(i).name for i in range(network.num_inputs)}
    for prof in settings.profiles:
        p = builder.create_optimization_profile()
        for name, (lo, opt, hi) in prof.shapes.items():
            if name not in inputs:  # e.g. an input a pass removed: say so rather than build a wrong profile
                raise QvlError(f"The {prof.name} profile names input {name!r}, which the network lacks "
                               f"(inputs: {', '.join(sorted(inputs))}); rebuild the bundle with this qvl-export.")
            p.set_shape(name, lo, opt, hi)
        if config.add_optimization_profile(p) < 0:
            raise QvlError(f"TensorRT rejected the {prof.name} optimization profile: {prof.shapes}")
    return config


class EngineBytesFromNetwork:
    """Build a serialized engine (bytes) from a network with ``settings`` applied; the timing cache
    (bytes, or None) is read from ``timing_cache`` and the updated one handed to ``save_timing_cache``."""

    def __init__(self, network: Network | Callable[[], Network], settings: EngineSettings,
                 timing_cache: bytes | None = None, save_timing_cache: Callable[[bytes], None] | None = None):
        self.network = network
        self.settings = settings
        self.timing_cache = timing_cache
        self.save_timing_cache = save_timing_cache

    def __call__(self) -> bytes:
        trt, _ = require_tensorrt()
        net = _call(self.network)
        config = create_config(trt, net.builder, net.network, self.settings)
        cache = config.create_timing_cache(self.timing_cache or b"")
        if not config.set_timing_cache(cache, ignore_mismatch=False):
            log.warning("the timing cache of another TensorRT / GPU was ignored")
            config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
        log.info("building %s: %s", net.source, self.settings.describe())
        serialized = net.builder.build_serialized_network(net.network, config)
        if serialized is None:
            raise QvlError(f"TensorRT failed to build the engine of {net.source}; rerun with --verbose for its log "
                           "(out of memory on a Jetson: add swap or lower --max-seq).")
        if self.save_timing_cache is not None:
            self.save_timing_cache(bytes(config.get_timing_cache().serialize()))
        return bytes(serialized)


class EngineFromBytes:
    """Deserialize an engine (bytes, or a loader of bytes)."""

    def __init__(self, data: bytes | Callable[[], bytes], name: str = "engine"):
        self.data = data
        self.name = name

    def __call__(self):
        trt, _ = require_tensorrt()
        try:
            engine = _runtime(trt).deserialize_cuda_engine(_call(self.data))
        except Exception as err:
            raise QvlError(f"TensorRT could not load {self.name} ({err}); rebuild it with 'qvl-export engine'.") \
                from None
        if engine is None:
            raise QvlError(f"TensorRT could not load {self.name} (built by another TensorRT or GPU?); rebuild it here "
                           "with 'qvl-export engine'.")
        return engine


class EngineFromPath(EngineFromBytes):
    """Deserialize an engine file."""

    def __init__(self, path: str | Path):
        path = Path(path)
        super().__init__(path.read_bytes, path.name)


class EngineFromNetwork(EngineFromBytes):
    """Build and deserialize in one (the engine stays in memory; nothing is written)."""

    def __init__(self, network, settings: EngineSettings, timing_cache: bytes | None = None):
        super().__init__(EngineBytesFromNetwork(network, settings, timing_cache), "engine")
