"""Load-time validation: weights table vs transformers, damaged weights / tokenizer / preprocessor config."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest

from qvl_export.core.errors import QvlError
from qvl_export.core.spec import PreprocessSpec
from qvl_export.loading.config import parse_model_config, parse_preprocessor
from qvl_export.loading.validate import (
    check_checkpoint,
    check_tokenizer,
    check_weights,
    expected_tensors,
    load_tokenizer,
    tokenizer_problems,
)
from qvl_export.loading.weights import CheckpointWeights, flattens_to, load_plan, normalise_name

FAMILIES = ("qwen2_vl", "qwen2_5_vl")


@pytest.fixture()
def copy(tmp_path, checkpoint):
    """copy(family) -> a private copy of the tiny checkpoint, free to damage."""
    def make(family: str = "qwen2_5_vl"):
        dst = tmp_path / f"ckpt-{family}"
        shutil.copytree(checkpoint(family), dst)
        return dst

    return make


def one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


def rewrite_weights(ckpt, change) -> None:
    """Load model.safetensors, let ``change(tensors)`` edit the dict, save it back."""
    from safetensors.torch import load_file, save_file

    path = ckpt / "model.safetensors"
    tensors = load_file(str(path))
    change(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


def set_tied(ckpt, tied: bool) -> None:
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["tie_word_embeddings"] = tied
    cfg.setdefault("text_config", {})["tie_word_embeddings"] = tied
    (ckpt / "config.json").write_text(json.dumps(cfg))


# ------------------------------------------------------------------------------------ weights table

@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("family", FAMILIES)
def test_expected_tensors_equal_transformers_state_dict(copy, family, tied):
    """The table computed from the spec is exactly transformers' parameters (hub names, shapes)."""
    import torch
    import transformers

    ckpt = copy(family)
    set_tied(ckpt, tied)
    spec = parse_model_config(ckpt)
    assert spec.text.tie_word_embeddings is tied
    config = transformers.AutoConfig.from_pretrained(ckpt)
    torch.manual_seed(0)
    model = getattr(transformers, spec.architecture)._from_config(config)
    state = model.state_dict()
    real = {normalise_name(k): tuple(v.shape) for k, v in state.items()}
    if tied:  # transformers lists the tied head; it is the embedding table, which the table names once
        head = next(v for k, v in state.items() if normalise_name(k) == "lm_head.weight")
        embed = next(v for k, v in state.items() if normalise_name(k) == "model.embed_tokens.weight")
        assert head.data_ptr() == embed.data_ptr()
        del real["lm_head.weight"]
    assert expected_tensors(spec) == real


@pytest.mark.parametrize("family", FAMILIES)
def test_expected_tensors_are_what_the_export_modules_read(checkpoint, family):
    """Every parameter the vision / merger / decoder modules load comes from a table entry, and back."""
    from qvl_export.models.decoder import Decoder
    from qvl_export.models.vision import Merger, VisionEncoder

    spec = parse_model_config(checkpoint(family))
    table = expected_tensors(spec)
    vision, merger, decoder = VisionEncoder(spec.vision), Merger(spec.vision), Decoder(spec.text, 0)
    plans = (load_plan(vision, "visual.", vision.weight_aliases())
             + load_plan(merger, "visual.merger.")
             + load_plan(decoder, "model.", decoder.weight_aliases(), decoder.transposed_weights()))
    read = {source: shape for _, source, shape in plans}
    assert set(read) == set(table)
    for source, shape in read.items():
        assert table[source] == shape or flattens_to(table[source], shape), source
    assert len(table["visual.patch_embed.proj.weight"]) == 5  # the Conv3d kernel, as stored


@pytest.mark.parametrize("family", FAMILIES)
def test_good_checkpoints_pass(checkpoint, family):
    ckpt = checkpoint(family)
    spec, weights = parse_model_config(ckpt), CheckpointWeights(ckpt)
    check_checkpoint(ckpt, spec, weights)
    assert spec.text.tie_word_embeddings == ("lm_head.weight" not in weights)  # the tied one saves no head
    name = "model.layers.0.mlp.down_proj.weight"
    assert weights.shape(name) == (spec.text.hidden_size, spec.text.intermediate_size)
    assert weights.dtype(name) == "F32"


