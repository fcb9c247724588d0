"""The shipped demo checkpoint (trained by ``python tools/train_demo.py``) reads its sample invoice.

Nothing is retrained here: the tests load the committed weights, check them with our own config
parser, run transformers' greedy ``generate`` on the shipped sample page, and build the demo the
way the README's first command does (no MODEL_DIR), demo-task gate included.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from qvl_export.demo import CHECKPOINT, SAMPLES, checkpoint_dir, documents, task_reference

FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.json",
         "generation_config.json", "preprocessor_config.json", "eval.json")


def test_checkpoint_files_are_shipped_and_small():
    for name in FILES:
        assert (CHECKPOINT / name).is_file(), f"{name} missing from {CHECKPOINT}"
    assert (CHECKPOINT / "model.safetensors").stat().st_size < 10_000_000


def test_checkpoint_parses_with_our_config_parser():
    from qvl_export.loading.config import parse_model_config

    spec = parse_model_config(CHECKPOINT)
    assert spec.family == "qwen2_5_vl"
    assert spec.architecture == "Qwen2_5_VLForConditionalGeneration"
    assert spec.vision.windowed and spec.vision.fullatt_block_indexes
    assert spec.tokens.image_token_id is not None
    # The pages are not resized by smart_resize: one image token per 28x28 px cell.
    width, height = documents.PAGE_SIZE
    unit = spec.vision.patch_size * spec.vision.spatial_merge_size
    assert width % unit == 0 and height % unit == 0
    assert spec.preprocess.min_pixels <= width * height <= spec.preprocess.max_pixels


def test_eval_report_covers_a_heldout_set():
    report = json.loads((CHECKPOINT / "eval.json").read_text())
    assert report["heldout"] >= 200
    assert report["exact_match"] >= 0.9
    # The run's own CPU time (one thread): what it costs on an idle machine. Its wall time is in
    # eval.json too, with the load average of the other jobs that shared the machine.
    assert report["seconds"]["process_cpu"] < 20 * 60


def _sample():
    meta = json.loads((SAMPLES / "invoice.json").read_text())
    return Image.open(SAMPLES / "invoice.png").convert("RGB"), meta


def test_sample_invoice_is_a_heldout_page():
    image, meta = _sample()
    assert meta["seed"] >= documents.HELDOUT_SEED_OFFSET
    rendered, prompt, answer = documents.make_example(meta["seed"])
    assert (prompt, answer) == (meta["prompt"], meta["answer"])
    assert np.array_equal(np.asarray(rendered), np.asarray(image))


def test_transformers_generate_reads_the_sample_invoice():
    pytest.importorskip("transformers")
    from qvl_export.parity.reference import ReferenceCase, TorchReference

    image, meta = _sample()
    ref = TorchReference(CHECKPOINT, num_threads=1)
    inputs = ref.prepare(ReferenceCase("invoice", [image], meta["prompt"]))
    ids, _ = ref.generate(inputs, max_new_tokens=8)
    assert ref.tokenizer.decode(ids, skip_special_tokens=True).strip() == meta["answer"]
    assert int(ids[-1]) in ref.eos_token_ids  # it stops after the digits


def test_renderer_is_deterministic():
    for seed in (0, 7, documents.HELDOUT_SEED_OFFSET + 3):
        a_img, a_prompt, a_answer = documents.make_example(seed)
        b_img, b_prompt, b_answer = documents.make_example(seed)
        assert (a_prompt, a_answer) == (b_prompt, b_answer)
        assert a_img.size == documents.PAGE_SIZE
        assert np.array_equal(np.asarray(a_img), np.asarray(b_img))
        assert a_answer.isdigit() and 3 <= len(a_answer) <= documents.MAX_ANSWER_DIGITS
        assert a_prompt in documents.PROMPTS


def test_renderer_varies_with_the_seed():
    pages = [documents.make_example(seed) for seed in range(6)]
    assert len({answer for _, _, answer in pages}) > 3
    assert len({np.asarray(img).tobytes() for img, _, _ in pages}) == 6


def test_heldout_set_is_seeded_apart_from_training():
    held = documents.heldout_set(3)
    again = documents.heldout_set(3)
    assert [a for _, _, a in held] == [a for _, _, a in again]
    assert [a for _, _, a in held] == [documents.make_example(documents.HELDOUT_SEED_OFFSET + i)[2] for i in range(3)]


def test_total_digits_sit_one_per_image_token():
    """Training supervises the vision tower where the total's digits are: one digit per 28x28 cell
    (the area of one image token), with ink near each recorded centre."""
    from qvl_export.documents import render

    for seed in range(20):
        page = render.render_invoice(seed)
        assert len(page.total_digits) == len(str(page.total))
        cells = [(int(x) // render.CELL, int(y) // render.CELL) for x, y in page.total_digits]
        assert len(set(cells)) == len(cells)
        assert len({row for _, row in cells}) == 1  # one row, left to right
        assert [c for c, _ in cells] == sorted(c for c, _ in cells)
        pixels = np.asarray(page.image.convert("L"), dtype=np.int32)
        paper = int(np.median(pixels))
        for x, y in page.total_digits:
            patch = pixels[int(y) - 3:int(y) + 4, int(x) - 3:int(x) + 4]
            assert patch.min() < paper - 60  # dark ink near every digit centre


def test_demo_checkpoint_is_a_task_reference(tmp_path):
    assert checkpoint_dir() == CHECKPOINT
    record = task_reference(CHECKPOINT)
    assert record is not None and record["heldout"] >= 200
    # any other checkpoint (or a foreign eval.json) is not one
    assert task_reference(tmp_path) is None
    (tmp_path / "eval.json").write_text(json.dumps({"task": "something else", "exact_match": 1.0}))
    assert task_reference(tmp_path) is None


def test_build_without_a_model_builds_the_demo_and_reads_the_sample(tmp_path, monkeypatch):
    """The README's first command: the trained demo model, built and gated, answers the shipped invoice.
    The gate includes the demo task: exact match on held-out pages within the fp32 figure of eval.json."""
    from click.testing import CliRunner

    from qvl_export.cli import main

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["build"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    out = tmp_path / "build" / "demo"
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] is True
    task = [c for c in report["cases"] if c["name"] == "demo-task"]
    assert len(task) == 1 and task[0]["passed"]
    stage = task[0]["stages"]["task"]
    assert stage["pages"] == task_reference(CHECKPOINT)["heldout"]
    assert abs(stage["exact_match"] - stage["reference_exact_match"]) <= 0.01  # fp32: same answers
    assert "demo-task" in result.output and "exact" in result.output

    meta = json.loads((SAMPLES / "invoice.json").read_text())
    result = CliRunner().invoke(main, ["run", str(out), "--image", str(SAMPLES / "invoice.png"),
                                       "--prompt", meta["prompt"], "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.strip().splitlines()[-1])["text"].strip() == meta["answer"]
