"""The build plan: the declared stage order, part-by-part grouping, cleanup on failure, and the one
quantizer table (no torch: stub stages)."""

from __future__ import annotations

import dataclasses

import pytest

from qvl_export.building import plan
from qvl_export.building.plan import STAGES, Stage, describe_stages, run_build
from qvl_export.building.quantize_stage import QUANTIZERS
from qvl_export.building.settings import BuildOptions, Reporter, Settings
from qvl_export.core import precisions
from qvl_export.core.store import ArtifactStore


def test_stage_order():
    assert [s.name for s in STAGES] == [
        "check_request", "validate_checkpoint", "check_device", "load_documents", "open_store",
        "trace", "graph_passes", "save_float", "write_manifest", "calibrate",
        "quantize", "quantized_passes", "lint", "save_final", "engines", "commit"]
    groups = [[s.name for s in g] for g in plan._groups(STAGES) if g[0].per_part]
    assert groups == [["trace", "graph_passes", "save_float"], ["quantize", "quantized_passes", "lint", "save_final"]]
    lines = describe_stages()
    assert len(lines) == len(STAGES) and lines[0].startswith(" 1. check_request") and "commit" in lines[-1]


def test_every_quantized_kind_has_its_quantizer():
    kinds = {p.kind for p in precisions.REGISTRY.values() if p.quantized}
    assert kinds == set(QUANTIZERS)


def test_parts_run_one_at_a_time_and_a_failure_removes_the_folder(tmp_path):
    calls = []

    def build_stage(name):
        return Stage(name, lambda ctx: calls.append(name), name)

    def part_stage(name, fail_on=None):
        def run(ctx, part):
            calls.append(f"{name}:{part}")
            if part == fail_on:
                raise RuntimeError("boom")
        return Stage(name, run, name, per_part=True)

    def open_store(ctx):
        ctx.store = ArtifactStore.create(ctx.out_dir)
        calls.append("open")

    stages = (Stage("open", open_store, ""), part_stage("a"), part_stage("b"), build_stage("mid"),
              part_stage("c"), Stage("skipped", lambda ctx: calls.append("never"), "", when=lambda ctx: False))
    run_build(tmp_path / "ckpt", tmp_path / "out", Settings(), Reporter(), stages)
    assert calls == ["open", "a:vision", "b:vision", "a:merger", "b:merger", "a:decoder", "b:decoder", "mid",
                     "c:vision", "c:merger", "c:decoder"]
    calls.clear()
    with pytest.raises(RuntimeError, match="boom"):
        run_build(tmp_path / "ckpt", tmp_path / "out2", Settings(), Reporter(),
                  (stages[0], part_stage("a", fail_on="merger")))
    assert calls == ["open", "a:vision", "a:merger"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out2.")] and not (tmp_path / "out2").exists()


def test_build_options_split_into_frozen_settings_and_a_reporter():
    said = []
    opts = BuildOptions(precision="int8", calib_limit=3, device="jetson-orin", bundle=True, progress=said.append,
                        skip_passes=["fuse_rms_norm"])
    s = opts.settings()
    assert s.calibration.limit == 3 and s.tensorrt.device == "jetson-orin" and s.tensorrt.bundle
    assert s.skip_passes == ("fuse_rms_norm",) and s.precisions["decoder"] == "int8"
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.target = "trt"
    opts.reporter().say("hello")
    assert said == ["hello"]
    assert BuildOptions().settings() == Settings()
