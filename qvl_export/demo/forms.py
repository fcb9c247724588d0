"""Deterministic rendered forms with two numbers to tell apart: the form reader's training and eval task.

Each example is a bordered form page (``FORM_SIZE``, a multiple of 28 on both sides so the Qwen
"smart resize" leaves it untouched) with a title, a reference code, a date, a phone number, a row
of checkboxes, a signature line and two numeric fields written in digit boxes: the account number
and the amount (3 or 4 digits each, never equal), stacked or side by side. The question asks for
ONE of the two fields (``PROMPTS[field]``, several phrasings each); the answer is that field's
digits, so the model has to read the question to pick the field. Every other number on the page
(reference, date, phone, the other field) is a distractor.

The page is drawn by ``qvl_export.documents.render.render_form``; this module is the task: which
field is asked, the question, the answer, the held-out seeds. Training draws seeds from 0 upwards,
held-out sets start at ``HELDOUT_SEED_OFFSET``; ``make_example(seed)`` is a pure function of its seed.
"""

from __future__ import annotations

import random

from PIL import Image

from qvl_export.documents.render import FORM_FIELDS, FORM_SIZE, MAX_ANSWER_DIGITS, FormPage, render_form

PROMPTS = {
    "account": (
        "What is the account number?",
        "Read the account number.",
        "Which account number is on this form?",
        "What account number is written here?",
    ),
    "amount": (
        "What is the amount?",
        "Read the amount.",
        "How much is the amount on this form?",
        "What amount is written here?",
    ),
}

# Training draws seeds from 0 upwards; held-out sets start far away so they never overlap.
HELDOUT_SEED_OFFSET = 10_000_000

__all__ = ["FORM_FIELDS", "FORM_SIZE", "HELDOUT_SEED_OFFSET", "MAX_ANSWER_DIGITS", "PROMPTS", "FormPage", "asked_field",
           "heldout_set", "make_example", "question", "render_form"]


def asked_field(seed: int) -> str:
    """The field the question of page ``seed`` asks for (one of ``FORM_FIELDS``, half each)."""
    return FORM_FIELDS[random.Random(seed * 7919 + 2).randrange(len(FORM_FIELDS))]


def question(seed: int) -> str:
    """The question asked about page ``seed`` (one of ``PROMPTS[asked_field(seed)]``)."""
    prompts = PROMPTS[asked_field(seed)]
    return prompts[random.Random(seed * 7919 + 3).randrange(len(prompts))]


def make_example(seed: int) -> tuple[Image.Image, str, str]:
    """(page RGB ``FORM_SIZE``, question, answer digits) for ``seed``; deterministic."""
    page = render_form(seed)
    return page.image, question(seed), page.fields[asked_field(seed)]


def heldout_set(n: int, seed_offset: int = HELDOUT_SEED_OFFSET) -> list[tuple[Image.Image, str, str]]:
    """``n`` held-out examples (seeds ``seed_offset .. seed_offset + n - 1``)."""
    return [make_example(seed_offset + i) for i in range(n)]
