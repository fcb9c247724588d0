"""The parity cases: prompts over document-like pages of several sizes and aspects (drawn by
``qvl_export.documents.render.sample_page``)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from qvl_export.documents.render import sample_page as render_page  # the name callers know


@dataclass
class Case:
    name: str
    sizes: list[tuple[int, int]] = field(default_factory=list)  # (width, height) per image
    prompt: str = "What is the total?"
    system: str | None = None  # a system turn; None leaves it to the chat template
    video: tuple[int, int, int] | None = None  # (frames, width, height): a clip after the images, at VIDEO_FPS

    def images(self) -> list[Image.Image]:
        return [render_page(w, h, seed=1000 * i + w + h) for i, (w, h) in enumerate(self.sizes)]

    def videos(self) -> list[np.ndarray]:
        """The case's clip as [T, H, W, 3] uint8: a page panning right, as in a screen recording."""
        if self.video is None:
            return []
        frames, w, h = self.video
        page = np.asarray(render_page(w + 8 * frames, h, seed=7 + w + h).convert("RGB"))
        return [np.stack([page[:, 8 * i:8 * i + w] for i in range(frames)])]


# video cases: frames sampled as given (an array is already at its fps), each frame kept within
# this pixel range (small, so the tiny test models see a few hundred video tokens)
VIDEO_FPS = 2.0
VIDEO_PIXELS = {"video_min_pixels": 28 * 28 * 4, "video_max_pixels": 28 * 28 * 24}


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
    Case("video", [], "What does the recording show?", video=(6, 200, 120)),
]
QUICK_CASES = ALL_CASES[:3] + [c for c in ALL_CASES if c.video]  # the build's own gate: a video too
