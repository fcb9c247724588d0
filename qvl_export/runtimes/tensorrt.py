"""TensorRT backend of the thin runtime (GPU only): same interface as the onnxruntime backend.

Engines are loaded from the artifacts folder named by the manifest; device buffers are allocated
once per tensor and grown only when a larger shape arrives; the decoder picks its prefill or
decode optimization profile from the cache length. Imports tensorrt and cuda-python only.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from qvl_export.errors import QvlError
from qvl_export.manifest import Manifest
from qvl_export.runtimes.cuda import DeviceBuffer, cudart_call, get_cudart

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
        self.dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        self.buffers = {n: DeviceBuffer(cudart) for n in names}
        self.num_profiles = self.engine.num_optimization_profiles
        self.profile = 0


class TrtBackend:
    name = "tensorrt"

    def __init__(self, folder: str | Path, manifest: Manifest):
        from qvl_export.building.trt import check_engine_compatibility

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
                ctx.set_optimization_profile_async(want, self.stream)
                e.profile = want
        for name in e.inputs:
            arr = np.ascontiguousarray(feeds[name], dtype=e.dtypes[name])
            ctx.set_input_shape(name, arr.shape)
            ctx.set_tensor_address(name, e.buffers[name].upload(arr, self.stream))
        outs = {}
        for name in e.outputs:
            shape = tuple(ctx.get_tensor_shape(name))
            out = np.empty(shape, dtype=e.dtypes[name])
            ctx.set_tensor_address(name, e.buffers[name].ensure(out.nbytes))
            outs[name] = out
        if not ctx.execute_async_v3(self.stream):
            raise RuntimeError(f"TensorRT failed to run the {part} engine")
        for name, out in outs.items():
            e.buffers[name].download(out, self.stream)
        cudart_call(self.cudart.cudaStreamSynchronize(self.stream))
        return [outs[name] for name in self.order[part]]  # manifest order, as onnxruntime returns
