"""The TensorRT backend's device memory on a real GPU, without TensorRT: device buffers, and the
device-resident KV cache driven through a real CUDA stream.

TensorRT's execution context is replaced by ``ConcatContext``, which does on the device what the trt
target's decoder graph does to the cache (``present = Concat(past, new rows)``, device-to-device copies
on the runner's stream) and reads its ``input_ids`` back from the device address it was bound to. So
every pointer, offset, byte count, ping-pong swap and stream order of our code meets real CUDA memory;
only the engine's arithmetic is not TensorRT's. Run with ``python -m pytest -m cuda`` on a GPU machine.
"""

from __future__ import annotations

import numpy as np
import pytest

from qvl_export.runtimes.trt.cuda import DeviceBuffer, cudart_call, get_cudart
from qvl_export.runtimes.trt.kv_cache import DeviceKVCache, KVBuffers, kv_names
from qvl_export.runtimes.trt.runner import EngineIO, TrtRunner
from tests.runtimes.trt.test_trt_kv_cache import HEAD_DIM, HEADS, HIDDEN, LAYERS, VOCAB, FakeContext

pytestmark = pytest.mark.cuda


@pytest.fixture()
def cuda():
    cudart = get_cudart()
    stream = cudart_call(cudart.cudaStreamCreate())
    yield cudart, stream
    cudart_call(cudart.cudaStreamSynchronize(stream))
    cudart.cudaStreamDestroy(stream)


def new_row(token: int, layer: int, kind: int) -> np.ndarray:
    """The K or V row [HEADS, HEAD_DIM] the emulated engine writes for ``token`` (exact in fp16)."""
    return (token * 16 + layer * 4 + kind * 2 + np.arange(HEADS * HEAD_DIM).reshape(HEADS, HEAD_DIM) % 2
            ).astype(np.float16)


def next_token(token: int) -> int:
    return (token * 7 + 3) % VOCAB


class ConcatContext(FakeContext):
    """On the device: present = Concat(past, new rows) per (sequence, head); logits peak at next_token.
    Shapes and addresses are recorded as the unit tests' fake context records them."""

    def __init__(self, cudart, stream):
        super().__init__()
        self.cudart, self.stream = cudart, stream
        self.d2d = cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice
        self.h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        self.d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self.kept = []

    def _copy(self, dst, src, nbytes, kind):
        cudart_call(self.cudart.cudaMemcpyAsync(dst, src, nbytes, kind, self.stream))

    def execute_async_v3(self, stream):
        assert stream == int(self.stream)
        b, t = self.shapes["input_ids"]
        ids = np.empty((b, t), np.int64)  # read back from where the runner bound it
        self._copy(ids.ctypes.data, self.addresses["input_ids"], ids.nbytes, self.d2h)
        cudart_call(self.cudart.cudaStreamSynchronize(self.stream))
        row = HEAD_DIM * 2  # fp16 bytes of one row
        for layer in range(LAYERS):
            for kind, name in enumerate(("key", "value")):
                _, heads, past_len, _ = self.shapes[f"past_key_values.{layer}.{name}"]
                src, dst = self.addresses[f"past_key_values.{layer}.{name}"], self.addresses[f"present.{layer}.{name}"]
                for s in range(b):
                    new = np.stack([new_row(int(tok), layer, kind) for tok in ids[s]], axis=1)  # [H, T, D]
                    new = np.ascontiguousarray(new)
                    self.kept.append(new)
                    for h in range(heads):
                        src_off = ((s * heads + h) * past_len) * row
                        dst_off = ((s * heads + h) * (past_len + t)) * row
                        if past_len:
                            self._copy(dst + dst_off, src + src_off, past_len * row, self.d2d)
                        self._copy(dst + dst_off + past_len * row, new[h].ctypes.data, t * row, self.h2d)
        logits = np.full((b, t, VOCAB), -1.0, np.float32)
        for s in range(b):
            for i, tok in enumerate(ids[s]):
                logits[s, i, next_token(int(tok))] = 5.0 + s
        self.kept.append(logits)
        self._copy(self.addresses["logits"], logits.ctypes.data, logits.nbytes, self.h2d)
        self.runs += 1
        return True


