"""The TensorRT decoder's device-resident KV cache: buffer bookkeeping only.

A fake ``cudart`` (records mallocs and copies) and a fake execution context (records shapes and
addresses, computes output shapes as the concat decoder graph would) stand in for CUDA and
TensorRT. This tests OUR bookkeeping - which buffer each past/present tensor is bound to, the pointer
swaps, what is copied per step - not TensorRT; the GPU tests run the real engines.
"""

from __future__ import annotations

import types

import numpy as np
import pytest

from qvl_export.core.errors import QvlError
from qvl_export.runtimes.trt.kv_cache import DeviceKVCache, KVBuffers, kv_names
from qvl_export.runtimes.trt.runner import EngineIO, TrtRunner

LAYERS, HEADS, HEAD_DIM, VOCAB, HIDDEN = 2, 2, 4, 11, 8
H2D, D2H = "h2d", "d2h"


class FakeCudart:
    cudaMemcpyKind = types.SimpleNamespace(cudaMemcpyHostToDevice=H2D, cudaMemcpyDeviceToHost=D2H)

    def __init__(self):
        self.next_ptr = 0x1000
        self.mallocs, self.copies, self.frees = [], [], []

    def cudaMalloc(self, nbytes):
        ptr = self.next_ptr
        self.next_ptr += nbytes + 0x1000
        self.mallocs.append((ptr, nbytes))
        return (0, ptr)

    def cudaFree(self, ptr):
        self.frees.append(ptr)
        return (0,)

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):
        self.copies.append((kind, nbytes, dst if kind == H2D else src))
        return (0,)

    def cudaStreamSynchronize(self, stream):
        return (0,)


class FakeContext:
    """Output shapes as the plain decoder graph gives them: logits [B, T, V], present = past + T rows."""

    def __init__(self):
        self.shapes, self.addresses, self.profiles, self.runs = {}, {}, [], 0

    def set_optimization_profile_async(self, index, stream):
        self.profiles.append(index)
        return True

    def set_input_shape(self, name, shape):
        if name.startswith("past_key_values.") and shape[2] > 64:
            return False  # outside the profile
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr
        return True

    def get_tensor_shape(self, name):
        b, t = self.shapes["input_ids"]
        if name == "logits":
            return (b, t, VOCAB)
        past = self.shapes[name.replace("present", "past_key_values")]
        return (past[0], past[1], past[2] + t, past[3])

    def execute_async_v3(self, stream):
        self.runs += 1
        return True


def make(max_seq=64, max_batch=1):
    cudart = FakeCudart()
    names = kv_names(LAYERS)
    inputs = ("input_ids", "image_embeds", "position_ids", *(p for p, _ in names))
    outputs = ("logits", *(q for _, q in names))
    dtypes = {n: np.dtype(np.float16) for n in (*inputs, *outputs)}
    dtypes.update(input_ids=np.dtype(np.int64), position_ids=np.dtype(np.int64), logits=np.dtype(np.float32))
    engine = types.SimpleNamespace(num_optimization_profiles=2)
    runner = TrtRunner("decoder", engine, EngineIO(inputs, outputs, dtypes), cudart, 7, context=FakeContext())
    kv = KVBuffers(cudart, names, HEADS, HEAD_DIM, np.float16, max_batch, max_seq)
    return cudart, runner, kv


def feeds(tokens, images=0):
    ids = np.arange(tokens, dtype=np.int64)[None]
    return ids, np.zeros((images, HIDDEN), np.float32), np.zeros((3, 1, tokens), np.int64)


def test_buffers_allocated_once_at_the_engines_maximum():
    cudart, runner, kv = make(max_seq=64)
    per_tensor = 1 * HEADS * 64 * HEAD_DIM * 2
    assert kv.tensor_bytes == per_tensor and kv.nbytes == 2 * 2 * LAYERS * per_tensor
    assert [n for _, n in cudart.mallocs] == [per_tensor] * (2 * 2 * LAYERS)
    DeviceKVCache(runner, kv)
    DeviceKVCache(runner, kv)  # a new cache reuses them
    assert len(cudart.mallocs) == 2 * 2 * LAYERS


