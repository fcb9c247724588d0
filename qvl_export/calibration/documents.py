"""The built-in calibration documents: rendered deterministically with Pillow, each with a QA prompt.

Kinds cover what deployed document models see: invoices, forms, tables, bar and line charts,
receipts, dense small print, a screenshot-like UI, mixed Chinese/English text, and portrait,
landscape and extreme aspect ratios. Chinese glyphs need a CJK font (Debian ``fonts-wqy-microhei``
or ``fonts-noto-cjk``); without one the Chinese runs still render, as boxes, and the page keeps its
layout - calibration sees the same activation statistics of a text-dense page.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

CJK_FONTS = (
    "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc",
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
)


@dataclass
class Document:
    name: str
    image: Image.Image
    prompt: str


def _font(size: int, cjk: bool = False):
    if cjk:
        for path in CJK_FONTS:
            if Path(path).exists():
                return ImageFont.truetype(path, size)
    return ImageFont.load_default(size=size)


def _words(rng: random.Random, n: int) -> str:
    vocab = ("invoice total amount due date customer address item quantity price tax subtotal shipping "
             "balance order reference account payment terms signature approved department project").split()
    return " ".join(rng.choice(vocab) for _ in range(n))


def invoice(rng: random.Random, w=827, h=1169) -> Document:
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    d.text((40, 30), "INVOICE", font=_font(40), fill=(20, 30, 90))
    d.text((w - 260, 40), f"No. {rng.randint(10000, 99999)}\nDate: 2026-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
           font=_font(18), fill="black")
    y, total = 180, 0
    d.rectangle([40, y - 10, w - 40, y + 20], fill=(230, 235, 245))
    d.text((50, y - 6), "Item                     Qty      Price      Amount", font=_font(18), fill="black")
    for _ in range(rng.randint(4, 9)):
        y += 40
        qty, price = rng.randint(1, 20), rng.randint(2, 400)
        total += qty * price
        d.text((50, y), f"{_words(rng, 2):<24} {qty:>4} {price:>9} {qty * price:>10}", font=_font(18), fill="black")
    d.line([40, y + 40, w - 40, y + 40], fill="black", width=2)
    d.text((w - 330, y + 60), f"TOTAL: {total}", font=_font(30), fill=(150, 0, 0))
    return Document("invoice", img, "What is the total amount of this invoice?")


def form(rng: random.Random, w=850, h=1100) -> Document:
    img = Image.new("RGB", (w, h), (252, 252, 248))
    d = ImageDraw.Draw(img)
    d.text((60, 40), "APPLICATION FORM", font=_font(34), fill="black")
    fields = ["Name", "Date of birth", "Address", "City", "Phone", "Email", "Signature", "Date"]
    for i, f in enumerate(fields):
        y = 140 + i * 100
        d.text((60, y), f + ":", font=_font(20), fill="black")
        d.rectangle([260, y - 5, w - 60, y + 35], outline=(120, 120, 120))
        d.text((270, y), _words(rng, 3) if "Date" not in f else f"{rng.randint(1, 28):02d}/{rng.randint(1, 12):02d}/19{rng.randint(50, 99)}",
               font=_font(20), fill=(0, 0, 160))
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
            d.text((x0 + 6, y0 + 6), text, font=_font(16), fill="black")
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
        d.text((x0, top - 22), str(v), font=_font(16), fill="black")
        d.text((x0, h - 50), f"Q{i + 1}", font=_font(16), fill="black")
    d.text((w // 2 - 120, 8), "Quarterly revenue", font=_font(22), fill="black")
    return Document("bar_chart", img, "Which quarter has the highest revenue?")


def line_chart(rng: random.Random, w=1000, h=560) -> Document:
    img = Image.new("RGB", (w, h), (250, 250, 255))
    d = ImageDraw.Draw(img)
    d.line([70, 30, 70, h - 50, w - 30, h - 50], fill="black", width=2)
    pts = [(70 + i * (w - 110) // 11, h - 50 - rng.randint(20, h - 120)) for i in range(12)]
    d.line(pts, fill=(200, 40, 40), width=3)
    for i, (x, y) in enumerate(pts):
        d.ellipse([x - 4, y - 4, x + 4, y + 4], fill=(200, 40, 40))
        d.text((x - 10, h - 42), ["J", "F", "M", "A", "M", "J", "J", "A", "S", "O", "N", "D"][i], font=_font(14),
               fill="black")
    return Document("line_chart", img, "In which month is the line at its lowest point?")


def receipt(rng: random.Random, w=380, h=1100) -> Document:
    img = Image.new("RGB", (w, h), (255, 255, 250))
    d = ImageDraw.Draw(img)
    d.text((90, 20), "CORNER STORE", font=_font(26), fill="black")
    y, total = 90, 0.0
    for _ in range(rng.randint(8, 18)):
        price = rng.uniform(0.5, 30)
        total += price
        d.text((20, y), f"{_words(rng, 1)[:14]:<16}{price:>8.2f}", font=_font(16), fill="black")
        y += 28
    d.text((20, y + 20), f"TOTAL {total:>16.2f}", font=_font(22), fill="black")
    d.text((20, y + 60), "CARD **** 4821  THANK YOU", font=_font(14), fill="black")
    return Document("receipt", img, "What is the total on this receipt?")


def small_print(rng: random.Random, w=1240, h=1754) -> Document:
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    font = _font(11)
    for i in range(150):
        d.text((40, 30 + i * 11), f"{i + 1:>3}. " + _words(rng, rng.randint(12, 22)), font=font, fill=(30, 30, 30))
    return Document("small_print", img, "What does clause 12 say?")


def ui_screenshot(rng: random.Random, w=1280, h=800) -> Document:
    img = Image.new("RGB", (w, h), (240, 242, 245))
    d = ImageDraw.Draw(img)
    d.rectangle([0, 0, w, 50], fill=(40, 60, 120))
    d.text((20, 12), "Settings  -  Account", font=_font(22), fill="white")
    d.rectangle([0, 50, 240, h], fill=(225, 228, 235))
    for i, item in enumerate(["General", "Privacy", "Billing", "Notifications", "Security", "Help"]):
        d.text((24, 80 + i * 44), item, font=_font(18), fill="black")
    for i in range(5):
        y = 90 + i * 110
        d.rounded_rectangle([280, y, w - 40, y + 90], radius=10, fill="white", outline=(200, 200, 210))
        d.text((300, y + 14), _words(rng, 3).title(), font=_font(20), fill="black")
        d.rounded_rectangle([w - 200, y + 25, w - 70, y + 65], radius=8, fill=(50, 120, 220))
        d.text((w - 180, y + 35), "Enable" if rng.random() < 0.5 else "Disable", font=_font(16), fill="white")
    return Document("ui_screenshot", img, "Which menu item is selected and what buttons are shown?")


def mixed_zh_en(rng: random.Random, w=900, h=900) -> Document:
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    zh = ["发票", "总计", "金额", "日期", "客户", "地址", "数量", "单价", "税额", "备注"]
    d.text((40, 30), "发票 INVOICE", font=_font(36, cjk=True), fill="black")
    for i in range(14):
        line = f"{rng.choice(zh)} {_words(rng, 2)} {rng.randint(1, 999)} {rng.choice(zh)}"
        d.text((40, 110 + i * 50), line, font=_font(22, cjk=True), fill="black")
    return Document("mixed_zh_en", img, "总计金额是多少? What is the total?")


def extreme_aspect(rng: random.Random, w=2000, h=300) -> Document:
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    for i in range(6):
        d.text((30, 20 + i * 44), _words(rng, 24), font=_font(20), fill="black")
    return Document("banner_wide", img, "Read the first line.")


def tall_strip(rng: random.Random, w=280, h=1680) -> Document:
    doc = receipt(rng, w, h)
    return Document("tall_strip", doc.image, doc.prompt)


KINDS = (invoice, form, table, bar_chart, line_chart, receipt, small_print, ui_screenshot, mixed_zh_en,
         extreme_aspect, tall_strip)


def builtin_documents(count: int | None = None, seed: int = 0) -> list[Document]:
    """The built-in set: every kind once (more in rotation when ``count`` is larger)."""
    count = len(KINDS) if count is None else count
    docs = []
    for i in range(count):
        rng = random.Random(seed * 1000 + i)
        doc = KINDS[i % len(KINDS)](rng)
        docs.append(Document(f"{i:02d}-{doc.name}", doc.image, doc.prompt))
    return docs
