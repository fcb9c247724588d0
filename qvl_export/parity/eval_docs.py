"""The task gate on the user's own documents (``--eval-docs DIR`` on ``build`` and ``parity``).

``DIR`` holds the documents - images (PNG/JPEG/WebP/BMP/TIFF, one document each) and PDFs (one
document per page, named ``file.pdf#p1``, ``file.pdf#p2``, ... at the runtime's 150 dpi,
``runtimes/pdf.py``) - and:

- ``prompts.txt`` (required): either one line, the prompt asked of every document, or lines
  ``name<TAB>prompt``, one per document, where ``name`` is a file name (every page of a PDF) or a
  page name ``file.pdf#p2``. In the second form every document needs a prompt.
- ``answers.jsonl`` (optional): lines ``{"document": name, "answer": "..."}`` with the expected
  answers, for the exact-match figures.

The transformers reference and the built artifacts answer every document greedily (the raw logits,
``EVAL_MAX_NEW_TOKENS`` new tokens at most); an answer is the decoded text, stripped. The gate is
answer agreement - the fraction of documents whose two answers are identical - at
``task_answer_agreement`` (``gates.json``), and, where expected answers are given, the artifacts'
exact match may fall at most ``task_exact_match_drop`` below the reference's. Every document's
answers are in report.json; the documents whose answer changed are named in the failure line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from qvl_export.core.errors import QvlError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
EVAL_MAX_NEW_TOKENS = 32
MAX_DOCUMENTS = 1000  # a folder of more is an evaluation job, not a build gate
CASE = "eval-docs"


@dataclass
class EvalDoc:
    name: str  # file name, or file.pdf#pN for a PDF page
    image: object  # PIL RGB image
    prompt: str
    expected: str | None = None


def _documents(folder: Path) -> list[tuple[str, object]]:
    from qvl_export.runtimes.pdf import MAX_PAGES, render_pdf
    from qvl_export.runtimes.preprocess import load_image

    docs = []
    for path in sorted(folder.iterdir()):
        suffix = path.suffix.lower()
        if not path.is_file() or suffix not in IMAGE_SUFFIXES + (".pdf",):
            continue
        try:
            if suffix == ".pdf":
                pages = render_pdf(path, max_pages=MAX_PAGES)
                docs += [(f"{path.name}#p{i + 1}", page) for i, page in enumerate(pages)]
            else:
                docs.append((path.name, load_image(path)))
        except QvlError as err:
            raise QvlError(f"--eval-docs {folder}: {err}") from None
        if len(docs) > MAX_DOCUMENTS:
            raise QvlError(f"--eval-docs {folder} holds more than {MAX_DOCUMENTS} documents; gate on a sample of them.")
    return docs


def _prompts(folder: Path, names: list[str]) -> dict[str, str]:
    path = folder / "prompts.txt"
    if not path.is_file():
        raise QvlError(f"--eval-docs {folder} has no prompts.txt; write one prompt for every document in it, or "
                       "'name<TAB>prompt' lines (one per document).")
    try:
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise QvlError(f"{path} is unreadable ({err}); save it as UTF-8 text.") from None
    if not lines:
        raise QvlError(f"{path} is empty; write the prompt to ask of every document in it.")
    if len(lines) == 1 and "\t" not in lines[0]:
        return {name: lines[0].strip() for name in names}
    known = set(names)
    by_file: dict[str, str] = {}
    for n, line in enumerate(lines, 1):
        name, tab, prompt = line.partition("\t")
        if not tab or not name.strip() or not prompt.strip():
            raise QvlError(f"{path} line {n} is not 'name<TAB>prompt'; with more than one line every line names "
                           "its document (or keep a single line: one prompt for all).")
        name = name.strip()
        if name not in known and not any(d.startswith(name + "#p") for d in known):
            raise QvlError(f"{path} line {n} names {name!r}, which is not a document in {folder}.")
        by_file[name] = prompt.strip()
    prompts = {}
    for name in names:
        prompt = by_file.get(name, by_file.get(name.split("#p")[0]))
        if prompt is None:
            raise QvlError(f"{path} has no prompt for {name}; add a '{name}<TAB>prompt' line.")
        prompts[name] = prompt
    return prompts


def _answers(folder: Path, names: list[str]) -> dict[str, str]:
    path = folder / "answers.jsonl"
    if not path.exists():
        return {}
    known = set(names)
    answers = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise QvlError(f"{path} is unreadable ({err}); save it as UTF-8 JSON lines.") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as err:
            raise QvlError(f"{path} line {n} is not JSON ({err}).") from None
        if not isinstance(row, dict) or not isinstance(row.get("document"), str) or "answer" not in row:
            raise QvlError(f'{path} line {n} must be {{"document": name, "answer": "..."}}.')
        if row["document"] not in known:
            raise QvlError(f"{path} line {n} gives an answer for {row['document']!r}, which is not a document in "
                           f"{folder} (PDF pages are named file.pdf#p1, ...).")
        answers[row["document"]] = str(row["answer"]).strip()
    return answers


def read_eval_docs(folder: str | Path) -> list[EvalDoc]:
    """The documents of ``folder`` with their prompts and expected answers; bad input is one QvlError line."""
    folder = Path(folder)
    if not folder.is_dir():
        raise QvlError(f"--eval-docs {folder} is not a folder; pass a folder of images / PDFs with a prompts.txt.")
    docs = _documents(folder)
    if not docs:
        raise QvlError(f"--eval-docs {folder} holds no images or PDFs ({', '.join(IMAGE_SUFFIXES)}, .pdf).")
    names = [n for n, _ in docs]
    prompts = _prompts(folder, names)
    answers = _answers(folder, names)
    return [EvalDoc(name, image, prompts[name], answers.get(name)) for name, image in docs]


def reference_answers(ref, docs: list[EvalDoc], progress=None) -> list[list[int]]:
    """The transformers reference's greedy new token ids per document."""
    from qvl_export.parity.reference import ReferenceCase

    out = []
    for i, doc in enumerate(docs):
        if progress and i % 10 == 0:
            progress(f"eval documents: reference {i + 1}-{min(i + 10, len(docs))} of {len(docs)}")
        inputs = ref.prepare(ReferenceCase(doc.name, [doc.image], doc.prompt, max_new_tokens=EVAL_MAX_NEW_TOKENS))
        ids, _ = ref.generate(inputs, EVAL_MAX_NEW_TOKENS)
        out.append([int(t) for t in ids])
    return out


