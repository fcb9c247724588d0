"""The TensorRT-rules lint: our trt graphs are clean, and each rule fires on a graph that breaks it."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from qvl_export.building.trt_lint import lint_errors, lint_model
from qvl_export.core.manifest import Manifest


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_exported_parts_are_trt_legal(family, checkpoint, tmp_path):
    from qvl_export.building.artifacts import BuildOptions, build

    out = tmp_path / "bundle"
    build(checkpoint(family), out, BuildOptions(target="trt", bundle=True))
    m = Manifest.read(out)
    for name, part in m.parts.items():
        findings = lint_model(ir.load(out / part.file), name)
        assert lint_errors(findings) == [], findings
        # format 3: the findings are the part's lint record, not a pass record
        assert part.lint == [{"level": f.level, "rule": f.rule, "node": f.node, "message": f.message}
                             for f in findings]
        assert all(r.get("pass") != "trt_lint" for r in part.passes)
    assert (out / "trt_build.json").exists() and (out / "BUILD_ON_DEVICE.md").exists()


def _matmul_graph(a_dq=True, w_dq=True, w_axis=1, act_scale_shape=(), zero_point=0, qtype=TensorProto.INT8,
                  quantize_output=False, contrib=False):
    nodes, inits = [], []
    w = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    inits.append(numpy_helper.from_array(w, "w"))
    a_in = "x"
    if a_dq:
        inits += [numpy_helper.from_array(np.full(act_scale_shape, 0.1, np.float32), "a_s"),
                  helper.make_tensor("a_zp", qtype, act_scale_shape, np.full(act_scale_shape, zero_point).ravel())]
        nodes += [helper.make_node("QuantizeLinear", ["x", "a_s", "a_zp"], ["xq"], name="q_x"),
                  helper.make_node("DequantizeLinear", ["xq", "a_s", "a_zp"], ["xdq"], name="dq_x")]
        a_in = "xdq"
    w_in = "w"
    if w_dq:
        n = w.shape[w_axis]
        inits += [numpy_helper.from_array(np.full((n,), 0.02, np.float32), "w_s"),
                  helper.make_tensor("w_zp", TensorProto.INT8, (n,), np.zeros(n, int))]
        nodes += [helper.make_node("QuantizeLinear", ["w", "w_s", "w_zp"], ["wq"], axis=w_axis, name="q_w"),
                  helper.make_node("DequantizeLinear", ["wq", "w_s", "w_zp"], ["wdq"], axis=w_axis, name="dq_w")]
        w_in = "wdq"
    nodes.append(helper.make_node("MatMul", [a_in, w_in], ["y"], name="mm"))
    out = "y"
    if quantize_output:
        inits += [numpy_helper.from_array(np.float32(0.1), "o_s")]
        nodes.append(helper.make_node("QuantizeLinear", ["y", "o_s"], ["yq"], name="q_out"))
        out = "yq"
    if contrib:
        nodes.append(helper.make_node("FastGelu", [out], ["z"], domain="com.microsoft", name="gelu"))
        out = "z"
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                          [helper.make_tensor_value_info(out, TensorProto.UNDEFINED, None)], inits)
    opsets = [helper.make_opsetid("", 19)] + ([helper.make_opsetid("com.microsoft", 1)] if contrib else [])
    return ir.from_proto(helper.make_model(g, opset_imports=opsets))


def rules(model):
    return {f.rule for f in lint_errors(lint_model(model))}


def test_clean_qdq_matmul_passes():
    assert rules(_matmul_graph()) == set()


@pytest.mark.parametrize("kwargs,rule", [
    (dict(w_dq=False), "qdq-inputs"),
    (dict(w_axis=0), "qdq-weight-axis"),
    (dict(act_scale_shape=(8,)), "qdq-activation"),
    (dict(zero_point=3), "qdq-zero-point"),
    (dict(qtype=TensorProto.UINT8), "qdq-type"),
    (dict(contrib=True), "domain"),
])
def test_each_rule_fires(kwargs, rule):
    assert rule in rules(_matmul_graph(**kwargs))


def test_quantized_output_of_weighted_op_is_flagged():
    findings = lint_model(_matmul_graph(quantize_output=True))
    assert any(f.rule == "qdq-output" for f in findings)


def test_opset_out_of_range():
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = ir.from_proto(helper.make_model(g, opset_imports=[helper.make_opsetid("", 8)]))
    assert "opset" in rules(model)
    onnx.checker.check_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)]))
