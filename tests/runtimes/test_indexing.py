"""qvl_export.runtimes.indexing against transformers' own vision towers, window index and rope index."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import Qwen2_5_VLVisionConfig, Qwen2VLVisionConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLVisionRotaryEmbedding
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLVisionRotaryEmbedding
from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

from qvl_export.core.errors import QvlError
from qvl_export.core.spec import VisionSpec
from qvl_export.runtimes.indexing import decode_positions, rope_index, vision_layout, vision_rotary

ROTARY_TOL = 1e-6  # measured: 6e-8 (1 ulp of float32 cos/sin)

GRID_SETS = {
    "one-window-multiple": [(1, 16, 16)],  # 8x8 units: exactly 2x2 windows of 4x4 units
    "ragged": [(1, 10, 14)],  # 5x7 units: edge windows smaller
    "tiny": [(1, 2, 2)],  # a single merged unit
    "wide": [(1, 4, 72)],
    "large": [(1, 36, 52)],
    "multi": [(1, 16, 16), (1, 6, 10), (1, 20, 8), (1, 2, 4)],
    "frames": [(2, 8, 12)],  # t > 1: windows per frame
}


def _real_vision(family: str, **kw) -> VisionSpec:
    return VisionSpec(family=family, depth=32, hidden_size=1280, num_heads=16, intermediate_size=3420,
                      hidden_act="silu", out_hidden_size=2048, fullatt_block_indexes=(7, 15, 23, 31), **kw)


def _hf_window(grids) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """transformers' (unit window_index, token window order, window token lengths)."""
    window_index, cu = get_vision_window_index(torch.tensor(grids), spatial_merge_size=2, window_size=112,
                                               patch_size=14)
    tokens = (window_index[:, None] * 4 + torch.arange(4)).reshape(-1)
    return window_index.numpy(), tokens.numpy(), np.diff(cu.numpy())


# ----------------------------------------------------------------------------- rotary


def _capture_tower_inputs(visual, grids, in_dim: int) -> dict:
    """Run transformers' vision tower; record what its first block is fed and what it returns."""
    seen = {}

    def hook(_module, _args, kwargs):
        seen["cos"], seen["sin"] = (t.detach().numpy() for t in kwargs["position_embeddings"])
        seen["cu_seqlens"] = kwargs["cu_seqlens"].numpy()

    handle = visual.blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        n = sum(t * h * w for t, h, w in grids)
        torch.manual_seed(0)
        with torch.no_grad():
            out = visual(torch.randn(n, in_dim), grid_thw=torch.tensor(grids))
    finally:
        handle.remove()
    seen["last_hidden_state"] = out.last_hidden_state.numpy()
    seen["pooler_output"] = out.pooler_output.numpy()
    return seen


@pytest.mark.parametrize("grids", [GRID_SETS["ragged"], GRID_SETS["multi"], GRID_SETS["frames"]], ids=str)
def test_vision_rotary_matches_tower(tiny, grids):
    """(cos, sin) equal what transformers' vision tower feeds its attention (window order for 2.5)."""
    vision = tiny.spec.vision
    seen = _capture_tower_inputs(tiny.model.model.visual, grids, vision.patch_dim)
    cos, sin = vision_rotary(grids, vision)
    layout = vision_layout(grids, vision)
    order = layout.window_order()  # natural row of each token in the tower's order
    assert cos.shape == (sum(t * h * w for t, h, w in grids), vision.head_dim) and cos.dtype == np.float32
    assert np.abs(cos[order] - seen["cos"]).max() <= ROTARY_TOL
    assert np.abs(sin[order] - seen["sin"]).max() <= ROTARY_TOL
    if not vision.windowed:
        assert np.array_equal(order, np.arange(len(cos)))


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_vision_rotary_real_head_dim(family):
    """Real-size head_dim (80) and large positions, against the transformers rotary module."""
    grids = [(1, 100, 140), (1, 16, 16), (1, 10, 14)]
    if family == "qwen2_vl":
        rotary = Qwen2VLVisionRotaryEmbedding(Qwen2VLVisionConfig(embed_dim=1280, num_heads=16))
    else:
        rotary = Qwen2_5_VLVisionRotaryEmbedding(Qwen2_5_VLVisionConfig(hidden_size=1280, num_heads=16))
    ref_cos, ref_sin = rotary(torch.zeros(1), get_vision_position_ids(torch.tensor(grids), 2))
    cos, sin = vision_rotary(grids, _real_vision(family))
    assert cos.shape == tuple(ref_cos.shape) == (14396, 80)
    assert np.abs(cos - ref_cos.numpy()).max() <= ROTARY_TOL
    assert np.abs(sin - ref_sin.numpy()).max() <= ROTARY_TOL


