"""Deterministic random-weight checkpoints of the real architectures.

Used by the test suite, the benchmarks (real widths) and the demo model's training script. They
are written exactly as a user's checkpoint is: transformers' own config classes and
``save_pretrained`` (safetensors), a byte-level BPE tokenizer trained with ``tokenizers`` that has
the Qwen special tokens and splits digits, the Qwen2-VL chat template (Qwen3-VL: a template in its
format, without a default system turn) and a preprocessor config (Qwen3-VL: patch 16, mean/std 0.5).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path


SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# The chat template that ships with Qwen2-VL / Qwen2.5-VL instruct checkpoints.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen3-VL's prompt format for plain chats (system only when given, no default one), written compactly;
# the tests also build checkpoints with the official template (tests/data/chat_templates/qwen3_vl.jinja).
QWEN3_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen2's pre-tokenizer split: single digits, letter runs, punctuation runs, white space.
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_CORPUS_WORDS = (
    "invoice total amount due date number customer address item quantity price tax subtotal "
    "receipt store cash card change form name signature table row column chart bar line value "
    "year month day page document report summary what is the of a an in on for to from and or "
    "please answer question read find describe image picture text shows this that which how many "
    "you are helpful assistant system user Chinese English mixed screen button menu settings ok "
    "cancel file edit view help paid balance order shipping discount net gross weight unit"
).split()


@dataclass(frozen=True)
class CheckpointDims:
    """Sizes of a synthetic checkpoint. Defaults give a fast, tiny Qwen2.5-VL."""

    family: str = "qwen2_5_vl"
    vision_depth: int = 4
    vision_hidden: int = 64
    vision_heads: int = 2
    vision_intermediate: int = 128
    fullatt_block_indexes: tuple[int, ...] = (1, 3)
    window_size: int = 112
    text_hidden: int = 128
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 2
    text_intermediate: int = 256
    mrope_section: tuple[int, int, int] = (4, 6, 6)
    tie_word_embeddings: bool = False
    tokenizer_vocab: int = 640
    max_position_embeddings: int = 4096
    init_std: float = 0.05
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 256
    seed: int = 0
    vocab_size: int | None = None  # None: the tokenizer's vocabulary padded to 64; the real models: 151936
    rms_norm_eps: float | None = None  # None: transformers' default
    chat_template: str | None = None  # None: the Qwen2-VL template (CHAT_TEMPLATE)
    # where the template is written, as checkpoints in the wild do: "tokenizer_config" + "chat_template.json"
    # (Qwen2-VL / Qwen2.5-VL on the hub), "json" (processor file only), "jinja" (chat_template.jinja only)
    chat_template_file: str = "both"
    generation: dict = field(default_factory=dict)  # extra generation_config.json keys (sampling defaults)
    extra: dict = field(default_factory=dict)
    # Qwen3-VL only: head_dim of the text model (None: hidden / heads), the learned position table's
    # entries (a square), the ViT layers feeding the DeepStack mergers
    text_head_dim: int | None = None
    num_position_embeddings: int = 2304
    deepstack_visual_indexes: tuple[int, ...] = ()


def train_tokenizer(vocab_size: int, seed: int = 0):
    """A small byte-level BPE with Qwen's split (single digits) and the Qwen special tokens."""
    import random

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    rng = random.Random(seed)
    lines = []
    for _ in range(2000):
        words = [rng.choice(_CORPUS_WORDS) for _ in range(rng.randint(3, 12))]
        if rng.random() < 0.5:
            words.insert(rng.randint(0, len(words)), f"{rng.randint(0, 99999)}.{rng.randint(0, 99):02d}")
        lines.append(" ".join(words).capitalize() + rng.choice([".", "?", ":", "!", ","]))
    lines.append("发票 总计 金额 日期 表格 数字 中文 English 混合")
    tok = Tokenizer(models.BPE(byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer=trainer)
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok


def build_model_config(dims: CheckpointDims, tok):
    """transformers config and model class of ``dims.family`` for tokenizer ``tok``: (config, model_cls)."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
    )

    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    vocab = dims.vocab_size or ((tok.get_vocab_size() + 63) // 64) * 64  # padded like Qwen's 151936 / 152064
    if vocab < tok.get_vocab_size():
        raise ValueError(f"vocab_size {vocab} is smaller than the tokenizer's {tok.get_vocab_size()}")

    text = dict(
        vocab_size=vocab,
        hidden_size=dims.text_hidden,
        intermediate_size=dims.text_intermediate,
        num_hidden_layers=dims.text_layers,
        num_attention_heads=dims.text_heads,
        num_key_value_heads=dims.text_kv_heads,
        max_position_embeddings=dims.max_position_embeddings,
        rope_parameters={"rope_type": "default", "mrope_section": list(dims.mrope_section),
                         "rope_theta": 1000000.0},
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        tie_word_embeddings=dims.tie_word_embeddings,
        initializer_range=dims.init_std,
    )
    if dims.rms_norm_eps is not None:
        text["rms_norm_eps"] = dims.rms_norm_eps
    special = dict(
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=dims.tie_word_embeddings,
    )
    if dims.family == "qwen2_vl":
        vision = dict(depth=dims.vision_depth, embed_dim=dims.vision_hidden, num_heads=dims.vision_heads,
                      mlp_ratio=dims.vision_intermediate // dims.vision_hidden, hidden_size=dims.text_hidden,
                      initializer_range=dims.init_std)
        return Qwen2VLConfig(text_config=text, vision_config=vision, **special), Qwen2VLForConditionalGeneration
    if dims.family == "qwen2_5_vl":
        vision = dict(depth=dims.vision_depth, hidden_size=dims.vision_hidden, num_heads=dims.vision_heads,
                      intermediate_size=dims.vision_intermediate, out_hidden_size=dims.text_hidden,
                      fullatt_block_indexes=list(dims.fullatt_block_indexes), window_size=dims.window_size,
                      initializer_range=dims.init_std)
        return (Qwen2_5_VLConfig(text_config=text, vision_config=vision, **special),
                Qwen2_5_VLForConditionalGeneration)
    if dims.family == "qwen3_vl":
        text["head_dim"] = dims.text_head_dim or dims.text_hidden // dims.text_heads
        text["rope_parameters"] = {**text["rope_parameters"], "rope_theta": 5000000.0, "mrope_interleaved": True}
        vision = dict(depth=dims.vision_depth, hidden_size=dims.vision_hidden, num_heads=dims.vision_heads,
                      intermediate_size=dims.vision_intermediate, out_hidden_size=dims.text_hidden,
                      num_position_embeddings=dims.num_position_embeddings,
                      deepstack_visual_indexes=list(dims.deepstack_visual_indexes), patch_size=16,
                      initializer_range=dims.init_std)
        return Qwen3VLConfig(text_config=text, vision_config=vision, **special), Qwen3VLForConditionalGeneration
    raise ValueError(f"unknown family {dims.family!r}")


def write_processing_files(out_dir: str | Path, tok, dims: CheckpointDims) -> None:
    """Tokenizer, tokenizer/chat/generation configs and preprocessor config beside a saved model."""
    out = Path(out_dir)
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    tok.save(str(out / "tokenizer.json"))
    qwen3 = dims.family == "qwen3_vl"
    template = dims.chat_template or (QWEN3_CHAT_TEMPLATE if qwen3 else CHAT_TEMPLATE)
    if dims.chat_template_file not in ("both", "json", "jinja"):
        raise ValueError(f"chat_template_file {dims.chat_template_file!r}: use both, json or jinja")
    tok_config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "model_max_length": dims.max_position_embeddings,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "bos_token": None,
        "unk_token": None,
        "errors": "replace",
        "split_special_tokens": False,
        "add_prefix_space": False,
    }
    if dims.chat_template_file == "both":
        tok_config["chat_template"] = template
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
    if dims.chat_template_file in ("both", "json"):
        (out / "chat_template.json").write_text(json.dumps({"chat_template": template}, indent=2))
    else:
        (out / "chat_template.jinja").write_text(template, encoding="utf-8")
    (out / "generation_config.json").write_text(json.dumps({
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
        "pad_token_id": ids["<|endoftext|>"],
        "do_sample": False,
        **dims.generation,
    }, indent=2))
    (out / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "Qwen2VLImageProcessor",
        "do_resize": True, "do_rescale": True, "do_normalize": True, "do_convert_rgb": True,
        "rescale_factor": 1 / 255,
        "image_mean": [0.5, 0.5, 0.5] if qwen3 else [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.5, 0.5, 0.5] if qwen3 else [0.26862954, 0.26130258, 0.27577711],
        "min_pixels": dims.min_pixels, "max_pixels": dims.max_pixels,
        "size": {"shortest_edge": dims.min_pixels, "longest_edge": dims.max_pixels},
        "patch_size": 16 if qwen3 else 14, "temporal_patch_size": 2, "merge_size": 2,
    }, indent=2))


def is_norm_weight(name: str) -> bool:
    """Parameters the synthetic checkpoints draw uniform(0.5, 1.5): RMSNorm / LayerNorm weights."""
    return name.endswith("norm.weight") or any(s in name for s in (".norm1.", ".norm2.", "ln_q", ".norm."))


def make_checkpoint(out_dir: str | Path, dims: CheckpointDims = CheckpointDims()) -> Path:
    """Write a complete random-weight checkpoint of ``dims.family`` into ``out_dir``."""
    import torch

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(dims.tokenizer_vocab, dims.seed)
    config, model_cls = build_model_config(dims, tok)

    torch.manual_seed(dims.seed)
    model = model_cls(config).eval()
    with torch.no_grad():  # norms start at 1.0; randomise them so parity sees their weights
        for name, p in model.named_parameters():
            if is_norm_weight(name):
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0.0, dims.init_std)
    model.save_pretrained(out)
    write_processing_files(out, tok, dims)
    return out
