"""AWQ int4 (calibration/awq.py): its grid is the packer's, its folds keep the float function, it lowers the
output error where activations have salient channels, its calibration rows cover every run, and a build
with it packs, records and passes its gate."""

from __future__ import annotations

import shutil

import numpy as np
import onnx_ir as ir
import pytest

from qvl_export.calibration import awq
from qvl_export.calibration.taps import TensorStats, release


def test_round_trip_is_the_packers_grid():
    """The numpy round trip the search uses equals onnxruntime's packed blocks, unpacked (K not a whole block)."""
    from qvl_export.building.weight_only import block_quantizer
    from qvl_export.core import precisions

    quantizer = block_quantizer(precisions.get("int4").bits)
    rng = np.random.default_rng(0)
    for k, n in ((64, 6), (100, 7), (416, 33)):
        w = (rng.standard_normal((k, n)) * rng.random((k, 1)) * 3).astype(np.float32)
        blocks, scales, _ = quantizer.qbits_block_quant(w)
        values = np.stack([blocks & 0xF, blocks >> 4], -1).reshape(blocks.shape[0], blocks.shape[1], -1)
        theirs = ((values.astype(np.float32) - 8) * scales.reshape(blocks.shape[0], blocks.shape[1], 1))
        theirs = theirs.reshape(blocks.shape[0], -1)[:, :k].T
        np.testing.assert_array_equal(awq.quantized(w, 4, 32), theirs)


