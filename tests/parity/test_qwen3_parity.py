"""Qwen3-VL: the fp32 artifacts against transformers' Qwen3VLForConditionalGeneration, stage by stage.

The tiny checkpoint (tests/conftest.py) has DeepStack on (ViT layers 0 and 2 into LLM layers 0 and
1), a 4x4 learned position table that every test grid must interpolate, head_dim stated apart from
hidden / heads, interleaved M-RoPE sections, tied embeddings and the official chat template. Each
case compares the prompt ids and M-RoPE positions (exactly), the patches (bit for bit), the vision
encoder, merger and DeepStack features, and 64 greedy tokens with the logits of every step.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

FAMILY = "qwen3_vl-sharp"  # greedy answers that vary (tests/conftest.py)
NEW_TOKENS = 64
VIDEO_PIXELS = dict(video_min_pixels=32 * 32 * 4, video_max_pixels=32 * 32 * 24)


def _clip(path: Path, frames: int = 24, size=(176, 112), rate: int = 6) -> Path:
    """An mp4 at its own frame rate (timestamps come from the file's rate, not from --fps)."""
    av = pytest.importorskip("av")
    w, h = size
    base = np.random.default_rng(5).integers(0, 256, (h, w, 3), dtype=np.uint8)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for i in range(frames):
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.roll(base, 7 * i, axis=1), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture(scope="module")
def reference(checkpoint):
    from qvl_export.parity.reference import TorchReference

    return TorchReference(checkpoint(FAMILY))


@pytest.fixture(scope="module")
def pipe(artifacts):
    from qvl_export.runtimes.pipeline import Pipeline

    return Pipeline.load(artifacts(FAMILY))


def _pages(*sizes):
    from qvl_export.parity.samples import render_page

    return [render_page(w, h, seed=31 * i + w) for i, (w, h) in enumerate(sizes)]


def _rel(a, b) -> float:
    """Largest absolute difference relative to the reference's largest magnitude."""
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


def _cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


CASES = ("image", "two-images", "text-only", "video-frames", "video-file")


def _case(name, tmp_path_factory):
    from qvl_export.parity.samples import ALL_CASES

    if name == "image":
        return _pages((640, 336)), [], "What is the total amount due?"
    if name == "two-images":
        return _pages((392, 392), (230, 510)), [], "Compare the totals of the two pages."
    if name == "text-only":
        return [], [], "Write the word invoice three times."
    if name == "video-frames":  # a page panning right, frames already sampled at 2 fps, after an image
        return _pages((200, 150)), next(c for c in ALL_CASES if c.video).videos(), "What does the recording show?"
    return [], [str(_clip(tmp_path_factory.mktemp("q3clip") / "clip.mp4"))], "What happens in this video?"


@pytest.mark.parametrize("name", CASES)
def test_qwen3_matches_transformers(name, pipe, reference, tmp_path_factory):
    from qvl_export.parity.reference import ReferenceCase

    images, videos, prompt = _case(name, tmp_path_factory)
    pixels = VIDEO_PIXELS if videos else {}
    ref = reference.run(ReferenceCase(name, images, prompt, max_new_tokens=NEW_TOKENS, videos=videos, fps=2.0,
                                      **pixels))
    prep = pipe.prepare(images, prompt, videos=videos, fps=2.0, **pixels)
    assert np.array_equal(prep.input_ids, ref.input_ids)  # the official template, timestamps included
    assert np.array_equal(prep.position_ids, ref.position_ids) and prep.rope_delta == ref.rope_delta

    side = pipe.spec.vision.position_side
    for kind, pixels_ref, merger_ref, deep_ref in (("image", ref.pixel_values, ref.merger_out, ref.deepstack_out),
                                                   ("video", ref.pixel_values_videos, ref.video_merger_out,
                                                    ref.video_deepstack_out)):
        kept = [i for i, k in enumerate(prep.kinds) if k == kind]
        if not kept:
            assert merger_ref is None
            continue
        patches, grids = [prep.patches[i] for i in kept], [prep.grids[i] for i in kept]
        assert all(h != side and w != side for _, h, w in grids)  # the table is interpolated, not copied
        assert np.array_equal(np.concatenate(patches), pixels_ref)
        vis = pipe.encode_images(patches, grids)
        if kind == "image":
            assert _cosine(vis.vision_hidden, ref.vision_hidden) > 0.99999
            assert _rel(vis.vision_hidden, ref.vision_hidden) < 1e-5
        assert _cosine(vis.image_embeds, merger_ref) > 0.99999
        assert _rel(vis.image_embeds, merger_ref) < 1e-5
        assert vis.deepstack_embeds.shape == deep_ref.shape == (2, *merger_ref.shape)
        assert _cosine(vis.deepstack_embeds, deep_ref) > 0.99999
        assert _rel(vis.deepstack_embeds, deep_ref) < 1e-5

    gen = pipe.generate(images, prompt, videos=videos, fps=2.0, max_new_tokens=NEW_TOKENS, temperature=0,
                        repetition_penalty=1.0, keep_logits=True, **pixels)
    assert gen.token_ids == ref.generated_ids.tolist()
    assert len(gen.token_ids) == NEW_TOKENS and len(set(gen.token_ids)) > 4  # not one repeated token
    ours = np.stack(gen.step_logits)
    assert min(_cosine(a, b) for a, b in zip(ours, ref.step_logits)) > 0.99999
    assert _rel(ours, ref.step_logits) < 1e-5


def test_deepstack_reaches_the_logits(pipe, reference):
    """Without its DeepStack rows the decoder's prefill logits move far from transformers': the input is
    really used (and the comparison above could not pass without it)."""
    from qvl_export.parity.reference import ReferenceCase

    images, prompt = _pages((300, 200)), "Read the page."
    ref = reference.run(ReferenceCase("deepstack", images, prompt, max_new_tokens=1))
    prep = pipe.prepare(images, prompt)
    vis = pipe.encode_images(prep.patches, prep.grids)

    def prefill(deepstack):
        cache = pipe.new_cache(capacity=len(prep.input_ids) + 1)
        return pipe.decoder_step(prep.input_ids[None], vis.image_embeds, prep.position_ids[:, None, :], cache,
                                 deepstack)[0]

    with_rows = prefill(vis.deepstack_embeds)
    without = prefill(np.zeros_like(vis.deepstack_embeds))
    assert _rel(with_rows, ref.prefill_logits[-1]) < 1e-5
    assert _rel(without, ref.prefill_logits[-1]) > 1e-2
