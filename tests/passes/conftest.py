"""Fixtures for the graph-pass tests: each part of the tiny checkpoints traced once, as the build
traces it (constant folding included), and runners that feed a part the way the runtime does.

A pass test takes a fresh copy of the traced part, runs the pass, and compares the structure (op
counts) and the numbers (onnxruntime outputs before vs after on the same random inputs).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from qvl_export.loading.config import parse_model_config
from qvl_export.passes.base import GraphPassResult, op_counts, run_passes


@pytest.fixture(scope="session")
def traced(tmp_path_factory, checkpoint):
    """traced(family, part, dtype="float32") -> a fresh ``onnx_ir.Model`` of the part traced in ``dtype``,
    plain (only the cleanup passes)."""
    from qvl_export.export.parts import decoder_part, merger_part, trace_part, vision_part
    from qvl_export.loading.weights import CheckpointWeights

    folder = tmp_path_factory.mktemp("traced")
    saved: dict[tuple[str, str, str], object] = {}

    def get(family: str, part: str, dtype: str = "float32") -> ir.Model:
        key = (family, part, dtype)
        if key not in saved:
            ckpt = checkpoint(family)
            spec, weights = parse_model_config(ckpt), CheckpointWeights(ckpt)
            make = {"vision": vision_part, "merger": merger_part, "decoder": decoder_part}[part]
            model = trace_part(make(spec, weights), dtype)
            cleanup(model)
            path = folder / f"{family}-{part}-{dtype}.onnx"
            ir.save(model, path)
            saved[key] = path
        return ir.load(saved[key])

    return get


@pytest.fixture(scope="session")
def spec_of(checkpoint):
    """spec_of(family) -> the ModelSpec of the tiny checkpoint."""
    return lambda family: parse_model_config(checkpoint(family))


def session(model: ir.Model) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(ir.to_proto(model).SerializeToString(), opts, providers=["CPUExecutionProvider"])


def counts(model: ir.Model) -> dict[str, int]:
    return op_counts(model)


def cleanup(model: ir.Model) -> ir.Model:
    """What the build runs on the traced graph before any rewrite: the graph list's cleanup passes."""
    from qvl_export.passes.cleanup import EliminateCommonSubexpressions, EliminateIdentities, RemoveUnused
    from qvl_export.passes.fold_constants import FoldConstants

    return run_passes(model, [FoldConstants(), EliminateIdentities(), RemoveUnused(),
                              EliminateCommonSubexpressions()])[0]


def fuse(model: ir.Model, graph_pass) -> GraphPassResult:
    """``graph_pass`` on ``model``, then the cleanup the graph list runs after the fusions (a fusion leaves
    per-block copies and unread nodes to it); returns the pass's own result (``modified``, ``details``)."""
    from qvl_export.passes.cleanup import CseAfterFusions, RemoveUnusedAfterFusions
    from qvl_export.passes.fold_constants import FoldConstantsAfterFusions

    result = graph_pass(model)
    run_passes(model, [CseAfterFusions(), FoldConstantsAfterFusions(), RemoveUnusedAfterFusions()])
    return result


