"""Graph passes and the ordered pass list of every (target, part).

The order is declared here, in one place. ``qvl-export passes`` prints it; ``qvl-export build
--passes/--skip-pass`` selects from it; the manifest records what each pass changed.
"""

from __future__ import annotations

from qvl_export.core.errors import QvlError
from qvl_export.passes.base import GraphPass, run_passes
from qvl_export.passes.cleanup import CleanupAfterFusions, FoldConstantsAndCleanup
from qvl_export.passes.fuse_decoder_attention import FuseDecoderAttention
from qvl_export.passes.fuse_rms_norm import FuseRmsNorm
from qvl_export.passes.fuse_vision_attention import FuseVisionAttention
from qvl_export.passes.fuse_vision_gelu import FuseVisionGelu
from qvl_export.passes.fuse_vision_rotary import FuseVisionRotary
from qvl_export.passes.pack_decoder_matmuls import PackDecoderMatMuls
from qvl_export.passes.quantize_embeddings import QuantizeEmbeddings
from qvl_export.passes.unshare_dequantize import UnshareDequantize

# One ordered list for all; a pass runs on the (target, part) pairs it declares.
PIPELINE: list[type[GraphPass]] = [
    FoldConstantsAndCleanup,
    FuseRmsNorm,  # ort; all parts (RMSNorm: the decoder, Qwen2.5-VL's vision tower and merger)
    FuseVisionRotary,  # ort vision; before the attention fusion (it reads the rotated q/k as they come)
    FuseVisionAttention,  # ort vision; window/full attention -> MultiHeadAttention on its flash path
    FuseVisionGelu,  # ort merger; erf GELU -> Gelu
    FuseDecoderAttention,  # ort decoder; changes the decoder's K/V inputs to in-place buffers
    PackDecoderMatMuls,  # both targets; after the attention fusion (packs what feeds GQA)
    CleanupAfterFusions,  # CSE merges the per-layer copies the fusions made
    QuantizeEmbeddings,  # ort decoder, int8/fp8 builds only: runs after Q/DQ placement
    UnshareDequantize,  # ort, int8/fp8 builds: one DQ per consumer so every quantized MatMul fuses
]


def all_passes() -> list[GraphPass]:
    return [cls() for cls in PIPELINE]


def select_passes(target: str, part: str, only: list[str] | None = None,
                  skip: list[str] | None = None) -> list[GraphPass]:
    """The passes to run on ``part`` for ``target``: the declared order, filtered."""
    known = {p.name for p in all_passes()}
    for name in (only or []) + (skip or []):
        if name not in known:
            raise QvlError(f"Unknown pass {name!r}; 'qvl-export passes' lists them: {', '.join(sorted(known))}.")
    chosen = []
    for p in all_passes():
        if not p.applies_to(target, part):
            continue
        if only is not None and p.name not in only:
            continue
        if skip and p.name in skip:
            continue
        chosen.append(p)
    return chosen


__all__ = ["GraphPass", "PIPELINE", "all_passes", "run_passes", "select_passes"]
