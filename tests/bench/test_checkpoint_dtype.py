"""A bf16 checkpoint (how real Qwen checkpoints ship) is read directly: ``convert_checkpoint`` writes one
from a float32 checkpoint, and a build from it passes its gate against transformers on that bf16
checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")


def test_convert_checkpoint_to_bf16(checkpoint, tmp_path):
    from safetensors import safe_open

    from qvl_export.bench.checkpoint import convert_checkpoint, weight_files

    src = checkpoint("qwen2_vl")
    out = convert_checkpoint(src, tmp_path / "bf16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    converted = {}
    for path in weight_files(out):
        with safe_open(str(path), "pt") as f:
            converted.update({k: f.get_tensor(k) for k in f.keys()})
    n = 0
    for path in weight_files(src):
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                ref = f.get_tensor(key)
                assert converted[key].dtype == torch.bfloat16
                np.testing.assert_array_equal(converted[key].float().numpy(), ref.to(torch.bfloat16).float().numpy())
                n += 1
    assert n == len(converted)
    assert (out / "tokenizer.json").exists() and (out / "preprocessor_config.json").exists()


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_streamed_checkpoint_matches_save_pretrained(family, tiny_dims, tmp_path):
    """A model too large for fp32 here (7B) is written tensor by tensor in bf16: the same files, tensor
    names and shapes as ``save_pretrained`` writes (tied lm_head left out, the hub's key names), norms drawn
    around 1 like ``make_checkpoint``'s, and transformers loads it with nothing missing or unexpected."""
    from dataclasses import replace

    from safetensors import safe_open

    from qvl_export.bench.checkpoint import make_streamed_checkpoint, weight_files
    from qvl_export.loading.synthetic import make_checkpoint

    dims = replace(tiny_dims[family], text_layers=3)  # an odd depth
    ref = make_checkpoint(tmp_path / "ref", dims)
    out = make_streamed_checkpoint(tmp_path / "streamed", dims, "bfloat16", shard_bytes=1 << 16)

    def tensors(path):
        found = {}
        for f in weight_files(path):
            with safe_open(str(f), "pt") as h:
                found.update({k: h.get_tensor(k) for k in h.keys()})
        return found

    want, got = tensors(ref), tensors(out)
    assert len(weight_files(out)) > 1  # sharded, with an index
    assert sorted(got) == sorted(want)
    assert all(got[k].shape == want[k].shape and got[k].dtype == torch.bfloat16 for k in want)
    norms = [k for k in got if k.endswith("norm.weight")]
    assert norms and all(0.5 <= float(got[k].float().min()) and float(got[k].float().max()) <= 1.5 for k in norms)
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["architectures"] == json.loads(
        (ref / "config.json").read_text())["architectures"]
    assert sorted(p.name for p in ref.iterdir() if not p.name.startswith("model")) == \
        sorted(p.name for p in out.iterdir() if not p.name.startswith("model"))

    import transformers

    cls = getattr(transformers, config["architectures"][0])
    _, info = cls.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info


@pytest.mark.slow
def test_build_from_bf16_checkpoint_passes_gate(checkpoint, tmp_path):
    from qvl_export.bench.checkpoint import convert_checkpoint
    from qvl_export.building.artifacts import BuildOptions, build
    from qvl_export.parity.gate import run_parity
    from qvl_export.parity.samples import ALL_CASES

    src = convert_checkpoint(checkpoint("qwen2_5_vl"), tmp_path / "bf16")
    out = tmp_path / "art"
    build(src, out, BuildOptions())
    cases = [c for c in ALL_CASES if c.name in ("landscape", "text-only")]
    report = run_parity(out, src, cases=cases, max_new_tokens=32)
    assert report.passed, report.failure_summary()
    for case in report.cases:
        assert case["stages"]["greedy"]["first_divergence"] == -1
