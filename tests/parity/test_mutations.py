"""Mutation test of the parity gate: deliberately broken builds must each fail the default gate of their
precision. Graph-level faults are real edits of built fp32 artifacts (ONNX initializers); the quantizer
fault is a broken activation-scale rule in a real int8 / fp8 build. The gate is the build's own (quick
cases, default thresholds of the part precisions); transformers runs once per case for all of them."""

from __future__ import annotations

import pytest
from faults import (
    copy_artifacts,
    permute_mrope_section,
    perturb_vision_weight,
    zero_decoder_layer,
)

from qvl_export.building.artifacts import BuildOptions, build
from qvl_export.core.manifest import Manifest
from qvl_export.parity.gate import run_parity

FAMILY = "qwen2_5_vl"  # window attention, untied embeddings, mrope_section (4, 6, 6)
TOKENS = 16

FP32_FAULTS = {
    "decoder layer 1 zeroed": lambda art: zero_decoder_layer(art, 1),
    "mrope_section rotated": lambda art: permute_mrope_section(art, Manifest.read(art).spec.text.mrope_section),
    "vision weight +20% noise": lambda art: perturb_vision_weight(art, "blocks.1.mlp.down_proj.weight", 0.20),
}


@pytest.fixture(scope="module")
def reference_cache():
    return {}


def _gate(art, checkpoint, cache):
    return run_parity(art, checkpoint(FAMILY), quick=True, max_new_tokens=TOKENS, verify=False, task_pages=0,
                      reference_cache=cache)


def test_clean_fp32_build_passes(artifacts, checkpoint, reference_cache):
    """The control: the unmutated artifacts pass the same gate."""
    report = _gate(artifacts(FAMILY), checkpoint, reference_cache)
    assert report.passed, report.failure_summary()


@pytest.mark.parametrize("fault", list(FP32_FAULTS))
def test_graph_fault_fails_the_fp32_gate(fault, artifacts, checkpoint, reference_cache, tmp_path):
    art = copy_artifacts(artifacts(FAMILY), tmp_path / "mutant")
    assert FP32_FAULTS[fault](art), "the fault edited nothing"
    report = _gate(art, checkpoint, reference_cache)
    assert not report.passed, f"{fault}: not caught"
    print(f"{fault}: caught by {report.failure_summary()}")


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_activation_scale_off_by_2x_fails_the_quantized_gate(precision, checkpoint, reference_cache, monkeypatch,
                                                            tmp_path, tmp_path_factory):
    """Every activation scale half what the calibrated range gives (a quantizer that divides by the full
    code span twice): values above half the range clip. Built as the build builds it; the gate of its
    precision must fail."""
    from qvl_export.calibration import qdq

    right = qdq.activation_scale
    monkeypatch.setattr(qdq, "activation_scale", lambda p, low, high: (right(p, low, high) * 0.5).astype("float32"))
    out = tmp_path / "mutant"
    build(checkpoint(FAMILY), out, BuildOptions(precision=precision, calib_limit=3,
                                                calib_cache=tmp_path_factory.getbasetemp() / f"mut-calib-{FAMILY}"))
    report = _gate(out, checkpoint, reference_cache)
    assert not report.passed, f"{precision} activation scale x0.5: not caught"
    print(f"{precision} activation scale x0.5: caught by {report.failure_summary()}")
