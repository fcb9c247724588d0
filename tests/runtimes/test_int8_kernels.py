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
