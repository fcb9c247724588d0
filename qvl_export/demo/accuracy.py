"""Exact-match accuracy of a model trained on one of our tasks, on that task's held-out pages.

One scoring rule for every engine: the greedy answer, stripped, must equal the asked digits and
generation must have stopped on an end token within ``task.max_new_tokens`` (the longest answer + 2)
new tokens. The training script scores transformers with it (``eval.json``), the parity gate scores
the artifacts. The task defaults to the demo's invoices (``qvl_export.demo.tasks``).
"""

from __future__ import annotations

import time
from typing import Callable

from qvl_export.demo.tasks import INVOICE, Task

MAX_ANSWER_DIGITS = INVOICE.max_answer_digits
MAX_NEW_TOKENS = INVOICE.max_new_tokens
HELDOUT_SEED_OFFSET = INVOICE.heldout_seed_offset
DEFAULT_PAGES = 250

# read(image, prompt) -> (answer text, stopped on an end token)
Reader = Callable[[object, str], tuple[str, bool]]


def exact_match(read: Reader, n: int = DEFAULT_PAGES, seed_offset: int | None = None, keep_wrong: int = 20,
                task: Task = INVOICE) -> dict:
    """Score ``read`` on ``task``'s held-out pages ``seed_offset .. seed_offset + n - 1`` (default
    offset: the task's)."""
    offset = task.heldout_seed_offset if seed_offset is None else seed_offset
    right, wrong, answers, expected = [], [], [], []
    t0 = time.perf_counter()
    for i, (image, prompt, answer) in enumerate(task.heldout_set(n, offset)):
        text, stopped = read(image, prompt)
        text = text.strip()
        answers.append([text, bool(stopped)])
        expected.append(answer)
        if stopped and text == answer:
            right.append(i)
        elif len(wrong) < keep_wrong:
            wrong.append({"index": i, "answer": answer, "generated": text})
    return {"heldout": n, "heldout_seed_offset": offset, "exact_match": len(right) / n,
            "correct_indices": right, "examples_wrong": wrong, "answers": answers, "expected": expected,
            "seconds": round(time.perf_counter() - t0, 2)}


def agreement(ours: dict, reference: dict, pages: int) -> dict | None:
    """Page by page, ``ours`` (an ``exact_match`` result) against the reference's answers on the same
    held-out pages (``reference["answers"]``, recorded in a trained checkpoint's ``eval.json``; None when
    it has none): the fraction of answers identical (text and stop), the pages the reference read right
    and ours wrong (``broke``) and the reverse (``fixed``). Exact match alone cannot tell one change from
    none when they cancel; these can (McNemar's discordant pairs)."""
    ref = reference.get("answers")
    if not ref or len(ref) < pages:
        return None
    mine = set(ours["correct_indices"])
    theirs = {i for i in range(pages) if ref[i][1] and ref[i][0] == ours["expected"][i]}
    changed = [i for i in range(pages) if list(ours["answers"][i]) != list(ref[i])]
    return {"answer_agreement": 1.0 - len(changed) / pages, "changed_pages": changed,
            "broke": sorted(theirs - mine), "fixed": sorted(mine - theirs)}


def pipeline_reader(pipe, max_new_tokens: int = MAX_NEW_TOKENS) -> Reader:
    """A ``Reader`` over the thin runtime's ``Pipeline`` (greedy)."""
    def read(image, prompt: str) -> tuple[str, bool]:
        gen = pipe.generate([image], prompt, max_new_tokens=max_new_tokens, temperature=0.0, repetition_penalty=1.0)
        return gen.text, gen.finish_reason == "stop"
    return read
