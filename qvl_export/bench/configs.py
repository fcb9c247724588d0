"""Benchmark model shapes: the real Qwen2-VL-2B / Qwen2.5-VL-3B / Qwen3-VL-2B / Qwen3-VL-4B widths with
random weights.

Widths, heads, vocabulary and activations are those of the published ``config.json`` of
Qwen/Qwen2-VL-2B-Instruct, Qwen/Qwen2.5-VL-3B-Instruct, Qwen/Qwen3-VL-2B-Instruct and
Qwen/Qwen3-VL-4B-Instruct. ``layers`` cuts the depth of both the vision tower and the LLM to N, so a
quick run keeps every per-layer cost comparable with the full model (same matmul shapes, same
attention lengths); only the number of layers changes.

For Qwen2.5-VL the full-attention blocks are kept where they are: with N vision layers the kept
indexes are ``{7, 15, 23, 31} ∩ [0, N)``, and when none is left the last layer is full attention,
so a cut model always has at least one full-attention block (as every real one does). For Qwen3-VL
the DeepStack layers move with the cut: layer i of D becomes ``floor(i * N / D)`` (duplicates
dropped, at most as many as LLM layers), so a cut model still runs DeepStack mergers and adds their
rows to its first decoder layers ({5, 11, 17} of 24 -> {0, 1} with 2 layers).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from qvl_export.core.errors import QvlError
from qvl_export.loading.synthetic import CheckpointDims

# Real Qwen processors: min 56*56, max 28*28*16384 pixels; the bench pages are square multiples of
# 28 px, so a page of P x P pixels is exactly (P/14)^2 patch tokens.
REAL_MIN_PIXELS = 56 * 56
REAL_MAX_PIXELS = 28 * 28 * 16384
# Qwen3-VL's preprocessor_config.json: size shortest_edge 65536, longest_edge 16777216 (patch 16, merge 2)
QWEN3_MIN_PIXELS = 65536
QWEN3_MAX_PIXELS = 16777216


@dataclass(frozen=True)
class BenchModel:
    """A benchmark shape: synthetic checkpoint dims plus what CheckpointDims has no field for."""

    name: str
    dims: CheckpointDims
    vocab_size: int | None = None  # None: the tokenizer's vocabulary padded to 64 (tiny models)
    hub_id: str | None = None  # the checkpoint whose config.json the widths come from
    rms_norm_eps: float | None = None  # None: transformers' default
    # the weights' dtype: "bfloat16" for a model too large to make (or run) in fp32 here - written one
    # tensor at a time by ``checkpoint.make_streamed_checkpoint``
    dtype: str = "float32"

    @property
    def full_depth(self) -> tuple[int, int]:
        """(vision depth, LLM layers) of this shape."""
        return self.dims.vision_depth, self.dims.text_layers

    def describe(self) -> dict:
        d = self.dims
        return {
            "name": self.name, "hub_id": self.hub_id, "family": d.family,
            "vision": {"depth": d.vision_depth, "hidden": d.vision_hidden, "heads": d.vision_heads,
                       "intermediate": d.vision_intermediate,
                       "fullatt_block_indexes": list(d.fullatt_block_indexes) if d.family == "qwen2_5_vl" else None,
                       "window_size": d.window_size if d.family == "qwen2_5_vl" else None,
                       **({"num_position_embeddings": d.num_position_embeddings,
                           "deepstack_visual_indexes": list(d.deepstack_visual_indexes)}
                          if d.family == "qwen3_vl" else {})},
            "text": {"layers": d.text_layers, "hidden": d.text_hidden, "heads": d.text_heads,
                     "kv_heads": d.text_kv_heads, "intermediate": d.text_intermediate,
                     "vocab_size": self.vocab_size, "mrope_section": list(d.mrope_section),
                     "tie_word_embeddings": d.tie_word_embeddings,
                     **({"head_dim": d.text_head_dim} if d.family == "qwen3_vl" else {})},
        }


MODELS: dict[str, BenchModel] = {
    # Qwen/Qwen2-VL-2B-Instruct: ViT 32 x 1280 (16 heads, mlp_ratio 4, QuickGELU), LLM 28 x 1536.
    "qwen2-vl-2b": BenchModel(
        "qwen2-vl-2b",
        CheckpointDims(family="qwen2_vl", vision_depth=32, vision_hidden=1280, vision_heads=16,
                       vision_intermediate=5120, text_hidden=1536, text_layers=28, text_heads=12,
                       text_kv_heads=2, text_intermediate=8960, mrope_section=(16, 24, 24),
                       tie_word_embeddings=True, max_position_embeddings=32768, init_std=0.02,
                       min_pixels=REAL_MIN_PIXELS, max_pixels=REAL_MAX_PIXELS, seed=2),
        vocab_size=151936, hub_id="Qwen/Qwen2-VL-2B-Instruct", rms_norm_eps=1e-6),
    # Qwen/Qwen2.5-VL-3B-Instruct: ViT 32 x 1280 (16 heads, SwiGLU 3420, windows of 112 px, full
    # attention in blocks 7/15/23/31), merger to 2048, LLM 36 x 2048.
    "qwen2.5-vl-3b": BenchModel(
        "qwen2.5-vl-3b",
        CheckpointDims(family="qwen2_5_vl", vision_depth=32, vision_hidden=1280, vision_heads=16,
                       vision_intermediate=3420, fullatt_block_indexes=(7, 15, 23, 31), window_size=112,
                       text_hidden=2048, text_layers=36, text_heads=16, text_kv_heads=2,
                       text_intermediate=11008, mrope_section=(16, 24, 24), tie_word_embeddings=True,
                       max_position_embeddings=128000, init_std=0.02,
                       min_pixels=REAL_MIN_PIXELS, max_pixels=REAL_MAX_PIXELS, seed=3),
        vocab_size=151936, hub_id="Qwen/Qwen2.5-VL-3B-Instruct", rms_norm_eps=1e-6),
    # Qwen/Qwen2.5-VL-7B-Instruct: the 3B's ViT with a merger to 3584, LLM 28 x 3584 (28 heads, 4 KV heads,
    # intermediate 18944), untied 152064-row tables. 33 GB in fp32: made in bf16 (as it ships), one tensor
    # at a time.
    "qwen2.5-vl-7b": BenchModel(
        "qwen2.5-vl-7b",
        CheckpointDims(family="qwen2_5_vl", vision_depth=32, vision_hidden=1280, vision_heads=16,
                       vision_intermediate=3420, fullatt_block_indexes=(7, 15, 23, 31), window_size=112,
                       text_hidden=3584, text_layers=28, text_heads=28, text_kv_heads=4,
                       text_intermediate=18944, mrope_section=(16, 24, 24), tie_word_embeddings=False,
                       max_position_embeddings=128000, init_std=0.02,
                       min_pixels=REAL_MIN_PIXELS, max_pixels=REAL_MAX_PIXELS, seed=6),
        vocab_size=152064, hub_id="Qwen/Qwen2.5-VL-7B-Instruct", rms_norm_eps=1e-6, dtype="bfloat16"),
    # Qwen/Qwen3-VL-2B-Instruct: ViT 24 x 1024 (16 heads, tanh-GELU 4096, patch 16, 48 x 48 position
    # table, DeepStack from blocks 5/11/17), merger to 2048, LLM 28 x 2048 (16 heads, 8 KV heads,
    # head_dim 128, q/k norm, interleaved M-RoPE [24, 20, 20], rope_theta 5e6), tied embeddings.
    "qwen3-vl-2b": BenchModel(
        "qwen3-vl-2b",
        CheckpointDims(family="qwen3_vl", vision_depth=24, vision_hidden=1024, vision_heads=16,
                       vision_intermediate=4096, num_position_embeddings=2304, deepstack_visual_indexes=(5, 11, 17),
                       text_hidden=2048, text_layers=28, text_heads=16, text_kv_heads=8, text_head_dim=128,
                       text_intermediate=6144, mrope_section=(24, 20, 20), tie_word_embeddings=True,
                       max_position_embeddings=262144, init_std=0.02, min_pixels=QWEN3_MIN_PIXELS,
                       max_pixels=QWEN3_MAX_PIXELS, seed=4),
        vocab_size=151936, hub_id="Qwen/Qwen3-VL-2B-Instruct", rms_norm_eps=1e-6),
    # Qwen/Qwen3-VL-4B-Instruct: the same ViT, merger to 2560, LLM 36 x 2560 (32 heads, 8 KV heads,
    # head_dim 128, intermediate 9728), tied embeddings.
    "qwen3-vl-4b": BenchModel(
        "qwen3-vl-4b",
        CheckpointDims(family="qwen3_vl", vision_depth=24, vision_hidden=1024, vision_heads=16,
                       vision_intermediate=4096, num_position_embeddings=2304, deepstack_visual_indexes=(5, 11, 17),
                       text_hidden=2560, text_layers=36, text_heads=32, text_kv_heads=8, text_head_dim=128,
                       text_intermediate=9728, mrope_section=(24, 20, 20), tie_word_embeddings=True,
                       max_position_embeddings=262144, init_std=0.02, min_pixels=QWEN3_MIN_PIXELS,
                       max_pixels=QWEN3_MAX_PIXELS, seed=5),
        vocab_size=151936, hub_id="Qwen/Qwen3-VL-4B-Instruct", rms_norm_eps=1e-6),
    # The synthetic defaults (tiny Qwen2.5-VL): for smoke tests of the harness itself.
    "tiny": BenchModel("tiny", replace(CheckpointDims(), max_pixels=REAL_MAX_PIXELS)),
}


def cut_layers(dims: CheckpointDims, layers: int | None) -> CheckpointDims:
    """``dims`` with vision depth and LLM layers cut to ``layers`` (None keeps the full depth)."""
    if layers is None:
        return dims
    if layers < 1:
        raise QvlError(f"--layers must be at least 1, got {layers}.")
    if layers > max(dims.vision_depth, dims.text_layers):
        raise QvlError(f"--layers {layers} is deeper than the model ({dims.vision_depth} vision, "
                       f"{dims.text_layers} LLM layers); omit --layers for the full depth.")
    full = tuple(i for i in dims.fullatt_block_indexes if i < layers) or (layers - 1,)
    depth, text_layers = min(layers, dims.vision_depth), min(layers, dims.text_layers)
    deepstack = tuple(dict.fromkeys(i * depth // dims.vision_depth for i in dims.deepstack_visual_indexes))
    return replace(dims, vision_depth=depth, text_layers=text_layers, fullatt_block_indexes=full,
                   deepstack_visual_indexes=deepstack[:text_layers])


def bench_model(name: str, layers: int | None = None) -> BenchModel:
    """The named shape, cut to ``layers`` (see the module docstring)."""
    if name not in MODELS:
        raise QvlError(f"Unknown benchmark model {name!r}; use one of {', '.join(MODELS)}.")
    model = MODELS[name]
    return replace(model, dims=cut_layers(model.dims, layers))
