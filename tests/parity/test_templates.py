"""Checkpoints whose chat template is not Qwen2-VL's build, pass their fp32 gate, and generate the
same 64 greedy tokens as transformers - both architectures.

The runtime renders the checkpoint's own template: with a hard-coded Qwen2-VL prompt these
checkpoints fail their gate at token 0 (prompt ids differ on every case).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from qvl_export.building.artifacts import BuildOptions, build
from qvl_export.loading.synthetic import make_checkpoint
from qvl_export.parity.gate import run_parity
from qvl_export.parity.samples import ALL_CASES

TEMPLATES = Path(__file__).resolve().parents[1] / "data" / "chat_templates"
CASES = [c for c in ALL_CASES if c.name in ("two-images", "text-only", "square-odd")]  # square-odd: a system turn


@pytest.mark.slow
@pytest.mark.parametrize("family, name, where", [
    ("qwen2_vl", "qwen3_vl", "json"),  # no default system turn (Qwen3-VL's official template)
    ("qwen2_5_vl", "qwen3_vl", "jinja"),
    ("qwen2_vl", "custom_reader", "jinja"),  # a fine-tune's own format
    ("qwen2_5_vl", "custom_reader", "both"),
])
def test_own_template_passes_fp32_gate(family, name, where, tmp_path, tiny_dims):
    base = tiny_dims[family]
    dims = dataclasses.replace(base, chat_template=(TEMPLATES / f"{name}.jinja").read_text(),
                               chat_template_file=where, seed=base.seed + 100)
    ckpt = make_checkpoint(tmp_path / "ckpt", dims)
    out = tmp_path / "art"
    build(ckpt, out, BuildOptions())
    assert (out / "chat_template.jinja").read_text() == dims.chat_template
    report = run_parity(out, ckpt, cases=CASES, max_new_tokens=64)
    assert report.passed, report.failure_summary()
    for case in report.cases:
        assert case["stages"]["prompt"]["ids_equal"] == 1.0
        greedy = case["stages"]["greedy"]
        assert greedy["ref_len"] == 64 and greedy["matched_prefix"] == 64, (case["name"], greedy)