# ----------------------------------------------------------------------------- layout


@pytest.mark.parametrize("name", list(GRID_SETS))
def test_window_layout_matches_transformers(name):
    grids = GRID_SETS[name]
    vision = _real_vision("qwen2_5_vl")
    layout = vision_layout(grids, vision)
    window_index, hf_tokens, hf_lengths = _hf_window(grids)
    L = vision.window_tokens
    assert L == 64 and layout.window_tokens == L and layout.padded_len % L == 0

    # Valid slots, in order, are transformers' window order.
    assert np.array_equal(layout.window_order(), hf_tokens)
    assert np.array_equal(layout.slots[layout.window_order_rows()], hf_tokens)

    windows = layout.slots.reshape(-1, L)
    ids = layout.image_ids.reshape(-1, L)
    lengths = (windows >= 0).sum(axis=1)
    assert np.all(lengths > 0)  # no empty window
    assert np.array_equal(lengths, hf_lengths)  # same windows (transformers drops its empty ones)
    for w in range(len(windows)):
        n = lengths[w]
        assert np.all(windows[w, n:] == -1) and np.all(ids[w, n:] == -1)  # padding at the end only
        assert len(set(ids[w, :n].tolist())) == 1  # a window never spans two images

    # image ids follow the images' token ranges.
    bounds = np.cumsum([0] + [t * h * w for t, h, w in grids])
    valid = layout.valid
    assert np.array_equal(layout.image_ids[valid], np.searchsorted(bounds, layout.slots[valid], side="right") - 1)

    # unit_slots un-permutes merged units: compact window order position of unit u is argsort(window_index)[u].
    compact_unit_slot = layout.window_order_rows()[::4] // 4
    assert np.array_equal(layout.unit_slots, compact_unit_slot[np.argsort(window_index)])
    # each unit's 4 tokens are contiguous and 4-aligned in the graph sequence
    first = layout.slots[layout.unit_slots * 4]
    assert np.array_equal(first, np.arange(len(layout.unit_slots)) * 4)
    for k in range(4):
        assert np.array_equal(layout.slots[layout.unit_slots * 4 + k], first + k)


