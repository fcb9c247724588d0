"""Load-time checks of a checkpoint, before anything is traced.

Each check reads only headers and small files (the safetensors headers, tokenizer.json) and raises
one ``QvlError`` line that names the first problem and counts the others, so a checkpoint whose
config.json and weights (or tokenizer) come from different models fails in seconds, not after a
long trace with a confusing error.

- ``expected_tensors(spec)``: every hub-layout tensor (``visual.*``, ``model.*``, ``lm_head.*``) the
  export modules read, with its exact shape, computed from the spec alone;
- ``check_weights(spec, weights)``: each is present, of that shape, and floating point;
- ``check_tokenizer(model_dir, spec)``: tokenizer.json loads, its vision special tokens have the
  ids config.json declares, the eos ids decode, and it fits the model's vocabulary.
"""

from __future__ import annotations

from pathlib import Path

from qvl_export.core.errors import QvlError
from qvl_export.core.spec import FAMILIES, ModelSpec, VisionSpec
from qvl_export.loading.weights import FLOAT_DTYPES, CheckpointWeights, dtype_unsupported, shape_mismatch

Shapes = dict[str, tuple[int, ...]]


def _linear(out: Shapes, name: str, n_out: int, n_in: int, bias: bool) -> None:
    out[f"{name}.weight"] = (n_out, n_in)
    if bias:
        out[f"{name}.bias"] = (n_out,)


def _norm(out: Shapes, name: str, v: VisionSpec, dim: int) -> None:
    out[f"{name}.weight"] = (dim,)
    if v.family != "qwen2_5_vl":  # LayerNorm; Qwen2.5-VL uses RMSNorm (no bias)
        out[f"{name}.bias"] = (dim,)


def _qwen3_vision(v: VisionSpec) -> Shapes:
    """Qwen3-VL: patch embedding with a bias, the learned position table, tanh-GELU MLPs named
    linear_fc1/2, the merger (LayerNorm over C) and one DeepStack merger per feature (LayerNorm over 4C)."""
    c, i = v.hidden_size, v.intermediate_size
    out: Shapes = {"visual.patch_embed.proj.weight": (c, v.in_channels, v.temporal_patch_size, v.patch_size,
                                                      v.patch_size),
                   "visual.patch_embed.proj.bias": (c,),
                   "visual.pos_embed.weight": (v.num_position_embeddings, c)}
    for b in range(v.depth):
        p = f"visual.blocks.{b}"
        _norm(out, f"{p}.norm1", v, c)
        _norm(out, f"{p}.norm2", v, c)
        _linear(out, f"{p}.attn.qkv", 3 * c, c, True)
        _linear(out, f"{p}.attn.proj", c, c, True)
        _linear(out, f"{p}.mlp.linear_fc1", i, c, True)
        _linear(out, f"{p}.mlp.linear_fc2", c, i, True)
    unit = c * v.merge_unit
    mergers = [("visual.merger", c)] + [(f"visual.deepstack_merger_list.{j}", unit) for j in range(v.deepstack)]
    for name, norm in mergers:
        _norm(out, f"{name}.norm", v, norm)
        _linear(out, f"{name}.linear_fc1", unit, unit, True)
        _linear(out, f"{name}.linear_fc2", v.out_hidden_size, unit, True)
    return out


def _vision(v: VisionSpec) -> Shapes:
    c, i = v.hidden_size, v.intermediate_size
    out: Shapes = {"visual.patch_embed.proj.weight": (c, v.in_channels, v.temporal_patch_size, v.patch_size,
                                                      v.patch_size)}  # Conv3d kernel, no bias
    for b in range(v.depth):
        p = f"visual.blocks.{b}"
        _norm(out, f"{p}.norm1", v, c)
        _norm(out, f"{p}.norm2", v, c)
        _linear(out, f"{p}.attn.qkv", 3 * c, c, True)
        _linear(out, f"{p}.attn.proj", c, c, True)
        if v.family == "qwen2_5_vl":  # SwiGLU
            _linear(out, f"{p}.mlp.gate_proj", i, c, True)
            _linear(out, f"{p}.mlp.up_proj", i, c, True)
            _linear(out, f"{p}.mlp.down_proj", c, i, True)
        else:
            _linear(out, f"{p}.mlp.fc1", i, c, True)
            _linear(out, f"{p}.mlp.fc2", c, i, True)
    unit = c * v.merge_unit
    _norm(out, "visual.merger.ln_q", v, c)
    _linear(out, "visual.merger.mlp.0", unit, unit, True)
    _linear(out, "visual.merger.mlp.2", v.out_hidden_size, unit, True)
    return out


def _text(spec: ModelSpec) -> Shapes:
    t = spec.text
    h, hd = t.hidden_size, t.head_dim
    out: Shapes = {"model.embed_tokens.weight": (t.vocab_size, h)}
    for n in range(t.num_hidden_layers):
        p = f"model.layers.{n}"
        out[f"{p}.input_layernorm.weight"] = (h,)
        out[f"{p}.post_attention_layernorm.weight"] = (h,)
        _linear(out, f"{p}.self_attn.q_proj", t.num_attention_heads * hd, h, t.qkv_bias)
        _linear(out, f"{p}.self_attn.k_proj", t.num_key_value_heads * hd, h, t.qkv_bias)
        _linear(out, f"{p}.self_attn.v_proj", t.num_key_value_heads * hd, h, t.qkv_bias)
        _linear(out, f"{p}.self_attn.o_proj", h, t.num_attention_heads * hd, t.o_proj_bias)
        if t.qk_norm:  # Qwen3: RMSNorm over each head of q and k
            out[f"{p}.self_attn.q_norm.weight"] = (hd,)
            out[f"{p}.self_attn.k_norm.weight"] = (hd,)
        _linear(out, f"{p}.mlp.gate_proj", t.intermediate_size, h, False)
        _linear(out, f"{p}.mlp.up_proj", t.intermediate_size, h, False)
        _linear(out, f"{p}.mlp.down_proj", h, t.intermediate_size, False)
    out["model.norm.weight"] = (h,)
    if not t.tie_word_embeddings:  # tied: the lm_head reads model.embed_tokens.weight
        out["lm_head.weight"] = (t.vocab_size, h)
    return out


