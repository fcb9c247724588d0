"""Deterministic rendered bar charts with one bar to read: the chart reader's training and eval task.

Each example is a horizontal bar chart (``CHART_SIZE``, a multiple of 28 on both sides so the Qwen
"smart resize" leaves it untouched) with a title holding a year, 3 or 4 bars whose categories come
from ``CHART_CATEGORIES`` in a seeded order, each bar's value (2-4 digits, all different) printed as
its data label, a value axis with tick labels and often a footnote with a number. The question
names ONE of the chart's categories (``PROMPTS[category]``, several phrasings each); the answer is
that bar's printed digits, so the model has to read the category names to find the bar. Every
other number on the page (year, ticks, footnote, the other bars) is a distractor.

The page is drawn by ``qvl_export.documents.render.render_chart``; this module is the task: which
category is asked, the question, the answer, the held-out seeds. Training draws seeds from 0
upwards, held-out sets start at ``HELDOUT_SEED_OFFSET``; ``make_example(seed)`` is a pure function of
its seed.
"""

from __future__ import annotations

import random

from PIL import Image

from qvl_export.documents.render import CHART_CATEGORIES, CHART_SIZE, MAX_ANSWER_DIGITS, ChartPage, render_chart

_PHRASINGS = (
    "What is the value for {}?",
    "Read the value of {}.",
    "How much is {} on this chart?",
    "What value does the {} bar show?",
)
PROMPTS = {name: tuple(p.format(name) for p in _PHRASINGS) for name in CHART_CATEGORIES}

# Training draws seeds from 0 upwards; held-out sets start far away so they never overlap.
HELDOUT_SEED_OFFSET = 10_000_000

__all__ = ["CHART_CATEGORIES", "CHART_SIZE", "HELDOUT_SEED_OFFSET", "MAX_ANSWER_DIGITS", "PROMPTS", "ChartPage",
           "asked_category", "heldout_set", "make_example", "question", "render_chart"]


def asked_category(seed: int, page: ChartPage | None = None) -> str:
    """The category the question of page ``seed`` asks for: one of the chart's bars, each equally
    likely (``page``: ``render_chart(seed)``, if already drawn)."""
    page = page or render_chart(seed)
    return page.categories[random.Random(seed * 7919 + 2).randrange(len(page.categories))]


def question(seed: int, page: ChartPage | None = None) -> str:
    """The question asked about page ``seed`` (one of ``PROMPTS[asked_category(seed)]``)."""
    prompts = PROMPTS[asked_category(seed, page)]
    return prompts[random.Random(seed * 7919 + 3).randrange(len(prompts))]


def make_example(seed: int) -> tuple[Image.Image, str, str]:
    """(page RGB ``CHART_SIZE``, question, answer digits) for ``seed``; deterministic."""
    page = render_chart(seed)
    return page.image, question(seed, page), page.values[asked_category(seed, page)]


def heldout_set(n: int, seed_offset: int = HELDOUT_SEED_OFFSET) -> list[tuple[Image.Image, str, str]]:
    """``n`` held-out examples (seeds ``seed_offset .. seed_offset + n - 1``)."""
    return [make_example(seed_offset + i) for i in range(n)]
