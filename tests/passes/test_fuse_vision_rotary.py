"""fuse_vision_rotary: structure (which ops went, which came) and numbers (outputs before vs after)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from qvl_export.passes import select_passes
from qvl_export.passes.fuse_vision_attention import FuseVisionAttention
from qvl_export.passes.fuse_vision_rotary import FuseVisionRotary

ROPE = "com.microsoft:RotaryEmbedding"


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_rotary_becomes_rotary_embedding_same_numbers(family, traced, spec_of, harness):
    spec = spec_of(family)
    depth = spec.vision.depth
    plain, fused = traced(family, "vision"), traced(family, "vision")
    before = harness.counts(plain)
    p = harness.fuse(fused, FuseVisionRotary())
    assert p.modified
    after = harness.counts(fused)

    assert p.details == {"rotary": 2 * depth}  # q and k of every block
    assert after[ROPE] == 2 * depth
    assert before["Neg"] == 2 * depth and "Neg" not in after
    assert before["Concat"] - after.get("Concat", 0) == 2 * depth
    assert before["Mul"] - after["Mul"] == 4 * depth and before["Add"] - after["Add"] == 2 * depth
    assert after["Slice"] == 2  # the two half-table caches, shared by every block
    valid, feeds = harness.vision_feeds(spec)
    (a,) = harness.session(plain).run(None, feeds)
    (b,) = harness.session(fused).run(None, feeds)
    np.testing.assert_allclose(b[valid], a[valid], atol=2e-5, rtol=1e-4)
    assert np.isfinite(b).all()


def test_composes_with_the_attention_fusion(traced, spec_of, harness):
    spec = spec_of("qwen2_5_vl")
    plain, fused = traced("qwen2_5_vl", "vision"), traced("qwen2_5_vl", "vision")
    assert harness.fuse(fused, FuseVisionRotary()).modified and harness.fuse(fused, FuseVisionAttention()).modified
    after = harness.counts(fused)
    assert after[ROPE] == 2 * spec.vision.depth and after["com.microsoft:MultiHeadAttention"] == spec.vision.depth
    valid, feeds = harness.vision_feeds(spec)
    (a,) = harness.session(plain).run(None, feeds)
    (b,) = harness.session(fused).run(None, feeds)
    np.testing.assert_allclose(b[valid], a[valid], atol=2e-5, rtol=1e-4)


def test_host_tables_meet_the_precondition(spec_of):
    """The pass takes the first half of each table row as the cache: the host's rows are cat(f, f)."""
    from qvl_export.runtimes import indexing

    for family in ("qwen2_vl", "qwen2_5_vl"):
        vision = spec_of(family).vision
        cos, sin = indexing.vision_rotary([(1, 6, 8), (1, 4, 4)], vision)
        half = vision.head_dim // 2
        assert np.array_equal(cos[:, :half], cos[:, half:]) and np.array_equal(sin[:, :half], sin[:, half:])


def test_tables_that_are_not_the_inputs_are_left_alone(harness):
    """A graph built from text: rotate-half whose cos/sin are computed, not the rope_cos/rope_sin inputs."""
    text = """
    <ir_version: 9, opset_import: ["" : 19]>
    g (float[S, 2, 8] x, float[S, 8] angles) => (float[S, 2, 8] y) {
        one = Constant <value = int64[1] {1}> ()
        c = Cos (angles)
        s = Sin (angles)
        cos = Unsqueeze (c, one)
        sin = Unsqueeze (s, one)
        zero = Constant <value = int64[1] {0}> ()
        half = Constant <value = int64[1] {4}> ()
        end = Constant <value = int64[1] {8}> ()
        last = Constant <value = int64[1] {-1}> ()
        step = Constant <value = int64[1] {1}> ()
        hi = Slice (x, half, end, last, step)
        lo = Slice (x, zero, half, last, step)
        nhi = Neg (hi)
        rot = Concat <axis = -1> (nhi, lo)
        a = Mul (x, cos)
        b = Mul (rot, sin)
        y = Add (a, b)
    }
    """
    model = ir.from_proto(onnx.parser.parse_model(text))
    p = harness.fuse(model, FuseVisionRotary())
    assert not p.modified
    assert any("not one of the graph inputs" in r for r in p.details["why_not"]), p.details


def test_onnxruntime_vision_only():
    assert "fuse_vision_rotary" in [p.name for p in select_passes("ort", "vision", "graph")]
    for target, part in (("trt", "vision"), ("ort", "merger"), ("ort", "decoder")):
        assert "fuse_vision_rotary" not in [p.name for p in select_passes(target, part, "graph")]