def expected_tensors(spec: ModelSpec) -> Shapes:
    """Hub-layout name -> exact shape of every checkpoint tensor the vision, merger and decoder parts read.

    Shapes are as stored in the checkpoint (Linear weights [out, in], the patch embedding as its
    Conv3d kernel [C, in_channels, temporal_patch, patch, patch]). ``lm_head.weight`` is listed only
    when the embeddings are not tied.
    """
    if spec.vision.family not in FAMILIES:
        raise QvlError(f"Unknown model family {spec.vision.family!r}; qvl-export supports {', '.join(FAMILIES)}.")
    vision = _qwen3_vision(spec.vision) if spec.vision.family == "qwen3_vl" else _vision(spec.vision)
    return {**vision, **_text(spec)}


def _raise_first(problems: list[str]) -> None:
    if not problems:
        return
    more = len(problems) - 1
    tail = f" ({more} further problem{'s' if more > 1 else ''} found after this one.)" if more else ""
    raise QvlError(problems[0] + tail)


def weight_problems(spec: ModelSpec, weights: CheckpointWeights) -> list[str]:
    """One message per expected tensor that is missing, of another shape, or not floating point."""
    problems = []
    for name, shape in expected_tensors(spec).items():
        if name not in weights:
            hint = (" (config.json has tie_word_embeddings false, so the output projection is a separate tensor)"
                    if name == "lm_head.weight" else "")
            problems.append(f"Weight '{name}' is missing from the checkpoint in {weights.model_dir}{hint}; the "
                            "checkpoint is incomplete or not of the architecture config.json declares.")
            continue
        found = weights.shape(name)
        if found != shape:
            problems.append(shape_mismatch(name, shape, found))
        elif weights.dtype(name) not in FLOAT_DTYPES:
            problems.append(dtype_unsupported(name, weights.dtype(name)))
    return problems


def check_weights(spec: ModelSpec, weights: CheckpointWeights) -> None:
    """Every tensor the export reads is present, has the shape config.json implies, and is F32/F16/BF16.

    Reads only the safetensors headers. Raises one QvlError line: the first problem and a count of the rest.
    """
    _raise_first(weight_problems(spec, weights))


# special token -> TokenSpec field (config.json key of the same name)
VISION_TOKENS = (
    ("<|image_pad|>", "image_token_id"),
    ("<|video_pad|>", "video_token_id"),
    ("<|vision_start|>", "vision_start_token_id"),
    ("<|vision_end|>", "vision_end_token_id"),
)


def load_tokenizer(model_dir: Path):
    """``tokenizers.Tokenizer`` of ``model_dir/tokenizer.json``, or one QvlError line."""
    from tokenizers import Tokenizer

    path = Path(model_dir) / "tokenizer.json"
    if not path.exists():
        raise QvlError(f"{Path(model_dir)} has no tokenizer.json; copy it from the original checkpoint.")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception for malformed files
        reason = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        raise QvlError(f"{path} is corrupt or unreadable ({reason}); restore it from the original "
                       "checkpoint.") from None


def tokenizer_problems(tok, spec: ModelSpec) -> list[str]:
    """One message per disagreement between tokenizer ``tok`` and the spec (config.json)."""
    problems = []
    for token, key in VISION_TOKENS:
        want = getattr(spec.tokens, key)
        if want is None or want < 0:  # -1: config.json does not declare it
            continue
        got = tok.token_to_id(token)
        if got is None:
            problems.append(f"tokenizer.json has no {token} token but config.json sets {key}={want}; the "
                            "tokenizer is not this model's: copy tokenizer.json from the original checkpoint.")
        elif got != want:
            problems.append(f"tokenizer.json gives {token} id {got} but config.json sets {key}={want}; the "
                            "tokenizer and config.json come from different checkpoints: copy both from the "
                            "same original checkpoint.")
    vocab = spec.text.vocab_size
    for eos in spec.tokens.eos_token_ids:
        if not 0 <= eos < vocab:
            problems.append(f"eos token id {eos} (generation_config.json / config.json) is outside the model's "
                            f"vocabulary of {vocab}; fix eos_token_id to this model's end-of-turn token.")
        elif tok.id_to_token(eos) is None:
            problems.append(f"eos token id {eos} (generation_config.json / config.json) is not a token of "
                            "tokenizer.json; the tokenizer and config come from different checkpoints.")
    size = tok.get_vocab_size(with_added_tokens=True)
    if size > vocab:
        problems.append(f"tokenizer.json has {size} tokens but config.json's vocab_size is {vocab}; ids past "
                        f"{vocab - 1} have no embedding: the tokenizer is not this model's.")
    return problems


def check_tokenizer(model_dir: Path, spec: ModelSpec):
    """tokenizer.json loads and agrees with config.json; returns the ``tokenizers.Tokenizer``.

    Raises one QvlError line: the first problem and a count of the rest.
    """
    tok = load_tokenizer(model_dir)
    _raise_first(tokenizer_problems(tok, spec))
    return tok


def check_checkpoint(model_dir: Path, spec: ModelSpec, weights: CheckpointWeights) -> None:
    """``check_weights`` then ``check_tokenizer``: everything the build reads, before it traces."""
    check_weights(spec, weights)
    check_tokenizer(model_dir, spec)
