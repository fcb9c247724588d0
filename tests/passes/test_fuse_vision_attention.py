"""fuse_vision_attention: structure (which ops went, which came) and numbers (outputs before vs after)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from qvl_export.passes import select_passes
from qvl_export.passes.fuse_vision_attention import FuseVisionAttention

MHA = "com.microsoft:MultiHeadAttention"
GRIDS = {  # one image; two (ragged windows, padding slots); three of different sizes
    "one": ((1, 8, 12),),
    "two": ((1, 10, 14), (1, 6, 4)),
    "three": ((1, 4, 4), (1, 12, 6), (1, 2, 6)),
}


def _run(harness, model, feeds):
    (out,) = harness.session(model).run(None, feeds)
    return out


def _assert_same_rows(after, before, valid):
    """Real rows equal up to rounding; every row (padding slots too) finite."""
    np.testing.assert_allclose(after[valid], before[valid], atol=2e-5, rtol=1e-4)
    assert np.isfinite(after).all()


def _layers(spec):
    full = sum(spec.vision.is_full_attention(i) for i in range(spec.vision.depth))
    return full, spec.vision.depth - full


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_attention_becomes_mha_same_numbers(family, traced, spec_of, harness):
    spec = spec_of(family)
    full, windowed = _layers(spec)
    plain, fused = traced(family, "vision"), traced(family, "vision")
    before = harness.counts(plain)
    p = harness.fuse(fused, FuseVisionAttention())
    assert p.modified
    after = harness.counts(fused)

    depth = spec.vision.depth
    assert p.details == {"window": windowed, "full": full}
    assert before["Softmax"] == depth and before.get(MHA, 0) == 0
    assert after[MHA] == depth
    # the S x S / per-window masking, the score math and the head transposes are gone
    for op in ("Softmax", "MatMul", "Transpose", "And"):
        assert op not in after, (op, after)
    assert after.get("Where", 0) == (1 if windowed else 0) + (1 if full else 0)  # one k_x per mask kind
    assert after.get("Pad", 0) == windowed  # q_x = 1 per window block
    assert after["Concat"] - before["Concat"] == windowed + 2 * full  # k_x per block, q_x per full block
    for grids in GRIDS.values():
        valid, feeds = harness.vision_feeds(spec, grids, seed=len(grids))
        _assert_same_rows(_run(harness, fused, feeds), _run(harness, plain, feeds), valid)


def test_mha_nodes_are_on_the_flash_path(traced, harness):
    """No mask and no bias input: onnxruntime's CPU MultiHeadAttention then runs its flash kernel."""
    model = traced("qwen2_5_vl", "vision")
    harness.fuse(model, FuseVisionAttention())
    nodes = [n for n in model.graph if n.op_type == "MultiHeadAttention"]
    assert nodes and all(len(n.inputs) == 3 for n in nodes)
    heads = {n.attributes["num_heads"].value for n in nodes}
    assert heads == {4}  # the tiny Qwen2.5-VL: 4 heads of 16
    assert {round(n.attributes["scale"].value, 6) for n in nodes} == {round(16 ** -0.5, 6)}


def test_dense_window_baseline_keeps_its_window_masks(checkpoint, spec_of, harness, tmp_path):
    """--window-attention dense: window blocks use an S x S mask over computed window ids; they stay
    as traced (the check says why), the full-attention blocks are fused, the numbers agree."""
    from qvl_export.export.parts import trace_part, vision_part
    from qvl_export.loading.weights import CheckpointWeights

    ckpt = checkpoint("qwen2_5_vl")
    spec = spec_of("qwen2_5_vl")
    model = trace_part(vision_part(spec, CheckpointWeights(ckpt), "dense"))
    harness.cleanup(model)
    ir.save(model, tmp_path / "dense.onnx")
    plain, fused = ir.load(tmp_path / "dense.onnx"), ir.load(tmp_path / "dense.onnx")
    full, windowed = _layers(spec)
    p = harness.fuse(fused, FuseVisionAttention())
    assert p.modified
    assert p.details["full"] == full and p.details["window"] == 0
    assert p.details["not_fused"] == windowed
    assert any("computed in the graph" in r for r in p.details["why_not"]), p.details
    after = harness.counts(fused)
    assert after[MHA] == full and after["Softmax"] == windowed
    valid, feeds = harness.vision_feeds(spec)
    _assert_same_rows(_run(harness, fused, feeds), _run(harness, plain, feeds), valid)


