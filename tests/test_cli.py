"""Bad input through the CLI: one line on stderr, a non-zero exit, no traceback, nothing half-written."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner
from PIL import Image

from qvl_export.cli import main


def invoke(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.output, result.stderr


def assert_one_line_error(code, stderr, *words):
    assert code == 2, stderr
    lines = [line for line in stderr.strip().splitlines() if not line.startswith("[qvl-export]")]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in stderr
    for w in words:
        assert w.lower() in lines[0].lower(), lines[0]


@pytest.fixture()
def ckpt_copy(tmp_path, checkpoint):
    def make(family="qwen2_5_vl"):
        dst = tmp_path / f"copy-{family}"
        shutil.copytree(checkpoint(family), dst)
        return dst

    return make


def no_leftovers(parent):
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name]


def test_unsupported_architecture(ckpt_copy, tmp_path):
    ckpt = ckpt_copy()
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["architectures"] = ["LlavaForConditionalGeneration"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    code, _, err = invoke("build", ckpt, "-o", out, "--no-parity")
    assert_one_line_error(code, err, "unsupported architecture", "Qwen2_5_VLForConditionalGeneration")
    assert not out.exists() and not no_leftovers(tmp_path)


def test_missing_weights(ckpt_copy, tmp_path):
    ckpt = ckpt_copy()
    (ckpt / "model.safetensors").unlink()
    code, _, err = invoke("build", ckpt, "-o", tmp_path / "out", "--no-parity")
    assert_one_line_error(code, err, "no safetensors")
    assert not (tmp_path / "out").exists()


def test_truncated_weights(ckpt_copy, tmp_path):
    ckpt = ckpt_copy()
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 3])
    code, _, err = invoke("build", ckpt, "-o", tmp_path / "out", "--no-parity")
    assert_one_line_error(code, err, "corrupt")
    assert not (tmp_path / "out").exists() and not no_leftovers(tmp_path)


def test_missing_tensor_fails_midway_without_leftovers(ckpt_copy, tmp_path):
    """The vision part traces, the decoder lacks a tensor: no output and no temporary folder remain."""
    from safetensors.numpy import load_file, save_file

    ckpt = ckpt_copy()
    tensors = load_file(ckpt / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    code, _, err = invoke("build", ckpt, "-o", out, "--no-parity")
    assert_one_line_error(code, err, "model.layers.1.mlp.down_proj.weight", "missing")
    assert not out.exists() and not no_leftovers(tmp_path)


def test_existing_artifacts_are_kept_without_force(artifacts, tmp_path, checkpoint):
    out = tmp_path / "art"
    shutil.copytree(artifacts("qwen2_5_vl"), out)
    before = sorted(p.name for p in out.iterdir())
    code, _, err = invoke("build", checkpoint("qwen2_5_vl"), "-o", out, "--no-parity")
    assert_one_line_error(code, err, "--force")
    assert sorted(p.name for p in out.iterdir()) == before


def test_output_that_is_not_artifacts_is_refused(tmp_path, checkpoint):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    code, _, err = invoke("build", checkpoint("qwen2_5_vl"), "-o", out, "--no-parity", "--force")
    assert_one_line_error(code, err, "not an artifacts folder")
    assert (out / "notes.txt").read_text() == "keep me"


def test_missing_model_dir(tmp_path):
    code, _, err = invoke("build", tmp_path / "nope", "-o", tmp_path / "out", "--no-parity")
    assert_one_line_error(code, err, "does not exist")


@pytest.mark.parametrize("kind", ["text", "empty", "bomb", "missing", "zero-width"])
def test_bad_images(kind, artifacts, tmp_path):
    path = tmp_path / f"{kind}.png"
    if kind == "text":
        path.write_text("this is not an image")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "bomb":
        Image.new("1", (20000, 20000)).save(path)  # 400 megapixels, a few KB on disk
    elif kind == "zero-width":
        path = tmp_path / "wide.png"
        Image.new("RGB", (4000, 1)).save(path)  # aspect ratio far beyond 200
    code, _, err = invoke("run", artifacts("qwen2_5_vl"), "--image", path, "--prompt", "hi")
    assert_one_line_error(code, err)


def test_prompt_longer_than_context(artifacts):
    code, _, err = invoke("run", artifacts("qwen2_5_vl"), "--prompt", "total " * 5000, "--max-new-tokens", "4")
    assert_one_line_error(code, err, "context")


def test_not_an_artifacts_folder(tmp_path):
    code, _, err = invoke("run", tmp_path, "--prompt", "hi")
    assert_one_line_error(code, err, "manifest.json")


def test_run_json(artifacts, tmp_path):
    img = tmp_path / "page.png"
    Image.new("RGB", (300, 200), (200, 30, 30)).save(img)
    code, out, err = invoke("run", artifacts("qwen2_5_vl"), "--image", img, "--prompt", "What is the total?",
                            "--max-new-tokens", "8", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert 1 <= len(data["token_ids"]) <= 8
    assert data["finish_reason"] in ("stop", "length")
    assert isinstance(data["text"], str)


@pytest.mark.parametrize("args", [("--target", "trt", "--bundle", "--precision", "int8"),
                                  ("--precision", "decoder=fp8")])
def test_dynamic_activations_where_only_static_scales_exist(args, checkpoint, tmp_path):
    """TensorRT's int8 and every fp8 GEMM take static scales: refused before anything is traced."""
    out = tmp_path / "out"
    code, _, err = invoke("build", checkpoint("qwen2_vl"), "-o", out, *args, "--activations", "dynamic")
    assert_one_line_error(code, err, "--activations dynamic", "--activations static")
    assert not out.exists() and not no_leftovers(tmp_path)
