"""The model spec: plain, serialisable dataclasses for what a checkpoint states.

Pure Python (json only). ``loading`` parses a checkpoint's config files into these; the manifest
stores them and the thin runtime reads them back. Nothing here imports anything but the standard
library and ``core.errors``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qvl_export.core.errors import QvlError

_FIX = {
    "temperature": "use a number >= 0 (1.0 leaves the logits unchanged)",
    "top_p": "use a number in (0, 1] (1.0 turns nucleus filtering off)",
    "top_k": "use a whole number >= 0 (0 turns top-k filtering off)",
    "repetition_penalty": "use a number > 0 (1.0 means no penalty)",
    "do_sample": "use true or false",
    "max_new_tokens": "use a whole number >= 1 or remove the key",
    "eos_token_id": "use a token id (a whole number >= 0) or a list of them",
}


@dataclass(frozen=True)
class GenerationSpec:
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0
    eos_token_ids: tuple[int, ...] = ()
    max_new_tokens: int | None = None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GenerationSpec:
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        if "eos_token_ids" in kw:
            kw["eos_token_ids"] = tuple(int(v) for v in kw["eos_token_ids"])
        return cls(**kw)


def check_value(key: str, value: Any, where: str) -> Any:
    """Validate one generation setting and return it normalised (floats as float, ints as int).

    ``where`` names the source for the error message (a file path, or e.g. "the --temperature option").
    Raises QvlError (one line: the source, the key, the value and what to do) for a bad value.
    """
    ok = True
    out = value
    is_num = isinstance(value, (int, float)) and not isinstance(value, bool)
    if key in ("temperature", "top_p", "repetition_penalty"):
        ok = is_num and math.isfinite(value)
        if ok:
            out = float(value)
            ok = {"temperature": out >= 0, "top_p": 0 < out <= 1, "repetition_penalty": out > 0}[key]
    elif key == "top_k":
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
    elif key == "max_new_tokens":
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
    elif key == "do_sample":
        ok = isinstance(value, bool)
    else:
        raise ValueError(f"unknown generation setting {key!r}")
    if not ok:
        raise QvlError(f"{where}: {key}={value!r} is not valid; {_FIX[key]}.")
    return out



# OpenAI CLIP statistics: the Qwen2-VL processors' defaults.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


@dataclass(frozen=True)
class VisionSpec:
    # "qwen2_vl" (LayerNorm + QuickGELU MLP), "qwen2_5_vl" (RMSNorm + SwiGLU, windows) or "qwen3_vl"
    # (LayerNorm + tanh-GELU MLP, patch bias, learned position table, DeepStack mergers)
    family: str
    depth: int
    hidden_size: int  # ViT width (C)
    num_heads: int
    intermediate_size: int
    hidden_act: str
    out_hidden_size: int  # merger output = LLM width
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    window_size: int = 112  # pixels; Qwen2.5-VL only
    fullatt_block_indexes: tuple[int, ...] = ()
    rope_theta: float = 10000.0
    # Qwen3-VL: the learned position table (side x side entries, interpolated per grid) and the ViT
    # layers whose outputs feed the DeepStack mergers (their features join the LLM's first layers)
    num_position_embeddings: int = 0
    deepstack_visual_indexes: tuple[int, ...] = ()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def position_side(self) -> int:
        """Side of the square learned position table (48 for 2304 entries); 0 without one."""
        return int(self.num_position_embeddings ** 0.5) if self.num_position_embeddings else 0

    @property
    def deepstack(self) -> int:
        """Number of DeepStack features (L of ``deepstack_hidden [L, S, C]``); 0 for Qwen2(.5)-VL."""
        return len(self.deepstack_visual_indexes)

    @property
    def patch_dim(self) -> int:
        """Values per patch: channels x temporal x patch x patch (1176 for the real models)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size**2

    @property
    def windowed(self) -> bool:
        return self.family == "qwen2_5_vl"

    @property
    def window_units(self) -> int:
        """Merged units per window side (112 px / 14 / 2 = 4)."""
        return self.window_size // self.spatial_merge_size // self.patch_size

    @property
    def window_tokens(self) -> int:
        """Patch tokens in a full window (4 x 4 merged units x 4 = 64)."""
        return self.window_units**2 * self.merge_unit

    def is_full_attention(self, layer: int) -> bool:
        return not self.windowed or layer in self.fullatt_block_indexes


@dataclass(frozen=True)
class TextSpec:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rms_norm_eps: float
    rope_theta: float
    mrope_section: tuple[int, int, int]
    max_position_embeddings: int
    tie_word_embeddings: bool
    hidden_act: str = "silu"
    # Qwen3 text: head_dim stated by the config (128 at every width, not hidden / heads), RMSNorm on each
    # head of q and k, no attention biases, M-RoPE sections interleaved over the frequencies
    head_dim_config: int | None = None
    qkv_bias: bool = True
    o_proj_bias: bool = False
    qk_norm: bool = False
    mrope_interleaved: bool = False

    @property
    def head_dim(self) -> int:
        return self.head_dim_config or self.hidden_size // self.num_attention_heads


@dataclass(frozen=True)
class TokenSpec:
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None


@dataclass(frozen=True)
class PreprocessSpec:
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    rescale_factor: float = 1 / 255


@dataclass(frozen=True)
class ModelSpec:
    architecture: str
    family: str
    vision: VisionSpec
    text: TextSpec
    tokens: TokenSpec
    preprocess: PreprocessSpec = field(default_factory=PreprocessSpec)
    generation: GenerationSpec = field(default_factory=GenerationSpec)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelSpec":
        """Read back ``to_dict`` output; unknown keys are ignored, a missing required key is named."""
        def tup(x):
            return tuple(x) if isinstance(x, list) else x

        def build(klass, key):
            values = d.get(key)
            if not isinstance(values, dict):
                raise QvlError(f"the model spec has no '{key}' section; rebuild the artifacts.")
            known = {f.name: f for f in dataclasses.fields(klass)}
            for name, f in known.items():
                if name not in values and f.default is dataclasses.MISSING \
                        and f.default_factory is dataclasses.MISSING:
                    raise QvlError(f"the model spec has no '{key}.{name}'; rebuild the artifacts.")
            return klass(**{k: tup(v) for k, v in values.items() if k in known})

        for key in ("architecture", "family"):
            if not isinstance(d.get(key), str):
                raise QvlError(f"the model spec has no '{key}'; rebuild the artifacts.")
        generation = d.get("generation")
        return cls(
            architecture=d["architecture"],
            family=d["family"],
            vision=build(VisionSpec, "vision"),
            text=build(TextSpec, "text"),
            tokens=build(TokenSpec, "tokens"),
            preprocess=build(PreprocessSpec, "preprocess"),
            generation=GenerationSpec.from_dict(generation) if isinstance(generation, dict) else GenerationSpec(),
        )


def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise QvlError(f"{path} is missing: {what} is required.") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise QvlError(f"{path} is not valid JSON ({err}); restore it from the original checkpoint.") from None
    if not isinstance(data, dict):
        raise QvlError(f"{path} must hold a JSON object; restore it from the original checkpoint.")
    return data
