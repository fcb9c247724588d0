"""Decoder weight-only int4 (MatMulNBits): structure, size, the parity gate, and its refusals."""

from __future__ import annotations

import onnx
import pytest

from qvl_export.building.artifacts import BuildOptions, build
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


def test_int4_is_decoder_and_ort_only(checkpoint, tmp_path):
    with pytest.raises(QvlError, match="decoder=int4"):
        build(checkpoint("qwen2_vl"), tmp_path / "a", BuildOptions(precision="int4"))
    with pytest.raises(QvlError, match="MatMulNBits"):
        build(checkpoint("qwen2_vl"), tmp_path / "b", BuildOptions(precision="decoder=int4", target="trt",
                                                                   bundle=True))
    assert not list(tmp_path.iterdir())  # refused before any work
