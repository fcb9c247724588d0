"""fuse_vision_gelu: structure (which ops went, which came) and numbers (outputs before vs after)."""

from __future__ import annotations

import numpy as np
import pytest

from qvl_export.passes import select_passes
from qvl_export.passes.fuse_vision_gelu import FuseVisionGelu


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_merger_gelu_fused_same_numbers(family, traced, spec_of, harness):
    spec = spec_of(family)
    plain, fused = traced(family, "merger"), traced(family, "merger")
    before = harness.counts(plain)
    p = harness.fuse(fused, FuseVisionGelu())
    assert p.modified
    after = harness.counts(fused)
    assert p.details == {"gelu": 1}
    assert before["Erf"] == 1 and "Erf" not in after and "Div" not in after
    assert after["com.microsoft:Gelu"] == 1
    assert after["Gemm"] == before["Gemm"] == 2  # the two Linears are untouched
    rng = np.random.default_rng(0)
    hidden = rng.standard_normal((spec.vision.merge_unit * 9, spec.vision.hidden_size)).astype(np.float32) * 3
    (a,) = harness.session(plain).run(None, {"vision_hidden": hidden})
    (b,) = harness.session(fused).run(None, {"vision_hidden": hidden})
    np.testing.assert_allclose(b, a, atol=2e-5, rtol=1e-4)


def test_vision_tower_has_no_erf_gelu(traced, harness):
    model = traced("qwen2_5_vl", "vision")
    p = harness.fuse(model, FuseVisionGelu())
    assert not p.modified and p.details == {"gelu": 0}


def test_onnxruntime_merger_only():
    assert "fuse_vision_gelu" in [p.name for p in select_passes("ort", "merger", "graph")]
    for target, part in (("trt", "merger"), ("ort", "vision"), ("ort", "decoder")):
        assert "fuse_vision_gelu" not in [p.name for p in select_passes(target, part, "graph")]
