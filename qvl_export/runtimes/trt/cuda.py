"""Minimal CUDA runtime access through cuda-python (no torch): device buffers and copies.

Every CUDA call goes through a ``cudart`` object (cuda-python's runtime module), passed in, so the
buffer bookkeeping can be unit-tested with a fake that records calls.
"""

from __future__ import annotations

import numpy as np


def get_cudart():
    """The cudart module of cuda-python (new or old layout), or None when it is not installed."""
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError:
            return None
    return cudart


def gpu_compute_capability() -> tuple[int, int] | None:
    """Compute capability of GPU 0 through the CUDA runtime (cuda-python), or None without a GPU."""
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


def cudart_call(result):
    """Unwrap cuda-python's (err, *values) tuples; raise on a CUDA error."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RuntimeError(f"CUDA error {err}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


class DeviceBuffer:
    """A growable device allocation; ``ensure(nbytes)`` reallocates only when it must grow."""

    def __init__(self, cudart):
        self.cudart = cudart
        self.ptr = 0
        self.nbytes = 0

    def ensure(self, nbytes: int) -> int:
        if nbytes > self.nbytes:
            self.free()
            self.ptr = int(cudart_call(self.cudart.cudaMalloc(max(nbytes, 256))))
            self.nbytes = max(nbytes, 256)
        return self.ptr

    def upload(self, array: np.ndarray, stream) -> int:
        """Copy ``array`` to the device (asynchronously: keep ``array`` alive until the stream syncs)."""
        array = np.ascontiguousarray(array)
        ptr = self.ensure(array.nbytes)
        if array.nbytes:
            cudart_call(self.cudart.cudaMemcpyAsync(ptr, array.ctypes.data, array.nbytes,
                                                    self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, stream))
        return ptr

    def download(self, out: np.ndarray, stream, offset: int = 0) -> np.ndarray:
        """Copy ``out.nbytes`` bytes from ``offset`` bytes into the buffer to the contiguous ``out``."""
        if offset + out.nbytes > self.nbytes:
            raise ValueError(f"download of {out.nbytes} bytes at {offset} from a {self.nbytes}-byte buffer")
        if out.nbytes:
            cudart_call(self.cudart.cudaMemcpyAsync(out.ctypes.data, self.ptr + offset, out.nbytes,
                                                    self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream))
        return out

    def free(self) -> None:
        if self.ptr:
            self.cudart.cudaFree(self.ptr)
            self.ptr, self.nbytes = 0, 0

    def __del__(self):
        try:
            self.free()
        except Exception:
            pass
