"""Deterministic rendered documents with one value to read: the demo model's training and eval task.

Each example is a small invoice page (``PAGE_SIZE``, a multiple of 28 on both sides so the Qwen
"smart resize" leaves it untouched) with a header, an invoice number, a date, 2-5 item lines, a
subtotal, a tax line and a ``TOTAL`` row whose amount is written in digit boxes, all at seeded
positions, sizes and colours. The question asks for the total; the answer is its digits (3 or 4
of them, ``100..9999``). Every other number on the page (invoice number, date, quantities, prices,
subtotal, tax) is a distractor, and the total is consistent with them (items sum to the subtotal,
total = subtotal + tax) so the page reads like a real invoice.

Pillow's built-in font (``ImageFont.load_default(size=...)``, FreeType) keeps the pages identical
on every machine with the same Pillow; ``make_example(seed)`` is a pure function of its seed.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

PAGE_SIZE = (224, 252)  # (width, height) px -> 16 x 18 patches = 72 image tokens after the 2x2 merge
PROMPTS = (
    "What is the total?",
    "What is the total amount?",
    "How much is the total on this invoice?",
    "Read the total.",
)
MAX_ANSWER_DIGITS = 4
BIG_MIN, BIG_MAX = 15, 19  # px: the TOTAL label is set large and bold
# The total is written in digit boxes ("comb" fields, as on forms and cheques), one box per
# CELL x CELL square of the page: the 2x2-patch area one image token covers. A ViT this small
# cannot learn to read digits straddling patches at arbitrary offsets in CPU minutes (measured:
# ~20-30% per digit after 100+ steps); one centred digit per token it reads in a few dozen steps.
CELL = 28
DIGIT_MIN, DIGIT_MAX = 16, 20
_ITEMS = ("Widget", "Cable", "Paper", "Ink", "Labour", "Parts", "Service", "Bolts", "Paint", "Lamp",
          "Filter", "Tape", "Glue", "Valve", "Hose")
_SELLERS = ("ACME Ltd", "Nordic Supply", "Blue Fox Co", "Kite & Sons", "Orbit GmbH", "Delta Parts")
_INK = ((20, 20, 20), (30, 30, 70), (50, 20, 20), (10, 40, 30), (60, 60, 60))
_PAPER = ((255, 255, 255), (250, 250, 245), (245, 245, 250), (252, 248, 238), (240, 244, 240))


@functools.lru_cache(maxsize=None)
def font(size: int) -> ImageFont.ImageFont:
    """Pillow's default font at ``size`` px (FreeType), or its bitmap default on Pillow < 10.1."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # pragma: no cover - Pillow < 10.1 has no sized default font
        return ImageFont.load_default()


