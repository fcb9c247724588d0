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
    assert [o.name for o in tap.graph.output][2:2 + len(TAP_OUTPUTS)] == [f"x.tap_{k}" for k in TAP_OUTPUTS]
    assert [n.activation for n in weighted_nodes(ir.load(tmp_path / "part.onnx"))] == ["x", "r1", "h2"]


def _dequantized_weight(init: dict, name: str, axis: int) -> np.ndarray:
    q, s = init[f"{name}_quantized"].astype(np.float32), init[f"{name}_scale"]
    return q * (s[None, :] if axis == 1 else s[:, None])


def test_dynamic_activations_compute_their_scale_per_run_and_fuse(tmp_path):
    """``activations="dynamic"`` (int8 decoders on the ort target): no calibrated activation scale in the
    graph; each run quantizes its own input to uint8 (DynamicQuantizeLinear: per tensor, asymmetric), and
    the outputs are those of that rule on the same per-channel int8 weights; onnxruntime runs a weighted
    MatMul as one integer kernel (DynamicQuantizeMatMul) - a biased Gemm it leaves in float on the
    dequantized weight, which is why ``auto`` keeps dynamic scales to the decoder (MatMuls only)."""
    rng = np.random.default_rng(5)
    src = tmp_path / "float.onnx"
    _model(src, rng)
    model = ir.load(src)
    report = place_qdq(model, {}, "int8", "test", target="ort", activations="dynamic")  # no ranges needed
    assert report.quantized == ["gemm1", "mm2", "gemm3"] and report.to_dict()["activations"] == "dynamic"
    out = tmp_path / "dynamic.onnx"
    ir.save(model, out)
    saved = onnx.load(str(out))
    ops = [n.op_type for n in saved.graph.node]
    assert ops.count("DynamicQuantizeLinear") == 3 and "QuantizeLinear" not in ops
    init = {i.name: numpy_helper.to_array(i) for i in saved.graph.initializer}
    assert "b1_quantized" not in init  # a per-run activation scale leaves the bias in float

    def dq(x):  # the ONNX DynamicQuantizeLinear rule, then dequantized
        lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
        scale = np.float32((hi - lo) / 255.0)
        zero = np.clip(np.round(-lo / scale), 0, 255)
        return ((np.clip(np.round(x / scale) + zero, 0, 255) - zero) * scale).astype(np.float32)

    w1 = _dequantized_weight(init, "w1", 0)
    w2 = _dequantized_weight(init, "w2", 1)
    w3 = _dequantized_weight(init, "w3", 1)
    for n in (1, 7):  # a decode step's single row, and a prefill
        x = (rng.standard_normal((n, 16)) * 3).astype(np.float32)
        h1 = np.maximum(dq(x) @ w1.T + init["b1"], 0)
        h2 = dq(h1) @ w2
        want = dq(h2) @ w3
        opts = ort.SessionOptions()
        opts.optimized_model_filepath = str(tmp_path / f"opt{n}.onnx")
        opts.add_session_config_entry("session.x64quantprecision", "1")  # as our sessions: exact on AVX2 too
        y, _ = ort.InferenceSession(str(out), opts, providers=["CPUExecutionProvider"]).run(None, {"x": x})
        np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    fused = [n.op_type for n in onnx.load(str(tmp_path / "opt7.onnx")).graph.node]
    assert fused.count("DynamicQuantizeMatMul") == 1 and "MatMul" not in fused  # mm2 (the weighted MatMul)


def test_activation_mode_rules():
    from qvl_export.calibration.qdq import activation_mode
    from qvl_export.core.errors import QvlError

    assert activation_mode("auto", "ort", "int8", "decoder") == "dynamic"
    assert activation_mode("auto", "ort", "int8", "vision") == "static"
    assert activation_mode("auto", "trt", "int8", "decoder") == "static"
    assert activation_mode("auto", "ort", "fp8", "decoder") == "static"
    assert activation_mode("dynamic", "ort", "int8", "vision") == "dynamic"
    assert activation_mode("static", "ort", "int8", "decoder") == "static"
    for target, precision in (("trt", "int8"), ("ort", "fp8")):
        with pytest.raises(QvlError, match="--activations static"):
            activation_mode("dynamic", target, precision, "decoder")


def _down_proj(path, rng, k=256, n=32):
    """One weighted MatMul whose input channel 0 carries a rare massive activation (as a SwiGLU
    down-projection's does) through a weight row that matters."""
    w = rng.standard_normal((k, n)).astype(np.float32) * 0.2
    w[0] *= 10
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="down_proj")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["r", k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["r", n])],
                          [numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)]), str(path))


def _massive_rows(rng, rows, k=256, every=600):
    x = rng.standard_normal((rows, k)).astype(np.float32)
    x[::every, 0] = 60.0  # one token in 600, one value in 150000: 60x the tensor's RMS
    return x


def test_range_search_keeps_the_massive_activation_the_percentile_clips(tmp_path):
    """Static int8: the percentile calibrator clips a rare 60x-RMS activation of a channel whose weight
    row matters; the range search widens that tensor's range toward its max, and the quantized op's real
    output error (onnxruntime, on rows it did not calibrate on) falls. A tensor without outliers keeps
    the calibrator's range."""
    from qvl_export.calibration.guard import measure
    from qvl_export.calibration.qdq import search_ranges

    rng = np.random.default_rng(7)
    src = tmp_path / "float.onnx"
    _down_proj(src, rng)
    taps = write_tap_graph(src, tmp_path / ".tap.onnx")
    sess = ort.InferenceSession(str(tmp_path / ".tap.onnx"), providers=["CPUExecutionProvider"])
    stats = ActivationStats(taps, "percentile")
    k = len(TAP_OUTPUTS)
    for _ in range(6):
        outs = sess.run(None, {"x": _massive_rows(rng, 400)})[1:]
        stats.update({name: outs[k * i:k * (i + 1)] for i, name in enumerate(taps)})
    base = stats.ranges()
    sens = measure(ir.load(src), stats, "int8")
    searched, summary = search_ranges(base, stats, sens)
    abs_max = stats.tensors["x"].abs_max
    assert base["x"][1] < 0.5 * abs_max  # the percentile clipped the massive activation
    assert base["x"][1] < searched["x"][1] <= abs_max * (1 + 1e-6) and searched["x"][0] == -searched["x"][1]
    assert summary["widened"] == 1 and summary["ranges"]["x"]["error_ratio"] > 1

    def output_error(ranges, name):
        model = ir.load(src)
        place_qdq(model, ranges, "int8", "test", calibrator="percentile", target="trt")
        ir.save(model, tmp_path / name)
        x = _massive_rows(np.random.default_rng(8), 1200)
        want = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        got = ort.InferenceSession(str(tmp_path / name), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        return float(np.linalg.norm(got - want) / np.linalg.norm(want))

    assert output_error(searched, "searched.onnx") < 0.5 * output_error(base, "percentile.onnx")

    plain = ActivationStats(taps, "percentile")  # no outliers: nothing to win by widening
    for _ in range(6):
        outs = sess.run(None, {"x": rng.standard_normal((400, 256)).astype(np.float32)})[1:]
        plain.update({name: outs[k * i:k * (i + 1)] for i, name in enumerate(taps)})
    kept, summary = search_ranges(plain.ranges(), plain, measure(ir.load(src), plain, "int8"))
    assert kept == plain.ranges() and summary["widened"] == 0
