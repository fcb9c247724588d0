"""Qwen3-VL config.json in both spellings, its weights table, and what is refused in one line."""

from __future__ import annotations

import json
import shutil

import pytest

from qvl_export.core.errors import QvlError
from qvl_export.loading.config import parse_model_config
from qvl_export.loading.validate import check_checkpoint, expected_tensors
from qvl_export.loading.weights import CheckpointWeights

FAMILY = "qwen3_vl"


@pytest.fixture()
def copy(tmp_path, checkpoint):
    dst = tmp_path / "ckpt"
    shutil.copytree(checkpoint(FAMILY), dst)
    return dst


def edit_config(ckpt, change) -> None:
    cfg = json.loads((ckpt / "config.json").read_text())
    change(cfg)
    (ckpt / "config.json").write_text(json.dumps(cfg))


def test_spec_and_weights_table(checkpoint):
    ckpt = checkpoint(FAMILY)
    spec = parse_model_config(ckpt)
    v, t = spec.vision, spec.text
    assert spec.family == "qwen3_vl" and v.patch_dim == 3 * 2 * 16 * 16
    assert v.position_side == 4 and v.deepstack_visual_indexes == (0, 2) and v.hidden_act == "gelu_pytorch_tanh"
    assert t.head_dim == 24 != t.hidden_size // t.num_attention_heads  # stated, not derived
    assert t.qk_norm and t.mrope_interleaved and not t.qkv_bias and not t.o_proj_bias
    assert t.rope_theta == 5000000.0 and t.tie_word_embeddings
    assert spec.preprocess.image_mean == (0.5, 0.5, 0.5) == spec.preprocess.image_std
    weights = CheckpointWeights(ckpt)
    table = expected_tensors(spec)
    assert set(table) == set(weights.names())  # every tensor read, none left over (tied: no lm_head)
    assert all(weights.shape(n) == s for n, s in table.items())
    check_checkpoint(ckpt, spec, weights)


def test_hub_spelling_gives_the_same_spec(copy, checkpoint):
    """Released Qwen3-VL configs spell rope_scaling + rope_theta (with mrope_interleaved); transformers 5.x
    writes rope_parameters. Both read the same; the sections are interleaved whatever the flag says."""
    def hub(cfg):
        text = cfg["text_config"]
        rope = text.pop("rope_parameters")
        text["rope_theta"] = rope.pop("rope_theta")
        text["rope_scaling"] = {**rope, "mrope_interleaved": False}
    edit_config(copy, hub)
    assert parse_model_config(copy) == parse_model_config(checkpoint(FAMILY))


@pytest.mark.parametrize("change,match", [
    (lambda c: c.update(architectures=["Qwen3VLMoeForConditionalGeneration"], model_type="qwen3_vl_moe"),
     "MoE .* not supported yet"),
    (lambda c: c.update(model_type="qwen3_vl_moe", architectures=[]), "MoE .* not supported yet"),
    (lambda c: c["vision_config"].update(deepstack_visual_indexes=[0, 3]), "deepstack_visual_indexes"),
    (lambda c: c["text_config"].update(head_dim=20), "mrope_section"),
    (lambda c: c["vision_config"].pop("num_position_embeddings"), "num_position_embeddings"),
])
def test_refused_in_one_line(copy, change, match):
    edit_config(copy, change)
    with pytest.raises(QvlError, match=match) as err:
        parse_model_config(copy)
    assert "\n" not in str(err.value)


def test_cli_refuses_moe_without_a_traceback(copy, tmp_path):
    from click.testing import CliRunner

    from qvl_export.cli import main

    edit_config(copy, lambda c: c.update(architectures=["Qwen3VLMoeForConditionalGeneration"],
                                         model_type="qwen3_vl_moe"))
    result = CliRunner().invoke(main, ["build", str(copy), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert result.output.startswith("error: ") and len(result.output.strip().splitlines()) == 1
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()
