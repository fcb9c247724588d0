"""The built-in calibration documents: one of each kind in ``qvl_export.documents.render.KINDS``
(invoices, a screen recording, forms, tables, charts, receipts, small print, a UI screenshot, mixed
Chinese/English, extreme aspect ratios), each with a QA prompt, in rotation. The screen recording
is a clip drawn at run time (8 frames at 2 fps): int8 / fp8 vision ranges see video patches, whose
two frames differ, not only still pages.
"""

from __future__ import annotations

import dataclasses
import random

from qvl_export.documents.render import CJK_FONTS, KINDS, Document

__all__ = ["CJK_FONTS", "KINDS", "Document", "builtin_documents"]


def builtin_documents(count: int | None = None, seed: int = 0) -> list[Document]:
    """The built-in set: every kind once (more in rotation when ``count`` is larger)."""
    count = len(KINDS) if count is None else count
    docs = []
    for i in range(count):
        rng = random.Random(seed * 1000 + i)
        doc = KINDS[i % len(KINDS)](rng)
        docs.append(dataclasses.replace(doc, name=f"{i:02d}-{doc.name}"))
    return docs
