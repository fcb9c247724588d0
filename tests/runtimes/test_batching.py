"""Continuous batching (runtimes/batching.py): every row of a batch generates what it generates alone.

The tiny checkpoints here have 4x the suite's usual weight scale (init_std 0.2, as conftest's
``qwen3_vl-sharp``): at 0.05 every greedy answer is one token repeated, so identical answers would say
little; at 0.2 they vary token by token and some requests end on an end token early (a row leaves the
batch while others run)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from qvl_export.core.errors import QvlError
from qvl_export.runtimes.batching import BatchDecoder, KVPool, Request
from qvl_export.runtimes.pipeline import Pipeline

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


@pytest.fixture(scope="module")
def sharp_artifacts(tmp_path_factory, tiny_dims):
    """sharp_artifacts(family) -> fp32 ort artifacts of the family's tiny checkpoint at init_std 0.2."""
    from qvl_export.building.artifacts import BuildOptions, build
    from qvl_export.loading.synthetic import make_checkpoint

    built = {}

    def get(family: str):
        if family not in built:
            root = tmp_path_factory.mktemp(f"batch-{family}")
            dims = tiny_dims["qwen3_vl-sharp"] if family == "qwen3_vl" else replace(tiny_dims[family], init_std=0.2)
            ckpt = make_checkpoint(root / "ckpt", dims)
            build(ckpt, root / "art", BuildOptions())
            built[family] = root / "art"
        return built[family]

    return get


def _images():
    rng = np.random.default_rng(0)
    sizes = ((56, 84), (112, 56), (84, 84))
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def mixed_requests():
    """Four requests: one image, two images of different sizes with a long prompt, text only, another image;
    different prompt lengths and different numbers of new tokens."""
    a, b, c = _images()
    return [(dict(images=[a], prompt="hello there"), 24),
            (dict(images=[b, c], prompt="what is it and why so long a prompt here, tell me more"), 30),
            (dict(prompt="text only"), 16),
            (dict(images=[c], prompt="Describe."), 20)]


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_of_four_mixed_requests_equals_each_alone(sharp_artifacts, family):
    pipe = Pipeline.load(sharp_artifacts(family), threads=1)
    cases = mixed_requests()
    alone = [pipe.generate(max_new_tokens=n, temperature=0, keep_logits=True, **kw) for kw, n in cases]
    assert len({tuple(g.token_ids) for g in alone}) == 4 and any(len(set(g.token_ids)) > 4 for g in alone)
    lengths = {len(pipe.prepare(**kw).input_ids) for kw, _ in cases}
    assert len(lengths) == 4  # four different prompt lengths: four different KV lengths per step
    for max_batch in (4, 2):  # 2: rows join as others leave, a finished row's slot is reused
        batcher = BatchDecoder(pipe, max_batch=max_batch, capacity=256)
        batched = batcher.run([Request(pipe.prepare(**kw), n, temperature=0, keep_logits=True) for kw, n in cases])
        assert batcher.peak_batch == max_batch and not batcher.rows
        for one, row in zip(alone, batched):
            assert row.token_ids == one.token_ids and row.finish_reason == one.finish_reason
            assert row.text == one.text
            worst = max(float(np.abs(x - y).max()) for x, y in zip(one.step_logits, row.step_logits))
            assert worst <= 1e-5, worst  # measured: 0.0 (bit-identical) on all three families


def test_seeded_sampling_per_row_equals_alone(sharp_artifacts):
    pipe = Pipeline.load(sharp_artifacts("qwen2_vl"), threads=1)
    cases = mixed_requests()
    settings = dict(temperature=0.9, top_p=0.9, repetition_penalty=1.1)
    alone = [pipe.generate(max_new_tokens=n, seed=i, **settings, **kw) for i, (kw, n) in enumerate(cases)]
    batched = BatchDecoder(pipe, max_batch=4, capacity=256).run(
        [Request(pipe.prepare(**kw), n, seed=i, **settings) for i, (kw, n) in enumerate(cases)])
    assert [g.token_ids for g in batched] == [g.token_ids for g in alone]


def test_streamed_pieces_are_the_text(sharp_artifacts):
    pipe = Pipeline.load(sharp_artifacts("qwen2_5_vl"), threads=1)
    pieces = {i: [] for i in range(4)}
    requests = [Request(pipe.prepare(**kw), n, temperature=0, on_text=pieces[i].append)
                for i, (kw, n) in enumerate(mixed_requests())]
    for i, g in enumerate(BatchDecoder(pipe, max_batch=3, capacity=256).run(requests)):
        assert "".join(pieces[i]) == g.text


def test_capacity_and_layout_refused_in_one_line(sharp_artifacts, checkpoint, tmp_path):
    pipe = Pipeline.load(sharp_artifacts("qwen2_vl"), threads=1)
    batcher = BatchDecoder(pipe, max_batch=2, capacity=64)
    prep = pipe.prepare(prompt="hello")
    with pytest.raises(QvlError, match="holds 64 tokens per sequence"):
        batcher.admit(Request(prep, 64))
    assert not batcher.rows and batcher.free == 2
    with pytest.raises(QvlError, match="over the model's context"):
        BatchDecoder(pipe, capacity=pipe.max_context + 1)
    with pytest.raises(QvlError, match="at least 1"):
        BatchDecoder(pipe, max_batch=0)

    from qvl_export.building.artifacts import BuildOptions, build

    plain = tmp_path / "plain"  # the concat-KV decoder (no fusions: the graph the trt target ships)
    build(checkpoint("qwen2_5_vl"), plain, BuildOptions(passes=["fold_constants"]))
    plain_pipe = Pipeline.load(plain, threads=1)
    with pytest.raises(QvlError, match="use a batch of 1"):
        BatchDecoder(plain_pipe, max_batch=2)
    cases = mixed_requests()[:2]
    one_by_one = BatchDecoder(plain_pipe, max_batch=1).run(
        [Request(plain_pipe.prepare(**kw), 8, temperature=0) for kw, _ in cases])
    assert [g.token_ids for g in one_by_one] == [plain_pipe.generate(max_new_tokens=8, temperature=0, **kw).token_ids
                                                 for kw, _ in cases]


def test_pool_move_copies_valid_rows_only():
    pool = KVPool(num_layers=1, kv_heads=2, head_dim=3, dtype=np.float32, slots=3, capacity=8)
    pool.arrays[0][2] = 7.0
    pool.move(2, 0, 5)
    assert (pool.arrays[0][0, :, :5] == 7).all() and (pool.arrays[0][0, :, 5:] == 0).all()
    cache = pool.slot_cache(1)
    assert np.shares_memory(cache.arrays[0], pool.arrays[0]) and cache.arrays[0].flags.c_contiguous
    assert all(a.flags.c_contiguous for a in pool.first(2))
