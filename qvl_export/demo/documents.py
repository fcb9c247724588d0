"""Deterministic rendered documents with one value to read: the demo model's training and eval task.

Each example is a small invoice page (``PAGE_SIZE``, a multiple of 28 on both sides so the Qwen
"smart resize" leaves it untouched) with a header, an invoice number, a date, 2-5 item lines, a
subtotal, a tax line and a ``TOTAL`` row whose amount is written in digit boxes, all at seeded
positions, sizes and colours. The question asks for the total; the answer is its digits (3 or 4
of them, ``100..9999``). Every other number on the page (invoice number, date, quantities, prices,
subtotal, tax) is a distractor, and the total is consistent with them (items sum to the subtotal,
total = subtotal + tax) so the page reads like a real invoice.

The page is drawn by ``qvl_export.documents.render.render_invoice`` (with every other synthetic page
of the package); this module is the task: the question, the answer, the held-out seeds.
``make_example(seed)`` is a pure function of its seed.
"""

from __future__ import annotations

import random

from PIL import Image

from qvl_export.documents.render import MAX_ANSWER_DIGITS, PAGE_SIZE, Page, render_invoice

PROMPTS = (
    "What is the total?",
    "What is the total amount?",
    "How much is the total on this invoice?",
    "Read the total.",
)

__all__ = ["HELDOUT_SEED_OFFSET", "MAX_ANSWER_DIGITS", "PAGE_SIZE", "PROMPTS", "Page", "heldout_set", "make_example",
           "question", "render_invoice"]


def make_example(seed: int) -> tuple[Image.Image, str, str]:
    """(page RGB ``PAGE_SIZE``, question, answer digits) for ``seed``; deterministic."""
    page = render_invoice(seed)
    return page.image, question(seed), str(page.total)


def question(seed: int) -> str:
    """The question asked about page ``seed`` (one of ``PROMPTS``)."""
    return PROMPTS[random.Random(seed * 7919 + 1).randrange(len(PROMPTS))]


# Training draws seeds from 0 upwards; held-out sets start far away so they never overlap.
HELDOUT_SEED_OFFSET = 10_000_000


def heldout_set(n: int, seed_offset: int = HELDOUT_SEED_OFFSET) -> list[tuple[Image.Image, str, str]]:
    """``n`` held-out examples (seeds ``seed_offset .. seed_offset + n - 1``)."""
    return [make_example(seed_offset + i) for i in range(n)]
