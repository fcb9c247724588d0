"""fuse_decoder_attention: structure (attention ops out, GroupQueryAttention + RotaryEmbedding in, new IO),
numbers (prefill with an image + decode steps, batch 1 and 2, before vs after) and the in-place cache."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from qvl_export.core.errors import QvlError
from qvl_export.passes import select_passes
from qvl_export.passes.fuse_decoder_attention import FuseDecoderAttention


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_attention_becomes_gqa(family, traced, spec_of, harness):
    spec = spec_of(family)
    layers = spec.text.num_hidden_layers
    model = traced(family, "decoder")
    before = harness.counts(model)
    fuse = harness.fuse(model, FuseDecoderAttention())
    assert fuse.modified
    after = harness.counts(model)

    assert fuse.details["fused"] == layers
    assert after["com.microsoft:GroupQueryAttention"] == layers
    assert after["com.microsoft:RotaryEmbedding"] == 2 * layers  # q and k
    # gone: softmax attention, its causal mask, the K/V concat with the past, rotate_half
    for op in ("Softmax", "Tile", "Neg"):
        assert before.get(op, 0) > 0 and op not in after, op
    # what stays: the clamp that embeds generated image pads as text (models/decoder.py)
    assert after.get("LessOrEqual", 0) >= 1
    assert after["Where"] == 2  # image-row insertion and its index clamp only
    assert before["MatMul"] - after["MatMul"] == 2 * layers  # q k^T and probs v per layer
    names = [v.name for v in model.graph.inputs]
    assert names[3:5] == ["seqlens_k", "total_sequence_length"]
    by_name = {v.name: v for v in list(model.graph.inputs) + list(model.graph.outputs)}
    assert by_name["seqlens_k"].dtype == ir.DataType.INT32 and by_name["total_sequence_length"].shape.rank() == 0
    for i in range(layers):
        for kind in ("key", "value"):
            for name in (f"past_key_values.{i}.{kind}", f"present.{i}.{kind}"):
                assert str(by_name[name].shape[2]) == "kv_capacity"


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("batch", [1, 2])
def test_same_numbers_prefill_with_image_and_decode(family, batch, traced, spec_of, harness):
    spec = spec_of(family)
    plain, fused = traced(family, "decoder"), traced(family, "decoder")
    assert harness.fuse(fused, FuseDecoderAttention()).modified
    before = harness.run_decoder(plain, spec, batch=batch, steps=4)
    after = harness.run_decoder(fused, spec, batch=batch, steps=4)
    harness.assert_same_decoding(before, after)


def test_cache_stays_in_place(traced, spec_of, harness):
    """Every step writes into the same buffers (the prefill's), only the new rows change."""
    spec = spec_of("qwen2_5_vl")
    model = traced("qwen2_5_vl", "decoder")
    harness.fuse(model, FuseDecoderAttention())
    steps = harness.run_decoder(model, spec, steps=4)
    first = steps[0]["buffers"]
    addresses = [b.ctypes.data for b in first]
    for step in steps[1:]:
        assert all(a is b for a, b in zip(step["buffers"], first))
        assert [b.ctypes.data for b in step["buffers"]] == addresses
    prompt = steps[0]["kv"][0].shape[2]
    for i, step in enumerate(steps):
        assert step["kv"][0].shape[2] == prompt + i
        np.testing.assert_array_equal(step["kv"][0][:, :, :prompt], steps[0]["kv"][0])  # older rows untouched


def test_no_match_says_why_and_leaves_graph(traced, harness):
    """A mask the pass cannot prove causal-with-finite-floor: no rewrite, no new inputs, the reason recorded."""
    model = traced("qwen2_5_vl", "decoder")
    for node in model.graph:
        if node.op_type == "Where" and node.inputs[2] is not None and node.inputs[2].const_value is not None \
                and node.inputs[2].const_value.numpy().size == 1 and float(node.inputs[2].const_value.numpy()) < -1e30:
            floor = ir.Value(name=f"{node.name}_zero_floor", const_value=ir.tensor(np.float32(0.0)))
            floor.shape, floor.type = ir.Shape([]), ir.TensorType(ir.DataType.FLOAT)
            model.graph.register_initializer(floor)
            node.replace_input_with(2, floor)
    before = harness.counts(model)
    fuse = harness.fuse(model, FuseDecoderAttention())
    assert not fuse.modified
    assert harness.counts(model) == before
    assert "seqlens_k" not in [v.name for v in model.graph.inputs]
    assert any("large negative" in r for r in fuse.details["why_not"]), fuse.details


def test_partial_match_raises(traced, harness):
    """Fusing some layers but not others would mix two cache layouts: the pass refuses."""
    model = traced("qwen2_5_vl", "decoder")
    wheres = [n for n in model.graph if n.op_type == "Where" and n.inputs[2] is not None
              and n.inputs[2].const_value is not None and n.inputs[2].const_value.numpy().size == 1]
    node = wheres[-1]  # the last layer's mask floor -> 0: that layer no longer matches
    floor = ir.Value(name="zero_floor", const_value=ir.tensor(np.float32(0.0)))
    floor.shape, floor.type = ir.Shape([]), ir.TensorType(ir.DataType.FLOAT)
    model.graph.register_initializer(floor)
    node.replace_input_with(2, floor)
    with pytest.raises(QvlError, match="partial fusion"):
        harness.fuse(model, FuseDecoderAttention())


def test_decoder_on_onnxruntime_target_only():
    assert "fuse_decoder_attention" in [p.name for p in select_passes("ort", "decoder", "graph")]
    assert "fuse_decoder_attention" not in [p.name for p in select_passes("trt", "decoder", "graph")]
    assert "fuse_decoder_attention" not in [p.name for p in select_passes("ort", "vision", "graph")]


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_float16_decoder_fuses_with_float32_rotary(family, traced, spec_of, harness):
    """A decoder traced in float16 fuses too (rotary and scores run in float32 between casts there): GQA
    takes the float16 q/k/v and cache, each RotaryEmbedding reads a float32 cast. Numbers: its cache equals
    the plain float16 graph's to float16 rounding, and its logits are no further from the float32 graph's
    than the plain float16 graph's are (GQA keeps the probabilities in float32)."""
    spec = spec_of(family)
    layers = spec.text.num_hidden_layers
    plain, fused = traced(family, "decoder", "float16"), traced(family, "decoder", "float16")
    fuse = harness.fuse(fused, FuseDecoderAttention())
    assert fuse.modified and fuse.details["fused"] == layers, fuse.details
    after = harness.counts(fused)
    assert after["com.microsoft:GroupQueryAttention"] == layers and "Softmax" not in after
    rotaries = [n for n in fused.graph if n.op_type == "RotaryEmbedding"]
    assert len(rotaries) == 2 * layers
    for node in rotaries:
        assert node.inputs[0].dtype == ir.DataType.FLOAT and node.inputs[0].producer().op_type == "Cast"
    by_name = {v.name: v for v in list(fused.graph.inputs) + list(fused.graph.outputs)}
    assert by_name["past_key_values.0.key"].dtype == by_name["present.0.value"].dtype == ir.DataType.FLOAT16

    reference = harness.run_decoder(traced(family, "decoder"), spec, steps=4)
    before = harness.run_decoder(plain, spec, steps=4)
    fused_steps = harness.run_decoder(fused, spec, steps=4)
    for step, (ref, a, b) in enumerate(zip(reference, before, fused_steps)):
        for ka, kb in zip(a["kv"], b["kv"]):
            np.testing.assert_allclose(kb.astype(np.float32), ka.astype(np.float32), rtol=4e-3, atol=4e-3,
                                       err_msg=f"kv, step {step}")
        want = ref["logits"].astype(np.float64)
        plain_err = np.abs(a["logits"].astype(np.float64) - want).max()
        fused_err = np.abs(b["logits"].astype(np.float64) - want).max()
        assert plain_err > 0, step  # float16 differs from float32: the comparison below means something
        assert fused_err <= 1.25 * plain_err, (step, fused_err, plain_err)
