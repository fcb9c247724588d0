"""Checkpoints shaped unlike the shared tiny ones, built and gated end to end on the ort target.

- Qwen2.5-VL with head dim 36 (144 / 4): onnxruntime's GroupQueryAttention refuses head dims that are
  not a multiple of 8, so the decoder keeps its plain attention (the build records why) - in fp32 and in
  the fp16 trace, whose rule differs - and both pass their gates; tied embeddings, an rms eps of 1e-5
  and a chat template stored only in chat_template.json.
- Qwen2-VL with head dim 40 and one KV head, a 1000-row vocabulary (not a multiple of 64), untied
  embeddings, a template without a system turn stored only as chat_template.jinja, and sampling
  defaults in generation_config.json; int8 and `--precision int4` (the decoder) pass their gates.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from qvl_export.building.artifacts import BuildOptions, build
from qvl_export.core.manifest import Manifest
from qvl_export.loading.synthetic import CheckpointDims, make_checkpoint
from qvl_export.parity.gate import run_parity
from qvl_export.parity.samples import ALL_CASES
from qvl_export.runtimes.pipeline import Pipeline

TEMPLATES = Path(__file__).resolve().parents[1] / "data" / "chat_templates"
pytestmark = pytest.mark.slow
CASES = [c for c in ALL_CASES if c.name in ("landscape", "video")]

SHAPES = {
    "head-dim-36": CheckpointDims(
        family="qwen2_5_vl", vision_depth=3, vision_hidden=96, vision_heads=3, vision_intermediate=160,
        fullatt_block_indexes=(2,), text_hidden=144, text_layers=2, text_heads=4, text_kv_heads=2,
        text_intermediate=224, mrope_section=(6, 6, 6), tie_word_embeddings=True, rms_norm_eps=1e-5, seed=22,
        chat_template_file="json"),
    "head-dim-40": CheckpointDims(
        family="qwen2_vl", vision_depth=2, vision_hidden=40, vision_heads=2, vision_intermediate=80,
        text_hidden=120, text_layers=2, text_heads=3, text_kv_heads=1, text_intermediate=200,
        mrope_section=(4, 8, 8), vocab_size=1000, seed=21, chat_template=(TEMPLATES / "custom_reader.jinja").read_text(),
        chat_template_file="jinja",
        generation={"temperature": 0.7, "top_p": 0.8, "do_sample": True, "repetition_penalty": 1.05}),
}


@pytest.fixture(scope="module")
def odd_checkpoint(tmp_path_factory):
    made = {}

    def get(name):
        if name not in made:
            made[name] = make_checkpoint(tmp_path_factory.mktemp(name), SHAPES[name])
        return made[name]

    return get


@pytest.mark.parametrize("shape,precision", [("head-dim-36", "fp32"), ("head-dim-36", "fp16"),
                                             ("head-dim-40", "int8"), ("head-dim-40", "int4")])
def test_odd_shape_builds_pass_their_gate(shape, precision, odd_checkpoint, tmp_path):
    ckpt, out = odd_checkpoint(shape), tmp_path / "art"
    build(ckpt, out, BuildOptions(precision=precision, calib_limit=3))
    m = Manifest.read(out)
    fused = next(p for p in m.parts["decoder"].passes if p["pass"] == "fuse_decoder_attention")
    if shape == "head-dim-36":  # GQA cannot take it: plain attention, and the reason recorded
        assert not fused["modified"] and "multiple of 8" in " ".join(fused["details"]["why_not"]), fused
        assert "seqlens_k" not in {t.name for t in m.parts["decoder"].inputs}
    else:
        assert fused["modified"] and fused["details"]["fused"] == SHAPES[shape].text_layers
    if precision == "int4":
        assert m.precisions == {"vision": "fp32", "merger": "fp32", "decoder": "int4"}
    report = run_parity(out, ckpt, cases=CASES, max_new_tokens=12)
    assert report.passed, report.failure_summary()
    # the runtime on its own, with the checkpoint's generation settings (sampling, for head-dim-40)
    answer = Pipeline.load(out).generate([], "Say something.", max_new_tokens=4)
    assert answer.finish_reason == "stop" or len(answer.token_ids) == 4, answer