def eval_case(pipe, docs: list[EvalDoc], ref_ids: list[list[int]], progress=None) -> dict:
    """The artifacts' answers vs the reference's on every document: one gate case."""
    rows, changed = [], []
    for i, (doc, ids) in enumerate(zip(docs, ref_ids)):
        if progress and i % 10 == 0:
            progress(f"eval documents: artifacts {i + 1}-{min(i + 10, len(docs))} of {len(docs)}")
        gen = pipe.generate([doc.image], doc.prompt, max_new_tokens=EVAL_MAX_NEW_TOKENS, temperature=0.0,
                            repetition_penalty=1.0)
        reference, ours = pipe.codec.decode(ids).strip(), gen.text.strip()
        row = {"document": doc.name, "prompt": doc.prompt, "reference": reference, "ours": ours,
               "agree": reference == ours}
        if doc.expected is not None:
            row.update(expected=doc.expected, reference_exact=reference == doc.expected,
                       ours_exact=ours == doc.expected)
        if not row["agree"]:
            changed.append(doc.name)
        rows.append(row)
    stage = {"documents": len(docs), "answer_agreement": sum(r["agree"] for r in rows) / len(rows),
             "changed": changed}
    graded = [r for r in rows if "expected" in r]
    if graded:
        ref_em = sum(r["reference_exact"] for r in graded) / len(graded)
        ours_em = sum(r["ours_exact"] for r in graded) / len(graded)
        stage.update(graded=len(graded), exact_match=ours_em, reference_exact_match=ref_em,
                     exact_match_drop=ref_em - ours_em)
    return {"name": CASE, "images": [], "prompt": "", "stages": {"eval": stage}, "documents": rows,
            "seconds": {}, "text": {}}
