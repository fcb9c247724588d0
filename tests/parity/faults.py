"""Deliberate faults for the mutation tests: real edits of built artifacts (ONNX initializers) and a
broken quantizer rule. Each helper edits a copy; the manifest's checksums no longer match, so the gate
is run with ``verify=False`` (the checksum check would catch every edit before the numbers do)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from qvl_export.core.manifest import Manifest


def copy_artifacts(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_initializers(folder: Path, part: str, edit) -> list[str]:
    """Call ``edit(name, array) -> array | None`` on every initializer of ``part``; save the changed
    ones. Returns the names changed."""
    path = folder / Manifest.read(folder).parts[part].file
    model = onnx.load(path)
    changed = []
    for init in model.graph.initializer:
        new = edit(init.name, numpy_helper.to_array(init))
        if new is not None:
            init.CopyFrom(numpy_helper.from_array(np.asarray(new, dtype=numpy_helper.to_array(init).dtype), init.name))
            changed.append(init.name)
    onnx.save(model, path)
    return changed


def zero_decoder_layer(folder: Path, layer: int) -> list[str]:
    """Every weight matrix of decoder layer ``layer`` zeroed (the layer adds nothing to the residual)."""
    prefix = f"layers.{layer}."
    return edit_initializers(folder, "decoder", lambda n, a: np.zeros_like(a) if n.startswith(prefix) and a.ndim == 2
                             else None)


def permute_mrope_section(folder: Path, section: tuple[int, int, int]) -> list[str]:
    """The decoder's M-RoPE component table ([head_dim/2] int64: t/h/w per frequency) rebuilt from the
    section rotated by one (t, h, w) -> (h, w, t) sizes - a wrong ``mrope_section`` baked into the graph."""
    rotated = section[1:] + section[:1]
    table = np.concatenate([np.full(n, i, np.int64) for i, n in enumerate(rotated)])
    return edit_initializers(folder, "decoder", lambda n, a: table if n == "mrope_component" else None)


def perturb_vision_weight(folder: Path, name: str, relative: float, seed: int = 0) -> list[str]:
    """Gaussian noise of ``relative`` x the weight's RMS added to one vision initializer."""
    rng = np.random.default_rng(seed)

    def edit(n, a):
        if n != name:
            return None
        return a + rng.standard_normal(a.shape).astype(a.dtype) * relative * float(np.sqrt(np.mean(a ** 2)))

    return edit_initializers(folder, "vision", edit)


def scale_activation_ranges(folder: Path, factor: float, parts=("vision", "merger", "decoder")) -> list[str]:
    """Every activation's Q/DQ scale of a quantized build multiplied by ``factor`` - its calibrated range
    scaled wrong after the fact (weights and their scales untouched)."""
    changed = []
    for part in parts:
        path = folder / Manifest.read(folder).parts[part].file
        model = onnx.load(path)
        inits = {i.name for i in model.graph.initializer}
        scales = {n.input[1] for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits}
        changed += edit_initializers(folder, part, lambda n, a, scales=scales: a * np.float32(factor) if n in scales
                                     else None)
    return changed