def test_positive_round_trip_is_the_tensorrt_forms_grid():
    """With ``positive`` the search's grid is what ``qdq_weights`` stores for TensorRT: int4 values times a
    positive scale per block, each block's largest magnitude at +-7 (fp32 scales; the build stores the
    graph's dtype)."""
    from qvl_export.building.weight_only import int4_blocks

    rng = np.random.default_rng(1)
    for k, n, block in ((128, 5, 64), (256, 9, 128)):
        w = (rng.standard_normal((k, n)) * rng.random((k, 1)) * 3).astype(np.float32)
        q, scale = int4_blocks(w, block, np.float32)
        assert (scale > 0).all() and q.dtype.name == "int4"
        qb = q.astype(np.int8).reshape(k // block, block, n)
        assert (np.abs(qb).max(axis=1) == 7).all()
        ours = (qb * scale[:, None, :]).reshape(k, n)
        np.testing.assert_allclose(awq.quantized(w, 4, block, positive=True), ours, rtol=1e-6, atol=1e-7)
        assert not np.array_equal(awq.quantized(w, 4, block), ours)  # onnxruntime's grid is another one


def test_least_error_scales_never_lose_to_max_over_7_and_use_the_16th_level():
    """Round to nearest on TensorRT's grid: per block, the searched scale's squared error is at most that of
    ``max|w| / 7`` (the first candidate, kept on ties), lower overall on Gaussian and heavy-tailed weights,
    and some blocks reach -8; with ``search`` the packer stores exactly those scales (fp16, positive)."""
    from qvl_export.building.weight_only import int4_blocks

    rng = np.random.default_rng(5)
    for draw in (rng.standard_normal((256, 96)), rng.standard_t(3, (256, 96))):
        w = draw.astype(np.float32)
        blocks = w.reshape(4, 64, 96)

        def error(scale):
            wide = scale.astype(np.float32)
            q = np.clip(np.rint(blocks / wide), -8, 7) * wide
            return ((q - blocks) ** 2).sum(axis=1)

        plain = awq.block_scales(blocks).astype(np.float16)
        searched = awq.least_error_scales(blocks, np.float16, columns=40)  # column chunks join up
        assert searched.dtype == np.float16 and (searched > 0).all()
        assert (error(searched) <= error(plain)).all()
        assert error(searched).sum() < 0.9 * error(plain).sum()
        q, scale = int4_blocks(w, 64, np.float16, search=True)
        np.testing.assert_array_equal(scale, searched.reshape(4, 96))
        assert (q.astype(np.int8) == -8).any() and not (int4_blocks(w, 64, np.float16)[0].astype(np.int8) == -8).any()
    exact = np.tile(np.arange(-7, 8, dtype=np.float32)[:, None], (1, 3))[None] * 0.5  # already on the / 7 grid
    np.testing.assert_array_equal(awq.least_error_scales(exact, np.float32), awq.block_scales(exact))


def test_spread_sample_is_even_over_every_run():
    """AWQ's rows: an even stride over the whole stream of runs (prefills of hundreds of rows, decode
    steps of one), within the cap - not the first runs only."""
    rng = np.random.default_rng(1)
    t, seen = TensorStats(), 0
    for _ in range(300):
        n = int(rng.choice([1, 1, 1, int(rng.integers(50, 400))]))
        t.keep_spread((np.arange(n) + seen)[:, None].astype(np.float32), cap=100)
        seen += n
    kept = t.sample()[:, 0]
    assert 50 <= len(kept) <= 100
    assert kept[0] == 0 and np.all(np.diff(kept) == t.stride)
    assert kept[-1] > seen - 2 * t.stride  # reaches the last runs


def _salient(rng, rows: int, k: int) -> np.ndarray:
    """Activations whose first 8 channels are 30x the rest (a norm-amplified channel, as in LLMs)."""
    x = rng.standard_normal((rows, k)).astype(np.float32)
    x[:, :8] *= 30
    return x


def test_awq_lowers_the_error_on_salient_channels():
    """Scales and clipping searched on calibration rows lower the int4 output error on other rows drawn
    the same way, relative to round to nearest; alpha 0 (RTN) is the search's first point."""
    rng = np.random.default_rng(2)
    k, n = 256, 96
    w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    calib, held = _salient(rng, 512, k), _salient(rng, 512, k)
    group = awq.Group("x", ["w"], ["layers.0.mlp.down_proj"], awq.Fold("norm", ("g",)))
    s = awq._search_scales(group, [calib[:256], calib[256:]], np.abs(calib).mean(0), [w], 4, 32, awq.GRID)
    assert group.alpha > 0 and group.loss_awq < group.loss_rtn
    plan = awq.AwqPlan(row_scale={"w": s}, clip={"w": awq._search_clip(calib / s, w * s[:, None], 4, 32, 20)})

    def error(out):
        return float(np.mean(np.square(out - held @ w)))

    rtn = error(held @ awq.quantized(w, 4, 32))
    scaled = error((held / s) @ awq.quantized(w * s[:, None], 4, 32))
    clipped = error((held / s) @ awq.quantized(plan.weight("w", w), 4, 32))
    assert scaled < 0.8 * rtn, (scaled, rtn)
    assert clipped < scaled, (clipped, scaled)


def test_scales_must_gain_on_every_pool_of_rows():
    """A scale that lowers the pooled error by fitting some documents' salient channels and raising the
    others' error is not taken: the context rows come in run order, their halves are two pools, and the
    search maximises the worst pool's gain. The same rows interleaved (both halves see both kinds of
    document) do take a scale."""
    rng = np.random.default_rng(3)
    k, n = 256, 96
    w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)

    def document(salient: bool) -> np.ndarray:
        x = rng.standard_normal((256, k)).astype(np.float32)
        x[:, :8] *= 30 if salient else 0.01  # the same channels loud in one document, silent in the other
        return x

    first, second = document(True), document(False)
    in_order, interleaved = np.concatenate([first, second]), np.stack([first, second], 1).reshape(-1, k)
    mean = np.abs(in_order).mean(0)
    for rows, taken in ((in_order, False), (interleaved, True)):
        group = awq.Group("x", ["w"], ["layers.0.mlp.down_proj"], awq.Fold("norm", ("g",)))
        awq._search_scales(group, awq._pools(TensorStats(rows=[rows]), 512), mean, [w], 4, 32, awq.GRID)
        assert (group.alpha > 0) == taken, (group.alpha, taken)
    # and the pooled error alone would have taken one for the rows in order
    s = np.power(mean, 0.3)
    s /= np.sqrt(s.max() * s.min())
    pooled = float(np.mean(np.square((in_order / s) @ awq.quantized(w * s[:, None], 4, 32) - in_order @ w)))
    assert pooled < 0.8 * float(np.mean(np.square(in_order @ awq.quantized(w, 4, 32) - in_order @ w)))


