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
    """Write a random-weight checkpoint of ``model`` (real widths, ``model.dims`` depth) to ``out_dir``."""
    out = Path(out_dir)
    for pattern in ("model*.safetensors", "model.safetensors.index.json"):  # a shorter rerun leaves no stale shards
        for stale in out.glob(pattern):
            stale.unlink()
    return make_checkpoint(out, replace(model.dims, vocab_size=model.vocab_size, rms_norm_eps=model.rms_norm_eps))


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
