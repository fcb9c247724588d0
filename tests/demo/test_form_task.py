"""The form task (``qvl_export.demo.forms``, pages from ``render_form``), the task registry, and the
trained form reader in tests/data/trained/form_reader (trained by
``python tools/train_demo.py --task form``): a second trained checkpoint, another architecture
(Qwen2-VL, tied embeddings, head dim 48, a template without a system turn) and another task (two
numeric fields, the question picks one)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from qvl_export.demo import CHECKPOINT, TASK, TASKS, forms, task_for, task_reference
from qvl_export.documents.render import CELL, FORM_FIELDS, FORM_SIZE, render_form
from trained_builds import assert_shipped_checkpoint, build_passes_its_task_gate

FORM_READER = Path(__file__).resolve().parents[1] / "data" / "trained" / "form_reader"


def test_form_pages_are_deterministic_and_hold_both_fields():
    layouts = set()
    for seed in (0, 1, 2, 7, 123, forms.HELDOUT_SEED_OFFSET + 5):
        page, again = render_form(seed), render_form(seed)
        assert page.image.tobytes() == again.image.tobytes() and page.fields == again.fields
        assert page.digits == again.digits
        assert page.image.size == FORM_SIZE and FORM_SIZE[0] % CELL == 0 and FORM_SIZE[1] % CELL == 0
        assert set(page.fields) == set(FORM_FIELDS) == set(page.digits)
        values = [page.fields[f] for f in FORM_FIELDS]
        assert values[0] != values[1]
        pixels = np.asarray(page.image.convert("L"), dtype=np.int32)
        paper = int(np.median(pixels))
        cells = {}
        for name in FORM_FIELDS:
            value, centres = page.fields[name], page.digits[name]
            assert value.isdigit() and 3 <= len(value) <= 4 and value[0] != "0"
            assert len(centres) == len(value)
            cells[name] = [(int(x) // CELL, int(y) // CELL) for x, y in centres]
            assert len({row for _, row in cells[name]}) == 1  # one row of boxes, left to right
            assert [c for c, _ in cells[name]] == sorted(c for c, _ in cells[name])
            for x, y in centres:
                assert 0 <= x < FORM_SIZE[0] and 0 <= y < FORM_SIZE[1]
                assert pixels[int(y) - 3:int(y) + 4, int(x) - 3:int(x) + 4].min() < paper - 60  # ink there
        assert not set(cells["account"]) & set(cells["amount"])  # the two fields sit apart
        layouts.add(page.layout)
    assert render_form(0).image.tobytes() != render_form(1).image.tobytes()
    assert layouts == {"stacked", "columns"}


def test_sample_pages_are_heldout_pages():
    from PIL import Image

    for name in FORM_FIELDS:
        meta = json.loads((FORM_READER / "samples" / f"{name}.json").read_text())
        image, prompt, answer = forms.make_example(meta["seed"])
        assert (prompt, answer) == (meta["prompt"], meta["answer"])
        shipped = Image.open(FORM_READER / "samples" / f"{name}.png").convert("RGB")
        assert shipped.tobytes() == image.tobytes()


def test_form_examples_ask_one_field():
    asked = set()
    for seed in range(40):
        _, prompt, answer = forms.make_example(seed)
        field = forms.asked_field(seed)
        asked.add(field)
        assert prompt in forms.PROMPTS[field]
        assert answer == render_form(seed).fields[field]
        assert forms.make_example(seed)[1:] == (prompt, answer)
    assert asked == set(FORM_FIELDS)
    held = forms.heldout_set(2)
    assert [h[1:] for h in held] == [forms.make_example(forms.HELDOUT_SEED_OFFSET + i)[1:] for i in range(2)]


def test_registry_knows_both_tasks():
    assert TASKS["invoice"].name == TASK and task_for(TASK) is TASKS["invoice"]
    assert task_for(TASKS["form"].name) is TASKS["form"]
    assert task_for("something else") is None and task_for(None) is None
    assert TASKS["invoice"].case == "demo-task" and TASKS["form"].case == "form-task"
    for task in TASKS.values():
        assert task.max_new_tokens == task.max_answer_digits + 2
        assert len(task.prompts) >= 4
        _, prompt, answer = task.make_example(task.heldout_seed_offset)
        assert prompt in task.prompts and len(answer) <= task.max_answer_digits


def test_task_reference_recognises_both_trained_checkpoints_and_rejects_others(tmp_path):
    assert task_reference(CHECKPOINT)["task"] == TASK
    record = task_reference(FORM_READER)
    assert record is not None and task_for(record["task"]) is TASKS["form"]
    for foreign in ({"task": "something else", "exact_match": 1.0}, {"task": "form", "exact_match": 1.0},
                    {"task": TASKS["form"].name}, ["not", "a", "record"]):
        (tmp_path / "eval.json").write_text(json.dumps(foreign))
        assert task_reference(tmp_path) is None
    (tmp_path / "eval.json").write_text("{not json")
    assert task_reference(tmp_path) is None


def test_form_reader_is_another_architecture():
    from qvl_export.loading.config import parse_model_config

    assert_shipped_checkpoint(FORM_READER)
    spec = parse_model_config(FORM_READER)
    demo = parse_model_config(CHECKPOINT)
    assert spec.family == "qwen2_vl" and not spec.vision.windowed
    assert spec.text.head_dim != demo.text.head_dim
    assert spec.text.num_hidden_layers != demo.text.num_hidden_layers and spec.text.vocab_size != demo.text.vocab_size
    assert spec.text.tie_word_embeddings and not demo.text.tie_word_embeddings
    config = json.loads((FORM_READER / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
    template = json.loads((FORM_READER / "chat_template.json").read_text())["chat_template"]
    assert "You are a helpful assistant" not in template
    record = json.loads((FORM_READER / "eval.json").read_text())
    assert record["heldout"] >= 200 and record["exact_match"] >= 0.75


@pytest.mark.slow
def test_form_reader_builds_and_passes_its_task_gate(tmp_path):
    """``qvl-export build`` of the form reader at fp32: the parity report has the form's task case,
    scored on the form's held-out pages, at transformers' exact match."""
    from click.testing import CliRunner

    from qvl_export.cli import main

    out = build_passes_its_task_gate(FORM_READER, "form-task", tmp_path / "form")
    for name in FORM_FIELDS:  # the shipped held-out pages, one question per field
        meta = json.loads((FORM_READER / "samples" / f"{name}.json").read_text())
        assert forms.asked_field(meta["seed"]) == name and meta["seed"] >= forms.HELDOUT_SEED_OFFSET
        result = CliRunner().invoke(main, ["run", str(out), "--image", str(FORM_READER / "samples" / f"{name}.png"),
                                           "--prompt", meta["prompt"], "--json"], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        assert json.loads(result.output.strip().splitlines()[-1])["text"].strip() == meta["answer"]
