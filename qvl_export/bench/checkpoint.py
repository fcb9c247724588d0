"""Random-weight checkpoints at the real widths, and a lean safetensors reader for the torch side.

``make_bench_checkpoint`` writes a checkpoint exactly as ``loading/synthetic.make_checkpoint`` does
(transformers config classes + ``save_pretrained``, the same tokenizer, chat template and
preprocessor files) but with the real vocabulary (151936 rows), which the synthetic maker cannot
set: it sizes the vocabulary from its small trained tokenizer. The tokenizer, templates and
pre-processing files are produced by the synthetic maker itself on a narrow copy of the dims (so
they never drift from it); config.json and the weights are then replaced at the real widths.
Token ids of the small tokenizer (< 700) are valid rows of the large embedding table.

``read_safetensors`` fills a module's parameters straight from the file with ``readinto``
(no mmap), so a process's peak RSS is its parameters plus its activations - not parameters plus a
mapped copy of the file, which is what a plain ``safe_open`` or ``from_pretrained`` would count.
"""

from __future__ import annotations

import json
import logging
import shutil
import struct
import tempfile
from dataclasses import replace
from pathlib import Path

from qvl_export.bench.configs import BenchModel
from qvl_export.loading.synthetic import SPECIAL_TOKENS, CheckpointDims, make_checkpoint

log = logging.getLogger(__name__)

# save_pretrained's own shard names; everything else in the folder comes from the synthetic maker
_WEIGHT_GLOBS = ("model*.safetensors", "model.safetensors.index.json")


def _side_files(out: Path, dims: CheckpointDims) -> None:
    """Tokenizer, templates, generation and preprocessor configs from the synthetic maker."""
    narrow = replace(CheckpointDims(), family=dims.family, tokenizer_vocab=dims.tokenizer_vocab,
                     max_position_embeddings=dims.max_position_embeddings, min_pixels=dims.min_pixels,
                     max_pixels=dims.max_pixels, seed=dims.seed)
    tmp = Path(tempfile.mkdtemp(prefix=".side-", dir=out))
    try:
        make_checkpoint(tmp, narrow)
        for path in tmp.iterdir():
            if path.name != "config.json" and not any(path.match(g) for g in _WEIGHT_GLOBS):
                shutil.copy2(path, out / path.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def make_bench_checkpoint(out_dir: str | Path, model: BenchModel) -> Path:
    """Write a random-weight checkpoint of ``model`` (real widths, ``model.dims`` depth) to ``out_dir``."""
    import torch
    from tokenizers import Tokenizer
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
    )

    dims = model.dims
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for pattern in _WEIGHT_GLOBS:
        for stale in out.glob(pattern):
            stale.unlink()
    _side_files(out, dims)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    vocab = model.vocab_size or ((tok.get_vocab_size() + 63) // 64) * 64
    if vocab < tok.get_vocab_size():
        raise ValueError(f"vocab_size {vocab} is smaller than the tokenizer's {tok.get_vocab_size()}")

    # Same fields as synthetic.make_checkpoint, vocabulary from ``model``.
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
    if model.rms_norm_eps is not None:
        text["rms_norm_eps"] = model.rms_norm_eps
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
        config = Qwen2VLConfig(text_config=text, vision_config=vision, **special)
        model_cls = Qwen2VLForConditionalGeneration
    else:
        vision = dict(depth=dims.vision_depth, hidden_size=dims.vision_hidden, num_heads=dims.vision_heads,
                      intermediate_size=dims.vision_intermediate, out_hidden_size=dims.text_hidden,
                      fullatt_block_indexes=list(dims.fullatt_block_indexes), window_size=dims.window_size,
                      initializer_range=dims.init_std)
        config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **special)
        model_cls = Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(dims.seed)
    net = model_cls(config).eval()
    with torch.no_grad():  # as the synthetic maker: norms and biases away from their constant init
        for name, p in net.named_parameters():
            if name.endswith("norm.weight") or ".norm1." in name or ".norm2." in name or "ln_q" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0.0, dims.init_std)
    net.save_pretrained(out)
    return out


# ----------------------------------------------------------------------------- lean reader

_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "I64": "int64"}


def weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        return [model_dir / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return sorted(model_dir.glob("*.safetensors"))


def read_safetensors(module, model_dir: Path, prefix: str, renames: dict[str, str] | None = None,
                     extra: dict | None = None) -> set[str]:
    """Copy every ``prefix``-ed tensor of the checkpoint into ``module``'s same-named parameter.

    ``renames`` maps a checkpoint name (prefix stripped) to a module name; ``extra`` maps
    checkpoint names (full) to tensors to fill outside the module (e.g. an untied lm_head). Returns
    the module names filled; the caller checks completeness. Reads with ``readinto`` straight into
    the parameter storage (no mmap).
    """
    import torch

    renames = renames or {}
    extra = extra or {}
    params = dict(module.named_parameters())
    params.update(dict(module.named_buffers()))
    filled: set[str] = set()
    for path in weight_files(Path(model_dir)):
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
            base = 8 + n
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                if name in extra:
                    target = extra[name]
                elif name.startswith(prefix):
                    key = renames.get(name[len(prefix):], name[len(prefix):])
                    if key not in params:
                        continue
                    target = params[key]
                    filled.add(key)
                else:
                    continue
                begin, end = info["data_offsets"]
                if target.numel() * target.element_size() != end - begin or \
                        _DTYPES.get(info["dtype"]) != str(target.dtype).removeprefix("torch."):
                    raise ValueError(f"{name}: checkpoint {info['dtype']} {info['shape']} does not fit "
                                     f"{target.dtype} {list(target.shape)}")
                f.seek(base + begin)
                with torch.no_grad():
                    view = target.data.view(-1).view(torch.uint8)  # contiguous parameter storage
                    f.readinto(memoryview(view.numpy()))
    return filled
