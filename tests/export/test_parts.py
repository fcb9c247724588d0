"""Each ONNX part against its own export-ready torch module, on shapes the trace never saw."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from qvl_export.export.parts import decoder_part, merger_part, vision_part
from qvl_export.loading.config import parse_model_config
from qvl_export.loading.weights import CheckpointWeights
from qvl_export.core.manifest import Manifest
from qvl_export.runtimes import indexing

FAMILIES = ["qwen2_vl", "qwen2_5_vl"]


def session(folder, part):
    return ort.InferenceSession(str(folder / Manifest.read(folder).parts[part].file),
                                providers=["CPUExecutionProvider"])


def vision_feeds(spec, grids, seed=0):
    rng = np.random.default_rng(seed)
    layout = indexing.vision_layout(grids, spec.vision)
    cos, sin = indexing.vision_rotary(grids, spec.vision)
    patches = rng.standard_normal((layout.num_tokens, spec.vision.patch_dim)).astype(np.float32)
    return layout, {"patches": layout.gather(patches, 0.0), "rope_cos": layout.gather(cos, 1.0),
                    "rope_sin": layout.gather(sin, 0.0), "image_ids": layout.image_ids}


@pytest.mark.parametrize("family", FAMILIES)
def test_vision_and_merger_match_torch(family, checkpoint, artifacts):
    ckpt, art = checkpoint(family), artifacts(family)
    spec, weights = parse_model_config(ckpt), CheckpointWeights(ckpt)
    grids = [(1, 10, 14), (1, 6, 4)]  # two images, ragged windows
    layout, feeds = vision_feeds(spec, grids)
    (ours,) = session(art, "vision").run(None, feeds)
    module = vision_part(spec, weights).build()
    with torch.no_grad():
        ref = module(*(torch.from_numpy(feeds[n]) for n in module.input_names)).numpy()
    valid = layout.valid
    np.testing.assert_allclose(ours[valid], ref[valid], atol=2e-4, rtol=1e-4)
    assert np.isfinite(ours).all()  # padding slots too

    (merged,) = session(art, "merger").run(None, {"vision_hidden": ours})
    merger = merger_part(spec, weights).build()
    with torch.no_grad():
        ref_m = merger(torch.from_numpy(ours)).numpy()
    np.testing.assert_allclose(merged, ref_m, atol=2e-5, rtol=1e-4)
    assert merged.shape == (layout.padded_len // 4, spec.text.hidden_size)


def test_fused_windows_equal_dense_mask(checkpoint):
    """The per-window attention and the S x S block-diagonal baseline compute the same function."""
    ckpt = checkpoint("qwen2_5_vl")
    spec, weights = parse_model_config(ckpt), CheckpointWeights(ckpt)
    layout, feeds = vision_feeds(spec, [(1, 12, 18), (1, 4, 6)], seed=3)
    args = [torch.from_numpy(feeds[n]) for n in ("patches", "rope_cos", "rope_sin", "image_ids")]
    with torch.no_grad():
        fused = vision_part(spec, weights, "fused").build()(*args).numpy()
        dense = vision_part(spec, weights, "dense").build()(*args).numpy()
    valid = layout.valid
    np.testing.assert_allclose(fused[valid], dense[valid], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_decoder_prefill_decode_batch(family, checkpoint, artifacts):
    """Prefill with images (empty past), then decode steps, batch 2, vs the torch module.

    The artifacts' decoder may hold its K/V in fixed buffers updated in place (fuse_decoder_attention):
    it is fed through the runtime's own cache code, and its valid rows are compared.
    """
    from qvl_export.runtimes.onnxrt import in_place_outputs, run_in_place
    from qvl_export.runtimes.pipeline import KVCache, advance_cache, decoder_feeds, kv_layout

    ckpt, art = checkpoint(family), artifacts(family)
    spec, weights = parse_model_config(ckpt), CheckpointWeights(ckpt)
    t = spec.text
    module = decoder_part(spec, weights).build()
    sess = session(art, "decoder")
    inputs, outputs = [i.name for i in sess.get_inputs()], [o.name for o in sess.get_outputs()]
    layout, shared = kv_layout(inputs), in_place_outputs(inputs, outputs)
    rng = np.random.default_rng(5)
    b, seq = 2, 11
    ids = rng.integers(0, 100, (b, seq)).astype(np.int64)
    ids[:, 2:6] = spec.tokens.image_token_id
    embeds = rng.standard_normal((8, t.hidden_size)).astype(np.float32)
    pos = np.stack([np.arange(seq), np.arange(seq) // 2, np.arange(seq) % 3])[:, None].repeat(b, 1)
    pos = pos.astype(np.int64)
    cache = KVCache(t.num_hidden_layers, t.num_key_value_heads, t.head_dim, np.float32, b)
    for step in range(3):
        past = [a.copy() for a in cache.valid()]
        feeds = decoder_feeds(layout, ids, embeds, pos, cache)
        out = run_in_place(sess, outputs, feeds, shared) if shared else sess.run(outputs, feeds)
        advance_cache(layout, cache, out[1:], ids.shape[1])
        with torch.no_grad():
            ref = module(*(torch.from_numpy(x) for x in (ids, embeds, pos, *past)))
        np.testing.assert_allclose(out[0], ref[0].numpy(), atol=1e-4, rtol=1e-4)
        for o, r in zip(cache.valid(), ref[1:]):
            np.testing.assert_allclose(o, r.numpy(), atol=1e-5, rtol=1e-4)
        assert cache.length == past[0].shape[2] + ids.shape[1]
        ids = rng.integers(0, 100, (b, 1)).astype(np.int64)
        embeds = np.zeros((0, t.hidden_size), np.float32)
        pos = np.full((3, b, 1), cache.length + 7, dtype=np.int64)


QWEN3 = "qwen3_vl-sharp"  # the checkpoint whose fp32 artifacts the Qwen3-VL parity tests build


def test_qwen3_interleaved_mrope_matches_transformers(checkpoint):
    """The folded M-RoPE (one integer select per frequency) equals transformers' interleaved
    recomposition for positions whose t, h and w all differ, tail frequencies included."""
    from transformers import AutoConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding

    ckpt = checkpoint(QWEN3)
    spec = parse_model_config(ckpt)
    assert spec.text.mrope_interleaved and sum(spec.text.mrope_section) * 2 == spec.text.head_dim
    module = decoder_part(spec, CheckpointWeights(ckpt)).skeleton()
    rng = np.random.default_rng(0)
    pos = torch.from_numpy(rng.integers(0, 5000, (3, 2, 9)))
    cos, sin = module.rotary(pos)  # [B, 1, T, hd]
    ref = Qwen3VLTextRotaryEmbedding(AutoConfig.from_pretrained(ckpt).text_config)
    ref_cos, ref_sin = ref(torch.zeros(1, dtype=torch.float32), pos)  # [B, T, hd]
    np.testing.assert_allclose(cos[:, 0].numpy(), ref_cos.numpy(), atol=1e-6)
    np.testing.assert_allclose(sin[:, 0].numpy(), ref_sin.numpy(), atol=1e-6)


def test_qwen3_decoder_deepstack_batch(checkpoint, artifacts):
    """Qwen3-VL's decoder (q/k norms, GQA over in-place buffers, DeepStack rows) against its torch module:
    a batch of 2 prefilled with images, then decode steps without any."""
    from qvl_export.runtimes.onnxrt import in_place_outputs, run_in_place
    from qvl_export.runtimes.pipeline import KVCache, advance_cache, decoder_feeds, kv_layout

    ckpt, art = checkpoint(QWEN3), artifacts(QWEN3)
    spec, weights = parse_model_config(ckpt), CheckpointWeights(ckpt)
    t, layers = spec.text, spec.vision.deepstack
    module = decoder_part(spec, weights).build()
    sess = session(art, "decoder")
    inputs, outputs = [i.name for i in sess.get_inputs()], [o.name for o in sess.get_outputs()]
    layout, shared = kv_layout(inputs), in_place_outputs(inputs, outputs)
    assert layout == "buffer" and "deepstack_embeds" in inputs
    rng = np.random.default_rng(6)
    b, seq = 2, 11
    ids = rng.integers(0, 100, (b, seq)).astype(np.int64)
    ids[:, 2:6] = spec.tokens.image_token_id
    embeds = rng.standard_normal((8, t.hidden_size)).astype(np.float32)
    deep = rng.standard_normal((layers, 8, t.hidden_size)).astype(np.float32)
    pos = np.stack([np.arange(seq), np.arange(seq) // 2, np.arange(seq) % 3])[:, None].repeat(b, 1).astype(np.int64)
    cache = KVCache(t.num_hidden_layers, t.num_key_value_heads, t.head_dim, np.float32, b)
    for step in range(3):
        past = [a.copy() for a in cache.valid()]
        feeds = decoder_feeds(layout, ids, embeds, pos, cache, deep)
        out = run_in_place(sess, outputs, feeds, shared)
        advance_cache(layout, cache, out[1:], ids.shape[1])
        with torch.no_grad():
            ref = module(*(torch.from_numpy(x) for x in (ids, embeds, deep, pos, *past)))
        np.testing.assert_allclose(out[0], ref[0].numpy(), atol=1e-4, rtol=1e-4)
        for o, r in zip(cache.valid(), ref[1:]):
            np.testing.assert_allclose(o, r.numpy(), atol=1e-5, rtol=1e-4)
        ids = rng.integers(0, 100, (b, 1)).astype(np.int64)
        embeds = np.zeros((0, t.hidden_size), np.float32)
        deep = np.zeros((layers, 0, t.hidden_size), np.float32)
        pos = np.full((3, b, 1), cache.length + 7, dtype=np.int64)
