"""int8 / fp8 builds end to end: calibration, guard, Q/DQ placement, gates - and a bad calibration fails."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from qvl_export.building.artifacts import BuildOptions, build
from qvl_export.manifest import Manifest
from qvl_export.parity.gate import run_parity
from qvl_export.parity.samples import ALL_CASES

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


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_quantized_build_passes_its_gates(family, precision, quantized, checkpoint, artifacts):
    art = quantized(family, precision)
    m = Manifest.read(art)
    assert {p.precision for p in m.parts.values()} == {precision}
    q = m.options["quantization"]
    assert set(q) == {"vision", "merger", "decoder"}
    for part in m.parts.values():
        model = onnx.load(art / part.file, load_external_data=False)
        ops = {n.op_type for n in model.graph.node}
        assert "DequantizeLinear" in ops and "QuantizeLinear" in ops
        assert q[part.name]["quantized_count"] > 0
    report = run_parity(art, checkpoint(family), cases=CASES, max_new_tokens=32)
    assert report.passed, report.failure_summary()
    for case in report.cases:
        if case["images"]:
            assert case["stages"]["vision"]["cosine"] > 0.99


def test_int8_artifacts_shrink(quantized, artifacts):
    art = quantized("qwen2_5_vl", "int8")
    fp32 = artifacts("qwen2_5_vl")
    ratio = part_bytes(art, Manifest.read(art)) / part_bytes(fp32, Manifest.read(fp32))
    assert ratio < 0.40, ratio  # tiny model: graph and scale overhead; real widths are measured in benchmarks


def test_calibration_cache_is_reused(quantized, checkpoint, tmp_path, tmp_path_factory):
    quantized("qwen2_vl", "int8")  # fills the cache
    cache = tmp_path_factory.getbasetemp() / "calib-qwen2_vl"
    assert (cache / "index.json").exists()
    said = []
    build(checkpoint("qwen2_vl"), tmp_path / "again", BuildOptions(precision="int8", calib_limit=6,
                                                                   calib_cache=cache, progress=said.append))
    assert any("reusing the calibration feeds" in s for s in said)
    assert not any("calibration document" in s for s in said)


def test_bad_calibration_fails_the_gate(checkpoint, tmp_path, monkeypatch):
    """Ranges 100x too wide (every float feed scaled by 100): the int8 gate must fail."""
    from qvl_export.calibration import collect

    real = collect.collect_feeds

    def scaled(*args, **kwargs):
        feeds = real(*args, **kwargs)
        return {part: [{k: v * 100 if v.dtype.kind == "f" else v for k, v in f.items()} for f in items]
                for part, items in feeds.items()}

    monkeypatch.setattr(collect, "collect_feeds", scaled)
    out = tmp_path / "bad"
    build(checkpoint("qwen2_5_vl"), out, BuildOptions(precision="int8", calib_limit=4))
    report = run_parity(out, checkpoint("qwen2_5_vl"), cases=CASES[:1], max_new_tokens=8)
    assert not report.passed
    failed = {f.split("/")[1].split(".")[0] for f in report.failures()}
    assert failed & {"vision", "merger", "prefill", "steps"}
