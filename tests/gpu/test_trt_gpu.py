"""TensorRT on a real GPU: engine build, run and parity. Skipped cleanly without a GPU + TensorRT.

Run on a GPU machine with TensorRT installed: ``python -m pytest -m "gpu or cuda" tests/gpu``.
"""

from __future__ import annotations

import pytest

from qvl_export.runtimes.trt.cuda import gpu_compute_capability

pytestmark = pytest.mark.gpu


def _need_gpu():
    pytest.importorskip("tensorrt")
    if gpu_compute_capability() is None:
        pytest.skip("no NVIDIA GPU visible")


@pytest.fixture(scope="module")
def trt_artifacts(tmp_path_factory, checkpoint):
    _need_gpu()
    from qvl_export.building.artifacts import BuildOptions, build
    from qvl_export.core.devices import Ranges

    out = tmp_path_factory.mktemp("trt") / "q25"
    build(checkpoint("qwen2_5_vl"), out, BuildOptions(target="trt", ranges=Ranges(max_pixels=640 * 640,
                                                                                 opt_pixels=448 * 448,
                                                                                 max_images=2, max_seq=2048)))
    return out


def test_engines_built_and_recorded(trt_artifacts):
    from qvl_export.core.manifest import Manifest

    m = Manifest.read(trt_artifacts)
    assert all(p.engine and (trt_artifacts / p.engine).exists() for p in m.parts.values())
    assert m.tensorrt.compute_capability and m.tensorrt.version
    m.verify(trt_artifacts)  # engines and timing cache sealed with the rest


def test_decoder_cache_stays_on_the_device(trt_artifacts):
    """Device-resident KV: the pipeline's cache is the backend's; its logits equal the host-copy path's."""
    import numpy as np

    from qvl_export.runtimes import indexing
    from qvl_export.runtimes.pipeline import KVCache, Pipeline
    from qvl_export.runtimes.trt.kv_cache import DeviceKVCache

    pipe = Pipeline.load(trt_artifacts)
    prep = pipe.prepare(prompt="What is the total?")
    no_image = np.zeros((0, pipe.spec.text.hidden_size), np.float32)
    device = pipe.new_cache(capacity=len(prep.input_ids) + 4)
    assert isinstance(device, DeviceKVCache)
    text = pipe.spec.text
    host = KVCache(text.num_hidden_layers, text.num_key_value_heads, text.head_dim, pipe.kv_dtype)
    a = pipe.decoder_step(prep.input_ids[None], no_image, prep.position_ids[:, None, :], device)
    b = pipe.decoder_step(prep.input_ids[None], no_image, prep.position_ids[:, None, :], host)  # backend.run path
    for _ in range(3):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3)
        token = int(np.argmax(a[0]))
        pos = indexing.decode_positions(device.length, prep.rope_delta, 1)[:, None, :]
        assert device.length == host.length
        a = pipe.decoder_step(np.asarray([[token]], np.int64), no_image, pos, device)
        b = pipe.decoder_step(np.asarray([[token]], np.int64), no_image, pos, host)


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
    assert f"qvl-export engine {bundle.name}" in (bundle / "BUILD_ON_DEVICE.md").read_text()
    from qvl_export.core.manifest import Manifest

    Manifest.read(bundle).verify(bundle)
