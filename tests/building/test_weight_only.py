"""Decoder weight-only int4 (MatMulNBits): structure, size, the parity gate, and its refusals."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from qvl_export.building.artifacts import BuildOptions, build
from qvl_export.core import precisions
from qvl_export.core.errors import QvlError
from qvl_export.core.manifest import Manifest
from qvl_export.parity.gate import run_parity
from qvl_export.parity.samples import ALL_CASES

CASES = [c for c in ALL_CASES if c.name in ("landscape", "text-only")]


def _decoder_bytes(folder):
    part = Manifest.read(folder).parts["decoder"]
    total = (folder / part.file).stat().st_size
    return total + ((folder / part.external_data).stat().st_size if part.external_data else 0)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])  # tied / untied embeddings
def test_int4_decoder_builds_shrinks_and_passes_its_gate(family, checkpoint, artifacts, tmp_path):
    out = tmp_path / "int4"
    build(checkpoint(family), out, BuildOptions(precision="decoder=int4"))
    m = Manifest.read(out)
    assert m.parts["decoder"].precision == "int4" and m.parts["vision"].precision == "fp32"
    assert m.calibration.quantization["decoder"]["quantized_count"] > 0
    assert m.calibration.documents == []  # weight-only: no calibration data
    model = onnx.load(out / m.parts["decoder"].file)
    inits = {i.name for i in model.graph.initializer}
    ops = [n.op_type for n in model.graph.node]
    assert "MatMulNBits" in ops
    assert not any(n.op_type == "MatMul" and n.input[1] in inits for n in model.graph.node)  # every weight packed
    ratio = _decoder_bytes(out) / _decoder_bytes(artifacts(family))
    assert ratio < 0.35, ratio  # 4-bit weights + a scale per 32, int8 token rows; tiny model overheads
    report = run_parity(out, checkpoint(family), cases=CASES, max_new_tokens=16)
    assert report.passed, report.failure_summary()


def test_awq_int4_build_calibrates_records_and_passes_its_gate(checkpoint, tmp_path):
    """``--int4-method awq``: the decoder is calibrated (the built-in documents), the manifest records the
    groups scaled and the weights clipped, every weight is still packed, and the gate passes."""
    out = tmp_path / "awq"
    build(checkpoint("qwen2_5_vl"), out, BuildOptions(precision="decoder=int4", int4_method="awq", calib_limit=3))
    m = Manifest.read(out)
    summary = m.calibration.quantization["decoder"]
    assert len(m.calibration.documents) == 3
    assert "AWQ" in summary["method"] and summary["awq"]["weights_clipped"] > 0
    assert summary["awq"]["groups"] + sum("round to nearest was best" in why
                                          for why in summary["awq"]["kept_rtn"].values()) > 0
    model = onnx.load(out / m.parts["decoder"].file)
    inits = {i.name for i in model.graph.initializer}
    assert not any(n.op_type == "MatMul" and n.input[1] in inits for n in model.graph.node)
    report = run_parity(out, checkpoint("qwen2_5_vl"), cases=CASES, max_new_tokens=16)
    assert report.passed, report.failure_summary()


def test_int4_block_option_sets_the_blocks_and_the_gate_judges_them(checkpoint, tmp_path):
    """``--int4-block 64`` on the ort target: every MatMulNBits takes blocks of 64 (half the scales of the
    default 32), the manifest records it, and the parity gate passes on the result."""
    out = tmp_path / "b64"
    build(checkpoint("qwen2_vl"), out, BuildOptions(precision="decoder=int4", int4_block=64))
    m = Manifest.read(out)
    assert m.calibration.quantization["decoder"]["block_size"] == 64
    model = onnx.load(out / m.parts["decoder"].file)
    blocks = {onnx.helper.get_attribute_value(a) for n in model.graph.node if n.op_type == "MatMulNBits"
              for a in n.attribute if a.name == "block_size"}
    assert blocks == {64}
    report = run_parity(out, checkpoint("qwen2_vl"), cases=CASES, max_new_tokens=16)
    assert report.passed, report.failure_summary()


def test_int4_block_is_checked_per_target_before_tracing(checkpoint, tmp_path):
    from click.testing import CliRunner

    from qvl_export.building.weight_only import block_size_for
    from qvl_export.cli import main

    assert (block_size_for("ort"), block_size_for("trt"), block_size_for("ort", 128), block_size_for("trt", 128)) \
        == (32, 64, 128, 128)
    for target, block in (("trt", 32), ("ort", 48), ("ort", 512)):
        with pytest.raises(QvlError, match=f"--int4-block {block}: .* takes blocks of"):
            block_size_for(target, block)
    out = tmp_path / "refused"
    result = CliRunner().invoke(main, ["build", str(checkpoint("qwen2_vl")), "-o", str(out), "--target", "trt",
                                       "--bundle", "--precision", "decoder=int4", "--int4-block", "32"])
    assert result.exit_code != 0 and "TensorRT takes blocks of 64, 128" in result.output
    assert "Traceback" not in result.output and not out.exists()


def test_int4_is_decoder_only(checkpoint, tmp_path):
    """One word means the decoder (the vision parts stay fp32); naming a vision part int4 is refused."""
    assert precisions.parse("int4") == precisions.parse("decoder=int4") == {
        "vision": "fp32", "merger": "fp32", "decoder": "int4"}
    for text in ("vision=int4", "merger=int4,decoder=int4"):
        with pytest.raises(QvlError, match="decoder=int4"):
            build(checkpoint("qwen2_vl"), tmp_path / "b", BuildOptions(precision=text, target="trt", bundle=True))
    assert not list(tmp_path.iterdir())  # refused before any work


@pytest.mark.parametrize("method", ["rtn", "awq"])
def test_int4_trt_form_is_tensorrt_weight_only_and_passes_its_gate(method, checkpoint, tmp_path):
    """``--target trt``: every decoder weight an INT4 initializer dequantized in blocks (TensorRT's weight-only
    form) in an fp16 graph - no contrib op, no lint error, TensorRT's grid (positive fp16 scales; AWQ: each
    block's largest magnitude at +-7, round to nearest: the least-error scale per block) - and that graph, what TensorRT is given, passes the int4 gate on onnxruntime."""
    from onnx import numpy_helper

    out = tmp_path / method
    build(checkpoint("qwen2_5_vl"), out, BuildOptions(precision="decoder=int4", target="trt", bundle=True,
                                                      int4_method=method, calib_limit=3))
    m = Manifest.read(out)
    part = m.parts["decoder"]
    summary = m.calibration.quantization["decoder"]
    assert part.precision == "int4" and summary["block_size"] in (64, 128) and summary["kept_high_precision"] == {}
    assert not [f for f in part.lint if f["level"] == "error"]
    assert ("awq" in summary) == (method == "awq") and (method == "rtn" or summary["awq"]["groups"] > 0)
    model = onnx.load(out / part.file)
    assert {o.domain for o in model.opset_import} == {""} and model.opset_import[0].version >= 21
    inits = {i.name: i for i in model.graph.initializer}
    assert not any(n.op_type == "MatMul" and n.input[1] in inits for n in model.graph.node)  # every weight blocked
    dqs = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dqs) == summary["quantized_count"] > 0
    peaks = []
    for dq in dqs:
        assert inits[dq.input[0]].data_type == onnx.TensorProto.INT4
        scale = numpy_helper.to_array(inits[dq.input[1]])
        assert scale.dtype == np.float16 and (scale > 0).all()
        block = next(a.i for a in dq.attribute if a.name == "block_size")
        q = numpy_helper.to_array(inits[dq.input[0]]).astype(np.int8)
        assert block == summary["block_size"] and q.shape[0] == block * scale.shape[0]
        peak = np.abs(q.reshape(scale.shape[0], block, -1)).max(axis=1)
        if method == "awq":  # AWQ's grid: each block's largest magnitude at +-7
            assert (peak == 7).all()
        else:  # least-error scales: the extreme at +-7, or a finer step that reaches 8 (-8) or clips at 7
            assert np.isin(peak, (7, 8)).all()
            peaks.append(peak)
    if method == "rtn":
        assert (np.concatenate([p.ravel() for p in peaks]) == 8).any()  # the search moved some blocks off / 7
    assert model.graph.input[1].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16  # image_embeds
    report = run_parity(out, checkpoint("qwen2_5_vl"), cases=CASES, max_new_tokens=16)
    assert report.passed, report.failure_summary()


