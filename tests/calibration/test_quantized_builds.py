"""int8 / fp8 builds end to end: calibration, guard, Q/DQ placement, gates - and a bad calibration fails."""

from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import numpy_helper
import pytest

from qvl_export.building.artifacts import BuildOptions, build
from qvl_export.core import precisions as registry
from qvl_export.core.manifest import Manifest
from qvl_export.parity.gate import run_parity
from qvl_export.parity.samples import ALL_CASES, QUICK_CASES

CASES = [c for c in ALL_CASES if c.name in ("landscape", "two-images", "text-only")]


def part_bytes(folder, m):
    total = 0
    for p in m.parts.values():
        total += (folder / p.file).stat().st_size
        if p.external_data:
            total += (folder / p.external_data).stat().st_size
    return total


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, checkpoint):
    built = {}

    def get(family, precision):
        key = (family, precision)
        if key not in built:
            out = tmp_path_factory.mktemp(f"{family}-{precision}") / "art"
            cache = tmp_path_factory.getbasetemp() / f"calib-{family}"
            build(checkpoint(family), out, BuildOptions(precision=precision, calib_limit=6, calib_cache=cache))
            built[key] = out
        return built[key]

    return get


ALL_FP8 = "vision=fp8,merger=fp8,decoder=fp8"  # what one-word fp8 keeps in float, quantized too


@pytest.mark.parametrize("family,precision", [(f, p) for f in ("qwen2_vl", "qwen2_5_vl") for p in ("int8", "fp8")]
                         + [("qwen2_5_vl", ALL_FP8)])
def test_quantized_build_passes_its_gates(family, precision, quantized, checkpoint, artifacts):
    """Built as ``qvl-export build`` builds it (the built-in set, a screen recording among it), gated as
    the build gates it (the quick cases: pages, text, a video)."""
    art = quantized(family, precision)
    m = Manifest.read(art)
    want = registry.parse(precision)  # fp8: the decoder; the vision tower stays fp16, the merger fp32
    assert {name: p.precision for name, p in m.parts.items()} == want
    q = m.calibration.quantization
    assert m.calibration.documents and m.calibration.settings
    assert "01-screen_recording" in m.calibration.documents  # vision ranges saw video patches
    assert set(q) == {part for part, name in want.items() if registry.get(name).calibrated}
    for part in m.parts.values():
        model = onnx.load(art / part.file, load_external_data=False)
        if not registry.get(part.precision).calibrated:  # kept in float: no Q/DQ
            assert "DequantizeLinear" not in {n.op_type for n in model.graph.node}
            continue
        ops = {n.op_type for n in model.graph.node}
        dynamic = part.precision == "int8" and part.name == "decoder"  # per-run activation scales (ort target)
        assert "DequantizeLinear" in ops and ("DynamicQuantizeLinear" if dynamic else "QuantizeLinear") in ops
        assert q[part.name]["quantized_count"] > 0
    report = run_parity(art, checkpoint(family), quick=True, max_new_tokens=32)  # the build's own gate
    assert report.passed, report.failure_summary()
    assert [c["name"] for c in report.cases] == [c.name for c in QUICK_CASES] and not report.meta["skipped_cases"]
    for case in report.cases:
        if case["images"]:
            assert case["stages"]["vision"]["cosine"] > 0.99
    # the video case: its temporal patches through the quantized vision part, the decoder on its tokens
    (clip,) = [c for c in report.cases if c["name"] == "video"]
    stages = clip["stages"]
    assert clip["passed"] and {c["stage"] for c in clip["checks"]} >= {"video_preprocess", "video_merger", "steps"}
    assert stages["video_preprocess"]["max_abs"] == 0.0  # same host patches as transformers' layout
    assert 0.99 < stages["video_merger"]["cosine"] < 1.0  # quantized: close, not identical
    assert stages["prompt"]["ids_equal"] == 1.0 and stages["prompt"]["positions_equal"] == 1.0
    rows = [line for line in report.table().splitlines() if line.startswith("video ")]
    assert any("video_merger" in line and line.endswith("ok") for line in rows), rows
    print(f"{family} {precision} video case: merger cosine {stages['video_merger']['cosine']:.6f}, "
          f"steps min cosine {stages['steps']['min_cosine']:.6f}, max kl {stages['steps']['max_kl']:.2e}, "
          f"greedy {stages['greedy']['matched_prefix']}/{stages['greedy']['ref_len']}")


