"""The declared pass lists and the pass plumbing: two stages, name checks, details in the records, a
rewrite rule applied alone, cleanup only where the lists put it."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from qvl_export.core.errors import QvlError
from qvl_export.passes import (
    GRAPH_PASSES,
    QUANTIZED_PASSES,
    all_passes,
    check_pass_names,
    run_passes,
    select_passes,
)
from qvl_export.passes.fold_constants import FoldConstants
from qvl_export.passes.fuse_vision_gelu import FuseVisionGelu
from qvl_export.passes.fuse_vision_rotary import VISION_ROTARY


def test_names_unique_and_every_pass_in_one_list():
    names = [p.name for p in all_passes()]
    assert len(names) == len(set(names))
    assert [c.name for c in QUANTIZED_PASSES] == ["quantize_embeddings", "unshare_dequantize"]
    assert not {c.name for c in GRAPH_PASSES} & {c.name for c in QUANTIZED_PASSES}


def test_graph_list_cleans_up_after_the_fusions():
    names = [c.name for c in GRAPH_PASSES]
    last_fusion = max(i for i, n in enumerate(names) if n.startswith(("fuse_", "pack_")))
    assert names[:4] == ["fold_constants", "eliminate_identities", "remove_unused", "cse"]
    assert names[last_fusion + 1:] == ["cse_after_fusions", "fold_constants_after_fusions",
                                       "remove_unused_after_fusions"]


def test_select_by_stage_target_part():
    assert [p.name for p in select_passes("ort", "decoder", "quantized")] == ["quantize_embeddings",
                                                                             "unshare_dequantize"]
    assert [p.name for p in select_passes("ort", "vision", "quantized")] == ["unshare_dequantize"]
    assert select_passes("trt", "decoder", "quantized") == []
    graph = [p.name for p in select_passes("ort", "decoder", "graph")]
    assert "quantize_embeddings" not in graph and "fuse_decoder_attention" in graph
    assert select_passes("ort", "decoder", "graph", only=[]) == []
    assert [p.name for p in select_passes("ort", "decoder", "graph", only=["fold_constants", "cse"])] == \
        ["fold_constants", "cse"]
    assert "cse" not in [p.name for p in select_passes("ort", "decoder", "graph", skip=["cse"])]
    with pytest.raises(ValueError):
        select_passes("ort", "decoder", "late")


def test_unknown_names_say_where_the_list_is():
    check_pass_names(["fold_constants"], ["unshare_dequantize"])
    with pytest.raises(QvlError, match=r"Unknown pass 'fuse_everything'; 'qvl-export passes' lists them: .*cse"):
        check_pass_names(None, ["fuse_everything"])
    with pytest.raises(QvlError, match="Unknown pass 'x'"):
        select_passes("ort", "vision", "graph", only=["x"])


DUPLICATES = """
<ir_version: 10, opset_import: ["" : 18]>
g (float[N] x) => (float[N] y) {
  one = Constant <value = float {1.0}> ()
  a = Add(x, one)
  b = Add(x, one)
  y = Mul(a, b)
}
"""


def test_fold_constants_does_not_merge_duplicates():
    model = ir.from_proto(onnx.parser.parse_model(DUPLICATES))
    FoldConstants()(model)
    assert sum(n.op_type == "Add" for n in model.graph) == 2  # merging them is the cse pass's work
    _, records = run_passes(model, select_passes("ort", "vision", "graph", only=["cse", "remove_unused"]))
    assert sum(n.op_type == "Add" for n in model.graph) == 1
    assert [r["pass"] for r in records] == ["remove_unused", "cse"]  # the declared order, not the given one


GELU = """
<ir_version: 10, opset_import: ["" : 18]>
g (float[N, 8] x) => (float[N, 8] y) {
  sqrt2 = Constant <value = float {1.4142135}> ()
  one = Constant <value = float {1.0}> ()
  half = Constant <value = float {0.5}> ()
  d = Div(x, sqrt2)
  e = Erf(d)
  p = Add(e, one)
  m = Mul(x, p)
  y = Mul(half, m)
}
"""


def test_details_come_back_in_the_result_and_the_record():
    model = ir.from_proto(onnx.parser.parse_model(GELU))
    result = FuseVisionGelu()(model)
    assert result.modified and result.details == {"gelu": 1}
    model = ir.from_proto(onnx.parser.parse_model(GELU))
    _, records = run_passes(model, [FuseVisionGelu()])
    assert records[0]["details"] == {"gelu": 1} and records[0]["op_changes"]["com.microsoft:Gelu"] == 1
    assert set(records[0]) == {"pass", "modified", "seconds", "nodes_before", "nodes_after", "op_changes",
                               "details"}


ROTARY = """
<ir_version: 10, opset_import: ["" : 18, "com.microsoft" : 1]>
g (float[S, 2, 8] x, float[S, 8] rope_cos, float[S, 8] rope_sin) => (float[S, 2, 8] y) {
  heads = Constant <value = int64[1] {1}> ()
  cos = Unsqueeze(rope_cos, heads)
  sin = Unsqueeze(rope_sin, heads)
  hs = Constant <value = int64[1] {4}> ()
  he = Constant <value = int64[1] {9223372036854775807}> ()
  ls = Constant <value = int64[1] {0}> ()
  le = Constant <value = int64[1] {4}> ()
  ax = Constant <value = int64[1] {-1}> ()
  st = Constant <value = int64[1] {1}> ()
  hi = Slice(x, hs, he, ax, st)
  lo = Slice(x, ls, le, ax, st)
  neg = Neg(hi)
  rot = Concat <axis = -1> (neg, lo)
  a = Mul(x, cos)
  b = Mul(rot, sin)
  y = Add(a, b)
}
"""


def test_rotary_rule_alone_on_a_graph_from_text(harness):
    """The module-level rule, applied with no pass around it: structure and numbers."""
    plain = ir.from_proto(onnx.parser.parse_model(ROTARY))
    fused = ir.from_proto(onnx.parser.parse_model(ROTARY))
    assert VISION_ROTARY.apply_to_model(fused) == 1
    ops = harness.counts(fused)
    assert ops["com.microsoft:RotaryEmbedding"] == 1 and "Neg" not in ops and "Concat" not in ops
    rng = np.random.default_rng(0)
    freqs = rng.standard_normal((5, 4)).astype(np.float32)
    angles = np.concatenate([freqs, freqs], axis=1)  # cat(f, f): the tables' contract
    feeds = {"x": rng.standard_normal((5, 2, 8)).astype(np.float32), "rope_cos": np.cos(angles),
             "rope_sin": np.sin(angles)}
    (a,) = harness.session(plain).run(None, feeds)
    (b,) = harness.session(fused).run(None, feeds)
    np.testing.assert_allclose(b, a, atol=1e-5)
