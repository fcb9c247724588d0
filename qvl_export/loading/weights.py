"""Lazy access to a checkpoint's safetensors weights (single file or sharded with an index).

Nothing is read until a tensor is asked for, so each part is built from its own weights only and
peak memory stays near the size of the largest part. Names are normalised to the hub layout
(``visual.*``, ``model.*``, ``lm_head.*``) whichever layout the checkpoint was saved in.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from qvl_export.errors import QvlError

# transformers 5.x module paths -> hub checkpoint names
_RENAMES = (
    ("model.language_model.", "model."),
    ("model.visual.", "visual."),
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
)


def normalise_name(name: str) -> str:
    for old, new in _RENAMES:
        if name.startswith(old):
            return new + name[len(old):]
    return name


class CheckpointWeights:
    """Maps normalised tensor names to the safetensors file that holds them."""

    def __init__(self, model_dir: Path):
        self.model_dir = Path(model_dir)
        index = self.model_dir / "model.safetensors.index.json"
        single = self.model_dir / "model.safetensors"
        self._where: dict[str, tuple[Path, str]] = {}
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError) as err:
                raise QvlError(f"{index} is unreadable ({err}); restore it from the original checkpoint.") from None
            files = sorted(set(weight_map.values()))
        elif single.exists():
            files = [single.name]
        else:
            found = sorted(p.name for p in self.model_dir.glob("*.safetensors"))
            if not found:
                bins = sorted(p.name for p in self.model_dir.glob("*.bin"))
                hint = " (only pickle .bin files found: re-save with safetensors)" if bins else ""
                raise QvlError(f"No safetensors weights in {self.model_dir}{hint}; "
                               "pass a Hugging Face checkpoint folder with model*.safetensors.")
            files = found
        self.files = [self.model_dir / f for f in files]
        self._scan()

    def _scan(self) -> None:
        from safetensors import safe_open

        for path in self.files:
            if not path.exists():
                raise QvlError(f"Weight shard {path.name} listed by the index is missing from {self.model_dir}; "
                               "download the complete checkpoint.")
            try:
                with safe_open(str(path), "pt") as f:
                    for name in f.keys():
                        self._where[normalise_name(name)] = (path, name)
            except Exception as err:  # safetensors raises several types for a damaged header
                raise QvlError(f"Weight file {path.name} is corrupt or truncated ({type(err).__name__}: {err}); "
                               "re-download it.") from None

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def names(self, prefix: str = "") -> list[str]:
        return sorted(n for n in self._where if n.startswith(prefix))

    def get(self, name: str):
        """Tensor ``name`` as float32 torch tensor (read from disk now)."""
        from safetensors import safe_open

        if name not in self._where:
            raise QvlError(f"Weight '{name}' is missing from the checkpoint in {self.model_dir}; "
                           "the checkpoint is incomplete or not of the declared architecture.")
        path, raw = self._where[name]
        try:
            with safe_open(str(path), "pt") as f:
                tensor = f.get_tensor(raw)
        except Exception as err:
            raise QvlError(f"Could not read '{name}' from {path.name} ({type(err).__name__}: {err}); "
                           "the file is corrupt: re-download it.") from None
        return tensor.float()

    def load_into(self, module, prefix: str, aliases: dict[str, str] | None = None,
                  transposed: dict[str, str] | None = None) -> None:
        """Fill every parameter of ``module`` from ``prefix + name`` (or an alias), checking shapes.

        ``transposed`` maps parameters stored as the transpose of a checkpoint tensor to that tensor.
        """
        import torch

        aliases = aliases or {}
        transposed = transposed or {}
        with torch.no_grad():
            for name, param in module.named_parameters():
                source = transposed.get(name) or aliases.get(name, prefix + name)
                tensor = self.get(source)
                if name in transposed:
                    tensor = tensor.t()
                if tensor.numel() != param.numel():
                    raise QvlError(f"Weight '{source}' has shape {tuple(tensor.shape)} but the config implies "
                                   f"{tuple(param.shape)}; config.json and the weights disagree.")
                param.copy_(tensor.reshape(param.shape))

    def fingerprint(self) -> str:
        """sha256 over config.json and every weight file's bytes (streamed)."""
        h = hashlib.sha256()
        h.update((self.model_dir / "config.json").read_bytes())
        for path in self.files:
            with open(path, "rb") as f:
                while chunk := f.read(1 << 24):
                    h.update(chunk)
        return h.hexdigest()
