"""Every synthetic page the package draws, in one place: Pillow, seeded, deterministic.

- ``render_invoice(seed)``: the demo model's task page (``demo.documents`` asks for its total);
- ``render_form(seed)``: the form reader's task page (``demo.forms`` asks for one of its two fields);
- ``render_chart(seed)``: the chart reader's task page (``demo.charts`` asks for one bar's value);
- ``sample_page(width, height, seed)``: the parity runs' document-like pages of any size
  (``parity.samples`` picks the sizes);
- ``KINDS``: the built-in calibration documents - invoices, a screen recording (a clip: an editor
  scrolling while a line is typed), forms, tables, bar and line charts, receipts, dense small
  print, a screenshot-like UI, mixed Chinese/English text, extreme aspect ratios
  (``calibration.documents`` picks them in rotation).

Each is a pure function of its arguments (and of Pillow's version: its built-in FreeType font keeps
pages identical on every machine with the same Pillow). The demo model was trained on
``render_invoice`` pages, the form reader (tests/data/trained/form_reader) on ``render_form`` pages,
the chart reader (tests/data/trained/chart_reader) on ``render_chart`` pages and the parity figures
were measured on these pages: a change to any drawing call here changes those numbers. Chinese
glyphs need a CJK font (Debian ``fonts-wqy-microhei`` or ``fonts-noto-cjk``); without one they render
as boxes and the page keeps its layout.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

CJK_FONTS = (
    "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc",
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
)


@functools.lru_cache(maxsize=None)
def font(size: int, cjk: bool = False) -> ImageFont.ImageFont:
    """Pillow's default font at ``size`` px (FreeType), or its bitmap default on Pillow < 10.1; with ``cjk``
    the first CJK font of ``CJK_FONTS`` found on this machine."""
    if cjk:
        for path in CJK_FONTS:
            if Path(path).exists():
                return ImageFont.truetype(path, size)
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # pragma: no cover - Pillow < 10.1 has no sized default font
        return ImageFont.load_default()


@dataclass
class Document:
    """A rendered page - or a clip - and the question asked about it.

    A clip has ``image`` None and ``video``: frames ``[T, H, W, 3] uint8`` taken as sampled at
    ``fps``, or the path of a video file (sampled at ``fps``, the runtime's 2.0 when None)."""

    name: str
    image: Image.Image | None
    prompt: str
    video: np.ndarray | Path | None = None
    fps: float | None = None


# -- the demo task's invoice ---------------------------------------------------------------------

PAGE_SIZE = (224, 252)  # (width, height) px -> 16 x 18 patches = 72 image tokens after the 2x2 merge
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


def digit_boxes(draw: ImageDraw.ImageDraw, rng: random.Random, c0: int, y: int, value: str,
                digit_font: ImageFont.ImageFont, ink: tuple[int, int, int]) -> list[tuple[float, float]]:
    """``value`` in a row of digit boxes ("comb" field) from cell column ``c0`` at pixel row ``y`` (a
    multiple of CELL): one box per CELL x CELL cell, one faux-bold digit per box jittered by up to
    2 px. Returns the pixel centre (x, y) of each digit, left to right."""
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
    return centres


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
        centres = digit_boxes(draw, rng, c0, y, value, font(rng.randint(DIGIT_MIN, DIGIT_MAX)), ink)
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


# -- the form task's page ------------------------------------------------------------------------

FORM_SIZE = (252, 252)  # (width, height) px -> 18 x 18 patches = 81 image tokens after the 2x2 merge
FORM_FIELDS = ("account", "amount")  # the two numeric fields, in reading order on every page
_FORM_TITLES = ("PAYMENT FORM", "TRANSFER ORDER", "DEPOSIT SLIP", "REQUEST FORM", "REMITTANCE")
_FORM_LABELS = {"account": ("Account No.", "Acct No.", "Account"), "amount": ("Amount", "Sum", "Amount due")}
_FORM_BOXES = ("Cash", "Cheque", "Card", "Urgent", "Copy", "Online")


@dataclass
class FormPage:
    """A rendered form and its two numeric fields: ``fields[name]`` the digits written in boxes,
    ``digits[name]`` the pixel centre (x, y) of each of them, left to right (training supervision)."""

    image: Image.Image
    fields: dict[str, str]
    digits: dict[str, list[tuple[float, float]]]
    layout: str  # "stacked" (one field per row, label on its left) or "columns" (side by side, labels above)


def render_form(seed: int) -> FormPage:
    """The form page of ``seed``: a bordered form with a title, a reference code, a date, a phone
    number, a row of checkboxes, a signature line and the account number and amount (3-4 digits
    each, never equal) in digit boxes, either stacked or side by side; all positions, sizes, colours
    and numbers follow the seed."""
    rng = random.Random(seed)
    width, height = FORM_SIZE
    cols = width // CELL
    ink = rng.choice(_INK)
    img = Image.new("RGB", FORM_SIZE, rng.choice(_PAPER))
    draw = ImageDraw.Draw(img)
    values = {}
    for name in FORM_FIELDS:
        while True:
            v = str(rng.randint(100, 9999) if rng.random() < 0.5 else rng.randint(1000, 9999))
            if v not in values.values():
                values[name] = v
                break
    layout = rng.choice(("stacked", "columns"))
    labels = {name: rng.choice(_FORM_LABELS[name]) for name in FORM_FIELDS}
    body = font(rng.randint(11, 13))
    title_font = font(rng.randint(13, 16))
    line = rng.randint(14, 16)
    inset = rng.randint(1, 4)
    left = rng.randint(inset + 4, 14)
    right = width - rng.randint(inset + 4, 14)
    draw.rectangle([inset, inset, width - 1 - inset, height - 1 - inset], outline=ink)  # the form's border
    ref = f"Ref {rng.choice('ABCDEFGHKLMNPRSTUVWXYZ')}{rng.choice('ABCDEFGHKLMNPRSTUVWXYZ')}-{rng.randint(10, 9999)}"
    date = f"Date {rng.randint(1, 28):02d}/{rng.randint(1, 12):02d}/{rng.randint(2015, 2025)}"
    phone = f"Tel {rng.randint(100, 999)} {rng.randint(1000, 9999)}"
    ticks = rng.sample(_FORM_BOXES, 3)
    checked = rng.randrange(3)
    digit_font = font(rng.randint(DIGIT_MIN, DIGIT_MAX))
    stacked = layout == "stacked"
    # rows of text above, between and below the fields (heights in px)
    used = 2 * line + 4 + (2 * (CELL + 3) + 2 * line if stacked else line + CELL + 3 + line) + 2 * line
    y = rng.randint(inset + 3, max(inset + 3, height - used - 2 * CELL - inset))
    centres: dict[str, list[tuple[float, float]]] = {}

    def text(x: float, value: str, f: ImageFont.ImageFont = body) -> None:
        draw.text((x, y), value, fill=ink, font=f)

    def checkboxes() -> None:
        nonlocal y
        x = left
        for k, word in enumerate(ticks):
            draw.rectangle([x, y + 2, x + 8, y + 10], outline=ink)
            if k == checked:
                draw.line([(x + 2, y + 4), (x + 6, y + 8)], fill=ink)
                draw.line([(x + 6, y + 4), (x + 2, y + 8)], fill=ink)
            text(x + 11, word)
            x += 11 + draw.textlength(word, font=body) + rng.randint(6, 12)
        y += line

    def cell_row() -> int:
        """Move down to the next cell row (digit boxes sit on the image-token grid)."""
        nonlocal y
        y = -(-y // CELL) * CELL
        return y

    text(left, rng.choice(_FORM_TITLES), title_font)
    y += line + 3
    text(left, ref)
    text(right - draw.textlength(date, font=body), date)
    y += line + 1
    if stacked:
        extras = [lambda: (text(left, phone), None), checkboxes]
        rng.shuffle(extras)
        for k, name in enumerate(FORM_FIELDS):
            y += rng.randint(0, 6)
            row = cell_row()
            ltop, lbottom = body.getbbox(labels[name])[1::2]
            y = row + (CELL - ltop - lbottom) // 2
            text(left, labels[name] + ":")
            first = -(-(left + int(draw.textlength(labels[name] + ":", font=body)) + 4) // CELL)
            n = len(values[name])
            c0 = rng.randint(min(first, cols - n), cols - n)
            centres[name] = digit_boxes(draw, rng, c0, row, values[name], digit_font, ink)
            y = row + CELL + 3
            extra = extras[k]
            if extra is checkboxes:
                checkboxes()
            else:
                extra()
                y += line
    else:
        y += rng.randint(0, 4)
        text(left, phone)
        y += line
        checkboxes()
        y += rng.randint(0, 6)
        label_y = y
        row = cell_row()
        if row - label_y < line:  # the labels need a line above the boxes
            row += CELL
            y = row
        na, nb = (len(values[name]) for name in FORM_FIELDS)
        first = rng.randint(0, cols - na - nb - 1)  # the first field on the left, one free cell at least between
        spans = {FORM_FIELDS[0]: first, FORM_FIELDS[1]: rng.randint(first + na + 1, cols - nb)}
        for name in FORM_FIELDS:
            y = row - line
            text(max(left, spans[name] * CELL + 2), labels[name])
            centres[name] = digit_boxes(draw, rng, spans[name], row, values[name], digit_font, ink)
        y = row + CELL + 3
    y += rng.randint(2, 8)
    text(left, "Signature")
    sig_x = left + draw.textlength("Signature", font=body) + 4
    draw.line([(sig_x, y + line - 3), (right, y + line - 3)], fill=ink)
    return FormPage(img, values, centres, layout)


# -- the chart task's page -----------------------------------------------------------------------

CHART_SIZE = (308, 224)  # (width, height) px -> 22 x 16 patches = 88 image tokens after the 2x2 merge
# Every category a chart can show, in a fixed order (the chart reader's phase-1 heads have one field
# per entry); a chart shows 3 or 4 of them, shuffled. Different lengths and shapes, so the words
# tell apart at 12-14 px.
CHART_CATEGORIES = ("Oil", "Milk", "Bread", "Sugar", "Coffee", "Apples")
_CHART_TITLES = ("Sales", "Orders", "Stock", "Imports", "Demand", "Output")
_CHART_AXIS_MAX = (100, 200, 400, 500, 800, 1000, 2000, 4000, 5000, 8000, 10000)
_CHART_FILLS = ((150, 190, 230), (240, 175, 125), (170, 210, 160), (205, 185, 230), (232, 212, 125),
                (190, 190, 190))
_CHART_NOTES = ("Source: survey n={}", "Fig. {}", "Base: {} stores", "Table {}")


def cell_digits(draw: ImageDraw.ImageDraw, rng: random.Random, c0: int, y: int, value: str,
                digit_font: ImageFont.ImageFont, ink: tuple[int, int, int]) -> list[tuple[float, float]]:
    """``value`` as a chart's data label, without boxes: one faux-bold digit per CELL x CELL cell from
    cell column ``c0`` at pixel row ``y`` (a multiple of CELL), each jittered by up to 2 px (the
    image-token grid ``digit_boxes`` writes on). Returns the pixel centre (x, y) of each digit."""
    top, bottom = digit_font.getbbox("0")[1::2]
    centres = []
    for k, ch in enumerate(value):
        x0 = (c0 + k) * CELL
        dx, dy = rng.randint(-2, 2), rng.randint(-2, 2)
        w = draw.textlength(ch, font=digit_font)
        for bold in (0, 1):
            draw.text((x0 + (CELL - w) / 2 + dx + bold, y + (CELL - top - bottom) / 2 + dy), ch, fill=ink,
                      font=digit_font)
        centres.append((x0 + CELL / 2 + dx + 0.5, y + CELL / 2 + dy))
    return centres


@dataclass
class ChartPage:
    """A rendered bar chart: ``categories`` top to bottom, ``values[name]`` the digits printed as the
    bar's data label, ``digits[name]`` the pixel centre (x, y) of each of them, left to right
    (training supervision)."""

    image: Image.Image
    categories: list[str]
    values: dict[str, str]
    digits: dict[str, list[tuple[float, float]]]
    labels: str  # "outside" (data labels after the bar ends) or "inside" (in the bar's end where it fits)


def render_chart(seed: int) -> ChartPage:
    """The bar chart page of ``seed``: a title with a year, 3 or 4 horizontal bars (categories from
    ``CHART_CATEGORIES``, their names left of the axis), each bar's value (2-4 digits, all different)
    printed as its data label after or inside its end, a value axis with tick labels below the bars
    and sometimes a footnote with a number; all positions, sizes, colours and numbers follow the
    seed. Bar lengths are to scale (value / axis maximum)."""
    rng = random.Random(seed)
    width, height = CHART_SIZE
    cols = width // CELL
    ink = rng.choice(_INK)
    img = Image.new("RGB", CHART_SIZE, rng.choice(_PAPER))
    draw = ImageDraw.Draw(img)
    n = rng.randint(3, 4)
    categories = rng.sample(CHART_CATEGORIES, n)
    axis_max = rng.choice(_CHART_AXIS_MAX)
    values: dict[str, str] = {}
    for name in categories:
        while True:
            v = str(rng.randint(max(10, axis_max // 10), min(9999, axis_max - 1)))
            if v not in values.values():
                values[name] = v
                break
    labels = rng.choice(("outside", "inside"))
    fill = rng.choice(_CHART_FILLS)
    body = font(rng.randint(12, 14))
    small = font(rng.randint(10, 11))
    title_font = font(rng.randint(13, 16))
    digit_font = font(rng.randint(DIGIT_MIN, DIGIT_MAX))
    left = rng.randint(4, 14)
    year = rng.randint(2015, 2025)
    title = f"{rng.choice(_CHART_TITLES)} {year}" if rng.random() < 0.5 else f"{rng.choice(_CHART_TITLES)} in {year}"
    note = rng.choice(_CHART_NOTES).format(rng.randint(2, 999)) if rng.random() < 0.7 else None
    # rows of the image-token grid: the title in row 0, the bars below, one per row or every other row
    gap = 2 if n == 3 and rng.random() < 0.4 else 1
    last_row = 5  # the tick labels and the footnote need the two rows below the last bar
    first = rng.randint(1, last_row - (n - 1) * gap)
    rows = [first + k * gap for k in range(n)]
    x0 = left + max(int(draw.textlength(name, font=body)) for name in CHART_CATEGORIES) + 6  # the axis
    x0 += rng.randint(0, 8)
    plot = (cols - 4) * CELL - 2 - x0  # px of axis_max: a 4-digit label after the longest bar still fits
    centres: dict[str, list[tuple[float, float]]] = {}

    draw.text((left + rng.randint(0, 40), rng.randint(2, 8)), title, fill=ink, font=title_font)
    thickness = rng.randint(12, 20)
    for name, row in zip(categories, rows):
        y = row * CELL
        top = y + (CELL - thickness) // 2 + rng.randint(-1, 1)
        end = x0 + max(2, round(int(values[name]) / axis_max * plot))
        draw.rectangle([x0, top, end, top + thickness], fill=fill)
        ntop, nbottom = body.getbbox(name)[1::2]
        draw.text((x0 - 6 - draw.textlength(name, font=body), y + (CELL - ntop - nbottom) / 2), name, fill=ink,
                  font=body)
        k = len(values[name])
        inside = end // CELL - k
        if labels == "inside" and inside * CELL >= x0 + 2:
            c0 = inside
        else:
            c0 = -(-(end + 2) // CELL)
        centres[name] = cell_digits(draw, rng, c0, y, values[name], digit_font, ink)
    # the axes: a vertical line at x0 beside the bars, the value axis under the last bar with 3 or 5 ticks
    y_axis = (rows[-1] + 1) * CELL + 2
    draw.line([(x0, rows[0] * CELL), (x0, y_axis)], fill=ink)
    draw.line([(x0, y_axis), (x0 + plot, y_axis)], fill=ink)
    ticks = 5 if axis_max < 1000 and rng.random() < 0.5 else 3
    for t in range(ticks):
        x = x0 + plot * t // (ticks - 1)
        value = str(axis_max * t // (ticks - 1))
        draw.line([(x, y_axis), (x, y_axis + 3)], fill=ink)
        draw.text((x - draw.textlength(value, font=small) / 2, y_axis + 4), value, fill=ink, font=small)
    if note:
        draw.text((width - 6 - draw.textlength(note, font=small) - rng.randint(0, 60), y_axis + 20), note,
                  fill=ink, font=small)
    return ChartPage(img, categories, values, centres, labels)


# -- parity sample pages -------------------------------------------------------------------------

def sample_page(width: int, height: int, seed: int, title: str = "INVOICE") -> Image.Image:
    """A page with a title, text lines, a table grid and a few coloured blocks."""
    rng = random.Random(seed)
    img = Image.new("RGB", (width, height), (250, 250, 245))
    draw = ImageDraw.Draw(img)
    draw.text((max(4, width // 20), max(2, height // 30)), title, fill=(20, 20, 60))
    y = max(14, height // 8)
    while y < height - 12:
        x = max(4, width // 20)
        words = [f"{rng.choice(['Item', 'Qty', 'Total', 'Date', 'Tax', 'Net'])} {rng.randint(0, 9999)}"
                 for _ in range(rng.randint(1, 4))]
        draw.text((x, y), "  ".join(words), fill=(rng.randint(0, 80),) * 3)
        y += max(10, height // 14)
    cols = rng.randint(2, 5)
    for c in range(cols + 1):
        xx = int(width * (0.1 + 0.8 * c / cols))
        draw.line([(xx, height // 2), (xx, int(height * 0.9))], fill=(90, 90, 90))
    for _ in range(3):
        x0, y0 = rng.randint(0, max(1, width - 20)), rng.randint(0, max(1, height - 20))
        draw.rectangle([x0, y0, x0 + width // 8 + 2, y0 + height // 10 + 2],
                       fill=(rng.randint(100, 255), rng.randint(100, 255), rng.randint(100, 255)))
    return img


# -- calibration documents -----------------------------------------------------------------------

def _words(rng: random.Random, n: int) -> str:
    vocab = ("invoice total amount due date customer address item quantity price tax subtotal shipping "
             "balance order reference account payment terms signature approved department project").split()
    return " ".join(rng.choice(vocab) for _ in range(n))


def invoice(rng: random.Random, w=827, h=1169) -> Document:
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    d.text((40, 30), "INVOICE", font=font(40), fill=(20, 30, 90))
    d.text((w - 260, 40), f"No. {rng.randint(10000, 99999)}\nDate: 2026-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
           font=font(18), fill="black")
    y, total = 180, 0
    d.rectangle([40, y - 10, w - 40, y + 20], fill=(230, 235, 245))
    d.text((50, y - 6), "Item                     Qty      Price      Amount", font=font(18), fill="black")
    for _ in range(rng.randint(4, 9)):
        y += 40
        qty, price = rng.randint(1, 20), rng.randint(2, 400)
        total += qty * price
        d.text((50, y), f"{_words(rng, 2):<24} {qty:>4} {price:>9} {qty * price:>10}", font=font(18), fill="black")
    d.line([40, y + 40, w - 40, y + 40], fill="black", width=2)
    d.text((w - 330, y + 60), f"TOTAL: {total}", font=font(30), fill=(150, 0, 0))
    return Document("invoice", img, "What is the total amount of this invoice?")


def form(rng: random.Random, w=850, h=1100) -> Document:
    img = Image.new("RGB", (w, h), (252, 252, 248))
    d = ImageDraw.Draw(img)
    d.text((60, 40), "APPLICATION FORM", font=font(34), fill="black")
    fields = ["Name", "Date of birth", "Address", "City", "Phone", "Email", "Signature", "Date"]
    for i, f in enumerate(fields):
        y = 140 + i * 100
        d.text((60, y), f + ":", font=font(20), fill="black")
        d.rectangle([260, y - 5, w - 60, y + 35], outline=(120, 120, 120))
        d.text((270, y), _words(rng, 3) if "Date" not in f else f"{rng.randint(1, 28):02d}/{rng.randint(1, 12):02d}/19{rng.randint(50, 99)}",
               font=font(20), fill=(0, 0, 160))
    return Document("form", img, "What is the date of birth on this form?")


def table(rng: random.Random, w=1100, h=700) -> Document:
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    rows, cols = rng.randint(8, 14), rng.randint(4, 7)
    cw, rh = (w - 80) // cols, (h - 80) // rows
    for r in range(rows):
        for c in range(cols):
            x0, y0 = 40 + c * cw, 40 + r * rh
            d.rectangle([x0, y0, x0 + cw, y0 + rh], outline="black", fill=(235, 240, 250) if r == 0 else None)
            text = f"Col {c + 1}" if r == 0 else f"{rng.uniform(0, 1000):.2f}"
            d.text((x0 + 6, y0 + 6), text, font=font(16), fill="black")
    return Document("table", img, "What is the largest value in the third column?")


def bar_chart(rng: random.Random, w=900, h=600) -> Document:
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    n = rng.randint(4, 8)
    values = [rng.randint(5, 100) for _ in range(n)]
    d.line([80, 40, 80, h - 60, w - 40, h - 60], fill="black", width=2)
    bw = (w - 160) // n
    for i, v in enumerate(values):
        x0 = 100 + i * bw
        top = h - 60 - int(v / 100 * (h - 120))
        d.rectangle([x0, top, x0 + bw - 20, h - 60], fill=(60 + 20 * i % 200, 120, 200))
        d.text((x0, top - 22), str(v), font=font(16), fill="black")
        d.text((x0, h - 50), f"Q{i + 1}", font=font(16), fill="black")
    d.text((w // 2 - 120, 8), "Quarterly revenue", font=font(22), fill="black")
    return Document("bar_chart", img, "Which quarter has the highest revenue?")


def line_chart(rng: random.Random, w=1000, h=560) -> Document:
    img = Image.new("RGB", (w, h), (250, 250, 255))
    d = ImageDraw.Draw(img)
    d.line([70, 30, 70, h - 50, w - 30, h - 50], fill="black", width=2)
    pts = [(70 + i * (w - 110) // 11, h - 50 - rng.randint(20, h - 120)) for i in range(12)]
    d.line(pts, fill=(200, 40, 40), width=3)
    for i, (x, y) in enumerate(pts):
        d.ellipse([x - 4, y - 4, x + 4, y + 4], fill=(200, 40, 40))
        d.text((x - 10, h - 42), ["J", "F", "M", "A", "M", "J", "J", "A", "S", "O", "N", "D"][i], font=font(14),
               fill="black")
    return Document("line_chart", img, "In which month is the line at its lowest point?")


def receipt(rng: random.Random, w=380, h=1100) -> Document:
    img = Image.new("RGB", (w, h), (255, 255, 250))
    d = ImageDraw.Draw(img)
    d.text((90, 20), "CORNER STORE", font=font(26), fill="black")
    y, total = 90, 0.0
    for _ in range(rng.randint(8, 18)):
        price = rng.uniform(0.5, 30)
        total += price
        d.text((20, y), f"{_words(rng, 1)[:14]:<16}{price:>8.2f}", font=font(16), fill="black")
        y += 28
    d.text((20, y + 20), f"TOTAL {total:>16.2f}", font=font(22), fill="black")
    d.text((20, y + 60), "CARD **** 4821  THANK YOU", font=font(14), fill="black")
    return Document("receipt", img, "What is the total on this receipt?")


def small_print(rng: random.Random, w=1240, h=1754) -> Document:
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    small = font(11)
    for i in range(150):
        d.text((40, 30 + i * 11), f"{i + 1:>3}. " + _words(rng, rng.randint(12, 22)), font=small, fill=(30, 30, 30))
    return Document("small_print", img, "What does clause 12 say?")


def ui_screenshot(rng: random.Random, w=1280, h=800) -> Document:
    img = Image.new("RGB", (w, h), (240, 242, 245))
    d = ImageDraw.Draw(img)
    d.rectangle([0, 0, w, 50], fill=(40, 60, 120))
    d.text((20, 12), "Settings  -  Account", font=font(22), fill="white")
    d.rectangle([0, 50, 240, h], fill=(225, 228, 235))
    for i, item in enumerate(["General", "Privacy", "Billing", "Notifications", "Security", "Help"]):
        d.text((24, 80 + i * 44), item, font=font(18), fill="black")
    for i in range(5):
        y = 90 + i * 110
        d.rounded_rectangle([280, y, w - 40, y + 90], radius=10, fill="white", outline=(200, 200, 210))
        d.text((300, y + 14), _words(rng, 3).title(), font=font(20), fill="black")
        d.rounded_rectangle([w - 200, y + 25, w - 70, y + 65], radius=8, fill=(50, 120, 220))
        d.text((w - 180, y + 35), "Enable" if rng.random() < 0.5 else "Disable", font=font(16), fill="white")
    return Document("ui_screenshot", img, "Which menu item is selected and what buttons are shown?")


def mixed_zh_en(rng: random.Random, w=900, h=900) -> Document:
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    zh = ["发票", "总计", "金额", "日期", "客户", "地址", "数量", "单价", "税额", "备注"]
    d.text((40, 30), "发票 INVOICE", font=font(36, cjk=True), fill="black")
    for i in range(14):
        line = f"{rng.choice(zh)} {_words(rng, 2)} {rng.randint(1, 999)} {rng.choice(zh)}"
        d.text((40, 110 + i * 50), line, font=font(22, cjk=True), fill="black")
    return Document("mixed_zh_en", img, "总计金额是多少? What is the total?")


def extreme_aspect(rng: random.Random, w=2000, h=300) -> Document:
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    for i in range(6):
        d.text((30, 20 + i * 44), _words(rng, 24), font=font(20), fill="black")
    return Document("banner_wide", img, "Read the first line.")


def tall_strip(rng: random.Random, w=280, h=1680) -> Document:
    doc = receipt(rng, w, h)
    return Document("tall_strip", doc.image, doc.prompt)


# -- the built-in screen recording ---------------------------------------------------------------

RECORDING_SIZE = (560, 336)  # (width, height): multiples of 28, 240 merged tokens per temporal patch
RECORDING_FRAMES = 8  # 4 temporal patches of two different frames
RECORDING_FPS = 2.0


def screen_recording(rng: random.Random, w: int = RECORDING_SIZE[0], h: int = RECORDING_SIZE[1],
                     frames: int = RECORDING_FRAMES) -> Document:
    """A screen recording drawn frame by frame: an editor window scrolling down while a line is typed
    (a caret after the typed text) and the mouse pointer drifts. Consecutive frames differ, so every
    temporal patch pairs two different frames, as in a real recording."""
    lines = [_words(rng, rng.randint(3, 7)) for _ in range(26)]
    typed_at = rng.randint(9, 12)  # the line being typed
    typed = f"TOTAL due {rng.randint(100, 9999)} on 2026-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
    title = rng.choice(("notes.txt", "report.md", "invoice_draft.txt"))
    body, line_h = font(14), 18
    px, py = rng.randint(w // 2, w - 80), rng.randint(60, h // 2)  # mouse pointer
    out = []
    for i in range(frames):
        img = Image.new("RGB", (w, h), (236, 238, 242))
        d = ImageDraw.Draw(img)
        y0 = 44 - 10 * i  # the view scrolls 10 px a frame
        for k, line in enumerate(lines):
            y = y0 + k * line_h
            if y < 30 or y > h - 24:
                continue
            text = typed[:len(typed) * (i + 1) // frames] if k == typed_at else line
            d.text((14, y), f"{k + 1:>3}", font=body, fill=(150, 150, 165))
            d.text((50, y), text, font=body, fill=(25, 25, 35))
            if k == typed_at:  # the caret
                x = 50 + d.textlength(text, font=body) + 1
                d.line([(x, y), (x, y + 15)], fill=(20, 60, 200), width=2)
        d.rectangle([0, 0, w, 28], fill=(45, 50, 62))  # title bar and status bar over the scrolled text
        d.text((12, 6), f"{title} - Editor", font=font(15), fill=(232, 232, 236))
        d.rectangle([0, h - 20, w, h], fill=(210, 214, 222))
        d.text((10, h - 18), f"Ln {typed_at + 1}, Col {len(typed) * (i + 1) // frames + 1}   UTF-8", font=font(12),
               fill=(40, 40, 50))
        x, y = px + 6 * i, py + 4 * i
        d.polygon([(x, y), (x, y + 16), (x + 4, y + 12), (x + 11, y + 12)], fill="black", outline="white")
        out.append(np.asarray(img))
    return Document("screen_recording", None, "What is being typed in this screen recording?",
                    video=np.stack(out), fps=RECORDING_FPS)


# The recording comes second, so any calibration set of two or more documents holds video patches.
KINDS = (invoice, screen_recording, form, table, bar_chart, line_chart, receipt, small_print, ui_screenshot,
         mixed_zh_en, extreme_aspect, tall_strip)
