"""A generated <|image_pad|> (any sampled or fine-tuned model can emit one) is embedded as text in
decode, as transformers does, and never indexes the image table out of range.

Before: a decode step with that token failed with "GatherND ... invalid index" on onnxruntime (and
would read garbage on TensorRT, where an out-of-range gather is not an error).
"""

from __future__ import annotations

import numpy as np
import pytest

from qvl_export.building.artifacts import BuildOptions, build
from qvl_export.parity.compare import compare
from qvl_export.parity.gate import forced_logits
from qvl_export.runtimes.pipeline import Pipeline


def _reference_logits(model_dir, ids: np.ndarray) -> np.ndarray:
    """transformers: one forward over the whole sequence without pixel values -> logits [T, V]."""
    import torch
    import transformers

    from qvl_export.core.spec import read_json
    from qvl_export.loading.config import ARCHITECTURES

    arch = next(a for a in read_json(model_dir / "config.json", "config")["architectures"] if a in ARCHITECTURES)
    model = getattr(transformers, arch).from_pretrained(model_dir, dtype=torch.float32,
                                                        attn_implementation="eager").eval()
    input_ids = torch.from_numpy(ids)[None]
    with torch.inference_mode():
        out = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                    mm_token_type_ids=torch.zeros_like(input_ids), use_cache=False)
    return out.logits[0].float().numpy()


def _check(pipe, model_dir):
    pad = pipe.spec.tokens.image_token_id
    prep = pipe.prepare([], "Say something.")
    forced = [pad, 17, pad, pad, 23]
    ours = forced_logits(pipe, prep, forced)  # prefill, then one step per forced token but the last
    ref = _reference_logits(model_dir, np.concatenate([prep.input_ids, forced[:-1]]))
    t = len(prep.input_ids)
    for i, logits in enumerate(ours):
        assert np.isfinite(logits).all()
        m = compare(logits[None], ref[t - 1 + i][None])
        assert m["cosine"] >= 0.99999 and m["max_abs"] < 1e-4, (i, m)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_image_pad_in_decode_is_text(family, artifacts, checkpoint):
    """The ort decoder (GroupQueryAttention, in-place KV buffers)."""
    _check(Pipeline.load(artifacts(family)), checkpoint(family))


def test_image_pad_in_decode_plain_graph(checkpoint, tmp_path):
    """The plain decoder graph (no passes: what the trt target hands TensorRT)."""
    out = tmp_path / "plain"
    build(checkpoint("qwen2_vl"), out, BuildOptions(passes=[]))
    pipe = Pipeline.load(out)
    assert pipe.kv_layout == "concat"
    _check(pipe, checkpoint("qwen2_vl"))


def test_image_pad_after_an_image_prompt_does_not_crash(artifacts):
    """A prompt with an image, then generated pads: every step runs and gives finite logits."""
    from PIL import Image

    pipe = Pipeline.load(artifacts("qwen2_5_vl"))
    prep = pipe.prepare([Image.new("RGB", (120, 90), (200, 30, 30))], "What is this?")
    pad = pipe.spec.tokens.image_token_id
    logits = forced_logits(pipe, prep, [pad, pad, 5])
    assert all(np.isfinite(x).all() for x in logits)
    gen = pipe.generate(prepared=prep, max_new_tokens=4, temperature=0.0)
    assert 1 <= len(gen.token_ids) <= 4
