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


def _int4_graph(block=128, axis=0, out_dtype=TensorProto.FLOAT16, computed=False, quantized_activation=False,
                reader="MatMul", scale_rank=2):
    """x [2, 256] @ DequantizeLinear(int4 w [256, 8], scale [256 / block, 8], block_size) in fp16."""
    k, n = 256, 8
    q = helper.make_tensor("w_q", TensorProto.INT4, (k, n), np.zeros(k * n, int).tolist())
    scale_shape = (k // block, n) if scale_rank == 2 else (n,)
    scale = numpy_helper.from_array(np.full(scale_shape, 0.01, onnx.helper.tensor_dtype_to_np_dtype(out_dtype)), "w_s")
    nodes, inits, w_src = [], [scale], "w_q"
    if computed:  # an int4 tensor made in the graph (Identity of the initializer)
        nodes.append(helper.make_node("Identity", ["w_q"], ["w_q2"], name="copy"))
        w_src = "w_q2"
    inits.append(q)
    attrs = {"axis": axis} | ({"block_size": block} if block else {})
    nodes.append(helper.make_node("DequantizeLinear", [w_src, "w_s"], ["w"], name="dq_w", **attrs))
    a_in = "x"
    if quantized_activation:
        inits += [numpy_helper.from_array(np.float16(0.1), "a_s")]
        nodes += [helper.make_node("QuantizeLinear", ["x", "a_s"], ["xq"], name="q_x"),
                  helper.make_node("DequantizeLinear", ["xq", "a_s"], ["xdq"], name="dq_x")]
        a_in = "xdq"
    if reader == "MatMul":
        nodes.append(helper.make_node("MatMul", [a_in, "w"], ["y"], name="mm"))
    else:
        nodes.append(helper.make_node(reader, ["w"], ["y"], name="other"))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", out_dtype, [2, k])],
                          [helper.make_tensor_value_info("y", out_dtype, None)], inits,
                          value_info=[helper.make_tensor_value_info("w_q2", TensorProto.INT4, [k, n])] * computed)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return ir.from_proto(model)


def test_int4_weight_only_matmul_passes_and_runs_on_onnxruntime():
    import onnxruntime as ort

    model = _int4_graph()
    assert [f.rule for f in lint_model(model)] == ["opset"]  # 21 (blocked DQ) > JetPack 6's 20: a warning
    sess = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    assert sess.run(None, {"x": np.ones((2, 256), np.float16)})[0].shape == (2, 8)


@pytest.mark.parametrize("kwargs,rule", [
    (dict(block=32), "int4-block"),
    (dict(block=0, scale_rank=1, axis=1), "int4-block"),  # per channel: TensorRT's int4 needs blocks
    (dict(computed=True), "int4-weight-only"),
    (dict(quantized_activation=True), "int4-weight-only"),
    (dict(reader="Relu"), "int4-weight-only"),
])
def test_each_int4_rule_fires(kwargs, rule):
    assert rule in rules(_int4_graph(**kwargs))


def test_int4_dequantized_to_float32_is_a_warning():
    findings = lint_model(_int4_graph(out_dtype=TensorProto.FLOAT))
    assert [f.rule for f in findings] == ["opset", "int4-activations"] and lint_errors(findings) == []
