"""Random-weight checkpoints at the real widths, and a lean safetensors reader for the torch side.

``make_bench_checkpoint`` writes the checkpoint with ``loading/synthetic.make_checkpoint`` (transformers
config classes + ``save_pretrained``, the small trained tokenizer, chat template and preprocessor
files) at the real widths and with the real vocabulary (151936 rows) and RMSNorm epsilon. Token ids
of the small tokenizer (< 700) are valid rows of the large embedding table.

``read_safetensors`` fills a module's parameters straight from the file with ``readinto``
(no mmap), so a process's peak RSS is its parameters plus its activations - not parameters plus a
mapped copy of the file, which is what a plain ``safe_open`` or ``from_pretrained`` would count.
"""

from __future__ import annotations

import json
import logging
import struct
from dataclasses import replace
from pathlib import Path

from qvl_export.bench.configs import BenchModel
from qvl_export.loading.synthetic import make_checkpoint

log = logging.getLogger(__name__)


def make_bench_checkpoint(out_dir: str | Path, model: BenchModel) -> Path:
    """Write a random-weight checkpoint of ``model`` (real widths, ``model.dims`` depth) to ``out_dir``: with
    ``save_pretrained`` in fp32, or tensor by tensor in the model's ``dtype`` where that is not fp32."""
    out = Path(out_dir)
    _remove_weights(out)
    dims = replace(model.dims, vocab_size=model.vocab_size, rms_norm_eps=model.rms_norm_eps)
    if model.dtype != "float32":
        return make_streamed_checkpoint(out, dims, model.dtype)
    return make_checkpoint(out, dims)


def make_streamed_checkpoint(out_dir: str | Path, dims, dtype: str = "bfloat16", shard_bytes: int = 1 << 30) -> Path:
    """The checkpoint ``make_checkpoint`` writes, with every floating-point weight in ``dtype``, generated
    one tensor at a time and written shard by shard: a model too large to hold in fp32 (Qwen2.5-VL-7B:
    33 GB) is made in a shard's memory. The model is instantiated on the meta device for its parameter
    names and shapes (saved under the names ``save_pretrained`` gives them); weights are drawn as
    ``make_checkpoint``'s are (normal(0, init_std), norms uniform(0.5, 1.5), biases normal(0, init_std)); a tied lm_head is left out as ``save_pretrained``
    leaves it out. Not the same random values as ``make_checkpoint`` for the same seed."""
    import torch

    from qvl_export.loading.synthetic import (build_model_config, is_norm_weight, train_tokenizer,
                                              write_processing_files)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _remove_weights(out)
    tok = train_tokenizer(dims.tokenizer_vocab, dims.seed)
    config, model_cls = build_model_config(dims, tok)
    with torch.device("meta"):
        model = model_cls(config)
    tied = model.config.get_text_config().tie_word_embeddings
    target = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(dims.seed)

    # the names save_pretrained writes (transformers reverts its load-time renames: Qwen2-VL / Qwen2.5-VL
    # checkpoints keep the hub's "model.layers." / "visual." keys)
    from transformers.core_model_loading import revert_weight_conversion

    params = revert_weight_conversion(model, model.state_dict())

    def tensors():
        for name, p in params.items():
            if tied and name == "lm_head.weight":
                continue
            if not p.is_floating_point():
                yield name, torch.zeros(p.shape, dtype=p.dtype)
                continue
            t = torch.empty(p.shape, dtype=torch.float32)
            if is_norm_weight(name):
                t.uniform_(0.5, 1.5, generator=gen)
            else:
                t.normal_(0.0, dims.init_std, generator=gen)
            yield name, t.to(target)

    write_shards(tensors(), out, shard_bytes)
    config.dtype = dtype
    config.architectures = [model_cls.__name__]
    config.save_pretrained(out)
    write_processing_files(out, tok, dims)
    return out


def _remove_weights(out: Path) -> None:
    """Delete the weight shards and index an earlier (larger) write left in ``out``."""
    for pattern in ("model*.safetensors", "model.safetensors.index.json"):
        for stale in out.glob(pattern):
            stale.unlink()


def write_shards(tensors, out: Path, shard_bytes: int = 1 << 30) -> dict[str, str]:
    """Write ``(name, torch tensor)`` pairs as safetensors shards of about ``shard_bytes`` (one shard in
    memory at a time) plus ``model.safetensors.index.json``; returns the weight map."""
    from safetensors.torch import save_file

    index: dict[str, str] = {}
    shard: dict = {}
    size = count = 0

    def flush():
        nonlocal shard, size, count
        if shard:
            count += 1
            name = f"model-{count:05d}.safetensors"
            save_file(shard, str(out / name), metadata={"format": "pt"})
            index.update({k: name for k in shard})
            shard, size = {}, 0

    for name, tensor in tensors:
        shard[name] = tensor
        size += tensor.numel() * tensor.element_size()
        if size >= shard_bytes:
            flush()
    flush()
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}, indent=1))
    return index


def convert_checkpoint(src: str | Path, out: str | Path, dtype: str = "bfloat16") -> Path:
    """A copy of checkpoint ``src`` with every floating-point weight in ``dtype`` (how real Qwen
    checkpoints ship: bf16), written shard by shard; config.json's ``dtype`` follows."""
    import shutil

    import torch
    from safetensors import safe_open

    src, out = Path(src), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _remove_weights(out)
    for path in src.iterdir():
        if path.is_file() and not path.name.startswith("model") and path.name != "config.json":
            shutil.copy2(path, out / path.name)
    target = getattr(torch, dtype)

    def tensors():
        for path in weight_files(src):
            with safe_open(str(path), "pt") as f:
                for key in f.keys():
                    t = f.get_tensor(key)
                    yield key, t.to(target) if t.is_floating_point() else t

    write_shards(tensors(), out)
    config = json.loads((src / "config.json").read_text())
    for section in (config, config.get("text_config") or {}, config.get("vision_config") or {}):
        for key in ("dtype", "torch_dtype"):
            if key in section:
                section[key] = dtype
    config.setdefault("dtype", dtype)
    (out / "config.json").write_text(json.dumps(config, indent=2))
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


def main(argv: list[str] | None = None) -> None:
    """``python -m qvl_export.bench.checkpoint MODEL OUT [--layers N] [--dtype D]``: write a benchmark
    checkpoint (the random weights ``qvl-export bench`` builds from) to build or gate by hand."""
    import argparse

    from qvl_export.bench.configs import MODELS, bench_model

    ap = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    ap.add_argument("model", choices=sorted(MODELS))
    ap.add_argument("out", type=Path)
    ap.add_argument("--layers", type=int, default=None, help="cut to N layers (default: full depth)")
    names = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
    ap.add_argument("--dtype", default=None, choices=sorted(names) + sorted(names.values()),
                    help="weights' dtype (default: the model's: fp32, bf16 for 7B)")
    args = ap.parse_args(argv)
    model = bench_model(args.model, args.layers)
    if args.dtype:
        model = replace(model, dtype=names.get(args.dtype, args.dtype))
    print(make_bench_checkpoint(args.out, model))


if __name__ == "__main__":
    main()
