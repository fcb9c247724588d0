"""Smoke test of the benchmark harness on the tiny synthetic shape: every figure is produced.

Speed goals are measured by ``benchmarks/``, never asserted here.
"""

from __future__ import annotations

import json
import math
import time

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("matplotlib")


def _positive(value, where: str) -> None:
    assert isinstance(value, (int, float)) and not isinstance(value, bool), f"{where}: {value!r} is not a number"
    assert math.isfinite(value) and value > 0, f"{where}: {value!r} is not a positive finite number"


def test_bench_tiny_has_every_figure(tmp_path):
    from qvl_export.bench import run_bench

    out = tmp_path / "bench"
    t0 = time.perf_counter()
    # jobs=2: the two exports and the measurement workers overlap (timings are meaningless here)
    report = run_bench("tiny", layers=2, threads=1, out_dir=out, pixels=(112, 224), decode_tokens=4,
                       prompt_tokens=8, repeats=1, warmup=0, bandwidth_mib=32, jobs=2, quantized=("int8",),
                       calib_limit=2, video=(4, 336))
    elapsed = time.perf_counter() - t0

    on_disk = json.loads((out / "bench.json").read_text())
    assert on_disk["model"] == "tiny" and on_disk["layers"] == 2
    assert (out / "encoder_time_vs_pixels.png").stat().st_size > 1000
    assert "Vision encoder" in (out / "table.txt").read_text()
    assert not report["warnings"] or all("other processes" in w for w in report["warnings"]), report["warnings"]

    for variant in ("fused", "dense"):
        for key in ("seconds", "peak_rss_mb", "bytes"):
            _positive(report["export"][variant][key], f"export.{variant}.{key}")
    _positive(report["checkpoint"]["seconds"], "checkpoint.seconds")
    for px in ("112", "224"):
        row = report["vision"][px]
        assert row["tokens"] == (int(px) // 14) ** 2
        for engine in ("torch", "ort_fused", "ort_dense"):
            for key in ("ms", "peak_rss_mb"):
                _positive(row[engine][key], f"vision.{px}.{engine}.{key}")
        _positive(row["ort_fused"]["host_ms"], f"vision.{px}.ort_fused.host_ms")
        _positive(report["speedups"]["vision"][px], f"speedups.vision.{px}")
    # 4 frames of 336 x 336 (within the video pixel range: not resized): 2 temporal patches of 24 x 24
    clip = report["vision_video"]
    assert (clip["frames"], clip["px"], clip["grid"], clip["patches"], clip["tokens"]) == (4, 336, [2, 24, 24], 1152,
                                                                                            288)
    for engine in ("torch", "ort_fused", "ort_dense"):
        _positive(clip[engine]["ms"], f"vision_video.{engine}.ms")
    _positive(clip["ort_fused"]["host_ms"], "vision_video.ort_fused.host_ms")
    _positive(report["speedups"]["vision_video"], "speedups.vision_video")
    assert "video clip 4 frames 336x336 (grid 2x24x24, 1152 patches, 288 visual tokens)" in (out / "table.txt").read_text()
    for engine in ("torch", "ort"):
        _positive(report["prefill"][engine]["ms"], f"prefill.{engine}.ms")
        _positive(report["decode"][engine]["tokens_per_s"], f"decode.{engine}.tokens_per_s")
        _positive(report["decode"][engine]["peak_rss_mb"], f"decode.{engine}.peak_rss_mb")
        _positive(report["roofline"]["fraction"][engine], f"roofline.fraction.{engine}")
    assert report["prefill"]["prompt_tokens_total"] == 256 // 4 + 2 + 8  # 224 px page: 256 patches, 64 units
    for key in ("copy_gb_s", "read_gb_s"):
        _positive(report["bandwidth"][key], f"bandwidth.{key}")
    for key in ("weight_bytes_per_token", "tokens_per_s", "read_tokens_per_s"):
        _positive(report["roofline"][key], f"roofline.{key}")
    for key in ("decode", "prefill", "vision_ref"):
        _positive(report["speedups"][key], f"speedups.{key}")
    for engine in ("torch", "ort_fused", "ort_dense"):
        _positive(report["scaling"]["112->224"][engine], f"scaling.{engine}")
    int8 = report["quantized"]["int8"]
    for key in ("decode_tokens_per_s", "prefill_ms", "decode_speedup", "bytes_ratio", "llm_peak_rss_mb"):
        _positive(int8[key], f"quantized.int8.{key}")
    assert int8["quantization"]["decoder"]["quantized_count"] > 0
    assert set(int8["vision"]) == {"112", "224"}
    assert "int8 vs ours fp32" in (out / "table.txt").read_text()
    acceptance = report["acceptance"]
    assert acceptance["applies"] is False  # tiny shape: goals do not apply
    assert {"decode_speedup", "vision_speedup_224", "fused_scaling_112->224", "int8_decode_vs_fp32",
            "int8_bytes_vs_fp32"} <= set(acceptance)
    for section in ("decoder_decode", "decoder_prefill", "vision"):
        assert report["ort_profile"][section]["ops"], section
    # the work folder's checkpoint and artifacts are removed unless kept
    assert not (out / "work" / "checkpoint").exists()
    print(f"smoke run: {elapsed:.0f} s; workers: "
          + ", ".join(f"{k} {v['wall_s']:.0f} s" for k, v in report["workers"].items()))


def test_cut_layers_keeps_full_attention_blocks():
    from qvl_export.bench.configs import bench_model

    q25 = bench_model("qwen2.5-vl-3b", 4).dims
    assert (q25.vision_depth, q25.text_layers, q25.fullatt_block_indexes) == (4, 4, (3,))
    assert bench_model("qwen2.5-vl-3b", 16).dims.fullatt_block_indexes == (7, 15)
    assert bench_model("qwen2.5-vl-3b").dims.fullatt_block_indexes == (7, 15, 23, 31)
    q2 = bench_model("qwen2-vl-2b", 2).dims
    assert (q2.vision_depth, q2.text_layers, q2.vision_hidden, q2.text_hidden) == (2, 2, 1280, 1536)


def test_qwen3_shapes_and_cut_deepstack():
    """Qwen3-VL-2B / 4B at their published widths; a cut keeps DeepStack, its layers moved with the cut."""
    from qvl_export.bench.configs import bench_model

    q3 = bench_model("qwen3-vl-2b").dims
    assert (q3.vision_depth, q3.vision_hidden, q3.vision_intermediate, q3.deepstack_visual_indexes) == \
        (24, 1024, 4096, (5, 11, 17))
    assert (q3.text_layers, q3.text_hidden, q3.text_heads, q3.text_kv_heads, q3.text_head_dim) == (28, 2048, 16, 8, 128)
    q4 = bench_model("qwen3-vl-4b").dims
    assert (q4.text_layers, q4.text_hidden, q4.text_heads, q4.text_intermediate) == (36, 2560, 32, 9728)
    assert bench_model("qwen3-vl-2b", 2).dims.deepstack_visual_indexes == (0, 1)
    assert bench_model("qwen3-vl-4b", 12).dims.deepstack_visual_indexes == (2, 5, 8)


def test_decoder_weight_bytes_rule(tmp_path):
    """A Gather-only table counts 0; a table also used by a MatMul (tied lm_head) counts in full."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from qvl_export.bench.ort_engine import decoder_weight_bytes

    table = numpy_helper.from_array(np.zeros((10, 4), np.float32), "table")
    w = numpy_helper.from_array(np.zeros((4, 3), np.float32), "w")
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    untied = helper.make_graph([helper.make_node("Gather", ["table", "ids"], ["e"]),
                                helper.make_node("MatMul", ["e", "w"], ["y"])], "g", [ids], [y], [table, w])
    onnx.save(helper.make_model(untied), tmp_path / "untied.onnx")
    assert decoder_weight_bytes(tmp_path / "untied.onnx")["bytes_per_token"] == 4 * 3 * 4

    y2 = helper.make_tensor_value_info("y2", TensorProto.FLOAT, [2, 10])
    tied = helper.make_graph([helper.make_node("Gather", ["table", "ids"], ["e"]),
                              helper.make_node("MatMul", ["e", "w"], ["y"]),
                              helper.make_node("Gemm", ["e", "table"], ["y2"], transB=1)],
                             "g", [ids], [y, y2], [table, w])
    onnx.save(helper.make_model(tied), tmp_path / "tied.onnx")
    assert decoder_weight_bytes(tmp_path / "tied.onnx")["bytes_per_token"] == 4 * 3 * 4 + 10 * 4 * 4
