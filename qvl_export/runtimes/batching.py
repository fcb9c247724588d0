"""Continuous batching: several sequences in one decoder run, rows joining and leaving between steps.

Each request is prepared and prefilled on its own (its images and videos through the vision and
merger graphs, its prompt through the decoder with batch 1), straight into its slot of a pool of
KV buffers; then every running sequence advances one token per batched decode step::

    input_ids [n, 1]             the token each row chose last
    position_ids [3, n, 1]       per row: its KV length + its own rope delta (M-RoPE in decode is 1-D)
    seqlens_k [n] int32          per row: its KV length (valid rows after the step - 1)
    total_sequence_length []     max over the rows of KV length + 1
    past_key_values.{i}.* [n, kv, C, hd]  the first n slots of the pool, updated in place

This is the decoder of an ort-target build (``passes/fuse_decoder_attention.py``): GroupQueryAttention
reads row b's first ``seqlens_k[b] + 1`` cache rows and writes its new K/V at row ``seqlens_k[b]``, so
rows of different lengths share a step with no padding and no mask; the rows past a sequence's length
are never read. A one-token step with per-row ``seqlens_k`` is the case onnxruntime's GQA kernel
takes at batch > 1 (a multi-token step on a filled cache needs batch 1, which is why the prefill is per
request). The concat-KV decoder (trt target, builds without the fusions) would need the cache padded
to a common length and masked; it is refused above batch 1 (``max_batch=1`` runs it one sequence at a
time through the same loop).

Rows are kept contiguous: a finished row's slot is filled with the last row (its valid K/V rows are
copied, once), so a step of n sequences binds exactly the pool's first n slots - no idle rows are
computed - and a new request takes slot n. Every row chooses its tokens through its own
``pipeline.Decoding`` (settings, seeded generator, repetition history), as ``Pipeline.generate`` does.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from qvl_export.core.errors import QvlError
from qvl_export.runtimes import indexing
from qvl_export.runtimes.pipeline import KV_BUFFER, Decoding, Generation, KVCache, Pipeline, Prepared

log = logging.getLogger(__name__)


class KVPool:
    """``slots`` sequences' KV buffers of ``capacity`` rows: one array [slots, kv_heads, C, head_dim] per
    layer and key/value (key, value, key, value, ...). A slot's view and the first n slots are C-contiguous,
    so the backend binds them in place (``onnxrt.run_in_place``)."""

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, dtype, slots: int, capacity: int):
        self.slots, self.capacity = int(slots), int(capacity)
        self.arrays = [np.zeros((self.slots, kv_heads, self.capacity, head_dim), dtype=dtype)
                       for _ in range(2 * num_layers)]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays)

    def first(self, n: int) -> list[np.ndarray]:
        """Slots 0..n-1, [n, kv_heads, C, head_dim] views."""
        return [a[:n] for a in self.arrays]

    def slot_cache(self, slot: int) -> KVCache:
        """An empty batch-1 ``KVCache`` whose buffers are the slot's memory (the prefill writes into the pool)."""
        cache = KVCache(len(self.arrays) // 2, self.arrays[0].shape[1], self.arrays[0].shape[3],
                        self.arrays[0].dtype)
        cache.arrays = [a[slot:slot + 1] for a in self.arrays]
        return cache

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first ``length`` rows of slot ``src`` into slot ``dst``."""
        for a in self.arrays:
            a[dst, :, :length] = a[src, :, :length]


@dataclass
class Request:
    """One generation request for the batched decoder: prepared (``Pipeline.prepare``) before it is queued."""

    prep: Prepared
    max_new_tokens: int
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    do_sample: bool | None = None
    seed: int | None = None
    on_text: Callable[[str], None] | None = None
    keep_logits: bool = False
    tag: Any = None  # the caller's handle (the server's request record)


@dataclass
class Row:
    """A running sequence: its request, its token choices and its KV length in the pool."""

    request: Request
    decoding: Decoding
    length: int = 0  # valid KV rows
    token: int = -1  # the token to feed at the next step
    timings: dict[str, float] = field(default_factory=dict)
    started: float = 0.0  # perf_counter at admission
    generation: Generation | None = None  # set when finished

    @property
    def finished(self) -> bool:
        return self.decoding.finish is not None


class BatchDecoder:
    """Runs up to ``max_batch`` sequences in one decoder run per step, each in a slot of a ``KVPool`` of
    ``capacity`` rows per sequence (prompt + new tokens; the model's context by default).

    ``admit`` prefills one request into the next free slot; ``step`` advances every running row by one token
    and returns the rows that finished (their slots are free again); ``run`` drives both over a list of
    requests. Not thread-safe: one thread owns it (the server's scheduler)."""

    def __init__(self, pipe: Pipeline, max_batch: int = 8, capacity: int | None = None):
        if max_batch < 1:
            raise QvlError(f"max_batch must be at least 1, got {max_batch}.")
        self.pipe, self.max_batch = pipe, int(max_batch)
        self.capacity = int(capacity or pipe.max_context)
        if self.capacity > pipe.max_context:
            raise QvlError(f"a KV capacity (--context) of {self.capacity} tokens per sequence is over the model's "
                           f"context of {pipe.max_context}; pass at most {pipe.max_context}.")
        self.pooled = pipe.kv_layout == KV_BUFFER and not hasattr(pipe.backend, "new_cache")
        if self.max_batch > 1 and not self.pooled:
            raise QvlError("batched decoding needs the decoder of an ort-target build (GroupQueryAttention over "
                           "in-place KV buffers with seqlens_k per row); this one concatenates its cache (trt "
                           "target or a build without the fusions): use a batch of 1 (--max-batch 1).")
        self.pool = None
        if self.pooled:
            text = pipe.spec.text
            self.pool = KVPool(text.num_hidden_layers, text.num_key_value_heads, text.head_dim, pipe.kv_dtype,
                               self.max_batch, self.capacity)
            log.info("KV pool: %d slots x %d tokens, %.1f MiB", self.max_batch, self.capacity,
                     self.pool.nbytes / 2**20)
        self.rows: list[Row] = []
        self._caches: dict[int, KVCache] = {}  # unpooled (batch 1): the row's own cache, by id(row)
        self.steps = 0  # batched decode steps run
        self.last_batch = 0  # rows in the last step
        self.peak_batch = 0  # most rows in one step

    @property
    def free(self) -> int:
        return self.max_batch - len(self.rows)

    def admit(self, request: Request) -> Row:
        """Prefill ``request`` into the next free slot and choose its first token. The returned row is running
        (it takes part in the next ``step``) unless it finished already (an end token first, or one new token
        asked for): then ``row.generation`` is set and the slot stays free. Raises QvlError (nothing admitted)
        when the request does not fit the slot's capacity."""
        if not self.free:
            raise QvlError(f"all {self.max_batch} rows are running; admit after a step frees one.")
        pipe = self.pipe
        pipe.check_fits(request.prep, request.max_new_tokens, self.capacity if self.pooled else None)
        params = pipe.sampling(temperature=request.temperature, top_p=request.top_p, top_k=request.top_k,
                               repetition_penalty=request.repetition_penalty, do_sample=request.do_sample)
        started = time.perf_counter()
        if self.pooled:
            cache = self.pool.slot_cache(len(self.rows))
        else:
            cache = pipe.new_cache(capacity=len(request.prep.input_ids) + request.max_new_tokens)
        timings: dict[str, float] = {}
        logits = pipe.prefill(request.prep, cache, timings)
        decoding = Decoding(pipe, request.prep, params, request.max_new_tokens, request.seed,
                            on_text=request.on_text, keep_logits=request.keep_logits)
        row = Row(request, decoding, length=len(request.prep.input_ids), timings=timings, started=started)
        row.token = decoding.push(logits)
        row.timings["first_token_s"] = time.perf_counter() - started
        if row.finished:
            self._finish(row)
        else:
            if not self.pooled:
                self._caches[id(row)] = cache
            self.rows.append(row)
        return row

    def step(self) -> list[Row]:
        """One decode step of every running row; returns the rows that finished in it (removed, slots free)."""
        if not self.rows:
            return []
        n = len(self.rows)
        if self.pooled:
            logits = self._pooled_step()
        else:
            (row,) = self.rows
            pos = indexing.decode_positions(row.length, row.decoding.prep.rope_delta, 1)
            logits = self.pipe.decoder_step(np.asarray([[row.token]], dtype=np.int64), self.pipe.no_images()[0],
                                            pos[:, None, :], self._caches[id(row)])
        self.steps, self.last_batch, self.peak_batch = self.steps + 1, n, max(self.peak_batch, n)
        done = []
        for b, row in enumerate(self.rows):
            row.length += 1
            row.token = row.decoding.push(logits[b])
            if row.finished:
                done.append(b)
        finished = []
        for b in reversed(done):  # highest first: the last row moved into a freed slot is never a finished one
            row = self._remove(b)
            self._finish(row)
            finished.append(row)
        return finished[::-1]

    def drop(self, row: Row) -> None:
        """Stop ``row`` before it finishes (its client went away); its slot is free for the next request."""
        for b, r in enumerate(self.rows):
            if r is row:
                self._remove(b)
                return

    def clear(self) -> list[Row]:
        """Drop every running row (after a failed step: their caches are in an unknown state); returns them."""
        rows, self.rows = self.rows, []
        self._caches.clear()
        return rows

    def _remove(self, b: int) -> Row:
        """Take row ``b`` out; the last row moves into its slot (its valid K/V rows copied), so slots stay 0..n-1."""
        row, last = self.rows[b], len(self.rows) - 1
        if b != last and self.pooled:
            self.pool.move(last, b, self.rows[last].length)
        self.rows[b] = self.rows[last]
        self.rows.pop()
        self._caches.pop(id(row), None)
        return row

    def _pooled_step(self) -> np.ndarray:
        """logits [n, V] float32 of one token per running row, over the pool's first n slots."""
        pipe, rows = self.pipe, self.rows
        n = len(rows)
        lengths = np.asarray([r.length for r in rows], dtype=np.int64)
        deltas = np.asarray([r.decoding.prep.rope_delta for r in rows], dtype=np.int64)
        feeds = {
            "input_ids": np.asarray([[r.token] for r in rows], dtype=np.int64),  # [n, 1]
            "image_embeds": pipe.no_images()[0].astype(pipe.embed_dtype),  # [0, D]
            "position_ids": np.ascontiguousarray(np.broadcast_to((lengths + deltas)[None, :, None], (3, n, 1))),
            "seqlens_k": lengths.astype(np.int32),  # [n]: valid rows after the step - 1
            "total_sequence_length": np.asarray(int(lengths.max()) + 1, dtype=np.int32),
        }
        if pipe.deepstack:
            feeds["deepstack_embeds"] = pipe.no_images()[1].astype(pipe.embed_dtype)  # [L, 0, D]
        for i, arr in enumerate(self.pool.first(n)):
            feeds[f"past_key_values.{i // 2}.{'value' if i % 2 else 'key'}"] = arr
        out = pipe.backend.run("decoder", feeds)
        return out[0][:, -1, :].astype(np.float32, copy=False)

    def _finish(self, row: Row) -> None:
        row.timings["decode_s"] = time.perf_counter() - row.started - row.timings["first_token_s"]
        row.timings["total_s"] = time.perf_counter() - row.started
        row.generation = row.decoding.result(row.timings)

    def run(self, requests: Sequence[Request]) -> list[Generation]:
        """Every request to its end, admitted in order as rows free up (continuous batching); the generations
        in the order of ``requests``. A request that does not fit raises before anything runs."""
        for r in requests:
            self.pipe.check_fits(r.prep, r.max_new_tokens, self.capacity if self.pooled else None)
        pending = deque(enumerate(requests))
        results: dict[int, Generation] = {}
        index: dict[int, int] = {}
        while pending or self.rows:
            while pending and self.free:
                i, request = pending.popleft()
                row = self.admit(request)
                if row.generation is not None:
                    results[i] = row.generation
                else:
                    index[id(row)] = i
            for row in self.step():
                results[index.pop(id(row))] = row.generation
        return [results[i] for i in range(len(requests))]