@pytest.mark.parametrize("positive", [False, True])
def test_packed_clipped_weights_are_what_the_clip_search_scored(positive):
    """The weight ``AwqPlan.weight`` hands the packer quantizes to exactly the values the clipping search
    scored for its chosen bounds - also in blocks whose two ends are both clipped, where onnxruntime's
    packer picks the end that maps to -8 from the clamped weight (a symmetric clamp let it pick the other
    end: a 1/8 error at the block's extreme)."""
    rng = np.random.default_rng(3)
    k, n, block = 128, 40, 32
    w = (rng.standard_normal((k, n)) * rng.random((1, n)) * 2).astype(np.float32)
    x = _salient(rng, 256, k)
    bound = awq._search_clip(x, w, 4, block, 20, positive)
    plan = awq.AwqPlan(clip={"w": bound}, block_size=block, positive=positive)
    packed = awq.quantized(plan.weight("w", w), 4, block, positive)
    scale = np.abs(bound) / 7 if positive else bound / -8
    scored = awq._on_grid(awq._blocks(w, block), scale[:, None, :], 4, positive).reshape(k, n)
    blocks = awq._blocks(w, block)
    both_ends = (blocks.max(axis=1) > np.abs(bound)) & (-blocks.min(axis=1) > np.abs(bound))
    assert both_ends.sum() > 0 and (np.abs(bound) < np.abs(blocks).max(axis=1)).mean() > 0.3
    np.testing.assert_allclose(packed, scored, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_folds_keep_the_float_function(family, artifacts, tmp_path):
    """Every q/k/v group folds into its input norm and every down_proj into the up projection's columns
    (o_proj and lm_head stay round to nearest); written into the float graph unquantized (clipping off),
    the decoder's logits are those of the original artifacts."""
    from qvl_export.calibration.collect import CalibSettings, collect_stats
    from qvl_export.calibration.documents import builtin_documents
    from qvl_export.core.manifest import Manifest
    from qvl_export.parity.gate import forced_logits
    from qvl_export.runtimes.pipeline import Pipeline

    src = artifacts(family)
    folded = tmp_path / "folded"
    shutil.copytree(src, folded)
    manifest = Manifest.read(folded)
    stats = collect_stats(folded, manifest, ["decoder"], builtin_documents(3), CalibSettings(max_new_tokens=4),
                          "awq")["decoder"]
    part = manifest.parts["decoder"]
    lazy = tmp_path / "lazy"  # weights in an external file, read through memory maps as at full size
    lazy.mkdir()
    ir.save(ir.load(folded / part.file), lazy / "decoder.onnx", external_data="decoder.onnx.data",
            size_threshold_bytes=0)
    model = ir.load(lazy / "decoder.onnx")
    layers = manifest.spec.text.num_hidden_layers
    plan = awq.search(model, stats, clip_grid=0, release=release)
    kinds = {}
    for g in plan.groups:
        kinds.setdefault(g.fold.kind, []).append(g.scopes)
    skipped = "\n".join(plan.skipped.values())
    found = len(plan.groups) + skipped.count("round to nearest was best")
    assert found == 2 * layers + layers, (plan.groups, plan.skipped)  # q/k/v, gate/up, down per layer
    assert skipped.count("takes none") == layers  # o_proj after attention
    assert "lm_head" in skipped
    assert kinds.get("columns") and kinds.get("norm")
    rng = np.random.default_rng(3)
    for g in plan.groups:  # make every scale count: far from 1, different per channel
        s = np.exp(rng.uniform(-1.5, 1.5, len(plan.row_scale[g.weights[0]]))).astype(np.float32)
        for w in g.weights:
            plan.row_scale[w] = s
        if g.fold.kind == "norm":
            plan.vector_divide.update(dict.fromkeys(g.fold.targets, s))
        else:
            plan.column_divide[g.fold.targets[0]] = [(g.fold.start, s)]
    awq.fold_into_float(model, plan)
    ir.save(model, folded / part.file, external_data=part.external_data or "decoder.onnx.data")

    def logits(folder):
        pipe = Pipeline.load(folder, verify=False)
        from PIL import Image

        image = Image.new("RGB", (84, 56), (200, 30, 90))
        prep = pipe.prepare(images=[image], prompt="What colour is it?")
        return np.stack(forced_logits(pipe, prep, [5, 9, 11]))

    ref, ours = logits(src), logits(folded)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))
