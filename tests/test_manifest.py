"""What the runtime trusts: checksummed, tolerant manifests, the right reference, the declared ranges,
and rebuilds that are byte-identical."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
from click.testing import CliRunner
from PIL import Image

from qvl_export.building.artifacts import BuildOptions, build
from qvl_export.cli import main
from qvl_export.core.devices import Ranges
from qvl_export.core.errors import QvlError
from qvl_export.core.manifest import BUILD_LOG, MANIFEST, Manifest
from qvl_export.runtimes.pipeline import Pipeline


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _copy(folder, tmp_path, name="copy"):
    out = tmp_path / name
    shutil.copytree(folder, out)
    return out


def _edit(folder, change):
    path = folder / MANIFEST
    d = json.loads(path.read_text())
    change(d)
    path.write_text(json.dumps(d))


def test_rebuild_is_byte_identical(artifacts, checkpoint, tmp_path):
    first = artifacts("qwen2_5_vl")
    second = tmp_path / "again"
    build(checkpoint("qwen2_5_vl"), second, BuildOptions())
    a, b = _files(first), _files(second)
    for f in (BUILD_LOG, "report.json"):  # the build log holds timings; report.json is the last parity run's
        a.pop(f, None)
        b.pop(f, None)
    assert sorted(a) == sorted(b)
    differing = [f for f in a if a[f] != b[f]]
    assert differing == []
    log = json.loads((second / BUILD_LOG).read_text())
    assert all("seconds" in r for records in log["passes"].values() for r in records)
    assert "seconds" not in (second / MANIFEST).read_text()


def test_part_from_another_build_is_refused(artifacts, tmp_path):
    folder = _copy(artifacts("qwen2_5_vl"), tmp_path)
    shutil.copyfile(artifacts("qwen2_vl") / "merger.onnx", folder / "merger.onnx")
    with pytest.raises(QvlError, match="merger.onnx does not match the manifest"):
        Pipeline.load(folder)
    result = CliRunner().invoke(main, ["run", str(folder), "--prompt", "hi", "--max-new-tokens", "2"])
    assert result.exit_code == 2
    assert "does not match the manifest" in result.stderr and "Traceback" not in result.stderr


def test_missing_file_and_skip_verify(artifacts, tmp_path):
    folder = _copy(artifacts("qwen2_vl"), tmp_path)
    (folder / "generation_config.json").unlink()
    with pytest.raises(QvlError, match="generation_config.json is missing"):
        Pipeline.load(folder)
    result = CliRunner().invoke(main, ["run", str(folder), "--prompt", "hi", "--max-new-tokens", "2",
                                       "--skip-verify"])
    assert result.exit_code == 0, result.stderr


@pytest.mark.parametrize("change, match", [
    (lambda d: d["parts"]["decoder"].pop("inputs"), "parts.decoder.inputs"),
    (lambda d: d["parts"].pop("merger"), "parts.merger"),
    (lambda d: d["spec"]["text"].pop("hidden_size"), "text.hidden_size"),
    (lambda d: d.pop("target"), "'target'"),
    (lambda d: d.update(format="qvl-export/99"), "format 'qvl-export/99'"),
])
def test_damaged_manifest_is_one_line(change, match, artifacts, tmp_path):
    folder = _copy(artifacts("qwen2_vl"), tmp_path)
    _edit(folder, change)
    with pytest.raises(QvlError, match=match):
        Manifest.read(folder)


def test_unknown_keys_are_ignored(artifacts, tmp_path):
    folder = _copy(artifacts("qwen2_vl"), tmp_path)

    def add(d):
        d["from_the_future"] = 1
        d["parts"]["decoder"]["new_field"] = {"x": 1}
        d["parts"]["decoder"]["inputs"][0]["layout"] = "NCHW"
        d["spec"]["text"]["sliding_window"] = 4096
    _edit(folder, add)
    pipe = Pipeline.load(folder)
    assert pipe.generate([], "hi", max_new_tokens=2).token_ids


def test_format_1_needs_a_rebuild_or_skip_verify(artifacts, tmp_path):
    folder = _copy(artifacts("qwen2_vl"), tmp_path)
    _edit(folder, lambda d: (d.pop("files"), d.update(format="qvl-export/1")))
    with pytest.raises(QvlError, match="no file checksums.*--skip-verify"):
        Pipeline.load(folder)
    assert Pipeline.load(folder, verify=False).generate([], "hi", max_new_tokens=2).token_ids


def test_parity_refuses_another_checkpoint(artifacts, checkpoint, tiny_dims, tmp_path):
    from qvl_export.loading.synthetic import make_checkpoint
    from qvl_export.parity.gate import run_parity

    folder = artifacts("qwen2_5_vl")
    with pytest.raises(QvlError, match="is a Qwen2VLForConditionalGeneration checkpoint but the artifacts were built "
                                       "from a Qwen2_5_VLForConditionalGeneration"):
        run_parity(folder, checkpoint("qwen2_vl"))
    sibling = make_checkpoint(tmp_path / "sibling", dataclasses.replace(tiny_dims["qwen2_5_vl"], seed=99))
    with pytest.raises(QvlError, match="not the checkpoint the artifacts were built from"):
        run_parity(folder, sibling)
    result = CliRunner().invoke(main, ["parity", str(folder), "--reference", str(sibling)])
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1


def test_runtime_enforces_the_bundle_ranges(checkpoint, tmp_path):
    ranges = Ranges(min_pixels=56 * 56, opt_pixels=112 * 112, max_pixels=224 * 224, max_images=1, max_seq=256,
                    opt_seq=128)
    out = tmp_path / "bundle"
    build(checkpoint("qwen2_vl"), out, BuildOptions(target="trt", bundle=True, ranges=ranges))
    pipe = Pipeline.load(out, backend="onnxruntime")  # the bundle's ONNX parts (no engines here)
    small = Image.new("RGB", (200, 180), (0, 90, 200))
    assert pipe.generate([small], "Total?", max_new_tokens=4, temperature=0.0).token_ids
    with pytest.raises(QvlError, match="at most 1"):
        pipe.generate([small, small], "Compare.", max_new_tokens=4)
    with pytest.raises(QvlError, match=r"built for 3136\.\.50176 pixels per image: pass --max-pixels 50176"):
        pipe.generate([Image.new("RGB", (400, 400))], "Total?", max_new_tokens=4)
    with pytest.raises(QvlError, match="built for 256"):
        pipe.generate([small], "Total?", max_new_tokens=250)
    assert pipe.generate([Image.new("RGB", (400, 400))], "Total?", max_new_tokens=4, max_pixels=224 * 224).token_ids


def test_format_2_manifest_is_migrated(artifacts, tmp_path):
    """A format-2 manifest (untyped ``options``, precision as one label, lint findings among the passes)
    reads back into the typed sections and still loads, checksums verified."""
    folder = _copy(artifacts("qwen2_vl"), tmp_path)
    new = Manifest.read(folder)
    lint = {"level": "warning", "rule": "r1", "node": "n", "message": "m"}

    def to_format_2(d):
        d["format"] = "qvl-export/2"
        d["precision"] = "fp32"
        d["options"] = {"window_attention": "dense", "chat_template": "chat_template.jinja",
                        "precisions": {"vision": "fp32", "merger": "fp32", "decoder": "fp32"},
                        "ranges": {"max_seq": 256}, "quantization": {"decoder": {"quantized_count": 3}},
                        "calibration": {"documents": ["a.png"], "settings": {"decode_stride": 4}}}
        d["parts"]["decoder"]["passes"].append({"pass": "trt_lint", "findings": [lint]})
        for k in ("build", "calibration", "tensorrt"):
            d.pop(k)
    _edit(folder, to_format_2)
    m = Manifest.read(folder)
    assert m.format == "qvl-export/2" and m.precisions == new.precisions and m.precision == "fp32"
    assert m.build.window_attention == "dense" and m.build.chat_template == "chat_template.jinja"
    assert m.calibration.documents == ["a.png"] and m.calibration.quantization["decoder"]["quantized_count"] == 3
    assert m.tensorrt.ranges == {"max_seq": 256} and m.tensorrt.device == "x86-gpu"
    assert m.parts["decoder"].lint == [lint]
    assert [r["pass"] for r in m.parts["decoder"].passes] == [r["pass"] for r in new.parts["decoder"].passes]
    assert m.source == new.source and m.files == new.files
    Pipeline.load(folder, backend="onnxruntime")  # checksums of a format-2 folder still verify
