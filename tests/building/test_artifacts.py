"""The artifacts folder: manifest contents, part-unique external data, the no-argument demo build."""

from __future__ import annotations

import json

import onnx
import onnxruntime as ort
from click.testing import CliRunner

from qvl_export.building.artifacts import BuildOptions, build
from qvl_export.cli import main
from qvl_export.core import store as store_mod
from qvl_export.core.manifest import Manifest


def test_manifest_describes_parts(artifacts, checkpoint):
    folder = artifacts("qwen2_5_vl")
    m = Manifest.read(folder)
    raw = json.loads((folder / "manifest.json").read_text())
    assert raw["format"] == "qvl-export/3"
    assert set(raw["files"]) >= {"vision.onnx", "merger.onnx", "decoder.onnx", "tokenizer.json", "chat_template.jinja"}
    assert m.source.architecture == "Qwen2_5_VLForConditionalGeneration"
    assert len(m.source.sha256) == 64
    assert m.precisions == {"vision": "fp32", "merger": "fp32", "decoder": "fp32"} and m.precision == "fp32"
    assert m.calibration is None and m.tensorrt is None
    for pkg in ("torch", "transformers", "onnx", "onnxruntime", "qvl-export"):
        assert pkg in m.versions
    assert set(m.parts) == {"vision", "merger", "decoder"}
    for name, part in m.parts.items():
        sess = ort.InferenceSession(str(folder / part.file), providers=["CPUExecutionProvider"])
        assert [i.name for i in sess.get_inputs()] == [t.name for t in part.inputs]
        assert [o.name for o in sess.get_outputs()] == [t.name for t in part.outputs]
        assert part.precision == "fp32"
    dec = m.parts["decoder"]
    assert dec.input("input_ids").shape == ["batch", "seq"]
    # ort target: fuse_decoder_attention makes the K/V fixed-capacity buffers, located by seqlens_k
    assert dec.input("past_key_values.0.key").shape[2] == "kv_capacity"
    assert dec.input("seqlens_k").shape == ["batch"] and dec.input("total_sequence_length").shape == []
    assert m.parts["vision"].input("patches").shape == ["vision_tokens", 1176]
    for f in ("tokenizer.json", "preprocessor_config.json", "generation_config.json"):
        assert (folder / f).exists()


def test_external_data_names_are_part_unique(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(store_mod, "EXTERNAL_DATA_THRESHOLD", 0)
    out = tmp_path / "ext"
    m = build(checkpoint("qwen2_vl"), out, BuildOptions())
    data = [p.external_data for p in m.parts.values()]
    assert all(data) and len(set(data)) == len(data)
    for p in m.parts.values():
        model = onnx.load(out / p.file, load_external_data=False)
        locations = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
        assert locations == {p.external_data}
    sess = ort.InferenceSession(str(out / m.parts["merger"].file), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].name == "vision_hidden"


def test_build_without_model_uses_demo_and_passes_gate(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(main, ["build", "-o", str(out)])
    assert result.exit_code == 0, result.stderr
    assert "gate (fp32): PASSED" in result.output
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] is True
    assert Manifest.read(out).spec.family == "qwen2_5_vl"
