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

    def encode_prompt(self, prompt: str, image_token_counts: list[int],
                      video_token_counts: list[int] | None = None) -> np.ndarray:
        """ids int64 [T]: the prompt with its i-th image pad repeated image_token_counts[i] times and its
        i-th video pad video_token_counts[i] times (as ``Qwen2VLProcessor`` expands them)."""
        ids = self.tokenizer.encode(prompt, add_special_tokens=False).ids
        pads = {self.tokens.image_token_id: ("image", "<|image_pad|>", list(image_token_counts))}
        if self.tokens.video_token_id >= 0:
            pads[self.tokens.video_token_id] = ("video", "<|video_pad|>", list(video_token_counts or []))
        for pad, (name, marker, counts) in pads.items():
            found = sum(1 for i in ids if i == pad)
            if found != len(counts):
                raise QvlError(f"The prompt has {found} {name} placeholders for {len(counts)} {name}s; "
                               f"give one {name} per {marker}.")
        out: list[int] = []
        iters = {pad: iter(counts) for pad, (_, _, counts) in pads.items()}
        for i in ids:
            out.extend([i] * next(iters[i]) if i in iters else [i])
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

    def flush(self) -> str:
        """What is held back at the end (an incomplete character, as the tokenizer decodes it)."""
        text = self.codec.decode(self.ids)
        piece = text[self.emitted:]
        self.emitted = len(text)
        return piece
