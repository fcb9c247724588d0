"""Running TensorRT engines: ``TrtRunner`` (one engine, Polygraphy-style) and ``TrtBackend`` (the thin
runtime's backend, same interface as the onnxruntime one plus a device-resident KV cache).

Imports numpy only at import time; tensorrt and cuda-python when a backend is made. The runner
talks to TensorRT through the execution context's name-based API (TensorRT 10+) and checks every
setter's return value: a shape outside the optimization profile is named instead of surfacing later
as "failed to run".
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qvl_export.core.errors import QvlError
from qvl_export.core.manifest import Manifest
from qvl_export.runtimes.trt.cuda import DeviceBuffer, cudart_call, get_cudart, gpu_compute_capability
from qvl_export.runtimes.trt.kv_cache import DeviceKVCache, KVBuffers, kv_names

log = logging.getLogger(__name__)

# decoder profiles, in the order core.devices.profiles declares them
PREFILL, DECODE = 0, 1


def check_engine_compatibility(manifest: Manifest) -> None:
    """Loading engines built elsewhere fails with a clear error (engines are not portable)."""
    meta = dataclasses.asdict(manifest.tensorrt) if manifest.tensorrt else {}
    try:
        import tensorrt as trt
    except ImportError:
        raise QvlError("These artifacts hold TensorRT engines; install TensorRT on a GPU machine to run them, "
                       "or run the ONNX parts with --backend onnxruntime.") from None
    if meta.get("version") and meta["version"] != trt.__version__:
        raise QvlError(f"The engines were built with TensorRT {meta['version']}, this machine has "
                       f"{trt.__version__}: rebuild them here with 'qvl-export engine'.")
    sm = gpu_compute_capability()
    want = meta.get("compute_capability")
    if want and sm is not None and want != f"{sm[0]}.{sm[1]}":
        raise QvlError(f"The engines were built for SM {want}, this GPU is SM {sm[0]}.{sm[1]}: rebuild them "
                       "here with 'qvl-export engine'.")


def numpy_dtype(trt, dtype) -> np.dtype:
    """numpy dtype of a TensorRT tensor type; bf16 through ml_dtypes (``trt.nptype`` has no bfloat16)."""
    if dtype == getattr(trt.DataType, "BF16", object()):
        try:
            import ml_dtypes
        except ImportError:
            raise QvlError("bf16 engine inputs need the ml-dtypes package (pip install ml-dtypes).") from None
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(trt.nptype(dtype))


def checked(ok, what: str) -> None:
    """TensorRT's setters return False instead of raising; say which one failed and why it may have."""
    if ok is False:
        raise QvlError(f"TensorRT refused {what}: outside the engine's optimization profile? The ranges the "
                       "engines were built for are in the manifest's 'tensorrt.ranges' (and trt_build.json); "
                       "rebuild with wider --engine-* / --max-* ranges.")


