"""fuse_rms_norm: structure (which ops went, which came) and numbers (outputs before vs after)."""

from __future__ import annotations

import numpy as np
import pytest

from qvl_export.passes import select_passes
from qvl_export.passes.fuse_rms_norm import FuseRmsNorm

RMS_OPS = ("Pow", "ReduceMean", "Sqrt", "Reciprocal")


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_decoder_norms_fused_same_numbers(family, traced, spec_of, harness):
    spec = spec_of(family)
    layers = spec.text.num_hidden_layers
    plain, fused = traced(family, "decoder"), traced(family, "decoder")
    before = harness.counts(plain)
    result = harness.fuse(fused, FuseRmsNorm())
    after = harness.counts(fused)

    assert result.modified
    norms = 2 * layers + 1  # input + post-attention norm per layer, and the final norm
    assert all(before.get(op, 0) == norms for op in RMS_OPS), before
    assert all(op not in after for op in RMS_OPS), after
    # every norm that follows a residual Add takes the Add with it: all but layer 0's input norm and the
    # final norm (it reads the last position's slice)
    assert after["com.microsoft:SkipSimplifiedLayerNormalization"] == 2 * layers - 1
    assert after["SimplifiedLayerNormalization"] == 2
    assert before["Add"] - after["Add"] == norms + (2 * layers - 1)  # eps Adds + residual Adds
    assert result.details == {"rms_norm": norms, "with_residual_add": 2 * layers - 1}
    harness.assert_same_decoding(harness.run_decoder(plain, spec, batch=2), harness.run_decoder(fused, spec, batch=2))


def test_vision_and_merger_norms_qwen2_5(traced, spec_of, harness):
    """Qwen2.5-VL's vision tower and merger use RMSNorm on [S, C]: plain fusion, no skip fusion."""
    spec = spec_of("qwen2_5_vl")
    valid, feeds = harness.vision_feeds(spec)
    plain, fused = traced("qwen2_5_vl", "vision"), traced("qwen2_5_vl", "vision")
    assert harness.fuse(fused, FuseRmsNorm()).modified
    after = harness.counts(fused)
    assert after["SimplifiedLayerNormalization"] == 2 * spec.vision.depth
    assert all(op not in after for op in RMS_OPS)
    (a,) = harness.session(plain).run(None, feeds)
    (b,) = harness.session(fused).run(None, feeds)
    np.testing.assert_allclose(b[valid], a[valid], atol=2e-5, rtol=1e-4)

    merger_plain, merger_fused = traced("qwen2_5_vl", "merger"), traced("qwen2_5_vl", "merger")
    assert harness.fuse(merger_fused, FuseRmsNorm()).modified
    assert harness.counts(merger_fused)["SimplifiedLayerNormalization"] == 1
    hidden = a.astype(np.float32)
    (ma,) = harness.session(merger_plain).run(None, {"vision_hidden": hidden})
    (mb,) = harness.session(merger_fused).run(None, {"vision_hidden": hidden})
    np.testing.assert_allclose(mb, ma, atol=2e-5, rtol=1e-4)


def test_layernorm_vision_untouched_and_says_why(traced, harness):
    """Qwen2-VL's vision tower uses LayerNorm: nothing matches, the record says how far matching got."""
    model = traced("qwen2_vl", "vision")
    p = harness.fuse(model, FuseRmsNorm())
    assert not p.modified
    assert p.details["rms_norm"] == 0 and p.details["why_not"]


def test_onnxruntime_target_only():
    for part in ("vision", "merger", "decoder"):
        assert "fuse_rms_norm" in [p.name for p in select_passes("ort", part, "graph")]
        assert "fuse_rms_norm" not in [p.name for p in select_passes("trt", part, "graph")]
