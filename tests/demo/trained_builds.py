"""The build check every trained checkpoint shares: ``qvl-export build`` at fp32 passes its gate, and the
report's task case is the checkpoint's own, scored on its held-out pages at transformers' exact match."""

from __future__ import annotations

import json
from pathlib import Path

from qvl_export.demo import task_reference


SHIPPED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.json",
                 "generation_config.json", "preprocessor_config.json", "eval.json")


def assert_shipped_checkpoint(checkpoint: Path) -> None:
    """A trained checkpoint in the repository: every file a Hugging Face folder has, its weights small."""
    for name in SHIPPED_FILES:
        assert (checkpoint / name).is_file(), name
    assert (checkpoint / "model.safetensors").stat().st_size < 10_000_000


def build_passes_its_task_gate(checkpoint: Path, case_name: str, out: Path) -> Path:
    """Build ``checkpoint`` into ``out`` at fp32; the report has ``case_name`` and no other task case."""
    from click.testing import CliRunner

    from qvl_export.cli import main

    result = CliRunner().invoke(main, ["build", str(checkpoint), "-o", str(out), "--precision", "fp32"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] is True
    cases = {c["name"]: c for c in report["cases"]}
    task_cases = {name for name in cases if name.endswith("-task")}
    assert task_cases == {case_name}, task_cases
    case = cases[case_name]
    assert case["passed"]
    stage = case["stages"]["task"]
    record = task_reference(checkpoint)
    assert stage["pages"] == record["heldout"] and stage["reference_pages"] == record["heldout"]
    assert stage["reference_exact_match"] == record["exact_match"]
    assert abs(stage["exact_match"] - stage["reference_exact_match"]) <= 0.01  # fp32: the same answers
    # page by page against transformers' recorded answers (eval.json "answers"): fp32 changes at most 1 in 100
    assert len(record["answers"]) == record["heldout"]
    assert stage["answer_agreement"] >= 0.99, stage["changed_pages"]
    assert len(stage["changed_pages"]) == round((1 - stage["answer_agreement"]) * stage["pages"])
    assert len(stage["broke"]) - len(stage["fixed"]) == round(stage["exact_match_drop"] * stage["pages"])
    assert case_name in result.output
    return out
