"""The trt target's build-machine side without a GPU: the bundle's files and the checks that run
before TensorRT is looked for (the GPU tests build real engines)."""

from __future__ import annotations

import json

import pytest

from qvl_export.building import trt_target
from qvl_export.core.devices import Ranges
from qvl_export.core.errors import QvlError
from qvl_export.core.manifest import MANIFEST, Manifest
from qvl_export.core.store import ArtifactStore
from qvl_export.loading.config import parse_model_config


def test_check_device_returns_the_manifest_section(checkpoint):
    spec = parse_model_config(checkpoint("qwen2_vl"))
    precisions = {"vision": "fp16", "merger": "fp16", "decoder": "int8"}
    warnings = []
    info = trt_target.check_device(spec, precisions, "jetson-orin", Ranges(opt_pixels=200704, max_pixels=409600, max_seq=1024), warnings.append,
                                   sm=(8, 6))
    assert info.device == "jetson-orin" and info.ranges["max_seq"] == 1024
    assert info.memory_estimate["runtime_gb"] > 0 and info.version is None
    assert any("SM 8.7" in w for w in warnings)  # the GPU present differs from the bundle's device
    with pytest.raises(QvlError, match="decoder=int8"):
        trt_target.check_device(spec, {"decoder": "fp8"}, "jetson-orin", Ranges(opt_pixels=200704, max_pixels=409600, max_seq=1024), warnings.append)


def test_bundle_files_name_the_final_folder(tmp_path, checkpoint):
    spec = parse_model_config(checkpoint("qwen2_vl"))
    info = trt_target.check_device(spec, {"decoder": "fp16"}, "jetson-orin-nano", Ranges(opt_pixels=200704, max_pixels=409600, max_seq=1024), print)
    store = ArtifactStore.create(tmp_path / "q2-nano")
    try:
        trt_target.write_bundle_files(store, info, "q2-nano")
        text = (store.path / trt_target.README).read_text()
        assert "qvl-export engine q2-nano\n" in text and store.path.name not in text
        assert json.loads((store.path / trt_target.BUILD_CONFIG).read_text())["device"] == "jetson-orin-nano"
    finally:
        store.abort()


def test_build_engines_refuses_other_targets_before_tensorrt(artifacts):
    """An ort folder is refused by its target, whether TensorRT exists or not."""
    with pytest.raises(QvlError, match="--target trt"):
        trt_target.build_engines(artifacts("qwen2_vl"), print, print)
    assert (artifacts("qwen2_vl") / MANIFEST).exists()
    Manifest.read(artifacts("qwen2_vl")).verify(artifacts("qwen2_vl"))  # untouched


def test_bf16_bundle_is_refused_by_the_cpu_runtime_with_what_to_do(tmp_path, checkpoint):
    """A bf16 bundle builds here (no gate: no CPU kernels), and the CPU runtime refuses it in one line
    that names the parts and the engine command, instead of an onnxruntime kernel error."""
    from qvl_export.building.artifacts import BuildOptions, build
    from qvl_export.runtimes.pipeline import Pipeline

    out = tmp_path / "bf16"
    build(checkpoint("qwen2_vl"), out, BuildOptions(precision="bf16", target="trt", bundle=True))
    assert {p.precision for p in Manifest.read(out).parts.values()} == {"bf16"}
    with pytest.raises(QvlError, match=r"vision \(bf16\), merger \(bf16\), decoder \(bf16\).*qvl-export engine"):
        Pipeline.load(out)
