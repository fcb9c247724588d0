"""The precision guard keeps an op the measurements name, and ``--sensitivity`` prints the table it decided on.

The checkpoint is the tiny Qwen2-VL with one activation outlier planted the way trained LLMs have them:
channel 0 of layer 0's SwiGLU output is 300x larger (up_proj row 0 x 300) and down_proj reads it with a
300x smaller weight column, so the float model computes exactly the same function, but a per-tensor
int8 scale set by that channel leaves the other 159 channels a few codes. The guard must keep that
down_proj in float; the build's gate then passes."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
from click.testing import CliRunner
from onnx import numpy_helper

from qvl_export.cli import main
from qvl_export.core.manifest import Manifest

OUTLIER = 300.0


def test_guard_keeps_the_outlier_down_proj_and_sensitivity_names_it(checkpoint, tmp_path):
    from safetensors.numpy import load_file, save_file

    ckpt = tmp_path / "outlier"
    shutil.copytree(checkpoint("qwen2_vl"), ckpt)
    weights = load_file(ckpt / "model.safetensors")
    weights["model.layers.0.mlp.up_proj.weight"][0] *= OUTLIER  # [160, 96]: SwiGLU channel 0
    weights["model.layers.0.mlp.down_proj.weight"][:, 0] /= OUTLIER  # [96, 160]: reads it 300x smaller
    save_file(weights, ckpt / "model.safetensors", metadata={"format": "pt"})

    out = tmp_path / "int8"
    result = CliRunner().invoke(main, ["build", str(ckpt), "-o", str(out), "--precision", "int8", "--calib-limit", "3",
                                       "--sensitivity"])
    assert result.exit_code == 0, result.output  # built, and its gate passed
    text = result.output
    assert "sensitivity (local quantization error per op)" in text
    rows = [line.split() for line in text.splitlines() if line.startswith("decoder: layers.")]
    errors = {r[1]: float(r[2]) for r in rows}
    assert errors["layers.0.mlp.down_proj"] > 0.06 > max(e for s, e in errors.items() if s != "layers.0.mlp.down_proj")
    assert "decoder: keeping layers.0.mlp.down_proj in float: int8 local error" in text

    q = Manifest.read(out).calibration.quantization["decoder"]
    assert list(q["kept_high_precision"]) == ["layers.0.mlp.down_proj"]
    model = onnx.load(out / Manifest.read(out).parts["decoder"].file)
    dtypes = {i.name: numpy_helper.to_array(i).dtype for i in model.graph.initializer if "mlp.down_proj" in i.name}
    assert any("layers.0." in n and d == np.float32 for n, d in dtypes.items()), dtypes  # kept: float weight
    assert not any("layers.0." in n and d == np.int8 for n, d in dtypes.items()), dtypes
    assert any("layers.1." in n and d == np.int8 for n, d in dtypes.items()), dtypes  # the other layer: int8
