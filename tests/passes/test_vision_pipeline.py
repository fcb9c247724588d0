"""The whole pass list on the vision tower and merger: ort gets the contrib fusions and the same numbers,
trt stays standard ONNX (no com.microsoft op, nothing for TensorRT to reject)."""

from __future__ import annotations

import numpy as np
import pytest

from qvl_export.passes import run_passes, select_passes

CONTRIB = ("com.microsoft:MultiHeadAttention", "com.microsoft:RotaryEmbedding")


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_trt_vision_and_merger_stay_standard_onnx(family, traced):
    for part in ("vision", "merger"):
        model, _ = run_passes(traced(family, part), select_passes("trt", part, "graph"))
        domains = {n.domain for n in model.graph}
        assert domains <= {""}, (part, domains)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_ort_vision_all_passes_same_numbers(family, traced, spec_of, harness):
    spec = spec_of(family)
    plain = traced(family, "vision")
    fused, records = run_passes(traced(family, "vision"), select_passes("ort", "vision", "graph"))
    changed = {r["pass"] for r in records if r["modified"]}
    assert {"fuse_vision_rotary", "fuse_vision_attention"} <= changed
    counts = harness.counts(fused)
    assert all(counts.get(op, 0) > 0 for op in CONTRIB), counts
    assert "Softmax" not in counts and "Transpose" not in counts
    valid, feeds = harness.vision_feeds(spec)
    (a,) = harness.session(plain).run(None, feeds)
    (b,) = harness.session(fused).run(None, feeds)
    np.testing.assert_allclose(b[valid], a[valid], atol=2e-5, rtol=1e-4)
    assert np.isfinite(b).all()