def test_prefill_then_decode_swaps_pointers_and_copies_one_token_and_one_logits_row():
    cudart, runner, kv = make()
    ctx = runner.context
    cache = DeviceKVCache(runner, kv)
    ping = {p: pair[0].ptr for (p, _), pair in zip(kv.names, kv.buffers)}
    pong = {p: pair[1].ptr for (p, _), pair in zip(kv.names, kv.buffers)}

    logits = cache.step(*feeds(5, images=3))  # prefill: 5 tokens, 3 image embeddings
    assert logits.shape == (1, VOCAB) and logits.dtype == np.float32
    assert ctx.profiles == [] and runner.profile == 0  # prefill profile (the initial one)
    assert ctx.shapes["past_key_values.0.key"] == (1, HEADS, 0, HEAD_DIM)
    for past, present in kv.names:
        assert ctx.addresses[past] == ping[past] and ctx.addresses[present] == pong[past]
    assert cache.length == 5
    h2d = [n for kind, n, _ in cudart.copies if kind == H2D]
    d2h = [(n, ptr) for kind, n, ptr in cudart.copies if kind == D2H]
    assert h2d == [5 * 8, 3 * HIDDEN * 2, 3 * 5 * 8]  # ids, embeddings (fp16), positions: no K/V
    logits_ptr = runner.buffers["logits"].ptr
    assert d2h == [(VOCAB * 4, logits_ptr + 4 * VOCAB * 4)]  # the last row of [1, 5, V] only

    for step in range(3):
        cudart.copies.clear()
        cache.step(*feeds(1))
        assert runner.profile == 1 and ctx.profiles == [1]  # switched once
        now, other = (pong, ping) if step % 2 == 0 else (ping, pong)
        for past, present in kv.names:  # the present of step N is the past of step N+1, no copy
            assert ctx.addresses[past] == now[past] and ctx.addresses[present] == other[past]
        assert ctx.shapes["past_key_values.1.value"] == (1, HEADS, 5 + step, HEAD_DIM)
        kinds = [(kind, n) for kind, n, _ in cudart.copies]
        assert kinds == [(H2D, 8), (H2D, 3 * 8), (D2H, VOCAB * 4)]  # one token in, one logits row out
        assert cache.length == 6 + step
    assert ctx.runs == 4


def test_limits_and_stale_caches_are_refused():
    _, runner, kv = make(max_seq=8)
    cache = DeviceKVCache(runner, kv)
    cache.step(*feeds(7))
    cache.step(*feeds(1))
    with pytest.raises(QvlError, match="--max-seq"):
        cache.step(*feeds(1))
    fresh = DeviceKVCache(runner, kv)
    with pytest.raises(QvlError, match="newer one"):
        cache.step(*feeds(1))
    assert fresh.length == 0
    fresh.step(*feeds(2))
    with pytest.raises(QvlError, match="one token"):
        fresh.step(*feeds(2))
    with pytest.raises(QvlError, match="--max-batch"):
        DeviceKVCache(runner, kv, batch=2)


def test_a_refused_shape_names_the_input():
    _, runner, kv = make(max_seq=200)
    cache = DeviceKVCache(runner, kv)
    cache.step(*feeds(65))
    with pytest.raises(QvlError, match="past_key_values.0.key of shape"):
        cache.step(*feeds(1))


def test_batched_logits_rows_come_from_each_sequence():
    cudart, runner, kv = make(max_batch=2)
    cache = DeviceKVCache(runner, kv, batch=2)
    ids = np.zeros((2, 3), np.int64)
    cache.step(ids, np.zeros((0, HIDDEN), np.float32), np.zeros((3, 2, 3), np.int64))
    base = runner.buffers["logits"].ptr
    rows = [ptr - base for kind, _, ptr in cudart.copies if kind == D2H]
    assert rows == [2 * VOCAB * 4, 5 * VOCAB * 4]  # [b=0, t=2] and [b=1, t=2] of [2, 3, V]