def test_unknown_mask_is_left_alone_with_a_reason(harness):
    """A graph built from text: attention whose mask is a plain input (not built from image ids)."""
    import onnx

    text = """
    <ir_version: 9, opset_import: ["" : 19]>
    g (float[S, 2, 4] q, float[S, 2, 4] k, float[S, 2, 4] v, bool[S, S] mask) => (float[S, 8] out) {
        scale = Constant <value = float {0.5}> ()
        fill = Constant <value = float {-3.4028235e38}> ()
        shape = Constant <value = int64[2] {-1, 8}> ()
        qt = Transpose <perm = [1, 0, 2]> (q)
        kt = Transpose <perm = [1, 2, 0]> (k)
        vt = Transpose <perm = [1, 0, 2]> (v)
        s = MatMul (qt, kt)
        ss = Mul (s, scale)
        w = Where (mask, ss, fill)
        p = Softmax <axis = -1> (w)
        o = MatMul (p, vt)
        ot = Transpose <perm = [1, 0, 2]> (o)
        out = Reshape (ot, shape)
    }
    """
    model = ir.from_proto(onnx.parser.parse_model(text))
    p = harness.fuse(model, FuseVisionAttention())
    assert not p.modified
    assert p.details["not_fused"] == 1
    assert any("not And(same group, valid key)" in r for r in p.details["why_not"]), p.details


def test_onnxruntime_vision_only():
    assert "fuse_vision_attention" in [p.name for p in select_passes("ort", "vision", "graph")]
    for target, part in (("trt", "vision"), ("ort", "merger"), ("ort", "decoder")):
        assert "fuse_vision_attention" not in [p.name for p in select_passes(target, part, "graph")]


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_float16_blocks_fuse_and_run_in_float32(family, checkpoint, spec_of, traced, harness, tmp_path):
    """A float16 trace (the vision tower of an fp8 build) fuses too: the block runs in float32 between
    casts, so no [N, S, S] scores are held, and its output is at least as close to the float32 graph's
    as the traced float16 blocks'."""
    from qvl_export.export.parts import trace_part, vision_part
    from qvl_export.loading.weights import CheckpointWeights

    spec = spec_of(family)
    model = trace_part(vision_part(spec, CheckpointWeights(checkpoint(family))), "float16")
    harness.cleanup(model)
    ir.save(model, tmp_path / "fp16.onnx")
    plain, fused = ir.load(tmp_path / "fp16.onnx"), ir.load(tmp_path / "fp16.onnx")
    full, windowed = _layers(spec)
    p = harness.fuse(fused, FuseVisionAttention())
    assert p.details == {"window": windowed, "full": full}
    after = harness.counts(fused)
    assert after[MHA] == spec.vision.depth and "Softmax" not in after and "MatMul" not in after
    import onnx

    inferred = onnx.shape_inference.infer_shapes(ir.to_proto(fused))
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    blocks = [n for n in inferred.graph.node if n.op_type == "MultiHeadAttention"]
    assert {types.get(x) for n in blocks for x in n.input} == {onnx.TensorProto.FLOAT}
    reference = traced(family, "vision")
    for grids in GRIDS.values():
        valid, feeds = harness.vision_feeds(spec, grids, seed=len(grids))
        want = _run(harness, reference, feeds)[valid]
        feeds["patches"] = feeds["patches"].astype(np.float16)
        got, traced16 = _run(harness, fused, feeds), _run(harness, plain, feeds)
        assert got.dtype == np.float16 and np.isfinite(got).all()
        err_fused = np.abs(got[valid].astype(np.float32) - want).max()
        err_traced = np.abs(traced16[valid].astype(np.float32) - want).max()
        assert err_fused <= err_traced * 1.25 + 1e-3, (err_fused, err_traced)
        np.testing.assert_allclose(got[valid].astype(np.float32), want, atol=0.05 * np.abs(want).max())
