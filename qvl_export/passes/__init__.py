"""Graph passes and their order: two declared lists, one per stage of the build.

- ``GRAPH_PASSES`` run on the traced float graph of every part (``stage="graph"``): cleanup, the
  onnxruntime fusions, the MatMul packing, cleanup again.
- ``QUANTIZED_PASSES`` run after Q/DQ placement or weight-only packing (``stage="quantized"``), on
  every part of a build that quantizes anything; a build that quantizes nothing skips the stage.
  No contrib-op fusion runs here: the fusions all run in the graph stage, on the float graph, and the
  quantizers place Q/DQ around (or pack the weights of) the MatMuls they leave.

Each pass runs on the (target, part) pairs it declares. ``qvl-export passes`` prints both lists;
``qvl-export build --passes/--skip-pass`` selects from them; the manifest records what each pass changed.
"""

from __future__ import annotations

from qvl_export.core.errors import QvlError
from qvl_export.passes.base import GraphPass, GraphPassResult, run_passes
from qvl_export.passes.cleanup import (
    CseAfterFusions,
    EliminateCommonSubexpressions,
    EliminateIdentities,
    RemoveUnused,
    RemoveUnusedAfterFusions,
)
from qvl_export.passes.fold_constants import FoldConstants, FoldConstantsAfterFusions
from qvl_export.passes.fuse_decoder_attention import FuseDecoderAttention
from qvl_export.passes.fuse_rms_norm import FuseRmsNorm
from qvl_export.passes.fuse_vision_attention import FuseVisionAttention
from qvl_export.passes.fuse_vision_gelu import FuseVisionGelu
from qvl_export.passes.fuse_vision_rotary import FuseVisionRotary
from qvl_export.passes.pack_decoder_matmuls import PackDecoderMatMuls
from qvl_export.passes.quantize_embeddings import QuantizeEmbeddings
from qvl_export.passes.unshare_dequantize import UnshareDequantize

GRAPH, QUANTIZED = "graph", "quantized"
STAGES = (GRAPH, QUANTIZED)

# On the traced float graph, every part; a pass runs on the (target, part) pairs it declares.
GRAPH_PASSES: list[type[GraphPass]] = [
    FoldConstants,  # all
    EliminateIdentities,  # all
    RemoveUnused,  # all: what folding left unread
    EliminateCommonSubexpressions,  # all
    FuseRmsNorm,  # ort; all parts (RMSNorm: the decoder, Qwen2.5-VL's vision tower and merger)
    FuseVisionRotary,  # ort vision; before the attention fusion (it reads the rotated q/k as they come)
    FuseVisionAttention,  # ort vision; window/full attention -> MultiHeadAttention on its flash path
    FuseVisionGelu,  # ort merger; erf GELU -> Gelu
    FuseDecoderAttention,  # ort decoder; changes the decoder's K/V inputs to in-place buffers
    PackDecoderMatMuls,  # both targets, decoder; after the attention fusion (packs what feeds GQA)
    CseAfterFusions,  # all: merges the per-layer copies the fusions made (rotary tables, mask columns)
    FoldConstantsAfterFusions,  # all: the constant subgraphs the fusions' rewrites built (after CSE: one copy)
    RemoveUnusedAfterFusions,  # all: what the fusions and CSE left unread
]

# After Q/DQ placement or weight-only packing, on every part of a build that quantizes anything.
QUANTIZED_PASSES: list[type[GraphPass]] = [
    QuantizeEmbeddings,  # ort decoder: int8 token table (needs the quantizer's DequantizeLinear / MatMulNBits)
    UnshareDequantize,  # ort: one Q/DQ pair per consumer so every quantized MatMul fuses; no CSE after it
]

_LISTS = {GRAPH: GRAPH_PASSES, QUANTIZED: QUANTIZED_PASSES}


def all_passes() -> list[GraphPass]:
    """Every pass, graph stage first, each list in its order."""
    return [cls() for cls in GRAPH_PASSES + QUANTIZED_PASSES]


def stage_of(name: str) -> str:
    """The stage (``"graph"`` / ``"quantized"``) whose list holds the pass ``name``."""
    for stage, classes in _LISTS.items():
        if any(cls.name == name for cls in classes):
            return stage
    check_pass_names([name], None)
    raise AssertionError("unreachable")


def check_pass_names(only: list[str] | None, skip: list[str] | None) -> None:
    """Raise a ``QvlError`` naming the known passes when ``only`` or ``skip`` holds an unknown name."""
    known = [cls.name for cls in GRAPH_PASSES + QUANTIZED_PASSES]
    for name in list(only or []) + list(skip or []):
        if name not in known:
            raise QvlError(f"Unknown pass {name!r}; 'qvl-export passes' lists them: {', '.join(sorted(known))}.")


def select_passes(target: str, part: str, stage: str, only: list[str] | None = None,
                  skip: list[str] | None = None) -> list[GraphPass]:
    """The passes of ``stage``'s list that run on ``part`` for ``target``, in the declared order;
    ``only`` (None: all; ``[]``: none) and ``skip`` filter by name."""
    if stage not in _LISTS:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    check_pass_names(only, skip)
    chosen = []
    for cls in _LISTS[stage]:
        p = cls()
        if not p.applies_to(target, part):
            continue
        if only is not None and p.name not in only:
            continue
        if skip and p.name in skip:
            continue
        chosen.append(p)
    return chosen


__all__ = [
    "GRAPH",
    "GRAPH_PASSES",
    "QUANTIZED",
    "QUANTIZED_PASSES",
    "STAGES",
    "GraphPass",
    "GraphPassResult",
    "all_passes",
    "check_pass_names",
    "run_passes",
    "select_passes",
    "stage_of",
]