def test_shape_and_dtype_of_a_missing_name(checkpoint):
    weights = CheckpointWeights(checkpoint("qwen2_5_vl"))
    for read in (weights.shape, weights.dtype):
        with pytest.raises(QvlError, match="visual.nothing"):
            read("visual.nothing")


# ----------------------------------------------------------------------------------- damaged weights

def test_transposed_down_proj(copy):
    """[I, H] where [H, I] belongs: same element count, so it used to be silently reshaped."""
    from qvl_export.export.parts import decoder_part

    ckpt = copy("qwen2_5_vl")
    name = "model.layers.0.mlp.down_proj.weight"
    rewrite_weights(ckpt, lambda t: t.__setitem__(name, t[name].t()))
    spec, weights = parse_model_config(ckpt), CheckpointWeights(ckpt)
    h, i = spec.text.hidden_size, spec.text.intermediate_size
    assert weights.shape(name) == (i, h)
    with pytest.raises(QvlError) as err:
        check_weights(spec, weights)
    text = one_line(err)
    assert name in text and str((h, i)) in text and str((i, h)) in text
    assert "transposed" in text and "config.json" in text
    with pytest.raises(QvlError) as err:  # the module loader refuses it too (nothing is reshaped)
        decoder_part(spec, weights).build()
    text = one_line(err)
    assert name in text and str((h, i)) in text and str((i, h)) in text and "transposed" in text


def test_wrong_size_tensor_is_named_with_both_shapes(copy):
    ckpt = copy("qwen2_vl")
    name = "visual.blocks.1.attn.qkv.weight"
    rewrite_weights(ckpt, lambda t: t.__setitem__(name, t[name][:-3]))
    spec, weights = parse_model_config(ckpt), CheckpointWeights(ckpt)
    c = spec.vision.hidden_size
    with pytest.raises(QvlError) as err:
        check_weights(spec, weights)
    text = one_line(err)
    assert name in text and str((3 * c, c)) in text and str((3 * c - 3, c)) in text


def test_missing_tensors_first_named_and_rest_counted(copy):
    ckpt = copy("qwen2_5_vl")
    gone = ("visual.blocks.1.attn.qkv.bias", "model.layers.2.self_attn.k_proj.weight")
    rewrite_weights(ckpt, lambda t: [t.pop(n) for n in gone])
    spec, weights = parse_model_config(ckpt), CheckpointWeights(ckpt)
    with pytest.raises(QvlError) as err:
        check_weights(spec, weights)
    text = one_line(err)
    assert gone[0] in text and "missing" in text and "1 further problem" in text


def test_untied_checkpoint_without_lm_head(copy):
    ckpt = copy("qwen2_5_vl")
    rewrite_weights(ckpt, lambda t: t.pop("lm_head.weight"))
    spec, weights = parse_model_config(ckpt), CheckpointWeights(ckpt)
    with pytest.raises(QvlError) as err:
        check_weights(spec, weights)
    text = one_line(err)
    assert "lm_head.weight" in text and "tie_word_embeddings" in text and "further" not in text


def test_int32_tensor(copy):
    import torch

    from qvl_export.export.parts import decoder_part

    ckpt = copy("qwen2_5_vl")
    name = "model.norm.weight"
    rewrite_weights(ckpt, lambda t: t.__setitem__(name, torch.ones_like(t[name], dtype=torch.int32)))
    spec, weights = parse_model_config(ckpt), CheckpointWeights(ckpt)
    assert weights.dtype(name) == "I32"
    for run in (lambda: check_weights(spec, weights), lambda: decoder_part(spec, weights).build()):
        with pytest.raises(QvlError) as err:
            run()
        text = one_line(err)
        assert name in text and "I32" in text and "F32/F16/BF16" in text


def test_bf16_and_f16_weights_are_accepted(copy):
    import torch

    ckpt = copy("qwen2_vl")
    rewrite_weights(ckpt, lambda t: t.update({k: v.to(torch.bfloat16 if i % 2 else torch.float16)
                                              for i, (k, v) in enumerate(t.items())}))
    spec, weights = parse_model_config(ckpt), CheckpointWeights(ckpt)
    check_weights(spec, weights)


