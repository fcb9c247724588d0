"""Qwen3-VL at every precision and on both targets: each build passes its own parity gate against
transformers on onnxruntime CPU (an image case and the video case: DeepStack features, merger, logits,
greedy tokens), the trt bundles for Jetson Orin (int8) and Thor (fp8) are lint-clean, and the decoder
packs to int4 weight-only. The tiny checkpoint is ``qwen3_vl`` of tests/conftest.py."""

from __future__ import annotations

import onnx
import onnx_ir as ir
import pytest

from qvl_export.building.artifacts import BuildOptions, build
from qvl_export.building.trt_lint import lint_errors, lint_model
from qvl_export.core import precisions as registry
from qvl_export.core.devices import Ranges
from qvl_export.core.manifest import Manifest
from qvl_export.parity.gate import run_parity
from qvl_export.parity.samples import ALL_CASES

pytestmark = pytest.mark.slow
FAMILY = "qwen3_vl"
CASES = [c for c in ALL_CASES if c.name == "landscape" or c.video]


def _gate(out, checkpoint):
    report = run_parity(out, checkpoint(FAMILY), cases=CASES, max_new_tokens=16)
    assert report.passed, report.failure_summary()
    assert [c["name"] for c in report.cases] == [c.name for c in CASES]  # none skipped
    for case in report.cases:  # the DeepStack features were compared, image and video
        assert ("deepstack" if case["images"] else "video_deepstack") in case["stages"]
    return report


@pytest.mark.parametrize("precision,device", [("int8", "jetson-orin"), ("fp8", "jetson-thor")])
def test_jetson_bundle_is_lint_clean_and_passes_its_gate(precision, device, checkpoint, tmp_path):
    out = tmp_path / device
    ranges = Ranges(opt_pixels=448 * 448, max_pixels=640 * 640, max_images=3)  # the video case fits: 3 frame groups
    build(checkpoint(FAMILY), out, BuildOptions(precision=precision, target="trt", device=device, bundle=True,
                                                calib_limit=3, ranges=ranges))
    m = Manifest.read(out)
    want = registry.parse(precision)  # fp8: the decoder; the vision tower stays fp16, the merger fp32
    assert m.tensorrt.device == device and {name: p.precision for name, p in m.parts.items()} == want
    assert [i.name for i in m.parts["decoder"].inputs][:4] == ["input_ids", "image_embeds", "deepstack_embeds",
                                                                "position_ids"]
    for name, part in m.parts.items():
        assert lint_errors(lint_model(ir.load(out / part.file), name)) == []
        if want[name] == precision:
            assert m.calibration.quantization[name]["quantized_count"] > 0
    _gate(out, checkpoint)


@pytest.mark.parametrize("precision", ["fp16", "int8", "vision=fp32,merger=fp32,decoder=int4"])
def test_ort_build_passes_its_gate(precision, checkpoint, tmp_path):
    out = tmp_path / "art"
    build(checkpoint(FAMILY), out, BuildOptions(precision=precision, calib_limit=3))
    m = Manifest.read(out)
    decoder = onnx.load(out / m.parts["decoder"].file, load_external_data=False)
    ops = {n.op_type for n in decoder.graph.node}
    if "int4" in precision:  # MatMulNBits, and the q/k-normed attention fused
        assert {"MatMulNBits", "GroupQueryAttention"} <= ops and m.parts["decoder"].precision == "int4"
    elif precision == "int8":  # W8A8 on integer kernels in every part, the decoder's activation scales dynamic
        assert "DynamicQuantizeLinear" in ops and m.calibration.quantization["decoder"]["activations"] == "dynamic"
        from ort_kernels import optimized_ops

        for name, (float_on_dq, kernels) in optimized_ops(out, m, tmp_path).items():
            assert not float_on_dq and sum(kernels.values()) == m.calibration.quantization[name]["quantized_count"]
    else:  # fp16: the q/k-normed attention fused too, its rotary in fp32 between casts
        assert m.parts["decoder"].input("deepstack_embeds").dtype == "float16"
        assert {"GroupQueryAttention", "RotaryEmbedding"} <= ops and m.parts["decoder"].input("seqlens_k")
    _gate(out, checkpoint)