def test_int4_trt_keeps_weights_tensorrt_cannot_block_and_awq_folds_still_hold(tiny_dims, tmp_path):
    """A decoder whose down_proj K (160) is not a multiple of 64: those weights stay fp16 and are named; with AWQ
    their row scales (1 / s folded into the up projection's columns) are still applied in float, so the
    gate passes. A decoder with no such weight at all (K 96 and 160) is refused in one line."""
    from dataclasses import replace

    from qvl_export.loading.synthetic import make_checkpoint

    ckpt = make_checkpoint(tmp_path / "ckpt", replace(tiny_dims["qwen2_5_vl"], text_intermediate=160))
    out = tmp_path / "awq"
    build(ckpt, out, BuildOptions(precision="decoder=int4", target="trt", bundle=True, int4_method="awq",
                                  calib_limit=3))
    summary = Manifest.read(out).calibration.quantization["decoder"]
    kept = summary["kept_high_precision"]
    assert len(kept) == 3 and all("K = 160" in why for why in kept.values())  # one down_proj per layer
    assert summary["awq"]["groups"] > 0
    report = run_parity(out, ckpt, cases=CASES, max_new_tokens=16)
    assert report.passed, report.failure_summary()
    none = make_checkpoint(tmp_path / "none", replace(tiny_dims["qwen2_vl"], text_intermediate=160))
    with pytest.raises(QvlError, match="multiple of 64"):
        build(none, tmp_path / "refused", BuildOptions(precision="decoder=int4", target="trt", bundle=True))
    assert not (tmp_path / "refused").exists()


