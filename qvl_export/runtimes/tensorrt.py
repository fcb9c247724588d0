"""TensorRT backend of the thin runtime (GPU only): same interface as the onnxruntime backend.

Engines are loaded from the artifacts folder named by the manifest; device buffers are allocated
once per tensor and grown only when a larger shape arrives; the decoder picks its prefill or
decode optimization profile from the cache length. Imports tensorrt and cuda-python only.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np

from qvl_export.core.errors import QvlError
from qvl_export.core.manifest import Manifest
from qvl_export.runtimes.cuda import DeviceBuffer, cudart_call, get_cudart, gpu_compute_capability

log = logging.getLogger(__name__)


class _Engine:
    def __init__(self, trt, runtime, path: Path, cudart):
        try:
            self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        except Exception as err:
            raise QvlError(f"TensorRT could not load {path.name} ({err}); rebuild it with 'qvl-export engine'.") \
                from None
        if self.engine is None:
            raise QvlError(f"TensorRT could not load {path.name} (built by another TensorRT or GPU?); rebuild it "
                           "here with 'qvl-export engine'.")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.dtypes = {n: numpy_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}
        self.buffers = {n: DeviceBuffer(cudart) for n in names}
        self.num_profiles = self.engine.num_optimization_profiles
        self.profile = 0


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
    if dtype == trt.DataType.BF16:
        try:
            import ml_dtypes
        except ImportError:
            raise QvlError("bf16 engine inputs need the ml-dtypes package (pip install ml-dtypes).") from None
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(trt.nptype(dtype))


def _checked(ok, what: str) -> None:
    """TensorRT's setters return False instead of raising; say which one failed and why it may have."""
    if ok is False:
        raise QvlError(f"TensorRT refused {what}: outside the engine's optimization profile? The ranges the "
                       "engines were built for are in trt_build.json; rebuild with wider --engine-* / --max-* "
                       "ranges.")


class TrtBackend:
    name = "tensorrt"

    def __init__(self, folder: str | Path, manifest: Manifest):
        check_engine_compatibility(manifest)
        import tensorrt as trt

        self.cudart = get_cudart()
        if self.cudart is None:
            raise QvlError("The TensorRT runtime needs cuda-python (pip install cuda-python).")
        self.stream = cudart_call(self.cudart.cudaStreamCreate())
        self.logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(self.logger)
        self.folder = Path(folder)
        self.engines = {}
        for name, part in manifest.parts.items():
            if not part.engine:
                raise QvlError(f"{name} has no engine in {folder}; run 'qvl-export engine {folder}'.")
            self.engines[name] = _Engine(trt, runtime, self.folder / part.engine, self.cudart)
        self.order = {name: [t.name for t in part.outputs] for name, part in manifest.parts.items()}

    def run(self, part: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        e = self.engines[part]
        ctx = e.context
        if e.num_profiles > 1:  # decoder: profile 0 = prefill (empty cache), 1 = decode
            past = next((a for n, a in feeds.items() if n.startswith("past_key_values.")), None)
            want = 1 if past is not None and past.shape[2] > 0 else 0
            if want != e.profile:
                _checked(ctx.set_optimization_profile_async(want, self.stream), f"{part} profile {want}")
                e.profile = want
        for name in e.inputs:
            arr = np.ascontiguousarray(feeds[name], dtype=e.dtypes[name])
            _checked(ctx.set_input_shape(name, arr.shape), f"{part} input {name} of shape {arr.shape}")
            _checked(ctx.set_tensor_address(name, e.buffers[name].upload(arr, self.stream)), f"{part} {name} address")
        outs = {}
        for name in e.outputs:
            shape = tuple(ctx.get_tensor_shape(name))
            out = np.empty(shape, dtype=e.dtypes[name])
            _checked(ctx.set_tensor_address(name, e.buffers[name].ensure(out.nbytes)), f"{part} {name} address")
            outs[name] = out
        if not ctx.execute_async_v3(self.stream):
            raise RuntimeError(f"TensorRT failed to run the {part} engine")
        for name, out in outs.items():
            e.buffers[name].download(out, self.stream)
        cudart_call(self.cudart.cudaStreamSynchronize(self.stream))
        return [outs[name] for name in self.order[part]]  # manifest order, as onnxruntime returns