def test_fp8_scales_are_max_calibrated(quantized):
    """fp8 Q/DQ scales are amax / 448 per tensor (activations from the calibration feeds, weights from
    their own values), not onnxruntime's Gaussian-matched scale that clips outliers."""
    import ml_dtypes
    from onnx import numpy_helper

    from qvl_export.calibration.qdq import FP8_MAX

    art = quantized("qwen2_5_vl", "fp8")
    model = onnx.load(art / Manifest.read(art).parts["decoder"].file)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    checked = 0
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits:
            continue
        q = inits[node.input[0]]
        if q.dtype != ml_dtypes.float8_e4m3fn:
            continue
        scale = inits[node.input[1]]
        assert scale.size == 1  # per tensor
        # the largest weight sits at the top of the E4M3 grid
        assert float(np.abs(q.astype(np.float32)).max()) == FP8_MAX, node.name
        checked += 1
    assert checked > 0


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])  # tied / untied embeddings
def test_int8_token_table_is_looked_up_before_dequantizing(family, quantized):
    """The token table is int8 and only the step's rows are dequantized (Gather, then Cast + Mul):
    no float copy of the table stays, and no DequantizeLinear of a whole table runs each step."""
    from onnx import numpy_helper

    art = quantized(family, "int8")
    model = onnx.load(art / Manifest.read(art).parts["decoder"].file)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    gathers = [n for n in model.graph.node if n.op_type == "Gather" and n.input[0] in inits
               and inits[n.input[0]].ndim == 2 and inits[n.input[0]].size >= 1 << 14]
    assert gathers and all(inits[n.input[0]].dtype == np.int8 for n in gathers)
    produced_by_dq = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    assert not any(n.op_type == "Gather" and n.input[0] in produced_by_dq for n in model.graph.node)
    spec = Manifest.read(art).spec.text
    table = spec.vocab_size * spec.hidden_size
    assert not any(a.dtype == np.float32 and a.size == table for a in inits.values())


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_int8_parts_run_integer_kernels(family, quantized, tmp_path):
    """After onnxruntime's own optimizations (as the runtime opens the parts), every quantized weighted
    op is an integer kernel (MatMulIntegerToFloat / QGemm, DynamicQuantizeMatMul in the decoder, whose
    activation scales are dynamic): no float MatMul or Gemm on dequantized weights is left - the q/k/v
    projections sharing one activation and the biased vision Gemms included."""
    from ort_kernels import optimized_ops

    art = quantized(family, "int8")
    m = Manifest.read(art)
    for name, (float_on_dq, kernels) in optimized_ops(art, m, tmp_path).items():
        want = "DynamicQuantizeMatMul" if name == "decoder" else None
        assert not float_on_dq, (name, float_on_dq)
        assert m.calibration.quantization[name]["activations"] == ("dynamic" if want else "static")
        assert sum(kernels.values()) == m.calibration.quantization[name]["quantized_count"], name
        assert (set(kernels) == {want}) if want else (want not in kernels), (name, kernels)
        search = m.calibration.quantization[name].get("range_search")
        if want:  # per-run scales: nothing to search
            assert search is None
            continue
        assert search["tensors"] > 0 and search["widened"] == len(search["ranges"])
        scales = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(art / m.parts[name].file)).graph.initializer
                  if i.name.endswith("_scale")}
        for tensor, r in search["ranges"].items():  # the graph holds the searched range, not the calibrator's
            assert r["searched"] > r["calibrator"] and r["error_ratio"] > 1
            np.testing.assert_allclose(scales[f"{tensor}_scale"], r["searched"] / 127, rtol=1e-5)


def test_int8_artifacts_shrink(quantized, artifacts):
    art = quantized("qwen2_5_vl", "int8")
    fp32 = artifacts("qwen2_5_vl")
    ratio = part_bytes(art, Manifest.read(art)) / part_bytes(fp32, Manifest.read(fp32))
    assert ratio < 0.40, ratio  # tiny model: graph and scale overhead; real widths are measured in benchmarks


def test_calibration_cache_is_reused_part_by_part(checkpoint, tmp_path):
    """The cache holds each part's statistics under its own key: fp8 (the decoder) collects the
    decoder's, int8 then reuses them and collects only the vision tower's and the merger's, and a
    second int8 build collects nothing."""
    from qvl_export.calibration.collect import CACHE_FORMAT

    cache = tmp_path / "calib"

    def run(precision, out):
        said = []
        build(checkpoint("qwen2_vl"), tmp_path / out, BuildOptions(precision=precision, calib_limit=3,
                                                                   calib_cache=cache, progress=said.append))
        reused = [s for s in said if s.startswith("reusing the calibration feeds")]
        collected = [s for s in said if s.startswith("calibrating on")]
        return reused, collected, any("calibration document" in s for s in said)

    reused, collected, ran = run("fp8", "fp8")
    assert not reused and ran and collected and collected[0].endswith("taps: decoder)")
    index = json.loads((cache / "index.json").read_text())
    assert index["format"] == CACHE_FORMAT and set(index["parts"]) == {"decoder"}

    reused, collected, ran = run("int8", "int8")
    assert reused and reused[0].endswith("(decoder)")
    assert ran and collected and collected[0].endswith("taps: merger, vision)")
    assert set(json.loads((cache / "index.json").read_text())["parts"]) == {"decoder", "merger", "vision"}

    reused, collected, ran = run("int8", "again")
    assert reused and reused[0].endswith("(decoder, merger, vision)") and not collected and not ran
    a, b = (Manifest.read(tmp_path / d).calibration.quantization for d in ("int8", "again"))
    assert a == b  # the same statistics: the same quantization


@pytest.mark.parametrize("precision,factor", [("int8", 100.0), ("fp8", 0.01)])
def test_bad_calibration_fails_the_gate(precision, factor, checkpoint, tmp_path, monkeypatch):
    """Calibration ranges off by 100x (every float feed scaled) must fail the gate: int8 with ranges 100x
    too wide (the values fall into a few codes), fp8 with ranges 100x too narrow (the values clip at
    448). fp8 shrugs off ranges 100x too wide - E4M3 keeps 3 mantissa bits over 2^15 of range - which
    is why it is calibrated by max."""
    from qvl_export.calibration import collect

    real = collect.collect_stats

    def scaled(*args, **kwargs):
        stats = real(*args, **kwargs)
        for st in stats.values():  # every activation statistic and range, as if the activations were scaled
            st.scale(factor)
        return stats

    monkeypatch.setattr(collect, "collect_stats", scaled)
    out = tmp_path / "bad"
    build(checkpoint("qwen2_5_vl"), out, BuildOptions(precision=precision, calib_limit=4))
    report = run_parity(out, checkpoint("qwen2_5_vl"), cases=CASES[:1], max_new_tokens=8)
    assert not report.passed
    failed = {f.split("/")[1].split(".")[0] for f in report.failures()}
    assert failed & {"vision", "merger", "prefill", "steps"}