@dataclass(frozen=True)
class EngineIO:
    """An engine's input and output names (engine order) and their numpy dtypes."""

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    dtypes: dict[str, np.dtype]

    @classmethod
    def of(cls, trt, engine) -> EngineIO:
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = tuple(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        outputs = tuple(n for n in names if n not in inputs)
        return cls(inputs, outputs, {n: numpy_dtype(trt, engine.get_tensor_dtype(n)) for n in names})


class TrtRunner:
    """One engine's execution context, its device buffers (one per tensor, grown only when a larger
    shape arrives) and its stream.

    ``engine`` and ``context`` are TensorRT's objects (duck-typed: the unit tests pass fakes);
    ``stream`` is a cuda-python stream, given to TensorRT as its integer handle."""

    def __init__(self, name: str, engine, io: EngineIO, cudart, stream, context=None):
        self.name = name
        self.engine = engine
        self.io = io
        self.cudart = cudart
        self.stream = stream
        self.context = context if context is not None else engine.create_execution_context()
        if self.context is None:
            raise QvlError(f"TensorRT could not create an execution context for the {name} engine (out of GPU "
                           "memory?).")
        self.buffers = {n: DeviceBuffer(cudart) for n in (*io.inputs, *io.outputs)}
        self.num_profiles = int(getattr(engine, "num_optimization_profiles", 1))
        self.profile = 0

    # -- binding ---------------------------------------------------------------------------------
    def select_profile(self, index: int) -> None:
        if index != self.profile:
            if index >= self.num_profiles:
                raise QvlError(f"The {self.name} engine has {self.num_profiles} optimization profile(s), not "
                               f"{index + 1}; rebuild it with 'qvl-export engine'.")
            checked(self.context.set_optimization_profile_async(index, int(self.stream)),
                    f"{self.name} optimization profile {index}")
            self.profile = index

    def upload(self, name: str, array: np.ndarray) -> np.ndarray:
        """Host -> device copy of input ``name`` (cast to the engine's dtype), then bind it."""
        arr = np.ascontiguousarray(array, dtype=self.io.dtypes[name])
        self.bind_input(name, self.buffers[name].upload(arr, self.stream), arr.shape)
        return arr  # keep alive until the stream syncs (the copy is asynchronous)

    def bind_input(self, name: str, ptr: int, shape: tuple[int, ...]) -> None:
        """Bind input ``name`` to device memory that already holds it (no copy)."""
        checked(self.context.set_input_shape(name, tuple(int(s) for s in shape)),
                f"{self.name} input {name} of shape {tuple(shape)}")
        checked(self.context.set_tensor_address(name, int(ptr)), f"{self.name} {name} address")

    def output_shape(self, name: str) -> tuple[int, ...]:
        shape = tuple(int(s) for s in self.context.get_tensor_shape(name))
        if any(s < 0 for s in shape):
            raise QvlError(f"TensorRT cannot infer the shape of {self.name} output {name} ({shape}): an input shape "
                           "is missing or outside the profile.")
        return shape

    def bind_output(self, name: str, ptr: int | None = None) -> tuple[int, ...]:
        """Bind output ``name`` to ``ptr`` (device memory the caller owns) or to this runner's buffer."""
        shape = self.output_shape(name)
        if ptr is None:
            nbytes = int(np.prod(shape, dtype=np.int64)) * self.io.dtypes[name].itemsize
            ptr = self.buffers[name].ensure(nbytes)
        checked(self.context.set_tensor_address(name, int(ptr)), f"{self.name} {name} address")
        return shape

    def execute(self) -> None:
        if not self.context.execute_async_v3(int(self.stream)):
            raise QvlError(f"TensorRT failed to run the {self.name} engine (its log above says why); rerun with "
                           "--verbose.")

    def synchronize(self) -> None:
        cudart_call(self.cudart.cudaStreamSynchronize(self.stream))

    # -- host in, host out -----------------------------------------------------------------------
    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every input uploaded, every output downloaded (vision, merger; the decoder's generic path)."""
        missing = [n for n in self.io.inputs if n not in feeds]
        if missing:
            raise QvlError(f"The {self.name} engine needs input {missing[0]}, which was not given.")
        kept = [self.upload(n, feeds[n]) for n in self.io.inputs]
        outs = {}
        for name in self.io.outputs:
            outs[name] = np.empty(self.bind_output(name), dtype=self.io.dtypes[name])
        self.execute()
        for name, out in outs.items():
            self.buffers[name].download(out, self.stream)
        self.synchronize()
        del kept
        return outs

    def free(self) -> None:
        for buf in self.buffers.values():
            buf.free()


class TrtBackend:
    """The thin runtime's TensorRT backend.

    ``run(part, feeds)`` returns the part's outputs in manifest order, as the onnxruntime backend does.
    ``new_cache(batch, capacity)`` returns a ``DeviceKVCache``: the pipeline then calls its ``step``
    instead of ``run`` for the decoder, and K/V never leave the device (see ``kv_cache``)."""

    name = "tensorrt"

    def __init__(self, folder: str | Path, manifest: Manifest):
        check_engine_compatibility(manifest)
        import tensorrt as trt

        from qvl_export.runtimes.trt.loaders import EngineFromPath

        self.cudart = get_cudart()
        if self.cudart is None:
            raise QvlError("The TensorRT runtime needs cuda-python (pip install cuda-python).")
        self.stream = cudart_call(self.cudart.cudaStreamCreate())
        self.folder = Path(folder)
        self.manifest = manifest
        self.runners: dict[str, TrtRunner] = {}
        for name, part in manifest.parts.items():
            if not part.engine:
                raise QvlError(f"{name} has no engine in {folder}; run 'qvl-export engine {folder}'.")
            engine = EngineFromPath(self.folder / part.engine)()
            self.runners[name] = TrtRunner(name, engine, EngineIO.of(trt, engine), self.cudart, self.stream)
        self.order = {name: [t.name for t in part.outputs] for name, part in manifest.parts.items()}
        self._kv: KVBuffers | None = None

    def run(self, part: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        runner = self.runners[part]
        if runner.num_profiles > 1:  # decoder: prefill (empty cache) or decode
            past = next((a for n, a in feeds.items() if n.startswith("past_key_values.")), None)
            runner.select_profile(DECODE if past is not None and past.shape[2] > 0 else PREFILL)
        outs = runner.infer(feeds)
        return [outs[name] for name in self.order[part]]

    def new_cache(self, batch: int = 1, capacity: int = 0) -> DeviceKVCache:
        """An empty device-resident KV cache. The buffers are allocated once, at the engines' maximum
        (``tensorrt.ranges``: max_batch x max_seq), and reused by the next cache: one cache is live at
        a time, and an older one refuses to step."""
        ranges = self.manifest.tensorrt.ranges if self.manifest.tensorrt else {}
        max_seq, max_batch = int(ranges.get("max_seq", 0)), int(ranges.get("max_batch", 1))
        if not max_seq:
            raise QvlError("The manifest records no tensorrt.ranges.max_seq; rebuild the engines with this "
                           "qvl-export ('qvl-export engine').")
        if capacity > max_seq or batch > max_batch:
            raise QvlError(f"A cache of {batch} x {capacity} tokens exceeds the engines' {max_batch} x {max_seq} "
                           "(--max-batch / --max-seq at build time).")
        runner = self.runners["decoder"]
        if self._kv is None:
            t = self.manifest.spec.text
            self._kv = KVBuffers(self.cudart, kv_names(t.num_hidden_layers), t.num_key_value_heads, t.head_dim,
                                 runner.io.dtypes["past_key_values.0.key"], max_batch, max_seq)
        return DeviceKVCache(runner, self._kv, batch, logits=self.order["decoder"][0])