def test_qwen2_vl_layout_is_natural():
    grids = GRID_SETS["multi"]
    layout = vision_layout(grids, _real_vision("qwen2_vl"))
    n = sum(t * h * w for t, h, w in grids)
    assert layout.window_tokens == 0 and layout.num_windows == 0 and layout.padded_len == n
    assert np.array_equal(layout.slots, np.arange(n))
    assert np.array_equal(layout.unit_slots, np.arange(n // 4))
    assert np.array_equal(layout.image_ids, np.repeat(np.arange(len(grids)), [t * h * w for t, h, w in grids]))


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("name", ["ragged", "multi", "frames", "one-window-multiple"])
def test_gather_round_trip(family, name):
    grids = GRID_SETS[name]
    layout = vision_layout(grids, _real_vision(family))
    n = sum(t * h * w for t, h, w in grids)
    x = np.random.default_rng(0).standard_normal((n, 5)).astype(np.float32)
    graph = layout.gather(x, fill=np.nan)
    assert graph.shape == (layout.padded_len, 5)
    assert np.all(np.isnan(graph[~layout.valid]))
    order = _hf_window(grids)[1] if family == "qwen2_5_vl" else np.arange(n)
    assert np.array_equal(graph[layout.window_order_rows()], x[order])
    assert np.array_equal(graph[layout.natural_order_rows()], x)
    cos, sin = vision_rotary(grids, _real_vision(family))
    assert np.all(layout.gather(cos, fill=1.0)[~layout.valid] == 1.0)
    with pytest.raises(QvlError):
        layout.gather(x[:-4])


def test_tower_output_order_and_unit_slots(tiny):
    """last_hidden_state is in window order; merger on the padded graph order + unit_slots = pooler_output."""
    grids = GRID_SETS["multi"] + [(1, 10, 14)]
    vision = tiny.spec.vision
    visual = tiny.model.model.visual
    seen = _capture_tower_inputs(visual, grids, vision.patch_dim)
    layout = vision_layout(grids, vision)
    hidden = seen["last_hidden_state"]  # [S, C], transformers' order
    graph = np.zeros((layout.padded_len, hidden.shape[1]), dtype=np.float32)
    graph[layout.window_order_rows()] = hidden
    with torch.no_grad():
        merged = visual.merger(torch.from_numpy(graph)).numpy()  # [S_pad / 4, out]
    assert np.abs(merged[layout.unit_slots] - seen["pooler_output"]).max() <= 1e-5
    if vision.windowed:  # guard that the permutation is not the identity for this grid set
        assert not np.array_equal(layout.window_order(), np.arange(layout.num_tokens))


def test_layout_rejects_bad_grids():
    vision = _real_vision("qwen2_5_vl")
    with pytest.raises(QvlError):
        vision_layout([(1, 5, 4)], vision)  # h not a multiple of the merge size
    with pytest.raises(QvlError):
        vision_layout([], vision)
    with pytest.raises(QvlError):
        vision_rotary([(1, 4)], vision)


# ----------------------------------------------------------------------------- rope index


def _prompt(tokens, grids, rng, texts=None) -> list[int]:
    """Text, then per image: text, <vision_start>, image pads, <vision_end>; then trailing text."""
    ids = list(rng.integers(0, 600, 7))
    for k, (t, h, w) in enumerate(grids):
        ids += list(rng.integers(0, 600, texts[k] if texts else 3))
        ids += [tokens.vision_start_token_id] + [tokens.image_token_id] * (t * h * w // 4) + [tokens.vision_end_token_id]
    ids += list(rng.integers(0, 600, 5))
    return [int(i) for i in ids]


@pytest.mark.parametrize("grids", [
    [],
    [(1, 4, 6)],
    [(1, 16, 10), (1, 2, 2)],
    [(1, 6, 22), (1, 12, 4), (1, 36, 52)],
], ids=lambda g: f"{len(g)}-images")
def test_rope_index_matches_transformers(tiny, grids):
    tokens = tiny.spec.tokens
    rng = np.random.default_rng(len(grids))
    ids = _prompt(tokens, grids, rng, texts=[1, 4, 9][: len(grids)])
    positions, delta = rope_index(np.array(ids), grids, tokens, tiny.spec.vision.spatial_merge_size)

    input_ids = torch.tensor([ids])
    mm = (input_ids == tokens.image_token_id).int()
    ref_pos, ref_delta = tiny.model.model.get_rope_index(
        input_ids, mm_token_type_ids=mm, image_grid_thw=torch.tensor(grids).reshape(-1, 3) if grids else None)
    assert positions.dtype == np.int64 and positions.shape == (3, len(ids))
    assert np.array_equal(positions, ref_pos[:, 0].numpy())
    assert delta == int(ref_delta.reshape(-1)[0])
    if not grids:
        assert delta == 0 and np.array_equal(positions, np.tile(np.arange(len(ids)), (3, 1)))


def test_rope_index_image_at_both_ends(tiny):
    """Image tokens first and last (no text around them) - edge runs of the grouping."""
    tokens = tiny.spec.tokens
    grids = [(1, 4, 6), (1, 8, 2)]
    ids = [tokens.image_token_id] * 6 + [5, 9, 11] + [tokens.image_token_id] * 4
    positions, delta = rope_index(np.array(ids), grids, tokens, 2)
    input_ids = torch.tensor([ids])
    ref_pos, ref_delta = tiny.model.model.get_rope_index(
        input_ids, mm_token_type_ids=(input_ids == tokens.image_token_id).int(), image_grid_thw=torch.tensor(grids))
    assert np.array_equal(positions, ref_pos[:, 0].numpy()) and delta == int(ref_delta.reshape(-1)[0])


def test_decode_positions_match_transformers(tiny_models):
    """Generated tokens: transformers' compute_3d_position_ids with a cache and stored rope_deltas."""
    tiny = tiny_models["qwen2_5_vl"]
    tokens = tiny.spec.tokens
    grids = [(1, 6, 22), (1, 12, 4)]
    ids = _prompt(tokens, grids, np.random.default_rng(1))
    _, delta = rope_index(np.array(ids), grids, tokens, 2)
    assert delta < 0
    inner = tiny.model.model
    saved = inner.rope_deltas
    try:
        inner.rope_deltas = torch.tensor([[delta]])
        for cache_len, n in [(len(ids), 1), (len(ids) + 7, 1), (len(ids), 3)]:
            ref = inner.compute_3d_position_ids(
                input_ids=None, image_grid_thw=None, video_grid_thw=None,
                inputs_embeds=torch.zeros(1, n, 8), attention_mask=None,
                past_key_values=SimpleNamespace(get_seq_length=lambda c=cache_len: c))
            assert np.array_equal(decode_positions(cache_len, delta, n), ref[:, 0].numpy())
    finally:
        inner.rope_deltas = saved
    assert decode_positions(10, -3, 2).tolist() == [[7, 8]] * 3


def test_rope_index_errors(tiny_models):
    tokens = tiny_models["qwen2_5_vl"].spec.tokens
    rng = np.random.default_rng(0)
    ids = _prompt(tokens, [(1, 4, 6)], rng)
    with pytest.raises(QvlError, match="needs 8"):
        rope_index(np.array(ids), [(1, 4, 8)], tokens, 2)  # 8 tokens expected, 6 present
    with pytest.raises(QvlError, match="grid"):
        rope_index(np.array(ids), [], tokens, 2)
    with pytest.raises(QvlError, match="grid"):
        rope_index(np.array(ids), [(1, 4, 6), (1, 2, 2)], tokens, 2)
    with pytest.raises(QvlError, match="video"):
        rope_index(np.array(ids + [tokens.video_token_id]), [(1, 4, 6)], tokens, 2)
    with pytest.raises(QvlError):
        rope_index(np.array([], dtype=np.int64), [], tokens, 2)
    # Two images with no token between them form one run: refused, not silently mis-positioned.
    fused = [1, 2] + [tokens.image_token_id] * 7 + [3]
    with pytest.raises(QvlError):
        rope_index(np.array(fused), [(1, 2, 2), (1, 4, 6)], tokens, 2)


# ----------------------------------------------------------------------------- Qwen3-VL position table


@pytest.mark.parametrize("side,grids", [(48, [(1, 34, 26), (1, 2, 2), (3, 100, 62)]), (4, [(1, 20, 40), (2, 6, 8)]),
                                        (5, [(1, 2, 60)])])
def test_position_taps_equal_transformers(side, grids):
    """Rows and weights of the learned position table's bilinear resampling, bit for bit: transformers'
    get_vision_interpolation_indices_and_weights(mode="bilinear", align_corners=True, merge-block order),
    which Qwen3VLVisionModel sums as table[idx] * w; video frames (t > 1) repeat their frame's taps."""
    from qvl_export.runtimes.indexing import position_taps
    from transformers.vision_utils import get_vision_interpolation_indices_and_weights

    vision = VisionSpec(family="qwen3_vl", depth=1, hidden_size=64, num_heads=4, intermediate_size=128,
                        hidden_act="gelu_pytorch_tanh", out_hidden_size=64, patch_size=16,
                        num_position_embeddings=side * side)
    ours_idx, ours_w = position_taps(grids, vision)
    ref_idx, ref_w = get_vision_interpolation_indices_and_weights(torch.tensor(grids), side, "bilinear", True, 2)
    assert ours_idx.dtype == np.int64 and ours_w.dtype == np.float32
    np.testing.assert_array_equal(ours_idx, ref_idx.numpy())
    np.testing.assert_array_equal(ours_w, ref_w.numpy())
    assert not np.array_equal(ours_w.max(1), np.ones(len(ours_w), np.float32))  # really interpolated
    with pytest.raises(QvlError, match="position table"):
        position_taps(grids, _real_vision("qwen2_5_vl"))
