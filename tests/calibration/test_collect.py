"""Calibration on clips: a clip's temporal patches reach the vision part's activation taps, decoded and
sampled exactly as the runtime's video path does it."""

from __future__ import annotations

import numpy as np
import pytest

from qvl_export.calibration.collect import CalibSettings, collect_stats
from qvl_export.calibration.documents import builtin_documents
from qvl_export.core.manifest import Manifest


def test_clip_patches_reach_the_vision_taps(artifacts):
    """Qwen2.5-VL: its windows pad every temporal patch, so the count checks the padding too."""
    from qvl_export.runtimes.pipeline import Pipeline

    art = artifacts("qwen2_5_vl")
    manifest = Manifest.read(art)
    rec = builtin_documents(2)[1]
    stats = collect_stats(art, manifest, ["vision"], [rec], CalibSettings(max_new_tokens=1), "max")["vision"]
    assert stats.runs == 1

    # the patches the runtime makes of the clip (header plan, decoded frames, patchify)
    pipe = Pipeline.load(art, verify=False)
    prep = pipe.prepare(videos=[rec.video], prompt=rec.prompt, fps=rec.fps, max_frames=32)
    assert prep.kinds == ["video"] and prep.grids == [(4, 24, 40)]  # 8 frames of 560 x 336
    patches = prep.patches[0]  # [4 * 24 * 40, 1176]
    padded = pipe.encode_images(prep.patches, prep.grids).layout.padded_len

    dim = manifest.spec.vision.patch_dim
    (name,) = [n for n, t in stats.tensors.items() if t.sample().shape[-1] == dim]  # patch embedding's input
    tapped = stats.tensors[name]
    assert tapped.count == padded * dim  # every temporal patch (windows padded with zero rows)
    assert tapped.abs_max == pytest.approx(float(np.abs(patches).max()), rel=1e-6)
    # reduced in float32 by onnxruntime over 4.5M values: agrees to float32 accumulation error
    assert tapped.sum_sq == pytest.approx(float(np.square(patches, dtype=np.float64).sum()), rel=2e-3)
    # AWQ's salience: mean |x| per channel over every row (the windows' zero rows count as rows)
    assert tapped.row_count == padded
    want = np.abs(patches, dtype=np.float64).sum(axis=0) / padded
    np.testing.assert_allclose(tapped.channel_mean(), want, rtol=2e-4)
    # rows are (C, tp, p, p): the two frames of a temporal patch differ, unlike a still image's
    rows = tapped.sample().reshape(-1, 3, 2, dim // 6)
    assert (np.abs(rows[:, :, 0] - rows[:, :, 1]).max(axis=(1, 2)) > 1e-3).mean() > 0.05