# ---------------------------------------------------------------------------------------- tokenizer

def test_corrupt_tokenizer(copy):
    ckpt = copy("qwen2_5_vl")
    path = ckpt / "tokenizer.json"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    spec = parse_model_config(ckpt)
    with pytest.raises(QvlError) as err:
        check_tokenizer(ckpt, spec)
    text = one_line(err)
    assert "tokenizer.json" in text and "restore it from the original checkpoint" in text


def test_missing_tokenizer(copy):
    ckpt = copy("qwen2_5_vl")
    (ckpt / "tokenizer.json").unlink()
    with pytest.raises(QvlError, match="no tokenizer.json"):
        check_tokenizer(ckpt, parse_model_config(ckpt))


def test_image_pad_id_differs_from_config(copy):
    """A tokenizer from another model: <|image_pad|> and <|video_pad|> swapped."""
    ckpt = copy("qwen2_5_vl")
    spec = parse_model_config(ckpt)
    raw = json.loads((ckpt / "tokenizer.json").read_text())
    # tokenizers numbers added tokens that are not in the model vocabulary in list order (the "id"
    # fields are not what decides), so swap the two entries' contents
    swap = {"<|image_pad|>": "<|video_pad|>", "<|video_pad|>": "<|image_pad|>"}
    for t in raw["added_tokens"]:
        t["content"] = swap.get(t["content"], t["content"])
    (ckpt / "tokenizer.json").write_text(json.dumps(raw))
    assert load_tokenizer(ckpt).token_to_id("<|image_pad|>") == spec.tokens.video_token_id
    with pytest.raises(QvlError) as err:
        check_tokenizer(ckpt, spec)
    text = one_line(err)
    assert "<|image_pad|>" in text and f"image_token_id={spec.tokens.image_token_id}" in text
    assert str(spec.tokens.video_token_id) in text and "1 further problem" in text  # the video pad too


def test_absent_vision_tokens_are_not_checked(checkpoint):
    ckpt = checkpoint("qwen2_5_vl")
    spec = parse_model_config(ckpt)
    tokens = dataclasses.replace(spec.tokens, video_token_id=-1, vision_end_token_id=-1)
    assert tokenizer_problems(load_tokenizer(ckpt), dataclasses.replace(spec, tokens=tokens)) == []


def test_eos_and_vocabulary_size(checkpoint):
    ckpt = checkpoint("qwen2_5_vl")
    spec, tok = parse_model_config(ckpt), load_tokenizer(ckpt)
    size = tok.get_vocab_size(with_added_tokens=True)
    assert spec.tokens.eos_token_ids and tokenizer_problems(tok, spec) == []

    small = dataclasses.replace(spec, text=dataclasses.replace(spec.text, vocab_size=size - 8))
    problems = tokenizer_problems(tok, small)
    assert any(f"{size} tokens" in p and f"vocab_size is {size - 8}" in p for p in problems)

    padded = dataclasses.replace(spec, text=dataclasses.replace(spec.text, vocab_size=size + 64),
                                 tokens=dataclasses.replace(spec.tokens, eos_token_ids=(size + 3,)))
    (problem,) = tokenizer_problems(tok, padded)
    assert f"eos token id {size + 3}" in problem and "not a token" in problem

    outside = dataclasses.replace(spec, tokens=dataclasses.replace(spec.tokens, eos_token_ids=(10**6,)))
    with pytest.raises(QvlError, match="outside the model's vocabulary"):
        check_tokenizer(ckpt, outside)


# ------------------------------------------------------------------------------ preprocessor config

def transformers_defaults():
    try:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    except ImportError:  # older transformers: one class, same attribute names
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor as \
            Qwen2VLImageProcessorPil
    return Qwen2VLImageProcessorPil()


def test_preprocess_defaults_equal_transformers():
    p, ours = transformers_defaults(), PreprocessSpec()
    assert (ours.min_pixels, ours.max_pixels) == (p.size.shortest_edge, p.size.longest_edge) == (3136, 1003520)
    assert ours.image_mean == pytest.approx(tuple(p.image_mean))
    assert ours.image_std == pytest.approx(tuple(p.image_std))
    assert ours.rescale_factor == pytest.approx(p.rescale_factor)


