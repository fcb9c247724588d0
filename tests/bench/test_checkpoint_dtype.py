"""A bf16 checkpoint (how real Qwen checkpoints ship) is read directly: ``convert_checkpoint`` writes one
from a float32 checkpoint, and a build from it passes its gate against transformers on that bf16
checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")


def test_convert_checkpoint_to_bf16(checkpoint, tmp_path):
    from safetensors import safe_open

    from qvl_export.bench.checkpoint import convert_checkpoint, weight_files

    src = checkpoint("qwen2_vl")
    out = convert_checkpoint(src, tmp_path / "bf16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    converted = {}
    for path in weight_files(out):
        with safe_open(str(path), "pt") as f:
            converted.update({k: f.get_tensor(k) for k in f.keys()})
    n = 0
    for path in weight_files(src):
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                ref = f.get_tensor(key)
                assert converted[key].dtype == torch.bfloat16
                np.testing.assert_array_equal(converted[key].float().numpy(), ref.to(torch.bfloat16).float().numpy())
                n += 1
    assert n == len(converted)
    assert (out / "tokenizer.json").exists() and (out / "preprocessor_config.json").exists()


@pytest.mark.slow
def test_build_from_bf16_checkpoint_passes_gate(checkpoint, tmp_path):
    from qvl_export.bench.checkpoint import convert_checkpoint
    from qvl_export.building.artifacts import BuildOptions, build
    from qvl_export.parity.gate import run_parity
    from qvl_export.parity.samples import ALL_CASES

    src = convert_checkpoint(checkpoint("qwen2_5_vl"), tmp_path / "bf16")
    out = tmp_path / "art"
    build(src, out, BuildOptions())
    cases = [c for c in ALL_CASES if c.name in ("landscape", "text-only")]
    report = run_parity(out, src, cases=cases, max_new_tokens=32)
    assert report.passed, report.failure_summary()
    for case in report.cases:
        assert case["stages"]["greedy"]["first_divergence"] == -1