def decoder(cudart, stream, max_batch=1, max_seq=64):
    names = kv_names(LAYERS)
    inputs = ("input_ids", "image_embeds", "position_ids", *(p for p, _ in names))
    outputs = ("logits", *(q for _, q in names))
    dtypes = {n: np.dtype(np.float16) for n in (*inputs, *outputs)}
    dtypes.update(input_ids=np.dtype(np.int64), position_ids=np.dtype(np.int64), logits=np.dtype(np.float32))
    engine = type("Engine", (), {"num_optimization_profiles": 2})()
    runner = TrtRunner("decoder", engine, EngineIO(inputs, outputs, dtypes), cudart, stream,
                       context=ConcatContext(cudart, stream))
    return runner, KVBuffers(cudart, names, HEADS, HEAD_DIM, np.float16, max_batch, max_seq)


def cache_on_device(runner: TrtRunner, kv: KVBuffers, layer: int, kind: int) -> np.ndarray:
    """The valid rows of one past tensor, copied back from the device."""
    out = np.empty(kv.shape(kv.length), np.float16)
    kv.buffers[2 * layer + kind][kv.current].download(out, runner.stream)
    runner.synchronize()
    return out


def test_device_buffer_round_trip_grows_and_downloads_at_an_offset(cuda):
    cudart, stream = cuda
    buf = DeviceBuffer(cudart)
    a = np.arange(1000, dtype=np.float32)
    first = buf.upload(a, stream)
    assert first and buf.nbytes == a.nbytes
    part = np.empty(10, np.float32)
    buf.download(part, stream, offset=100 * 4)
    cudart_call(cudart.cudaStreamSynchronize(stream))
    np.testing.assert_array_equal(part, a[100:110])
    b = np.arange(3000, dtype=np.int64) * 3
    buf.upload(b, stream)  # grows: a new allocation
    assert buf.nbytes == b.nbytes
    back = buf.download(np.empty_like(b), stream)
    cudart_call(cudart.cudaStreamSynchronize(stream))
    np.testing.assert_array_equal(back, b)
    buf.upload(a[:10], stream)  # smaller: same allocation kept
    assert buf.nbytes == b.nbytes
    with pytest.raises(ValueError, match="download"):
        buf.download(np.empty(10, np.float32), stream, offset=b.nbytes)
    buf.free()
    assert buf.ptr == 0


@pytest.mark.parametrize("batch", [1, 2])
def test_greedy_decode_keeps_the_cache_on_the_device(cuda, batch):
    """Prefill, then greedy steps fed from the returned logits: the valid buffer holds every token's rows
    in order (ping-pong swaps and offsets right), and each step's logits row is its last position's."""
    cudart, stream = cuda
    runner, kv = decoder(cudart, stream, max_batch=batch)
    cache = DeviceKVCache(runner, kv, batch=batch)
    prompt = np.asarray([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]][:batch], np.int64)
    tokens = [list(p) for p in prompt]
    logits = cache.step(prompt, np.zeros((2, HIDDEN), np.float32), np.zeros((3, batch, 5), np.int64))
    for _ in range(4):
        assert logits.shape == (batch, VOCAB)
        step = np.argmax(logits, axis=1)
        for s in range(batch):
            assert step[s] == next_token(tokens[s][-1]) and logits[s, step[s]] == 5.0 + s
            tokens[s].append(int(step[s]))
        logits = cache.step(step[:, None].astype(np.int64), np.zeros((0, HIDDEN), np.float32),
                            np.zeros((3, batch, 1), np.int64))
    assert cache.length == 9 and runner.profile == 1
    for layer in range(LAYERS):
        for kind in (0, 1):
            got = cache_on_device(runner, kv, layer, kind)  # [B, H, 9, D]
            for s in range(batch):
                want = np.stack([new_row(t, layer, kind) for t in tokens[s]], axis=1)
                np.testing.assert_array_equal(got[s], want)
    runner.free()
    kv.free()
