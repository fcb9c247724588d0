"""pack_decoder_matmuls: structure (MatMuls and bias Adds merged, Splits added, weights not grown) and
numbers (decoder before vs after, plain and GroupQueryAttention graphs). The default packs gate/up
only (q/k/v packing measured no gain); both kinds are tested."""

from __future__ import annotations

import numpy as np
import pytest

from qvl_export.passes import select_passes
from qvl_export.passes.fuse_decoder_attention import FuseDecoderAttention
from qvl_export.passes.pack_decoder_matmuls import PackDecoderMatMuls


def weight_bytes(model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_gate_up_packed_by_default(family, traced, spec_of, harness):
    spec = spec_of(family)
    layers = spec.text.num_hidden_layers
    plain, packed = traced(family, "decoder"), traced(family, "decoder")
    before, size = harness.counts(plain), weight_bytes(plain)
    pack = harness.fuse(packed, PackDecoderMatMuls())
    assert pack.modified
    after = harness.counts(packed)

    assert pack.details["packed"] == {"gate_up": layers}
    assert before["MatMul"] - after["MatMul"] == layers  # gate + up -> one per layer
    assert before["Add"] == after["Add"]  # no bias on the MLP
    assert after.get("Split", 0) - before.get("Split", 0) == layers
    assert abs(weight_bytes(packed) - size) <= 64 * layers  # only the split-size constants are new
    assert all("gate_up groups only" in r for r in pack.details["not_packed"])  # q/k/v left, and why
    harness.assert_same_decoding(harness.run_decoder(plain, spec), harness.run_decoder(packed, spec))


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qkv_and_gate_up_packed_on_request(family, traced, spec_of, harness):
    spec = spec_of(family)
    layers = spec.text.num_hidden_layers
    plain, packed = traced(family, "decoder"), traced(family, "decoder")
    before = harness.counts(plain)
    pack = harness.fuse(packed, PackDecoderMatMuls(kinds=("gate_up", "qkv")))
    assert pack.modified
    after = harness.counts(packed)

    assert pack.details["packed"] == {"qkv": layers, "gate_up": layers}
    assert before["MatMul"] - after["MatMul"] == 2 * layers + layers  # 3 -> 1 and 2 -> 1 per layer
    assert before["Add"] - after["Add"] == 2 * layers  # q/k/v bias Adds -> one
    assert after.get("Split", 0) - before.get("Split", 0) == 2 * layers
    harness.assert_same_decoding(harness.run_decoder(plain, spec), harness.run_decoder(packed, spec))


def test_packs_after_attention_fusion(traced, spec_of, harness):
    """In the pipeline's order (after fuse_decoder_attention) the Split feeds RotaryEmbedding / GQA."""
    spec = spec_of("qwen2_5_vl")
    plain, fused = traced("qwen2_5_vl", "decoder"), traced("qwen2_5_vl", "decoder")
    harness.fuse(fused, FuseDecoderAttention())
    pack = harness.fuse(fused, PackDecoderMatMuls(kinds=("gate_up", "qkv")))
    assert pack.modified
    assert pack.details["packed"] == {"qkv": spec.text.num_hidden_layers, "gate_up": spec.text.num_hidden_layers}
    harness.assert_same_decoding(harness.run_decoder(plain, spec, batch=2), harness.run_decoder(fused, spec, batch=2))


def test_kinds_select_and_say_why(traced, harness):
    model = traced("qwen2_vl", "decoder")
    pack = harness.fuse(model, PackDecoderMatMuls(kinds=("qkv",)))
    assert pack.modified
    assert pack.details["packed"] == {"qkv": 2}
    assert all("qkv groups only" in r for r in pack.details["not_packed"])


def test_plain_onnx_for_both_targets(traced):
    for target in ("ort", "trt"):
        assert "pack_decoder_matmuls" in [p.name for p in select_passes(target, "decoder", "graph")]
    model = traced("qwen2_vl", "decoder")
    PackDecoderMatMuls(kinds=("gate_up", "qkv"))(model)
    assert {n.domain for n in model.graph} <= {"", "ai.onnx"}
    splits = [n for n in model.graph if n.op_type == "Split"]
    assert all(n.inputs[1] is not None and n.inputs[1].const_value is not None for n in splits)
    assert all(np.asarray(n.attributes["axis"].value) == -1 for n in splits)
