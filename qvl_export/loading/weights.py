"""Lazy access to a checkpoint's safetensors weights (single file or sharded with an index).

Nothing is read until a tensor is asked for, so each part is built from its own weights only and
peak memory stays near the size of the largest part. Names are normalised to the hub layout
(``visual.*``, ``model.*``, ``lm_head.*``) whichever layout the checkpoint was saved in.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from qvl_export.core.errors import QvlError

# transformers 5.x module paths -> hub checkpoint names
_RENAMES = (
    ("model.language_model.", "model."),
    ("model.visual.", "visual."),
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
)


# safetensors dtype codes the export reads (``get`` converts them to float32)
FLOAT_DTYPES = ("F32", "F16", "BF16")


def normalise_name(name: str) -> str:
    for old, new in _RENAMES:
        if name.startswith(old):
            return new + name[len(old):]
    return name


def shape_mismatch(name: str, expected: tuple[int, ...], found: tuple[int, ...]) -> str:
    """The one-line message for a checkpoint tensor whose shape is not the one config.json implies."""
    expected, found = tuple(expected), tuple(found)
    if len(found) == len(expected) > 1 and found == expected[::-1]:
        why = "the tensor looks transposed (saved as [in, out] instead of [out, in])"
    else:
        why = "the weights may be from another model size, or the tensor may be transposed or re-shaped"
    return (f"Weight '{name}' has shape {found} but config.json implies {expected}; config.json and the "
            f"weights disagree: {why}. Use the config.json and weights of the same original checkpoint.")


def dtype_unsupported(name: str, dtype: str) -> str:
    return (f"Weight '{name}' is stored as {dtype}; only floating point weights ({'/'.join(FLOAT_DTYPES)}) can "
            "be exported: use the original (not pre-quantized) checkpoint.")


def flattens_to(found: tuple[int, ...], param_shape: tuple[int, ...]) -> bool:
    """A convolution kernel [out, in, *k] read as a Linear over the flattened patch: [out, in * prod(k)]."""
    if len(param_shape) != 2 or len(found) <= 2 or found[0] != param_shape[0]:
        return False
    n = 1
    for d in found[1:]:
        n *= d
    return n == param_shape[1]


def load_plan(module, prefix: str, aliases: dict[str, str] | None = None,
              transposed: dict[str, str] | None = None) -> list[tuple[str, str, tuple[int, ...]]]:
    """(parameter name, checkpoint tensor name, shape that tensor must have) for each parameter of ``module``.

    The shape is the parameter's, reversed for ``transposed`` parameters. A convolution kernel whose
    flattening gives a 2-D parameter is also accepted by ``load_into`` (see ``flattens_to``).
    """
    aliases = aliases or {}
    transposed = transposed or {}
    plan = []
    for name, param in module.named_parameters():
        shape = tuple(param.shape)
        if name in transposed:
            plan.append((name, transposed[name], shape[::-1]))
        else:
            plan.append((name, aliases.get(name, prefix + name), shape))
    return plan


class CheckpointWeights:
    """Maps normalised tensor names to the safetensors file that holds them."""

    def __init__(self, model_dir: Path):
        self.model_dir = Path(model_dir)
        index = self.model_dir / "model.safetensors.index.json"
        single = self.model_dir / "model.safetensors"
        self._where: dict[str, tuple[Path, str]] = {}
        self._meta: dict[str, tuple[tuple[int, ...], str]] = {}  # name -> (shape, dtype) from the header
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
                        sl = f.get_slice(name)  # header only: no tensor data is read
                        self._where[normalise_name(name)] = (path, name)
                        self._meta[normalise_name(name)] = (tuple(int(d) for d in sl.get_shape()),
                                                            str(sl.get_dtype()))
            except Exception as err:  # safetensors raises several types for a damaged header
                raise QvlError(f"Weight file {path.name} is corrupt or truncated ({type(err).__name__}: {err}); "
                               "re-download it.") from None

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def names(self, prefix: str = "") -> list[str]:
        return sorted(n for n in self._where if n.startswith(prefix))

    def _missing(self, name: str) -> QvlError:
        return QvlError(f"Weight '{name}' is missing from the checkpoint in {self.model_dir}; "
                        "the checkpoint is incomplete or not of the declared architecture.")

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of tensor ``name`` from the safetensors header (no data read)."""
        if name not in self._meta:
            raise self._missing(name)
        return self._meta[name][0]

    def dtype(self, name: str) -> str:
        """safetensors dtype code of tensor ``name`` (``F32``, ``BF16``, ``I32``, ...) from the header."""
        if name not in self._meta:
            raise self._missing(name)
        return self._meta[name][1]

    def get(self, name: str, dtype=None):
        """Tensor ``name`` as a torch tensor of ``dtype`` (default float32), read from disk now."""
        from safetensors import safe_open

        if name not in self._where:
            raise self._missing(name)
        path, raw = self._where[name]
        try:
            with safe_open(str(path), "pt") as f:
                tensor = f.get_tensor(raw)
        except Exception as err:
            raise QvlError(f"Could not read '{name}' from {path.name} ({type(err).__name__}: {err}); "
                           "the file is corrupt: re-download it.") from None
        return tensor.float() if dtype is None else tensor.to(dtype)

    def load_into(self, module, prefix: str, aliases: dict[str, str] | None = None,
                  transposed: dict[str, str] | None = None) -> None:
        """Fill every parameter of ``module`` from ``prefix + name`` (or an alias), checking exact shapes.

        ``transposed`` maps parameters stored as the transpose of a checkpoint tensor to that tensor.
        Each tensor's shape (from the header, before its data is read) must be the parameter's
        (reversed when transposed); the only reshape done is a convolution kernel flattened into a
        2-D Linear weight (the patch embedding). Anything else raises one line naming the tensor.
        """
        import torch

        params = dict(module.named_parameters())
        with torch.no_grad():
            for name, source, expected in load_plan(module, prefix, aliases, transposed):
                param = params[name]
                found = self.shape(source)
                flatten = name not in (transposed or {}) and flattens_to(found, expected)
                if found != expected and not flatten:
                    raise QvlError(shape_mismatch(source, expected, found))
                if self.dtype(source) not in FLOAT_DTYPES:
                    raise QvlError(dtype_unsupported(source, self.dtype(source)))
                tensor = self.get(source)
                if name in (transposed or {}):
                    tensor = tensor.t()
                elif flatten:
                    tensor = tensor.reshape(param.shape)
                param.copy_(tensor)

    def fingerprint(self) -> str:
        """sha256 over config.json and every weight file's bytes (streamed)."""
        h = hashlib.sha256()
        h.update((self.model_dir / "config.json").read_bytes())
        for path in self.files:
            with open(path, "rb") as f:
                while chunk := f.read(1 << 24):
                    h.update(chunk)
        return h.hexdigest()
