"""The runtime's KV cache in both decoder layouts: concat (plain graph) and in-place buffers (GQA graph)."""

from __future__ import annotations

import numpy as np
import pytest

from qvl_export.core.errors import QvlError
from qvl_export.runtimes.onnxrt import in_place_outputs
from qvl_export.runtimes.pipeline import KV_BUFFER, KV_CONCAT, KVCache, Pipeline, kv_layout


def test_reserve_grows_keeps_rows_and_aligns():
    cache = KVCache(num_layers=2, kv_heads=2, head_dim=4)
    cache.reserve(batch=1, total=5)
    assert cache.capacity == KVCache.ALIGN and cache.arrays[0].shape == (1, 2, KVCache.ALIGN, 4)
    rows = np.arange(5 * 8, dtype=np.float32).reshape(1, 2, 5, 4)
    for a in cache.arrays:
        a[:, :, :5] = rows
    cache.length = 5
    first = cache.arrays[0]
    cache.reserve(1, KVCache.ALIGN)  # fits: nothing moves
    assert cache.arrays[0] is first
    cache.reserve(1, KVCache.ALIGN + 1)  # doubles, one copy of the valid rows
    assert cache.capacity == 2 * KVCache.ALIGN
    for v in cache.valid():
        np.testing.assert_array_equal(v, rows)
    with pytest.raises(QvlError, match="new cache"):
        cache.reserve(batch=2, total=7)


def test_capacity_hint_allocates_once():
    cache = KVCache(1, 1, 8, capacity=1000)
    cache.reserve(1, 10)
    assert cache.capacity == 1024


def test_layout_and_in_place_pairs_from_names():
    plain = ["input_ids", "image_embeds", "position_ids", "past_key_values.0.key", "past_key_values.0.value"]
    outs = ["logits", "present.0.key", "present.0.value"]
    assert kv_layout(plain) == KV_CONCAT and in_place_outputs(plain, outs) == {}
    fused = plain + ["seqlens_k", "total_sequence_length"]
    assert kv_layout(fused) == KV_BUFFER
    assert in_place_outputs(fused, outs) == {"present.0.key": "past_key_values.0.key",
                                             "present.0.value": "past_key_values.0.value"}


@pytest.fixture(scope="module")
def plain_artifacts(tmp_path_factory, checkpoint):
    """The same checkpoint built without the fusions (the decoder graph the trt target ships)."""
    from qvl_export.building.artifacts import BuildOptions, build

    out = tmp_path_factory.mktemp("plain") / "artifacts"
    build(checkpoint("qwen2_5_vl"), out, BuildOptions(passes=["fold_constants"]))
    return out


def test_fused_and_plain_decoders_generate_the_same(artifacts, plain_artifacts):
    from PIL import Image

    fused, plain = Pipeline.load(artifacts("qwen2_5_vl")), Pipeline.load(plain_artifacts)
    assert fused.kv_layout == KV_BUFFER and plain.kv_layout == KV_CONCAT
    img = Image.new("RGB", (180, 120), (200, 40, 90))
    a = fused.generate([img], "What is the total?", max_new_tokens=10, keep_logits=True)
    b = plain.generate([img], "What is the total?", max_new_tokens=10, keep_logits=True)
    assert a.token_ids == b.token_ids
    for x, y in zip(a.step_logits, b.step_logits):
        np.testing.assert_allclose(x, y, atol=2e-5, rtol=1e-4)


def test_buffer_graph_without_in_place_backend(artifacts):
    """A backend that only has ``session.run`` (a profiler, say) gets full-capacity present copies back:
    same logits, the cache just is not shared."""
    from qvl_export.runtimes import indexing

    pipe = Pipeline.load(artifacts("qwen2_5_vl"))
    text = pipe.spec.text

    class RunOnly:
        def __init__(self, inner):
            self.inner = inner

        def run(self, part, feeds):
            return self.inner.sessions[part].run(self.inner.output_names[part], feeds)

    ids = np.arange(3, 20, dtype=np.int64)
    pos = np.broadcast_to(np.arange(len(ids)), (3, len(ids))).astype(np.int64)
    none = np.zeros((0, text.hidden_size), np.float32)
    logits = {}
    for name, backend in (("in_place", pipe.backend), ("run_only", RunOnly(pipe.backend))):
        pipe.backend = backend
        cache = pipe.new_cache(capacity=64)
        out = [pipe.decoder_step(ids[None], none, pos[:, None, :], cache)]
        first = cache.arrays[0]
        for token in (5, 6, 7):
            p = indexing.decode_positions(cache.length, 0, 1)[:, None, :]
            out.append(pipe.decoder_step(np.asarray([[token]], np.int64), none, p, cache))
        assert cache.length == len(ids) + 3
        assert (cache.arrays[0] is first) == (name == "in_place")
        logits[name] = out
    for x, y in zip(logits["in_place"], logits["run_only"]):
        np.testing.assert_allclose(x, y, atol=1e-6)