@pytest.mark.parametrize("block", [32, 64])
def test_streaming_packer_writes_what_onnxruntime_writes(block, tmp_path):
    """``pack_weights`` streams one weight at a time; onnxruntime's ``MatMulNBitsQuantizer`` loads the whole
    part. Same nodes (MatMulNBits, its attributes), same packed blocks and scales, same outputs - a weight
    read by two MatMuls packed once, one also read by a Gather (a tied token table) kept for it."""
    import numpy as np
    import onnx_ir as ir
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from qvl_export.building.weight_only import ACCURACY_LEVEL, pack_weights

    rng = np.random.default_rng(7)
    w1 = rng.standard_normal((96, 80)).astype(np.float32)  # K = 96: three blocks of 32
    w2 = rng.standard_normal((80, 50)).astype(np.float32)  # K = 80: a padded last block
    table = rng.standard_normal((80, 40)).astype(np.float32)  # [H, V]: a tied lm_head, looked up on axis 1
    g = helper.make_graph([
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
        helper.make_node("MatMul", ["h", "w2"], ["y"], name="mm2"),
        helper.make_node("MatMul", ["h", "w2"], ["y2"], name="mm2_again"),
        helper.make_node("MatMul", ["h", "table"], ["logits"], name="lm_head"),
        helper.make_node("Gather", ["table", "ids"], ["rows"], name="lookup", axis=1),
    ], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 96]),
             helper.make_tensor_value_info("ids", TensorProto.INT64, ["t"])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in ("y", "y2", "logits", "rows")],
        [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (w2, "w2"), (table, "table"))])
    src = tmp_path / "float.onnx"
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)])
    model.ir_version = 9
    onnx.save(model, str(src), save_as_external_data=True, location="float.onnx.data", size_threshold=0)

    ours, summary = pack_weights(src, precisions.get("int4"), "decoder", block_size=block)
    ir.save(ours, tmp_path / "ours.onnx")
    ref = MatMulNBitsQuantizer(onnx.load(str(src)), bits=4, block_size=block, is_symmetric=True,
                               accuracy_level=ACCURACY_LEVEL)
    ref.process()
    theirs = ref.model.model
    onnx.save(theirs, str(tmp_path / "theirs.onnx"))
    a, b = onnx.load(str(tmp_path / "ours.onnx")), onnx.load(str(tmp_path / "theirs.onnx"))

    def nbits(m):
        return sorted((tuple(n.input[1:]), tuple(sorted((x.name, helper.get_attribute_value(x)) for x in n.attribute)))
                      for n in m.graph.node if n.op_type == "MatMulNBits")

    assert summary["quantized_count"] == 4 and summary["block_size"] == block and nbits(a) == nbits(b)
    ia = {i.name: numpy_helper.to_array(i) for i in a.graph.initializer}
    ib = {i.name: numpy_helper.to_array(i) for i in b.graph.initializer}
    assert "table" in ia and "w1" not in ia and "w2" not in ia  # the Gather keeps its table; packed weights go
    for name in ib:
        if name in ia:
            np.testing.assert_array_equal(ia[name], ib[name], err_msg=name)
    feeds = {"x": rng.standard_normal((3, 96)).astype(np.float32), "ids": np.array([0, 7, 39])}
    ya = ort.InferenceSession(str(tmp_path / "ours.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)
    yb = ort.InferenceSession(str(tmp_path / "theirs.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)
    for u, v in zip(ya, yb):
        np.testing.assert_array_equal(u, v)
