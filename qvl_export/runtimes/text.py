"""Tokenization for the thin runtime (tokenizers only): prompt string -> ids with image pads
expanded, ids -> text. The prompt string itself comes from the checkpoint's chat template
(``runtimes/chat.py``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from qvl_export.core.errors import QvlError
from qvl_export.core.spec import TokenSpec

class TextCodec:
    """tokenizer.json wrapper: prompt -> ids with image pads expanded, ids -> text (streaming)."""

    def __init__(self, tokenizer_file: str | Path, tokens: TokenSpec):
        from tokenizers import Tokenizer

        try:
            self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        except Exception as err:
            raise QvlError(f"Could not load {tokenizer_file} ({err}); copy the checkpoint's tokenizer.json "
                           "into the artifacts folder.") from None
        self.tokens = tokens

    def encode_prompt(self, prompt: str, image_token_counts: list[int]) -> np.ndarray:
        """ids int64 [T]: the prompt with its i-th image pad repeated image_token_counts[i] times."""
        ids = self.tokenizer.encode(prompt, add_special_tokens=False).ids
        pad = self.tokens.image_token_id
        found = sum(1 for i in ids if i == pad)
        if found != len(image_token_counts):
            raise QvlError(f"The prompt has {found} image placeholders for {len(image_token_counts)} images; "
                           "give one image per <|image_pad|>.")
        out: list[int] = []
        counts = iter(image_token_counts)
        for i in ids:
            out.extend([pad] * next(counts) if i == pad else [i])
        return np.asarray(out, dtype=np.int64)

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)


class StreamDecoder:
    """Turns a growing list of token ids into text pieces, holding back incomplete UTF-8."""

    def __init__(self, codec: TextCodec):
        self.codec = codec
        self.ids: list[int] = []
        self.emitted = 0

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        text = self.codec.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        piece = text[self.emitted:]
        self.emitted = len(text)
        return piece
