"""Our int8 sessions multiply exactly on every x86 CPU: without VNNI (AVX2, AVX-512F) onnxruntime's
u8 x s8 kernel adds each pair of products in a saturating int16 (vpmaddubsw), unless the session asks
for its exact u8 x u8 path (``session_options``). On a VNNI or ARM CPU both paths are exact, so this
test can only fail on the CPUs it guards."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qvl_export.runtimes.onnxrt import session_options


def test_int8_session_matmul_is_exact_where_u8s8_pairs_overflow_int16():
    import onnxruntime as ort

    k, n = 64, 48
    rng = np.random.default_rng(0)
    w = np.where(rng.random((k, n)) < 0.9, 127, -128).astype(np.int8)  # every pair of products over int16
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [None, k])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [None, n])],
        [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    a = np.full((5, k), 255, dtype=np.uint8)
    a[1] = rng.integers(200, 256, k)
    exact = a.astype(np.int64) @ w.astype(np.int64)
    assert np.abs(exact).max() > 2 * 32767  # a saturated int16 pair sum cannot give this
    opts, disabled = session_options(SimpleNamespace(precision="int8"), threads=1)
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"],
                                disabled_optimizers=disabled)
    np.testing.assert_array_equal(sess.run(None, {"a": a})[0], exact)


def test_int8_weight_dequantized_for_two_consumers_still_loads(tmp_path):
    """A tied embedding: one int8 table, dequantized once, read by the embedding Gather and the lm_head
    MatMul. onnxruntime's u8 conversion of a weight it has duplicated per consumer fails to load the
    graph, so such a graph opens on the default kernels; one that is not shared keeps the exact ones."""
    import onnxruntime as ort

    hidden, vocab = 8, 300
    rng = np.random.default_rng(1)
    table = rng.integers(-128, 128, (hidden, vocab)).astype(np.int8)  # values past [-64, 64]: converted
    scale = (rng.random(vocab) * 0.01 + 0.001).astype(np.float32)

    def model(tied: bool | str):
        gather = [helper.make_node("Gather", ["w", "ids"] if tied else ["emb", "ids"], ["e"], axis=1)]
        if tied == "rows":  # the ort target's form: int8 rows gathered, then dequantized; one DQ for the MatMul
            gather = [helper.make_node("Gather", ["wq", "ids"], ["eq"], axis=1),
                      helper.make_node("Gather", ["ws", "ids"], ["es"], axis=0),
                      helper.make_node("Unsqueeze", ["es", "zero"], ["es2"]),
                      helper.make_node("Cast", ["eq"], ["ef"], to=TensorProto.FLOAT),
                      helper.make_node("Mul", ["ef", "es2"], ["e"])]
        nodes = [helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w"], axis=1), *gather,
                 helper.make_node("Transpose", ["e"], ["et"], perm=[1, 0]),
                 helper.make_node("MatMul", ["et", "w"], ["logits"])]
        inits = [numpy_helper.from_array(table, "wq"), numpy_helper.from_array(scale, "ws"),
                 numpy_helper.from_array(np.zeros(vocab, np.int8), "wz")]
        if not tied:
            inits.append(numpy_helper.from_array(rng.standard_normal((hidden, vocab)).astype(np.float32), "emb"))
        if tied == "rows":
            inits.append(numpy_helper.from_array(np.zeros(1, np.int64), "zero"))
        graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [None])],
                                  [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, vocab])], inits)
        path = tmp_path / f"tied-{tied}.onnx"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
        return path

    part = SimpleNamespace(precision="int8")
    for tied in (True, False, "rows"):
        path = model(tied)
        opts, disabled = session_options(part, threads=1, path=path)
        try:
            exact = opts.get_session_config_entry("session.x64quantprecision") == "1"
        except RuntimeError:  # not set
            exact = False
        assert exact is (tied is not True)
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"], disabled_optimizers=disabled)
        assert sess.run(None, {"ids": np.array([3, 299])})[0].shape == (2, vocab)
    opts, disabled = session_options(part, threads=1)  # asked for the exact kernels regardless: the graph fails
    try:
        ort.InferenceSession(str(model(True)), opts, providers=["CPUExecutionProvider"], disabled_optimizers=disabled)
    except Exception as err:
        assert "existing tensor" in str(err)
    else:  # an onnxruntime that converts a shared weight once: the exact kernels can then be kept
        raise AssertionError("onnxruntime now loads a shared int8 weight with x64quantprecision: drop the fallback")
