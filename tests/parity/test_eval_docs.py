"""--eval-docs: the task gate on a folder of the user's documents - answers of the built artifacts vs
transformers' greedy answers on the same pages, end to end on the trained demo model (whose answers
are the totals it reads, not noise), and bad folders refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from faults import copy_artifacts, scale_activation_ranges

from qvl_export.building.artifacts import BuildOptions, build
from qvl_export.cli import main
from qvl_export.core.errors import QvlError
from qvl_export.parity.eval_docs import read_eval_docs
from qvl_export.parity.gate import run_parity
from qvl_export.parity.samples import ALL_CASES

TEXT_ONLY = [c for c in ALL_CASES if c.name == "text-only"]  # the stage gates are tested elsewhere
PAGES = 12


def write_invoices(folder: Path, n: int, pdf_pages: int = 0) -> Path:
    """``n`` held-out demo invoices as PNG (the last ``pdf_pages`` of them as one PDF at 150 dpi, so the
    runtime's renderer gives back the same pixels), their prompts as name<TAB>prompt and answers.jsonl."""
    from qvl_export.demo.documents import heldout_set

    folder.mkdir(parents=True, exist_ok=True)
    examples = heldout_set(n)
    prompts, answers = [], []
    for i, (image, prompt, answer) in enumerate(examples[:n - pdf_pages]):
        image.save(folder / f"inv{i:02d}.png")
        prompts.append(f"inv{i:02d}.png\t{prompt}")
        answers.append({"document": f"inv{i:02d}.png", "answer": answer})
    if pdf_pages:
        pages = [image for image, _, _ in examples[n - pdf_pages:]]
        pages[0].save(folder / "batch.pdf", save_all=True, append_images=pages[1:], resolution=150.0)
        for k, (_, prompt, answer) in enumerate(examples[n - pdf_pages:], 1):
            prompts.append(f"batch.pdf#p{k}\t{prompt}")
            answers.append({"document": f"batch.pdf#p{k}", "answer": answer})
    (folder / "prompts.txt").write_text("\n".join(prompts) + "\n")
    (folder / "answers.jsonl").write_text("".join(json.dumps(a) + "\n" for a in answers))
    return folder


@pytest.fixture(scope="module")
def demo_int8(tmp_path_factory):
    from qvl_export.demo import checkpoint_dir

    out = tmp_path_factory.mktemp("demo-int8") / "art"
    build(checkpoint_dir(), out, BuildOptions(precision="int8", calib_limit=3))
    return out


def test_task_gate_passes_a_good_build_and_names_the_documents_a_bad_one_changes(demo_int8, tmp_path):
    """int8 as built: every answer equals transformers' (gate 0.97). The same build with every activation
    range scaled 100x (values fall into a few int8 codes): the gate fails, and the report and the failure
    line name exactly the documents whose answer changed."""
    from qvl_export.demo import checkpoint_dir

    docs = read_eval_docs(write_invoices(tmp_path / "docs", PAGES))
    cache: dict = {}
    good = run_parity(demo_int8, checkpoint_dir(), cases=TEXT_ONLY, max_new_tokens=4, task_pages=0, eval_docs=docs,
                      reference_cache=cache)
    (case,) = [c for c in good.cases if c["name"] == "eval-docs"]
    stage = case["stages"]["eval"]
    assert good.passed, good.failure_summary()
    assert stage["documents"] == PAGES and stage["answer_agreement"] == 1.0 and stage["changed"] == []
    assert good.gates["task_answer_agreement"] == 0.97
    # the reference reads the totals (trained), so agreement is about real answers, and exact match is reported
    assert stage["reference_exact_match"] >= 0.75 and stage["exact_match"] == stage["reference_exact_match"]
    assert all(d["reference"].isdigit() for d in case["documents"])
    saved = json.loads((demo_int8 / "report.json").read_text())
    assert [d["document"] for d in saved["cases"][-1]["documents"]] == [d.name for d in docs]

    bad = copy_artifacts(demo_int8, tmp_path / "bad")
    assert scale_activation_ranges(bad, 100.0)
    report = run_parity(bad, checkpoint_dir(), cases=TEXT_ONLY, max_new_tokens=4, task_pages=0, eval_docs=docs,
                        verify=False, reference_cache=cache)
    (case,) = [c for c in report.cases if c["name"] == "eval-docs"]
    changed = [d["document"] for d in case["documents"] if d["ours"] != d["reference"]]
    assert not report.passed and changed
    assert case["stages"]["eval"]["changed"] == changed
    assert case["stages"]["eval"]["answer_agreement"] == 1 - len(changed) / PAGES
    line = report.failure_summary()
    assert line.startswith("eval-docs/eval.answer_agreement=") and all(n in line for n in changed[:8]), line
    print(f"demo int8: {PAGES}/{PAGES} answers agree; ranges x100: {len(changed)} changed ({', '.join(changed)})")


def test_parity_cli_eval_docs_on_pdf_pages(artifacts, checkpoint, tmp_path):
    """``qvl-export parity --eval-docs`` with a single prompt line and a 2-page PDF (pages named
    file.pdf#p1, #p2): an fp32 build agrees on every document (gate 1.0), in the table and report.json."""
    pytest.importorskip("pypdfium2")
    from qvl_export.documents.render import sample_page

    folder = tmp_path / "docs"
    folder.mkdir()
    sample_page(300, 200, seed=1).save(folder / "a.png")
    pages = [sample_page(280, 360, seed=s).convert("RGB") for s in (2, 3)]
    pages[0].save(folder / "pack.pdf", save_all=True, append_images=pages[1:], resolution=150.0)
    (folder / "prompts.txt").write_text("What is the total?\n")
    art = artifacts("qwen2_vl")
    result = CliRunner().invoke(main, ["parity", str(art), "--reference", str(checkpoint("qwen2_vl")), "--quick",
                                       "--eval-docs", str(folder)])
    assert result.exit_code == 0, result.output
    assert "3 answers agree" in result.output
    saved = json.loads((art / "report.json").read_text())
    (case,) = [c for c in saved["cases"] if c["name"] == "eval-docs"]
    assert [d["document"] for d in case["documents"]] == ["a.png", "pack.pdf#p1", "pack.pdf#p2"]
    assert all(d["agree"] and d["prompt"] == "What is the total?" for d in case["documents"])
    assert saved["gates"]["task_answer_agreement"] == 1.0


def _folder(tmp_path, files: dict[str, str | bytes]) -> Path:
    from qvl_export.documents.render import sample_page

    folder = tmp_path / "docs"
    folder.mkdir()
    sample_page(200, 160, seed=0).save(folder / "a.png")
    sample_page(200, 160, seed=1).save(folder / "b.png")
    for name, content in files.items():
        (folder / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    return folder


@pytest.mark.parametrize("files,message", [
    ({}, "has no prompts.txt"),
    ({"prompts.txt": "\n\n"}, "is empty"),
    ({"prompts.txt": "a.png\tWhat?\n"}, "has no prompt for b.png"),
    ({"prompts.txt": "a.png\tWhat?\nb.png What?\n"}, "line 2 is not 'name<TAB>prompt'"),
    ({"prompts.txt": "a.png\tWhat?\nc.png\tWhy?\n"}, "names 'c.png', which is not a document"),
    ({"prompts.txt": "Total?\n", "answers.jsonl": '{"document": "z.png", "answer": "1"}\n'},
     "answer for 'z.png', which is not a document"),
    ({"prompts.txt": "Total?\n", "answers.jsonl": "{not json\n"}, "line 1 is not JSON"),
    ({"prompts.txt": "Total?\n", "answers.jsonl": '{"doc": "a.png"}\n'}, 'must be {"document": name'),
    ({"prompts.txt": "Total?\n", "c.png": b"not an image"}, "c.png"),
    ({"prompts.txt": "Total?\n", "d.pdf": b"%PDF-1.4 broken"}, "d.pdf is not a readable PDF"),
])
def test_bad_eval_folders_are_one_line(tmp_path, files, message):
    if any(n.endswith(".pdf") for n in files):
        pytest.importorskip("pypdfium2")
    folder = _folder(tmp_path, files)
    with pytest.raises(QvlError, match=None) as err:
        read_eval_docs(folder)
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_eval_docs_folder_reads_prompts_and_answers(tmp_path):
    folder = _folder(tmp_path, {"prompts.txt": "a.png\tFirst?\nb.png\tSecond?\n",
                                "answers.jsonl": '{"document": "b.png", "answer": " 42 "}\n', "notes.md": "skip"})
    docs = read_eval_docs(folder)
    assert [(d.name, d.prompt, d.expected) for d in docs] == [("a.png", "First?", None), ("b.png", "Second?", "42")]
    with pytest.raises(QvlError, match="not a folder"):
        read_eval_docs(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(QvlError, match="holds no images or PDFs"):
        read_eval_docs(empty)


def test_cli_refuses_a_bad_eval_folder_before_building(tmp_path):
    """One line, exit 2, nothing built - for build (before tracing) and for parity."""
    folder = _folder(tmp_path, {})
    out = tmp_path / "never"
    result = CliRunner().invoke(main, ["build", "-o", str(out), "--eval-docs", str(folder)])
    assert result.exit_code == 2 and "has no prompts.txt" in result.output and "Traceback" not in result.output
    assert not out.exists()
    result = CliRunner().invoke(main, ["build", "-o", str(out), "--no-parity", "--eval-docs", str(folder)])
    assert result.exit_code == 2 and "--eval-docs is gated by the parity run" in result.output
    result = CliRunner().invoke(main, ["parity", str(out), "--reference", str(tmp_path), "--eval-docs", str(folder)])
    assert result.exit_code == 2 and "Traceback" not in result.output
