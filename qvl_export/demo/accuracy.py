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
    right, wrong = [], []
    t0 = time.perf_counter()
    for i, (image, prompt, answer) in enumerate(task.heldout_set(n, offset)):
        text, stopped = read(image, prompt)
        text = text.strip()
        if stopped and text == answer:
            right.append(i)
        elif len(wrong) < keep_wrong:
            wrong.append({"index": i, "answer": answer, "generated": text})
    return {"heldout": n, "heldout_seed_offset": offset, "exact_match": len(right) / n,
            "correct_indices": right, "examples_wrong": wrong, "seconds": round(time.perf_counter() - t0, 2)}


def pipeline_reader(pipe, max_new_tokens: int = MAX_NEW_TOKENS) -> Reader:
    """A ``Reader`` over the thin runtime's ``Pipeline`` (greedy)."""
    def read(image, prompt: str) -> tuple[str, bool]:
        gen = pipe.generate([image], prompt, max_new_tokens=max_new_tokens, temperature=0.0, repetition_penalty=1.0)
        return gen.text, gen.finish_reason == "stop"
    return read
