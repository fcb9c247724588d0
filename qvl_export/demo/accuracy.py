"""Exact-match accuracy of a demo-task model on held-out rendered invoices.

One scoring rule for every engine: the greedy answer, stripped, must equal the total's digits and
generation must have stopped on an end token within ``MAX_ANSWER_DIGITS + 2`` new tokens. The
training script scores transformers with it (``eval.json``), the parity gate scores the artifacts.
"""

from __future__ import annotations

import time
from typing import Callable

from qvl_export.demo.documents import HELDOUT_SEED_OFFSET, MAX_ANSWER_DIGITS, heldout_set

MAX_NEW_TOKENS = MAX_ANSWER_DIGITS + 2
DEFAULT_PAGES = 250

# read(image, prompt) -> (answer text, stopped on an end token)
Reader = Callable[[object, str], tuple[str, bool]]


def exact_match(read: Reader, n: int = DEFAULT_PAGES, seed_offset: int = HELDOUT_SEED_OFFSET,
                keep_wrong: int = 20) -> dict:
    """Score ``read`` on held-out pages ``seed_offset .. seed_offset + n - 1``."""
    right, wrong = [], []
    t0 = time.perf_counter()
    for i, (image, prompt, answer) in enumerate(heldout_set(n, seed_offset)):
        text, stopped = read(image, prompt)
        text = text.strip()
        if stopped and text == answer:
            right.append(i)
        elif len(wrong) < keep_wrong:
            wrong.append({"index": i, "answer": answer, "generated": text})
    return {"heldout": n, "heldout_seed_offset": seed_offset, "exact_match": len(right) / n,
            "correct_indices": right, "examples_wrong": wrong, "seconds": round(time.perf_counter() - t0, 2)}


def pipeline_reader(pipe) -> Reader:
    """A ``Reader`` over the thin runtime's ``Pipeline`` (greedy)."""
    def read(image, prompt: str) -> tuple[str, bool]:
        gen = pipe.generate([image], prompt, max_new_tokens=MAX_NEW_TOKENS, temperature=0.0, repetition_penalty=1.0)
        return gen.text, gen.finish_reason == "stop"
    return read