def test_missing_preprocessor_config(copy):
    ckpt = copy("qwen2_5_vl")
    vision = parse_model_config(ckpt).vision
    (ckpt / "preprocessor_config.json").unlink()
    with pytest.raises(QvlError) as err:
        parse_preprocessor(ckpt, vision)
    text = one_line(err)
    assert "--assume-default-preprocessing" in text and "preprocessor_config.json" in text
    assert "min_pixels 3136" in text and "max_pixels 1003520" in text
    assert parse_preprocessor(ckpt, vision, assume_default=True) == PreprocessSpec()


def write_pp(ckpt, extra: dict) -> None:
    cfg = {"image_processor_type": "Qwen2VLImageProcessor", "patch_size": 14, "temporal_patch_size": 2,
           "merge_size": 2, **extra}
    (ckpt / "preprocessor_config.json").write_text(json.dumps(cfg))


RESOLVED = {
    "nothing": ({}, (3136, 1003520)),
    "top-level only min": ({"min_pixels": 1000}, (1000, 1003520)),
    "top-level wins over size": ({"min_pixels": 1000, "max_pixels": 200000,
                                  "size": {"shortest_edge": 5000, "longest_edge": 50000}}, (1000, 200000)),
    "size only": ({"size": {"shortest_edge": 5000, "longest_edge": 50000}}, (5000, 50000)),
    "mixed": ({"max_pixels": 90000, "size": {"shortest_edge": 5000, "longest_edge": 50000}}, (5000, 90000)),
    "4.45 layout": ({"min_pixels": 1000, "max_pixels": 200000,
                     "size": {"min_pixels": 1000, "max_pixels": 200000}}, (1000, 200000)),
}


@pytest.mark.parametrize("case", list(RESOLVED))
def test_min_max_pixels_resolve_as_transformers(copy, case):
    """Our reading equals the size transformers' own image processor ends up with."""
    from transformers import AutoImageProcessor

    extra, want = RESOLVED[case]
    ckpt = copy("qwen2_5_vl")
    vision = parse_model_config(ckpt).vision
    write_pp(ckpt, extra)
    pp = parse_preprocessor(ckpt, vision)
    assert (pp.min_pixels, pp.max_pixels) == want
    size = AutoImageProcessor.from_pretrained(ckpt).size
    assert (size.shortest_edge, size.longest_edge) == want


@pytest.mark.parametrize("extra, words", [
    ({"min_pixels": 0}, ["min_pixels=0", "positive"]),
    ({"max_pixels": -5}, ["max_pixels=-5", "positive"]),
    ({"size": {"shortest_edge": 3136, "longest_edge": 0}}, ["size.longest_edge=0", "positive"]),
    ({"min_pixels": 500000, "max_pixels": 1000}, ["min_pixels 500000", "max_pixels 1000"]),
    ({"size": {"shortest_edge": 3136}}, ["longest_edge", "size"]),  # transformers fails on it when preprocessing
    ({"size": {"min_pixels": 3136}}, ["longest_edge", "size"]),
    ({"image_std": [0.2, 0.0, 0.3]}, ["image_std", "positive"]),
    ({"image_mean": [0.5, 0.5]}, ["image_mean", "3"]),
    ({"rescale_factor": 0}, ["rescale_factor"]),
])
def test_bad_preprocessor_values(copy, extra, words):
    ckpt = copy("qwen2_5_vl")
    vision = parse_model_config(ckpt).vision
    write_pp(ckpt, extra)
    with pytest.raises(QvlError) as err:
        parse_preprocessor(ckpt, vision)
    text = one_line(err)
    for w in words:
        assert w in text, text


def test_tiny_checkpoint_preprocessor_values(checkpoint):
    """The synthetic checkpoint's own min/max pixels (given both top-level and in size) are read."""
    raw = json.loads((checkpoint("qwen2_5_vl") / "preprocessor_config.json").read_text())
    pp = parse_model_config(checkpoint("qwen2_5_vl")).preprocess
    assert (pp.min_pixels, pp.max_pixels) == (raw["min_pixels"], raw["max_pixels"]) != (3136, 1003520)
