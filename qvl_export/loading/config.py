"""Parse a Qwen2-VL family checkpoint's config files into plain, serialisable specs.

Pure Python (json only): the thin runtime reads the same specs back from ``manifest.json``.

Two config.json layouts exist in the wild and both are accepted:
- the hub layout of Qwen2-VL / Qwen2.5-VL (text fields at the top level, ``rope_scaling`` with
  ``mrope_section``, vision ``in_chans`` / ``embed_dim``);
- the transformers 5.x layout (``text_config`` / ``vision_config`` sub-dicts, ``rope_parameters``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qvl_export.errors import QvlError

ARCHITECTURES = {
    "Qwen2VLForConditionalGeneration": "qwen2_vl",
    "Qwen2_5_VLForConditionalGeneration": "qwen2_5_vl",
}
SUPPORTED = ", ".join(sorted(ARCHITECTURES))

# OpenAI CLIP statistics: the Qwen2-VL processors' defaults.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class VisionSpec:
    family: str  # "qwen2_vl" (LayerNorm + QuickGELU MLP) or "qwen2_5_vl" (RMSNorm + SwiGLU, windows)
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

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

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

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


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

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelSpec":
        def tup(x):
            return tuple(x) if isinstance(x, list) else x

        def build(klass, values):
            return klass(**{k: tup(v) for k, v in values.items()})

        return cls(
            architecture=d["architecture"],
            family=d["family"],
            vision=build(VisionSpec, d["vision"]),
            text=build(TextSpec, d["text"]),
            tokens=build(TokenSpec, d["tokens"]),
            preprocess=build(PreprocessSpec, d["preprocess"]),
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


def _need(d: dict, key: str, where: str):
    if key not in d or d[key] is None:
        raise QvlError(f"config.json has no '{key}' in {where}; is this a complete Qwen2-VL family config?")
    return d[key]


def _eos_ids(model_dir: Path, text: dict, top: dict) -> tuple[int, ...]:
    ids: list[int] = []
    gen = model_dir / "generation_config.json"
    for source in ([read_json(gen, "generation config")] if gen.exists() else []) + [text, top]:
        value = source.get("eos_token_id")
        if value is None:
            continue
        for v in value if isinstance(value, list) else [value]:
            if int(v) not in ids:
                ids.append(int(v))
        if ids:
            break
    return tuple(ids)


def parse_model_config(model_dir: Path) -> ModelSpec:
    """Read config.json (+ generation_config.json, preprocessor_config.json) of a local checkpoint."""
    top = read_json(model_dir / "config.json", "the model config")
    archs = top.get("architectures") or []
    arch = next((a for a in archs if a in ARCHITECTURES), None)
    if arch is None:
        found = ", ".join(archs) if archs else f"model_type={top.get('model_type')!r}"
        raise QvlError(f"Unsupported architecture {found}; qvl-export supports {SUPPORTED}.")
    family = ARCHITECTURES[arch]

    text = dict(top.get("text_config") or {})
    for k, v in top.items():  # hub layout keeps the text fields at the top level
        if k not in ("text_config", "vision_config") and k not in text:
            text[k] = v
    vis = dict(_need(top, "vision_config", "the top level"))

    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    section = rope.get("mrope_section")
    if section is None or len(section) != 3:
        raise QvlError("config.json has no 3-part 'mrope_section' in rope_scaling/rope_parameters; "
                       "Qwen2-VL family checkpoints need it.")
    rope_theta = float(rope.get("rope_theta", text.get("rope_theta", 1000000.0)))
    hidden = int(_need(text, "hidden_size", "the text config"))
    heads = int(_need(text, "num_attention_heads", "the text config"))
    if hidden % heads or sum(section) * 2 != hidden // heads:
        raise QvlError(f"mrope_section {list(section)} must sum to head_dim/2 = {hidden // heads // 2}; "
                       "the config is inconsistent.")
    tie = bool(top.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))
    text_spec = TextSpec(
        vocab_size=int(_need(text, "vocab_size", "the text config")),
        hidden_size=hidden,
        intermediate_size=int(_need(text, "intermediate_size", "the text config")),
        num_hidden_layers=int(_need(text, "num_hidden_layers", "the text config")),
        num_attention_heads=heads,
        num_key_value_heads=int(text.get("num_key_value_heads") or heads),
        rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        mrope_section=tuple(int(s) for s in section),
        max_position_embeddings=int(text.get("max_position_embeddings", 32768)),
        tie_word_embeddings=tie,
        hidden_act=str(text.get("hidden_act", "silu")),
    )

    vis_rope = vis.get("rope_parameters") or {}
    common = dict(
        family=family,
        depth=int(_need(vis, "depth", "vision_config")),
        num_heads=int(_need(vis, "num_heads", "vision_config")),
        patch_size=int(vis.get("patch_size", vis.get("spatial_patch_size", 14))),
        temporal_patch_size=int(vis.get("temporal_patch_size", 2)),
        spatial_merge_size=int(vis.get("spatial_merge_size", 2)),
        in_channels=int(vis.get("in_channels", vis.get("in_chans", 3))),
        rope_theta=float(vis_rope.get("rope_theta", 10000.0)),
    )
    if family == "qwen2_vl":
        embed = int(vis.get("embed_dim", 1280))
        vision = VisionSpec(
            hidden_size=embed,
            intermediate_size=int(embed * float(vis.get("mlp_ratio", 4))),
            hidden_act=str(vis.get("hidden_act", "quick_gelu")),
            out_hidden_size=int(vis.get("hidden_size", hidden)),
            **common,
        )
    else:
        vision = VisionSpec(
            hidden_size=int(_need(vis, "hidden_size", "vision_config")),
            intermediate_size=int(_need(vis, "intermediate_size", "vision_config")),
            hidden_act=str(vis.get("hidden_act", "silu")),
            out_hidden_size=int(vis.get("out_hidden_size", hidden)),
            window_size=int(vis.get("window_size", 112)),
            fullatt_block_indexes=tuple(int(i) for i in vis.get("fullatt_block_indexes", ())),
            **common,
        )
    if vision.hidden_size % vision.num_heads or vision.head_dim % 4:
        raise QvlError("vision hidden_size / num_heads must give a head_dim divisible by 4 for 2-D rotary.")
    if vision.out_hidden_size != hidden:
        raise QvlError(f"vision merger width {vision.out_hidden_size} differs from the LLM width {hidden}.")

    tokens = TokenSpec(
        image_token_id=int(_need(top, "image_token_id", "the top level")),
        video_token_id=int(top.get("video_token_id", -1)),
        vision_start_token_id=int(_need(top, "vision_start_token_id", "the top level")),
        vision_end_token_id=int(top.get("vision_end_token_id", -1)),
        eos_token_ids=_eos_ids(model_dir, text, top),
        pad_token_id=text.get("pad_token_id"),
    )
    return ModelSpec(arch, family, vision, text_spec, tokens, parse_preprocessor(model_dir, vision))


def parse_preprocessor(model_dir: Path, vision: VisionSpec) -> PreprocessSpec:
    path = model_dir / "preprocessor_config.json"
    if not path.exists():
        return PreprocessSpec()
    pp = read_json(path, "the preprocessor config")
    size = pp.get("size") or {}
    for key, want in (("patch_size", vision.patch_size), ("merge_size", vision.spatial_merge_size),
                      ("temporal_patch_size", vision.temporal_patch_size)):
        if key in pp and int(pp[key]) != want:
            raise QvlError(f"preprocessor_config.json {key}={pp[key]} disagrees with config.json ({want}).")
    default = PreprocessSpec()
    return PreprocessSpec(
        min_pixels=int(pp.get("min_pixels") or size.get("shortest_edge") or size.get("min_pixels")
                       or default.min_pixels),
        max_pixels=int(pp.get("max_pixels") or size.get("longest_edge") or size.get("max_pixels")
                       or default.max_pixels),
        image_mean=tuple(float(x) for x in pp.get("image_mean", default.image_mean)),
        image_std=tuple(float(x) for x in pp.get("image_std", default.image_std)),
        rescale_factor=float(pp.get("rescale_factor", default.rescale_factor)),
    )
