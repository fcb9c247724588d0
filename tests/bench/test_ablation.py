"""The leave-one-out pass ablation on the tiny shape: real builds, paired timings, equal outputs."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("torch")


def test_ablation_times_each_pass_against_all_passes(tmp_path):
    from qvl_export.bench.ablation import run_ablation

    report = run_ablation("tiny", layers=2, threads=1, out_dir=tmp_path, page=112, prefills=2, steps=4,
                          vision_runs=2, passes=["fuse_rms_norm", "fuse_vision_gelu", "quantize_embeddings"])
    assert json.loads((tmp_path / "ablation.json").read_text())["passes"].keys() == report["passes"].keys()
    assert "fuse_rms_norm" in (tmp_path / "ablation.txt").read_text()
    rms = report["passes"]["fuse_rms_norm"]
    assert set(rms["parts"]) >= {"vision", "decoder"}  # Qwen2.5-VL: RMSNorm in the ViT and the LLM
    for stage in ("vision", "prefill", "decode"):
        fig = rms[stage]
        assert math.isfinite(fig["ratio"]) and fig["ratio"] > 0 and fig["with_ms"] > 0
    # the pass changes the graph, not the numbers
    assert rms["vision"]["max_abs_diff"] < 1e-4 and rms["prefill"]["max_abs_diff"] < 1e-4
    gelu = report["passes"]["fuse_vision_gelu"]
    assert "decode" not in gelu  # a vision pass is timed on the vision graph only
    assert report["passes"]["quantize_embeddings"]["skipped"]  # fp32 build: nothing to do
    assert not (tmp_path / "work").exists()
