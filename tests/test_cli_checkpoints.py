"""Checkpoints that cannot be trusted, and the new run options, through the CLI.

Each bad input: exit 2, one line naming the problem and what to do, no traceback, no output or
temporary folder written, an existing artifacts folder left as it was."""

from __future__ import annotations

import json
import shutil

from click.testing import CliRunner
from PIL import Image

from qvl_export.cli import main

from test_cli import assert_one_line_error, ckpt_copy, invoke, no_leftovers  # noqa: F401  (shared helpers, fixture)


def _files(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def _transpose(ckpt, name):
    from safetensors.torch import load_file, save_file

    tensors = load_file(ckpt / "model.safetensors")
    key = next(k for k in tensors if k.endswith(name))
    tensors[key] = tensors[key].t().contiguous()
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    return key


def test_transposed_weight_is_refused(ckpt_copy, tmp_path):
    ckpt = ckpt_copy("qwen2_vl")
    _transpose(ckpt, "layers.0.mlp.down_proj.weight")
    out = tmp_path / "out"
    code, _, err = invoke("build", ckpt, "-o", out, "--no-parity")
    assert_one_line_error(code, err, "down_proj.weight", "(96, 160)", "(160, 96)")
    assert not out.exists() and not no_leftovers(tmp_path)


def test_corrupt_tokenizer_is_refused_and_old_artifacts_survive(ckpt_copy, artifacts, tmp_path):
    ckpt = ckpt_copy()
    data = (ckpt / "tokenizer.json").read_bytes()
    (ckpt / "tokenizer.json").write_bytes(data[: len(data) // 2])
    out = tmp_path / "existing"
    shutil.copytree(artifacts("qwen2_5_vl"), out)
    before = _files(out)
    code, _, err = invoke("build", ckpt, "-o", out, "--no-parity", "--force")
    assert_one_line_error(code, err, "tokenizer.json")
    assert _files(out) == before and not no_leftovers(tmp_path)


def test_missing_preprocessor_config(ckpt_copy, tmp_path):
    ckpt = ckpt_copy()
    (ckpt / "preprocessor_config.json").unlink()
    code, _, err = invoke("build", ckpt, "-o", tmp_path / "out", "--no-parity")
    assert_one_line_error(code, err, "preprocessor_config.json", "--assume-default-preprocessing")
    assert not (tmp_path / "out").exists()
    code, _, err = invoke("build", ckpt, "-o", tmp_path / "out", "--no-parity", "--assume-default-preprocessing")
    assert code == 0, err
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["spec"]["preprocess"]["max_pixels"] == 28 * 28 * 1280  # Qwen2VLImageProcessor's default


def test_template_without_image_support_is_refused(ckpt_copy, tmp_path):
    ckpt = ckpt_copy()
    bad = tmp_path / "text_only.jinja"
    bad.write_text("{% for m in messages %}{{ m.role }}: {{ m.content if m.content is string else '' }}{% endfor %}")
    code, _, err = invoke("build", ckpt, "-o", tmp_path / "out", "--no-parity", "--chat-template", bad)
    assert_one_line_error(code, err, "<|image_pad|>")
    assert not (tmp_path / "out").exists()


def test_damaged_manifest_via_cli(artifacts, tmp_path):
    out = tmp_path / "damaged"
    shutil.copytree(artifacts("qwen2_vl"), out)
    d = json.loads((out / "manifest.json").read_text())
    del d["parts"]["decoder"]["outputs"]
    (out / "manifest.json").write_text(json.dumps(d))
    code, _, err = invoke("run", out, "--prompt", "hi")
    assert_one_line_error(code, err, "parts.decoder.outputs", "rebuild")


def test_run_with_system_messages_and_sampling_options(artifacts, tmp_path):
    folder = artifacts("qwen2_5_vl")
    img = tmp_path / "page.png"
    Image.new("RGB", (160, 120), (20, 40, 200)).save(img)
    messages = [{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": [{"type": "image", "image": "page.png"},
                                             {"type": "text", "text": "What is the total?"}]}]
    (tmp_path / "chat.json").write_text(json.dumps(messages))
    code, out, err = invoke("run", folder, "--messages", tmp_path / "chat.json", "--max-new-tokens", "6", "--json")
    assert code == 0, err
    via_messages = json.loads(out)
    code, out, err = invoke("run", folder, "--image", img, "--prompt", "What is the total?", "--system",
                            "Answer briefly.", "--max-new-tokens", "6", "--json")
    assert code == 0, err
    assert json.loads(out)["token_ids"] == via_messages["token_ids"]
    assert json.loads(out)["prompt_tokens"] == via_messages["prompt_tokens"]
    code, out, err = invoke("run", folder, "--prompt", "hi", "--max-new-tokens", "6", "--temperature", "0.8",
                            "--top-k", "5", "--repetition-penalty", "1.2", "--seed", "3", "--json")
    assert code == 0, err
    code, _, err = invoke("run", folder, "--messages", tmp_path / "chat.json", "--prompt", "x")
    assert_one_line_error(code, err, "--messages")
    (tmp_path / "bad.json").write_text(json.dumps([{"role": "robot", "content": "x"}]))
    code, _, err = invoke("run", folder, "--messages", tmp_path / "bad.json")
    assert_one_line_error(code, err, "robot")


def test_run_uses_the_checkpoint_sampling_defaults(checkpoint, tiny_dims, tmp_path):
    """generation_config.json's sampling settings drive run unless overridden; --greedy wins."""
    import dataclasses

    from qvl_export.building.artifacts import BuildOptions, build
    from qvl_export.loading.synthetic import make_checkpoint
    from qvl_export.runtimes.pipeline import Pipeline

    dims = dataclasses.replace(tiny_dims["qwen2_vl"], generation={"do_sample": True, "temperature": 1.3,
                                                                   "top_k": 7, "top_p": 0.95,
                                                                   "repetition_penalty": 1.05})
    ckpt = make_checkpoint(tmp_path / "ckpt", dims)
    out = tmp_path / "art"
    build(ckpt, out, BuildOptions())
    pipe = Pipeline.load(out)
    params = pipe.sampling()
    assert (params.do_sample, params.temperature, params.top_k, params.top_p, params.repetition_penalty) == \
        (True, 1.3, 7, 0.95, 1.05)
    assert not pipe.sampling(temperature=0.0).do_sample
    runs = [json.loads(invoke("run", out, "--prompt", "Describe", "--max-new-tokens", "12", "--seed", str(s),
                              "--json")[1])["token_ids"] for s in (1, 2, 1)]
    assert runs[0] == runs[2] and runs[0] != runs[1]  # sampled (seeded), as the checkpoint asks
    greedy = [json.loads(invoke("run", out, "--prompt", "Describe", "--max-new-tokens", "12", "--greedy",
                                "--seed", str(s), "--json")[1])["token_ids"] for s in (1, 2)]
    assert greedy[0] == greedy[1]


def test_cli_runner_has_no_traceback_for_messages_file_missing(artifacts, tmp_path):
    result = CliRunner().invoke(main, ["run", str(artifacts("qwen2_vl")), "--messages", str(tmp_path / "none.json")])
    assert result.exit_code == 2 and "Traceback" not in result.output
