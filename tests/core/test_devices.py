"""Device rules, optimization profiles and the memory estimate (pure Python, CPU; no TensorRT)."""

from __future__ import annotations

import pytest

from qvl_export.core import precisions as registry
from qvl_export.core.devices import (
    DEVICES,
    Ranges,
    available_precisions,
    check_memory,
    check_precision,
    estimate_memory,
    parameter_counts,
    part_weight_bytes,
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
    assert int8.weights_gb < small.weights_gb  # the fp32 token table keeps it above half (next test)
    fp32 = estimate_memory(spec, {"vision": "fp32", "merger": "fp32", "decoder": "fp32"}, Ranges(max_seq=1024))
    # int8 graphs are traced in fp32: outside the quantized MatMuls a strongly typed engine runs fp32
    assert int8.activations_gb == pytest.approx(fp32.activations_gb)
    assert int8.activations_gb > small.activations_gb
    assert int8.kv_cache_gb == pytest.approx(fp32.kv_cache_gb) == pytest.approx(2 * small.kv_cache_gb)
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


def test_precision_rules_come_from_the_registry():
    """min_sm and targets are the registry's: Orin (SM 8.7) lacks fp8 and is pointed to int8."""
    assert "fp8" not in available_precisions(DEVICES["jetson-orin"])
    assert "fp8" in available_precisions(DEVICES["jetson-thor"])
    assert "int4" in available_precisions(DEVICES["jetson-orin"])  # weight-only, no minimum SM recorded
    assert set(available_precisions(DEVICES["x86-gpu"], sm=(9, 0))) == {
        p.name for p in registry.REGISTRY.values() if "trt" in p.targets}
    with pytest.raises(QvlError, match="decoder=int8"):
        check_precision(DEVICES["jetson-orin"], {"decoder": "fp8"})
    check_precision(DEVICES["x86-gpu"], {"decoder": "fp8"})  # GPU unknown until the device build checks it
    check_precision(DEVICES["jetson-orin"], {"decoder": "int4"})


def test_int4_decoder_on_trt_is_counted_in_fp16():
    """TensorRT's int4 decoder: weights at half a byte, its Gather token table and activations in fp16 (the
    graph is traced in fp16); on the ort target fp32 activations and int8 token rows."""
    p = registry.get("int4")
    assert p.traced("trt") == "float16" and p.traced("ort") == "float32"
    assert p.act_bytes_on("trt") == 2.0 and p.act_bytes_on("ort") == 4.0
    assert p.token_table_bytes("trt") == 2.0 and p.token_table_bytes("ort") == 1.0


def test_int8_decoder_keeps_an_fp32_token_table_on_trt(checkpoint):
    """An int8 decoder's token table is a Gather: TensorRT keeps it fp32 (4 bytes), the weighted ops at 1
    byte; a tied LM head adds its own int8 copy of the table. The estimate follows the registry."""
    for family in ("qwen2_vl", "qwen2_5_vl"):
        spec = parse_model_config(checkpoint(family))
        t = spec.text
        table = t.vocab_size * t.hidden_size
        rest = parameter_counts(spec)["decoder"] - table
        tied = table * 1.0 if t.tie_word_embeddings else 0.0
        assert part_weight_bytes(spec, "decoder", "int8", "trt") == pytest.approx(rest * 1.0 + table * 4.0 + tied)
        assert part_weight_bytes(spec, "decoder", "int8", "ort") == pytest.approx(rest * 1.0 + table * 1.0)
        assert part_weight_bytes(spec, "decoder", "fp16", "trt") == pytest.approx((rest + table) * 2.0)
        assert part_weight_bytes(spec, "vision", "int8") == parameter_counts(spec)["vision"] * 1.0
        est = estimate_memory(spec, {"vision": "int8", "merger": "int8", "decoder": "int8"}, Ranges(max_seq=1024))
        want = sum(part_weight_bytes(spec, p, "int8", "trt") for p in ("vision", "merger", "decoder")) / 1e9
        assert est.weights_gb == pytest.approx(want)
        assert est.build_peak_gb == pytest.approx(3.5 * want)
