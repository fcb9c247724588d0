"""Deterministic sample pages for parity runs: document-like images of several sizes and aspects."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from PIL import Image, ImageDraw


def render_page(width: int, height: int, seed: int, title: str = "INVOICE") -> Image.Image:
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


@dataclass
class Case:
    name: str
    sizes: list[tuple[int, int]] = field(default_factory=list)  # (width, height) per image
    prompt: str = "What is the total?"
    system: str | None = None  # a system turn; None leaves it to the chat template

    def images(self) -> list[Image.Image]:
        return [render_page(w, h, seed=1000 * i + w + h) for i, (w, h) in enumerate(self.sizes)]


# Sizes chosen to hit: square, landscape and portrait non-multiples of 28 (resize), a window grid
# that is not a multiple of the 4x4-unit window (edge windows), an image below min_pixels, and a
# prompt with two images of different sizes; one case carries a system turn of its own.
ALL_CASES = [
    Case("landscape", [(640, 336)], "What is the total amount due?"),
    Case("two-images", [(392, 392), (230, 510)], "Compare the totals of the two pages."),
    Case("text-only", [], "Write the word invoice three times."),
    Case("portrait", [(280, 532)], "What is the date on this form?"),
    Case("square-odd", [(301, 299)], "Read the first line.", system="Answer in one word."),
    Case("tiny", [(40, 70)], "What is written here?"),
]
QUICK_CASES = ALL_CASES[:3]
