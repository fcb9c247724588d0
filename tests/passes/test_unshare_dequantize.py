"""unshare_dequantize: one Q/DQ pair per consumer - structure, numbers, and the fusion it enables."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from qvl_export.passes.unshare_dequantize import UnshareDequantize


def _qkv_graph() -> onnx.ModelProto:
    """x -> Q -> DQ -> three weighted MatMuls (q/k/v-like), each weight behind its own DQ."""
    rng = np.random.default_rng(0)
    k, n = 64, 48
    inits = [numpy_helper.from_array(np.array(0.02, np.float32), "xs"),
             numpy_helper.from_array(np.array(0, np.int8), "xz")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"])]
    outputs = []
    for i in range(3):
        inits += [numpy_helper.from_array(rng.integers(-127, 128, (k, n)).astype(np.int8), f"w{i}"),
                  numpy_helper.from_array(rng.uniform(0.005, 0.02, n).astype(np.float32), f"ws{i}"),
                  numpy_helper.from_array(np.zeros(n, np.int8), f"wz{i}")]
        nodes += [helper.make_node("DequantizeLinear", [f"w{i}", f"ws{i}", f"wz{i}"], [f"wd{i}"], axis=1),
                  helper.make_node("MatMul", ["xd", f"wd{i}"], [f"y{i}"])]
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "qkv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 5, k])],
                              outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    model.ir_version = 9
    return model


def _run(model: onnx.ModelProto, x: np.ndarray, optimized: str | None = None, disabled=None) -> list:
    opts = ort.SessionOptions()
    if optimized:
        opts.optimized_model_filepath = optimized
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"],
                                disabled_optimizers=disabled)
    return sess.run(None, {"x": x})


def test_each_consumer_gets_its_own_pair_and_the_numbers_stay(tmp_path):
    before = _qkv_graph()
    model = ir.from_proto(before)
    result = UnshareDequantize()(model)
    assert result.modified
    after = ir.to_proto(result.model)
    ops = [n.op_type for n in after.graph.node]
    assert ops.count("QuantizeLinear") == 3 and ops.count("DequantizeLinear") == 6
    consumers = {}
    for node in after.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node.op_type)
    dq_outputs = [n.output[0] for n in after.graph.node if n.op_type == "DequantizeLinear"]
    assert all(len(consumers[o]) == 1 for o in dq_outputs)

    x = np.random.default_rng(1).normal(size=(1, 5, 64)).astype(np.float32)
    plain = {"disabled": None}
    for a, b in zip(_run(before, x, **plain), _run(after, x, **plain)):
        np.testing.assert_array_equal(a, b)
    # what it is for: with CSE off (as the runtime opens int8 parts) all three become integer kernels
    _run(after, x, optimized=str(tmp_path / "opt.onnx"), disabled=["CommonSubexpressionElimination"])
    fused = [n.op_type for n in onnx.load(tmp_path / "opt.onnx").graph.node]
    assert fused.count("MatMulIntegerToFloat") == 3 and "MatMul" not in fused
    assert not UnshareDequantize()(ir.from_proto(after)).modified  # nothing left to do


def _dynamic_qkv_graph() -> onnx.ModelProto:
    """The same three projections behind one DynamicQuantizeLinear -> DQ (an int8 decoder's dynamic
    activation scales, ``calibration/qdq.py``)."""
    model = _qkv_graph()
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend([helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xqs", "xqz"]),
                             helper.make_node("DequantizeLinear", ["xq", "xqs", "xqz"], ["xd"]), *nodes[2:]])
    keep = [i for i in model.graph.initializer if i.name not in ("xs", "xz")]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    return model


def test_dynamic_activation_gets_its_own_quantize_step_per_consumer(tmp_path):
    before = _dynamic_qkv_graph()
    result = UnshareDequantize()(ir.from_proto(before))
    assert result.modified and result.details["copies"] == 2
    after = ir.to_proto(result.model)
    ops = [n.op_type for n in after.graph.node]
    assert ops.count("DynamicQuantizeLinear") == 3 and ops.count("DequantizeLinear") == 6
    x = np.random.default_rng(2).normal(size=(1, 5, 64)).astype(np.float32)
    for a, b in zip(_run(before, x), _run(after, x)):
        np.testing.assert_array_equal(a, b)
    _run(after, x, optimized=str(tmp_path / "opt.onnx"), disabled=["CommonSubexpressionElimination"])
    fused = [n.op_type for n in onnx.load(tmp_path / "opt.onnx").graph.node]
    assert fused.count("DynamicQuantizeMatMul") == 3 and "MatMul" not in fused
