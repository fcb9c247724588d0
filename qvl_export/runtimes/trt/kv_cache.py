"""The TensorRT decoder's KV cache, kept on the device.

The trt target's decoder graph is the plain one: ``present.{i}.* = Concat(past_key_values.{i}.*,
new rows)`` [B, kv_heads, P+T, head_dim]. Copying the whole cache to the host and back every step
would move 2 x layers x P rows per token; here it never leaves the device:

- every past/present tensor has two device buffers ("ping" and "pong"), each sized once for the
  engines' maximum (max_batch x kv_heads x max_seq x head_dim), allocated when the first cache is
  made and reused by later ones;
- a step binds ``past_key_values.{i}.*`` to the buffer holding the valid cache (shape [B, H, P, D])
  and ``present.{i}.*`` to the other one; the engine writes P+T rows there; after the step the two
  swap roles (pointers only, nothing is copied);
- so a decode step copies one token id, its positions (and no image embeddings) host -> device and
  one row of logits per sequence device -> host.

The Concat inside the engine still moves the cache once per step, on the device. Writing only the
new rows in place (as the ort target's GroupQueryAttention graph does) needs a graph whose present
outputs alias its past inputs, e.g. a KV-cache-update op; then one buffer per tensor would do.
"""

from __future__ import annotations

import numpy as np

from qvl_export.core.errors import QvlError
from qvl_export.runtimes.trt.cuda import DeviceBuffer


def kv_names(num_layers: int) -> list[tuple[str, str]]:
    """(past input, present output) name pairs, key then value per layer, as the decoder graph names them."""
    return [(f"past_key_values.{i}.{kind}", f"present.{i}.{kind}") for i in range(num_layers)
            for kind in ("key", "value")]


class KVBuffers:
    """Ping-pong device buffers for every past/present pair, and which one holds the valid cache."""

    def __init__(self, cudart, names: list[tuple[str, str]], kv_heads: int, head_dim: int, dtype,
                 max_batch: int, max_seq: int):
        self.names = list(names)
        self.kv_heads, self.head_dim = int(kv_heads), int(head_dim)
        self.dtype = np.dtype(dtype)
        self.max_batch, self.max_seq = int(max_batch), int(max_seq)
        self.tensor_bytes = self.max_batch * self.kv_heads * self.max_seq * self.head_dim * self.dtype.itemsize
        self.buffers = [(DeviceBuffer(cudart), DeviceBuffer(cudart)) for _ in self.names]
        for pair in self.buffers:
            for buf in pair:
                buf.ensure(self.tensor_bytes)
        self.current = 0  # which buffer of each pair holds the valid rows
        self.length = 0
        self.batch = 0
        self.owner = None  # the DeviceKVCache using the buffers now

    @property
    def nbytes(self) -> int:
        return 2 * len(self.buffers) * self.tensor_bytes

    def reset(self, owner, batch: int) -> None:
        if not 1 <= batch <= self.max_batch:
            raise QvlError(f"A batch of {batch}: the engines were built for at most {self.max_batch} (--max-batch).")
        self.owner, self.batch, self.length, self.current = owner, batch, 0, 0

    def shape(self, rows: int) -> tuple[int, int, int, int]:
        return (self.batch, self.kv_heads, rows, self.head_dim)

    def bind(self, runner, steps: int) -> None:
        """Bind every past input to the valid buffer and every present output to the other one."""
        total = self.length + steps
        if total > self.max_seq:
            raise QvlError(f"{total} tokens exceed the {self.max_seq} the engines were built for (--max-seq at build "
                           "time); ask for fewer new tokens or rebuild.")
        for (past, present), pair in zip(self.names, self.buffers):
            runner.bind_input(past, pair[self.current].ptr, self.shape(self.length))
            runner.bind_output(present, pair[1 - self.current].ptr)

    def advance(self, steps: int) -> None:
        """After a step of ``steps`` tokens ran: the present buffers hold the cache now (pointer swap)."""
        self.current = 1 - self.current
        self.length += steps

    def free(self) -> None:
        for pair in self.buffers:
            for buf in pair:
                buf.free()


class DeviceKVCache:
    """What ``TrtBackend.new_cache`` returns. ``Pipeline`` reads ``length`` (for positions) and calls
    ``step`` instead of ``backend.run("decoder", ...)``."""

    def __init__(self, runner, kv: KVBuffers, batch: int = 1, logits: str = "logits"):
        self.runner, self.kv, self.logits = runner, kv, logits
        kv.reset(self, batch)

    @property
    def length(self) -> int:
        self._check_owner()
        return self.kv.length

    def step(self, input_ids: np.ndarray, image_embeds: np.ndarray, position_ids: np.ndarray,
             deepstack_embeds: np.ndarray | None = None) -> np.ndarray:
        """input_ids [B, T], image_embeds [N, D], position_ids [3, B, T] (and Qwen3-VL's deepstack_embeds
        [L, N, D]) -> logits [B, V] float32 of the last position; the cache grows by T rows on the device."""
        self._check_owner()
        kv, runner = self.kv, self.runner
        batch, steps = input_ids.shape
        if batch != kv.batch:
            raise QvlError(f"The KV cache holds a batch of {kv.batch}; a step of batch {batch} needs a new cache.")
        if kv.length and steps != 1 and runner.num_profiles > 1:
            raise QvlError("The decoder engine's decode profile takes one token per step after the prefill.")
        if runner.num_profiles > 1:
            runner.select_profile(1 if kv.length else 0)  # profiles: prefill (empty cache), decode
        kept = [runner.upload("input_ids", input_ids), runner.upload("image_embeds", image_embeds),
                runner.upload("position_ids", position_ids)]
        if deepstack_embeds is not None:
            kept.append(runner.upload("deepstack_embeds", deepstack_embeds))
        kv.bind(runner, steps)
        shape = runner.bind_output(self.logits)  # [B, T, V] into the runner's own buffer
        runner.execute()
        vocab = shape[-1]
        dtype = runner.io.dtypes[self.logits]
        rows = np.empty((batch, vocab), dtype=dtype)
        for b in range(batch):  # only the last position's row of each sequence comes back
            offset = (b * shape[1] + shape[1] - 1) * vocab * dtype.itemsize
            runner.buffers[self.logits].download(rows[b], runner.stream, offset)
        runner.synchronize()
        del kept
        kv.advance(steps)
        return rows.astype(np.float32, copy=False)

    def _check_owner(self) -> None:
        if self.kv.owner is not self:
            raise QvlError("This KV cache was replaced by a newer one (the TensorRT backend keeps one cache on the "
                           "device); make a new cache per generation.")
