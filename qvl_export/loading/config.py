"""Parse a Qwen2-VL family checkpoint's config files into the specs of ``core.spec``.

Two config.json layouts exist in the wild and both are accepted:
- the hub layout of Qwen2-VL / Qwen2.5-VL (text fields at the top level, ``rope_scaling`` with
  ``mrope_section``, vision ``in_chans`` / ``embed_dim``);
- the transformers 5.x layout (``text_config`` / ``vision_config`` sub-dicts, ``rope_parameters``).
Qwen3-VL (dense) nests both sub-configs and spells its rope settings either way (the hub's
``rope_scaling`` + ``rope_theta``, or transformers 5.x's ``rope_parameters``); its MoE variant is
refused in one line.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from qvl_export.core.errors import QvlError
from qvl_export.core.spec import ModelSpec, PreprocessSpec, TextSpec, TokenSpec, VisionSpec, read_json
from qvl_export.loading.generation import parse_generation_config

ARCHITECTURES = {
    "Qwen2VLForConditionalGeneration": "qwen2_vl",
    "Qwen2_5_VLForConditionalGeneration": "qwen2_5_vl",
    "Qwen3VLForConditionalGeneration": "qwen3_vl",
}
SUPPORTED = ", ".join(sorted(ARCHITECTURES))
# known but not supported yet: refused with a sentence of their own
NOT_YET = {
    "Qwen3VLMoeForConditionalGeneration": "Qwen3-VL MoE (model_type qwen3_vl_moe: 30B-A3B, 235B-A22B) is not "
                                          "supported yet; the dense Qwen3-VL checkpoints (2B, 4B, 8B, 32B) are.",
}


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


def parse_model_config(model_dir: Path, assume_default_preprocessing: bool = False) -> ModelSpec:
    """Read config.json (+ generation_config.json, preprocessor_config.json) of a local checkpoint."""
    top = read_json(model_dir / "config.json", "the model config")
    archs = top.get("architectures") or []
    arch = next((a for a in archs if a in ARCHITECTURES), None)
    refused = next((a for a in archs if a in NOT_YET), None)
    if refused is None and top.get("model_type") == "qwen3_vl_moe":
        refused = "Qwen3VLMoeForConditionalGeneration"
    if refused is not None:
        raise QvlError(f"{NOT_YET[refused]} ({model_dir / 'config.json'}).")
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
    qwen3 = family == "qwen3_vl"
    head_dim = int(text.get("head_dim") or 0) if qwen3 else 0  # Qwen3 states it (128 at every width)
    if not head_dim and hidden % heads:
        raise QvlError(f"hidden_size {hidden} is not a multiple of num_attention_heads {heads}; the config is "
                       "inconsistent.")
    head_dim = head_dim or hidden // heads
    if sum(section) * 2 != head_dim:
        raise QvlError(f"mrope_section {list(section)} must sum to head_dim/2 = {head_dim // 2}; "
                       "the config is inconsistent.")
    tie = bool(top.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))
    # Qwen3: attention_bias covers q/k/v/o (false in every release); Qwen2: q/k/v biased, o not
    bias = bool(text.get("attention_bias", False)) if qwen3 else None
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
        **(dict(head_dim_config=head_dim, qkv_bias=bias, o_proj_bias=bias, qk_norm=True,
                # transformers' Qwen3VLTextRotaryEmbedding interleaves the sections whatever
                # rope_scaling's mrope_interleaved says (recomposition_frequencies)
                mrope_interleaved=True) if qwen3 else {}),
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
    elif family == "qwen2_5_vl":
        vision = VisionSpec(
            hidden_size=int(_need(vis, "hidden_size", "vision_config")),
            intermediate_size=int(_need(vis, "intermediate_size", "vision_config")),
            hidden_act=str(vis.get("hidden_act", "silu")),
            out_hidden_size=int(vis.get("out_hidden_size", hidden)),
            window_size=int(vis.get("window_size", 112)),
            fullatt_block_indexes=tuple(int(i) for i in vis.get("fullatt_block_indexes", ())),
            **common,
        )
    else:
        common["patch_size"] = int(vis.get("patch_size", 16))
        vision = VisionSpec(
            hidden_size=int(_need(vis, "hidden_size", "vision_config")),
            intermediate_size=int(_need(vis, "intermediate_size", "vision_config")),
            hidden_act=str(vis.get("hidden_act", "gelu_pytorch_tanh")),
            out_hidden_size=int(vis.get("out_hidden_size", hidden)),
            num_position_embeddings=int(_need(vis, "num_position_embeddings", "vision_config")),
            deepstack_visual_indexes=tuple(int(i) for i in vis.get("deepstack_visual_indexes", ())),
            **common,
        )
        if vision.position_side < 2:
            raise QvlError(f"vision_config num_position_embeddings={vision.num_position_embeddings} gives a position "
                           "table of side < 2; the config is inconsistent.")
        bad = [i for i in vision.deepstack_visual_indexes if not 0 <= i < vision.depth]
        if bad or len(set(vision.deepstack_visual_indexes)) != vision.deepstack:
            raise QvlError(f"vision_config deepstack_visual_indexes {list(vision.deepstack_visual_indexes)} must be "
                           f"distinct layers of the {vision.depth}-layer vision tower; the config is inconsistent.")
        if vision.deepstack > text_spec.num_hidden_layers:
            raise QvlError(f"{vision.deepstack} DeepStack features for {text_spec.num_hidden_layers} LLM layers; "
                           "the config is inconsistent.")
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
    preprocess = parse_preprocessor(model_dir, vision, assume_default=assume_default_preprocessing)
    generation = parse_generation_config(model_dir, tokens.eos_token_ids)
    if generation.eos_token_ids and generation.eos_token_ids != tokens.eos_token_ids:
        tokens = dataclasses.replace(tokens, eos_token_ids=generation.eos_token_ids)
    return ModelSpec(arch, family, vision, text_spec, tokens, preprocess, generation)


_DEFAULT_NAMES = {"qwen2_vl": "Qwen2-VL", "qwen2_5_vl": "Qwen2-VL", "qwen3_vl": "Qwen3-VL"}


def default_preprocess(family: str) -> PreprocessSpec:
    """What ``--assume-default-preprocessing`` assumes: transformers' Qwen2-VL image processor defaults,
    or for Qwen3-VL the settings its released checkpoints state (mean/std 0.5, 256..16384 merged tokens)."""
    if family == "qwen3_vl":
        return PreprocessSpec(min_pixels=65536, max_pixels=16777216, image_mean=(0.5, 0.5, 0.5),
                              image_std=(0.5, 0.5, 0.5))
    return PreprocessSpec()


def parse_preprocessor(model_dir: Path, vision: VisionSpec, assume_default: bool = False) -> PreprocessSpec:
    """preprocessor_config.json -> PreprocessSpec, resolved as transformers' Qwen2VLImageProcessor does.

    min/max pixels: the top-level ``min_pixels`` / ``max_pixels`` win over ``size.shortest_edge`` /
    ``size.longest_edge`` (transformers 5.x); ``size.min_pixels`` / ``size.max_pixels`` (the layout
    transformers 4.45 wrote) are read last. Without a ``size`` dict a missing value is the
    processor's default; a ``size`` dict that gives only one bound is refused, as transformers
    refuses it when preprocessing. A missing file is an error unless ``assume_default``.
    """
    path = model_dir / "preprocessor_config.json"
    default = default_preprocess(vision.family)
    if not path.exists():
        if assume_default:
            return default
        raise QvlError(
            f"{model_dir} has no preprocessor_config.json: the image pre-processing settings (min/max pixels, "
            "mean/std) are part of the model; copy it from the original checkpoint, or pass "
            f"--assume-default-preprocessing to use {_DEFAULT_NAMES[vision.family]}'s defaults (min_pixels "
            f"{default.min_pixels}, max_pixels {default.max_pixels}, OpenAI CLIP mean "
            f"{list(default.image_mean)} / std {list(default.image_std)}, rescale 1/"
            f"{round(1 / default.rescale_factor)}).")
    pp = read_json(path, "the preprocessor config")
    size = pp.get("size")
    if size is not None and not isinstance(size, dict):
        raise QvlError(f"preprocessor_config.json 'size' must be an object with shortest_edge / longest_edge "
                       f"(pixel counts), not {size!r}; restore it from the original checkpoint.")
    for key, want in (("patch_size", vision.patch_size), ("merge_size", vision.spatial_merge_size),
                      ("temporal_patch_size", vision.temporal_patch_size)):
        if key in pp and int(pp[key]) != want:
            raise QvlError(f"preprocessor_config.json {key}={pp[key]} disagrees with config.json ({want}).")

    def pixels(top: str, edge: str, fallback: int) -> int:
        for where, d, key in (("", pp, top), ("size.", size or {}, edge), ("size.", size or {}, top)):
            if d.get(key) is not None:
                value, name = d[key], where + key
                break
        else:
            if size is not None:  # transformers: "size dict must contain 'shortest_edge' and 'longest_edge'"
                raise QvlError(f"preprocessor_config.json has a 'size' without {edge} and no top-level {top}; "
                               "transformers' Qwen2VLImageProcessor refuses it: restore the file from the "
                               "original checkpoint.")
            return fallback
        try:
            n = int(value)
        except (TypeError, ValueError):
            n = 0
        if n <= 0 or n != value:
            raise QvlError(f"preprocessor_config.json {name}={value!r} must be a positive whole number of pixels.")
        return n

    lo = pixels("min_pixels", "shortest_edge", default.min_pixels)
    hi = pixels("max_pixels", "longest_edge", default.max_pixels)
    if lo > hi:
        raise QvlError(f"preprocessor_config.json min_pixels {lo} is larger than max_pixels {hi}; "
                       "restore the file from the original checkpoint.")

    def triple(key: str, fallback: tuple[float, ...], positive: bool) -> tuple[float, ...]:
        value = pp.get(key)
        if value is None:
            return fallback
        values = value if isinstance(value, (list, tuple)) else [value] * vision.in_channels
        try:
            out = tuple(float(x) for x in values)
        except (TypeError, ValueError):
            out = ()
        if len(out) != vision.in_channels or (positive and min(out) <= 0):
            need = "positive numbers" if positive else "numbers"
            raise QvlError(f"preprocessor_config.json {key}={value!r} must be {vision.in_channels} {need}, "
                           "one per channel.")
        return out

    rescale = pp.get("rescale_factor", default.rescale_factor)
    if not isinstance(rescale, (int, float)) or isinstance(rescale, bool) or rescale <= 0:
        raise QvlError(f"preprocessor_config.json rescale_factor={rescale!r} must be a positive number.")
    return PreprocessSpec(
        min_pixels=lo,
        max_pixels=hi,
        image_mean=triple("image_mean", default.image_mean, False),
        image_std=triple("image_std", default.image_std, True),
        rescale_factor=float(rescale),
    )
