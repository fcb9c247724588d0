"""The built-in calibration documents: one page of each kind in ``qvl_export.documents.render.KINDS``
(invoices, forms, tables, charts, receipts, small print, a UI screenshot, mixed Chinese/English,
extreme aspect ratios), each with a QA prompt, in rotation.
"""

from __future__ import annotations

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
        docs.append(Document(f"{i:02d}-{doc.name}", doc.image, doc.prompt))
    return docs