def run_decoder(model: ir.Model, spec, *, batch: int = 1, steps: int = 3, seed: int = 0) -> list[dict]:
    """Prefill of a prompt with an image (M-RoPE positions, image rows inserted by the graph), then
    ``steps`` decode steps, through the runtime's own cache code (``KVCache``, ``decoder_feeds``,
    in-place binding when the graph has buffer K/V). Per step: ``logits [B, 1, V]``, ``kv`` = the valid
    K/V rows [B, kv, P, hd] per layer, and ``buffers`` (the cache arrays the step left)."""
    from qvl_export.runtimes import indexing
    from qvl_export.runtimes.onnxrt import in_place_outputs, run_in_place
    from qvl_export.runtimes.pipeline import KVCache, advance_cache, decoder_feeds, kv_layout

    sess = session(model)
    inputs = [i.name for i in sess.get_inputs()]
    outputs = [o.name for o in sess.get_outputs()]
    float_type = {i.name: i.type for i in sess.get_inputs()}["image_embeds"]  # the graph's activation dtype
    dtype = np.float16 if float_type == "tensor(float16)" else np.float32
    layout, shared = kv_layout(inputs), in_place_outputs(inputs, outputs)
    text, tok = spec.text, spec.tokens
    rng = np.random.default_rng(seed)
    grid = (1, 4, 6)  # 6 merged image tokens
    n_image = 6
    words = rng.integers(0, 50, 9)
    ids = np.concatenate([words[:3], [tok.vision_start_token_id], np.full(n_image, tok.image_token_id),
                          [tok.vision_end_token_id], words[3:]]).astype(np.int64)
    positions, delta = indexing.rope_index(ids, [grid], tok, spec.vision.spatial_merge_size)
    input_ids = np.repeat(ids[None], batch, 0)
    position_ids = np.repeat(positions[:, None, :], batch, 1)
    embeds = rng.standard_normal((batch * n_image, text.hidden_size)).astype(dtype)
    cache = KVCache(text.num_hidden_layers, text.num_key_value_heads, text.head_dim, dtype, batch)
    levels = spec.vision.deepstack if "deepstack_embeds" in inputs else 0  # Qwen3-VL
    deepstack = rng.standard_normal((levels, len(embeds), text.hidden_size)).astype(dtype) if levels else None
    results = []
    for _ in range(steps + 1):
        feeds = decoder_feeds(layout, input_ids, embeds, position_ids, cache, deepstack)
        out = run_in_place(sess, outputs, feeds, shared) if shared else sess.run(outputs, feeds)
        advance_cache(layout, cache, out[1:], input_ids.shape[1])
        results.append({"logits": out[0].copy(), "kv": [a.copy() for a in cache.valid()],
                        "buffers": list(cache.arrays)})
        input_ids = rng.integers(0, 50, (batch, 1)).astype(np.int64)
        embeds = np.zeros((0, text.hidden_size), dtype)
        deepstack = None if deepstack is None else deepstack[:, :0]
        position_ids = np.repeat(indexing.decode_positions(cache.length, delta, 1)[:, None, :], batch, 1)
    return results


def assert_same_decoding(before: list[dict], after: list[dict], atol: float = 2e-5) -> None:
    """Logits and cached K/V of every step agree (fp32: the rewrites change rounding only)."""
    assert len(before) == len(after)
    for step, (a, b) in enumerate(zip(before, after)):
        np.testing.assert_allclose(b["logits"], a["logits"], atol=atol, rtol=1e-4, err_msg=f"logits, step {step}")
        assert len(a["kv"]) == len(b["kv"])
        for i, (ka, kb) in enumerate(zip(a["kv"], b["kv"])):
            assert ka.shape == kb.shape, (step, i, ka.shape, kb.shape)
            np.testing.assert_allclose(kb, ka, atol=atol, rtol=1e-4, err_msg=f"kv {i}, step {step}")


def vision_feeds(spec, grids=((1, 10, 14), (1, 6, 4)), seed: int = 0) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(valid rows, feeds) of the vision part for two images, in the graph's window layout."""
    from qvl_export.runtimes import indexing

    rng = np.random.default_rng(seed)
    layout = indexing.vision_layout(list(grids), spec.vision)
    cos, sin = indexing.vision_rotary(list(grids), spec.vision)
    patches = rng.standard_normal((layout.num_tokens, spec.vision.patch_dim)).astype(np.float32)
    return layout.valid, {"patches": layout.gather(patches, 0.0), "rope_cos": layout.gather(cos, 1.0),
                          "rope_sin": layout.gather(sin, 0.0), "image_ids": layout.image_ids}


class Harness:
    """The helpers above, handed to tests as the ``harness`` fixture (conftest modules are not imported)."""

    session = staticmethod(session)
    counts = staticmethod(counts)
    cleanup = staticmethod(cleanup)
    fuse = staticmethod(fuse)
    run_decoder = staticmethod(run_decoder)
    assert_same_decoding = staticmethod(assert_same_decoding)
    vision_feeds = staticmethod(vision_feeds)


@pytest.fixture(scope="session")
def harness() -> type[Harness]:
    return Harness
