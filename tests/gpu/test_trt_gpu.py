"""TensorRT on a real GPU: engine build, run and parity. Skipped cleanly without a GPU + TensorRT.

Run on a GPU machine with ``python -m pytest -m gpu``.
"""

from __future__ import annotations

import pytest

from qvl_export.building.trt_engine import gpu_compute_capability

pytestmark = pytest.mark.gpu


def _need_gpu():
    pytest.importorskip("tensorrt")
    if gpu_compute_capability() is None:
        pytest.skip("no NVIDIA GPU visible")


@pytest.fixture(scope="module")
def trt_artifacts(tmp_path_factory, checkpoint):
    _need_gpu()
    from qvl_export.building.artifacts import BuildOptions, build
    from qvl_export.building.devices import Ranges

    out = tmp_path_factory.mktemp("trt") / "q25"
    build(checkpoint("qwen2_5_vl"), out, BuildOptions(target="trt", ranges=Ranges(max_pixels=640 * 640,
                                                                                 opt_pixels=448 * 448,
                                                                                 max_images=2, max_seq=2048)))
    return out


def test_engines_built_and_recorded(trt_artifacts):
    from qvl_export.core.manifest import Manifest

    m = Manifest.read(trt_artifacts)
    assert all(p.engine and (trt_artifacts / p.engine).exists() for p in m.parts.values())
    assert m.options["tensorrt"]["compute_capability"]


def test_trt_runtime_generates(trt_artifacts):
    from PIL import Image

    from qvl_export.runtimes.pipeline import Pipeline

    pipe = Pipeline.load(trt_artifacts)
    assert pipe.backend.name == "tensorrt"
    out = pipe.generate([Image.new("RGB", (320, 240), (200, 20, 20))], "What is the total?", max_new_tokens=8)
    assert 1 <= len(out.token_ids) <= 8


def test_trt_parity_gate(trt_artifacts, checkpoint):
    from qvl_export.parity.gate import run_parity

    report = run_parity(trt_artifacts, checkpoint("qwen2_5_vl"), quick=True)
    assert report.passed, report.failure_summary()


def test_engine_command_rebuilds_bundle(tmp_path, checkpoint):
    _need_gpu()
    from click.testing import CliRunner

    from qvl_export.cli import main

    bundle = tmp_path / "bundle"
    r = CliRunner().invoke(main, ["build", str(checkpoint("qwen2_vl")), "-o", str(bundle), "--target", "trt",
                                  "--bundle", "--no-parity", "--engine-max-pixels", "409600", "--max-seq", "1024"])
    assert r.exit_code == 0, r.stderr
    r = CliRunner().invoke(main, ["engine", str(bundle)])
    assert r.exit_code == 0, r.stderr
    assert (bundle / "decoder.engine").exists()