def _amounts(rng: random.Random) -> tuple[list[tuple[str, int, int]], int, int, int]:
    """Items (name, qty, line amount), subtotal, tax, total with 100 <= total <= 9999."""
    while True:
        n = rng.randint(2, 5)
        scale = rng.choice((30, 150, 600, 1500))
        items = []
        for _ in range(n):
            qty = rng.randint(1, 9)
            price = rng.randint(max(1, scale // 10), scale)
            items.append((rng.choice(_ITEMS), qty, qty * price))
        subtotal = sum(a for _, _, a in items)
        tax = subtotal * rng.choice((0, 5, 7, 10, 16, 20, 25)) // 100
        total = subtotal + tax
        if 100 <= total <= 9999:
            return items, subtotal, tax, total


@dataclass
class Page:
    """A rendered invoice and where its total's digits are (pixel centres, for training supervision)."""

    image: Image.Image
    total: int
    total_digits: list[tuple[float, float]]  # centre (x, y) of each digit of the total, left to right


def render_invoice(seed: int) -> Page:
    """The invoice page of ``seed``: layout, sizes, colours and numbers all follow the seed."""
    rng = random.Random(seed)
    width, height = PAGE_SIZE
    ink = rng.choice(_INK)
    img = Image.new("RGB", PAGE_SIZE, rng.choice(_PAPER))
    draw = ImageDraw.Draw(img)
    items, subtotal, tax, total = _amounts(rng)

    body = font(rng.randint(11, 13))
    title = font(rng.randint(15, 18))
    big = font(rng.randint(BIG_MIN, BIG_MAX))
    line = rng.randint(14, 17)
    left = rng.randint(6, 30)
    right = width - rng.randint(6, 30)  # amounts are right-aligned at this x
    seller = rng.choice(_SELLERS) if rng.random() < 0.6 else None
    gaps = (rng.randint(0, 6), rng.randint(0, 8))
    footer = rng.choice(("Thank you!", "Paid by card", "Due in 30 days", None))
    rows = 4 + (seller is not None) + len(items) + (footer is not None)
    used = rows * line + 4 + sum(gaps) + 8 + 2 * CELL
    y = rng.randint(4, max(4, height - used - 4))  # the block sits anywhere on the page

    def text(x: float, value: str, f: ImageFont.ImageFont, bold: bool = False) -> None:
        draw.text((x, y), value, fill=ink, font=f)
        if bold:  # faux bold: a second pass 1 px to the right keeps the letters legible
            draw.text((x + 1, y), value, fill=ink, font=f)

    def row(label: str, value: str | None = None) -> None:
        """One line: label on the left, ``value`` right-aligned."""
        nonlocal y
        text(left, label, body)
        if value is not None:
            text(right - draw.textlength(value, font=body), value, body)
        y += line

    def comb_row(value: str, f: ImageFont.ImageFont) -> list[tuple[float, float]]:
        """``TOTAL`` and ``value`` in a row of digit boxes, one box per CELL x CELL cell of the page."""
        nonlocal y
        y = -(-y // CELL) * CELL  # the boxes start on a cell row
        ltop, lbottom = f.getbbox("TOTAL")[1::2]
        y_row = y
        y = y_row + (CELL - ltop - lbottom) // 2  # the label sits in the middle of the row
        text(left, "TOTAL", f, bold=True)
        y = y_row
        first = -(-(left + int(draw.textlength("TOTAL", font=f)) + 6) // CELL)
        c0 = rng.randint(min(first, width // CELL - len(value)), width // CELL - len(value))
        size = rng.randint(DIGIT_MIN, DIGIT_MAX)
        digit_font = font(size)
        top, bottom = digit_font.getbbox("0")[1::2]
        centres = []
        for k, ch in enumerate(value):
            x0 = (c0 + k) * CELL
            draw.rectangle([x0 + 1, y + 1, x0 + CELL - 2, y + CELL - 2], outline=ink)
            dx, dy = rng.randint(-2, 2), rng.randint(-2, 2)
            w = draw.textlength(ch, font=digit_font)
            draw.text((x0 + (CELL - w) / 2 + dx, y + (CELL - top - bottom) / 2 + dy), ch, fill=ink, font=digit_font)
            draw.text((x0 + (CELL - w) / 2 + dx + 1, y + (CELL - top - bottom) / 2 + dy), ch, fill=ink,
                      font=digit_font)
            centres.append((x0 + CELL / 2 + dx + 0.5, y + CELL / 2 + dy))
        y += CELL + 3
        return centres

    def rule() -> None:
        nonlocal y
        draw.line([(left, y + 1), (right, y + 1)], fill=ink, width=1)
        y += 4

    number = f"No {rng.randint(1000, 99999)}"
    text(left, "INVOICE", title)
    y += 3
    text(right - draw.textlength(number, font=body), number, body)
    y += line + 1
    if seller:
        row(seller)
    row(f"Date {rng.randint(1, 28):02d}/{rng.randint(1, 12):02d}/{rng.randint(2015, 2025)}")
    y += gaps[0]
    rule()
    for name, qty, amount in items:
        row(f"{name} x{qty}", str(amount))
    rule()
    row("Subtotal", str(subtotal))
    row(rng.choice(("Tax", "VAT")), str(tax))
    y += gaps[1]
    total_digits = comb_row(str(total), big)
    if footer:
        row(footer)
    return Page(img, total, total_digits)


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
