"""Device rules, optimization profiles and the memory estimate (pure Python, CPU)."""

from __future__ import annotations

import pytest

from qvl_export.building.devices import (
    DEVICES,
    Ranges,
    check_memory,
    check_precision,
    estimate_memory,
    parameter_counts,
    profiles,
)
from qvl_export.core.errors import QvlError
from qvl_export.loading.config import parse_model_config


def test_orin_refuses_fp8_and_suggests_int8():
    with pytest.raises(QvlError, match="int8"):
        check_precision(DEVICES["jetson-orin"], {"decoder": "fp8"})
    check_precision(DEVICES["jetson-orin"], {"decoder": "int8", "vision": "fp16"})
    check_precision(DEVICES["jetson-thor"], {"decoder": "fp8", "vision": "fp8"})


def test_fp8_on_a_pre_ada_gpu_is_refused():
    with pytest.raises(QvlError, match="SM 8.6"):
        check_precision(DEVICES["x86-gpu"], {"decoder": "fp8"}, sm=(8, 6))
    check_precision(DEVICES["x86-gpu"], {"decoder": "fp8"}, sm=(8, 9))


def test_parameter_counts_match_the_checkpoint(checkpoint):
    """The estimate's parameter model equals the real parameter count of both architectures."""
    import torch
    from safetensors import safe_open

    for family in ("qwen2_vl", "qwen2_5_vl"):
        ckpt = checkpoint(family)
        spec = parse_model_config(ckpt)
        counts = parameter_counts(spec)
        with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
            numel = {k: f.get_slice(k).get_shape() for k in f.keys()}
        real = {"vision": 0, "merger": 0, "decoder": 0}
        for k, shape in numel.items():
            n = int(torch.tensor(shape).prod())
            part = "merger" if ".merger." in k else "vision" if k.startswith("visual.") else "decoder"
            real[part] += n
        assert counts == real, family


def test_profiles_cover_declared_ranges(checkpoint):
    spec = parse_model_config(checkpoint("qwen2_5_vl"))
    r = Ranges(min_pixels=56 * 56, opt_pixels=448 * 448, max_pixels=896 * 896, max_images=2, max_seq=2048,
               opt_seq=512)
    (vision,) = profiles(spec, "vision", r)
    lo, opt, hi = vision.shapes["patches"]
    assert lo[0] <= opt[0] <= hi[0] and hi[1] == 1176
    assert all(x[0] % spec.vision.window_tokens == 0 for x in (lo, opt, hi))
    # two 896^2 pages = 2 x 64 x 64 patches, all in whole windows, must fit under max
    assert hi[0] >= 2 * 64 * 64
    prefill, decode = profiles(spec, "decoder", r)
    assert prefill.shapes["input_ids"][2] == (1, 2048)
    assert prefill.shapes["past_key_values.0.key"][2][2] == 0  # prefill: empty cache
    assert decode.shapes["input_ids"][2] == (1, 1)
    assert decode.shapes["past_key_values.0.key"][2][2] == 2047
    assert set(prefill.shapes) == set(decode.shapes)


def test_memory_estimate_and_orin_nano_check(checkpoint):
    spec = parse_model_config(checkpoint("qwen2_5_vl"))
    small = estimate_memory(spec, {"vision": "fp16", "merger": "fp16", "decoder": "fp16"}, Ranges(max_seq=1024))
    big = estimate_memory(spec, {"vision": "fp16", "merger": "fp16", "decoder": "fp16"}, Ranges(max_seq=4096))
    assert big.kv_cache_gb == pytest.approx(4 * small.kv_cache_gb)
    int8 = estimate_memory(spec, {"vision": "int8", "merger": "int8", "decoder": "int8"}, Ranges(max_seq=1024))
    assert int8.weights_gb == pytest.approx(small.weights_gb / 2)
    warnings = []
    check_memory(DEVICES["jetson-orin-nano"], small, warnings.append)
    huge = type(small)(weights_gb=7.0, activations_gb=1.0, kv_cache_gb=1.0, build_peak_gb=24.0)
    with pytest.raises(QvlError, match="jetson-orin-nano"):
        check_memory(DEVICES["jetson-orin-nano"], huge, warnings.append)


def test_ranges_validation(checkpoint):
    spec = parse_model_config(checkpoint("qwen2_5_vl"))
    with pytest.raises(QvlError, match="max-seq"):
        Ranges(max_pixels=1344 * 1344, max_images=4, max_seq=2048).validate(spec)
    with pytest.raises(QvlError, match="context"):
        Ranges(max_seq=10**6).validate(spec)


def test_engine_settings_clear_tf32_and_set_typing():
    """The TensorRT builder settings are decided without TensorRT; build_engine only applies them."""
    import pytest

    from qvl_export.building.devices import Profile
    from qvl_export.building.trt_engine import engine_settings
    from qvl_export.core.errors import QvlError

    prof = [Profile("prefill", {"input_ids": ((1, 1), (1, 64), (1, 128))})]
    s10 = engine_settings("fp32", prof, trt_major=10)
    assert s10.tf32 is False and s10.strongly_typed_flag is True and s10.workspace_bytes == 4 << 30
    s11 = engine_settings("int8", prof, trt_major=11, workspace_gb=2)
    assert s11.tf32 is False and s11.strongly_typed_flag is False and s11.workspace_bytes == 2 << 30
    assert engine_settings("fp16", prof, trt_major=10, allow_tf32=True).tf32 is True
    with pytest.raises(QvlError):
        engine_settings("fp32", [], trt_major=10)
