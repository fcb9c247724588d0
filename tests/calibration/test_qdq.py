"""The streaming Q/DQ writer against onnxruntime's own quantize_static: same graph, same bytes.

Both calibrate on the same activations (the writer through ``ActivationStats``, fed one run at a
time as quantize_static feeds its collectors with ``CalibStridedMinMax=1``), so every scale, every
quantized weight and every int32 bias must be identical, and the two quantized models must give the
same outputs.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from qvl_export.calibration.qdq import place_qdq
from qvl_export.calibration.taps import TAP_OUTPUTS, ActivationStats, weighted_nodes, write_tap_graph


def _model(path, rng):
    w1 = rng.standard_normal((24, 16)).astype(np.float32)  # Gemm transB: [N, K]
    b1 = rng.standard_normal(24).astype(np.float32)
    w2 = (rng.standard_normal((24, 12)) * np.linspace(0.1, 3, 12)).astype(np.float32)  # MatMul [K, N]
    w3 = rng.standard_normal((12, 8)).astype(np.float32)  # Gemm, no transB, no bias
    g = helper.make_graph([
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h1"], name="gemm1", transB=1),
        helper.make_node("Relu", ["h1"], ["r1"], name="relu"),
        helper.make_node("MatMul", ["r1", "w2"], ["h2"], name="mm2"),
        helper.make_node("MatMul", ["h2", "h2t"], ["att"], name="attention"),  # two activations: stays float
        helper.make_node("Transpose", ["h2"], ["h2t"], name="t", perm=[1, 0]),
        helper.make_node("Gemm", ["h2", "w3"], ["y"], name="gemm3"),
    ], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8]),
         helper.make_tensor_value_info("att", TensorProto.FLOAT, ["n", "n"])],
        [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (w3, "w3"))])
    # graph order: Transpose before its consumer
    nodes = list(g.node)
    g.ClearField("node")
    g.node.extend([nodes[0], nodes[1], nodes[2], nodes[4], nodes[3], nodes[5]])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)]), str(path))


class _Reader:
    def __init__(self, feeds):
        self.feeds, self.i, self.end = feeds, 0, len(feeds)

    def get_next(self):
        if self.i >= self.end:
            return None
        self.i += 1
        return self.feeds[self.i - 1]

    def rewind(self):
        self.i, self.end = 0, len(self.feeds)

    def set_range(self, start_index, end_index):
        self.i, self.end = start_index, min(end_index, len(self.feeds))

    def __len__(self):
        return len(self.feeds)


def _ours(src, tmp_path, feeds, calibrator, target):
    taps = write_tap_graph(src, tmp_path / ".tap.onnx")
    sess = ort.InferenceSession(str(tmp_path / ".tap.onnx"), providers=["CPUExecutionProvider"])
    stats = ActivationStats(taps, calibrator)
    k = len(TAP_OUTPUTS)
    for f in feeds:
        outs = sess.run(None, f)[2:]
        stats.update({name: outs[k * i:k * (i + 1)] for i, name in enumerate(taps)})
    model = ir.load(src)
    report = place_qdq(model, stats.ranges(), "int8", "test", calibrator=calibrator, target=target)
    out = tmp_path / "ours.onnx"
    ir.save(model, out)
    return out, report


def _theirs(src, tmp_path, feeds, calibrator, target):
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    out = tmp_path / "theirs.onnx"
    method = {"max": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile}[calibrator]
    quantize_static(str(src), str(out), _Reader(feeds), quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=["MatMul", "Gemm"], per_channel=True, reduce_range=False,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, calibrate_method=method,
                    nodes_to_quantize=["gemm1", "mm2", "gemm3"],
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "MatMulConstBOnly": True,
                                   "QuantizeBias": target == "ort",
                                   "OpTypesToExcludeOutputQuantization": ["MatMul", "Gemm"],
                                   "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1}, "CalibPercentile": 99.999,
                                   "CalibStridedMinMax": 1})
    return out


@pytest.mark.parametrize("calibrator,target", [("max", "trt"), ("percentile", "ort")])
def test_writer_matches_quantize_static(calibrator, target, tmp_path):
    rng = np.random.default_rng(3)
    src = tmp_path / "float.onnx"
    _model(src, rng)
    feeds = [{"x": (rng.standard_normal((n, 16)) * (1 + 5 * (rng.random((n, 16)) > 0.99))).astype(np.float32)}
             for n in (5, 9, 3, 17)]
    ours, report = _ours(src, tmp_path, feeds, calibrator, target)
    theirs = _theirs(src, tmp_path, feeds, calibrator, target)
    assert report.quantized == ["gemm1", "mm2", "gemm3"]
    a = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(ours)).graph.initializer}
    b = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(theirs)).graph.initializer}
    assert sorted(a) == sorted(b)
    for name in b:
        assert a[name].dtype == b[name].dtype, name
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    ops = lambda p: sorted(n.op_type for n in onnx.load(str(p)).graph.node)  # noqa: E731
    assert ops(ours) == ops(theirs)
    x = {"x": rng.standard_normal((7, 16)).astype(np.float32)}
    ya = ort.InferenceSession(str(ours), providers=["CPUExecutionProvider"]).run(None, x)
    yb = ort.InferenceSession(str(theirs), providers=["CPUExecutionProvider"]).run(None, x)
    for u, v in zip(ya, yb):
        np.testing.assert_array_equal(u, v)


def test_tap_graph_keeps_weights_in_the_part_file(tmp_path):
    rng = np.random.default_rng(4)
    src = tmp_path / "float.onnx"
    _model(src, rng)
    model = ir.load(src)
    ir.save(model, tmp_path / "part.onnx", external_data="part.onnx.data", size_threshold_bytes=0)
    taps = write_tap_graph(tmp_path / "part.onnx", tmp_path / ".tap.onnx")
    tap = onnx.load(str(tmp_path / ".tap.onnx"), load_external_data=False)
    weights = {i.name: i for i in tap.graph.initializer if i.name in ("w1", "b1", "w2", "w3")}
    assert len(weights) == 4
    assert all(i.data_location == TensorProto.EXTERNAL for i in weights.values())  # read from part.onnx.data
    assert taps == ["x", "r1", "h2"]
    assert [o.name for o in tap.graph.output][2:7] == [f"x.tap_{k}" for k in TAP_OUTPUTS]
    assert [n.activation for n in weighted_nodes(ir.load(tmp_path / "part.onnx"))] == ["x", "r1", "h2"]
