"""Host-side index math for the thin runtime (numpy only).

Everything here is data-dependent integer bookkeeping that does not belong in an exported graph
(it is what breaks ``torch.export``): the vision tower's 2-D rotary table, the order in which the
exported vision graph consumes patch tokens (Qwen2.5-VL windows, padded to a fixed window length),
and the LLM's 3-D M-RoPE positions. Each function reproduces a transformers 5.x function; the
tests compare against transformers itself:

- :func:`vision_rotary` - the (cos, sin) that transformers' vision towers compute in
  ``Qwen2VLVisionRotaryEmbedding`` / ``Qwen2_5_VLVisionRotaryEmbedding`` from
  ``transformers.vision_utils.get_vision_position_ids``, in natural (processor) token order.
- :func:`vision_layout` - for Qwen2.5-VL the window order of
  ``transformers.vision_utils.get_vision_window_index``, with every window padded to
  ``vision.window_tokens`` slots so the graph can run windowed attention as a reshape to
  ``[num_windows, L]`` plus a key mask instead of data-dependent ``cu_seqlens`` loops.
- :func:`rope_index` - ``Qwen2VLModel.get_rope_index`` / ``Qwen2_5_VLModel.get_rope_index`` for
  prompts with images and videos (``mm_token_type_ids`` 1 on image tokens, 2 on video tokens).
- :func:`position_taps` - Qwen3-VL's learned position table resampled to each grid: the 4 table rows
  and weights per patch of ``transformers.vision_utils.get_vision_interpolation_indices_and_weights``
  (bilinear, align_corners, merge-block order); the graph gathers and sums them.
- :func:`frame_grids` - a video's (t, h, w) as t one-frame grids: how the vision graph sees it.
- :func:`decode_positions` - positions of generated tokens (plain 1-D RoPE shifted by the delta).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import numpy as np

from qvl_export.core.errors import QvlError
from qvl_export.core.spec import TokenSpec, VisionSpec

GridsLike = Union[Sequence[Sequence[int]], np.ndarray]


def _grids(grid_thws: GridsLike, merge: int) -> list[tuple[int, int, int]]:
    """Validate ``grid_thws`` ([n, 3] of (t, h, w) in patches) and return them as int tuples."""
    arr = np.asarray(grid_thws, dtype=np.int64)
    if arr.ndim != 2 or arr.shape[1] != 3:
        raise QvlError(f"grid_thw must have shape [num_images, 3], got {list(arr.shape)}.")
    out = []
    for t, h, w in arr.tolist():
        if t <= 0 or h <= 0 or w <= 0 or h % merge or w % merge:
            raise QvlError(f"grid_thw {[t, h, w]} is invalid: all sizes must be positive and h, w multiples of "
                           f"the spatial merge size {merge}; use the grid returned by preprocess_image.")
        out.append((int(t), int(h), int(w)))
    return out


# ----------------------------------------------------------------------------- vision rotary


def vision_inv_freq(vision: VisionSpec) -> np.ndarray:
    """``inv_freq [head_dim // 4] float32`` of the axial vision RoPE, bit-identical to torch's.

    torch computes ``1 / theta ** (arange(0, d, 2) / d)`` (d = head_dim // 2) in float32; the power
    evaluated in float64 and rounded, then a float32 reciprocal, reproduces it bit for bit (numpy's
    float32 ``power`` is off by one ulp for some head dims).
    """
    spatial_dim = vision.head_dim // 2
    exponent = np.arange(0, spatial_dim, 2, dtype=np.float32) / np.float32(spatial_dim)
    power = np.power(np.float64(vision.rope_theta), exponent.astype(np.float64)).astype(np.float32)
    return (np.float32(1.0) / power).astype(np.float32)


def vision_position_ids(grid_thws: GridsLike, spatial_merge_size: int) -> np.ndarray:
    """``positions [S, 2] int64`` (row, col) of every patch token in natural order.

    Natural order = processor order: merge-unit-major ((h/m, w/m, m, m) per frame), frames repeated.
    Same as ``transformers.vision_utils.get_vision_position_ids``.
    """
    m = spatial_merge_size
    parts = []
    for t, h, w in _grids(grid_thws, m):
        hpos, wpos = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")  # [h, w]
        hpos = hpos.reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3).reshape(-1)
        wpos = wpos.reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3).reshape(-1)
        parts.append(np.tile(np.stack([hpos, wpos], axis=-1), (t, 1)))
    if not parts:
        return np.zeros((0, 2), dtype=np.int64)
    return np.concatenate(parts, axis=0).astype(np.int64)


def vision_rotary(grid_thws: GridsLike, vision: VisionSpec) -> tuple[np.ndarray, np.ndarray]:
    """``(cos, sin)`` each ``[S, head_dim] float32`` in natural token order.

    Layout as transformers: per token ``[h_freqs, w_freqs, h_freqs, w_freqs]`` (head_dim/4 each),
    i.e. ``emb = cat(freqs, freqs)`` with ``freqs = cat(h * inv_freq, w * inv_freq)``.
    Angles are formed in float32 exactly like torch (``float32(pos) * inv_freq``: identical
    rounding), then cos/sin are evaluated in float64 and rounded to float32 - correctly rounded,
    so within 1 ulp of torch's float32 cos/sin (max abs diff ~6e-8 in the tests).
    """
    pos = vision_position_ids(grid_thws, vision.spatial_merge_size).astype(np.float32)  # [S, 2]
    inv_freq = vision_inv_freq(vision)  # [head_dim/4]
    angles = pos[:, :, None] * inv_freq[None, None, :]  # [S, 2, head_dim/4] float32
    angles = angles.reshape(len(pos), -1)  # [S, head_dim/2]: h freqs then w freqs
    cos = np.cos(angles.astype(np.float64)).astype(np.float32)
    sin = np.sin(angles.astype(np.float64)).astype(np.float32)
    return np.concatenate([cos, cos], axis=-1), np.concatenate([sin, sin], axis=-1)


# ----------------------------------------------------------------------------- position table (Qwen3-VL)


def _axis_taps(index: np.ndarray, size: np.ndarray, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear, align_corners=True taps along one axis: ``(taps [n, 2] int64, weights [n, 2] float32)``.

    The float32 arithmetic of transformers' ``_interpolation_axis_taps_weights`` operation for operation
    (``index * (side - 1) / max(size - 1, 1)``, floor, ``(src - floor - offset).abs()``, ``1 - d`` clamped
    at 0), so the weights are bit-identical; out-of-range taps are clamped to the border."""
    src = index.astype(np.float32) * np.float32(side - 1) / np.maximum(size - 1, 1).astype(np.float32)
    floor = np.floor(src)
    offsets = np.arange(2, dtype=np.float32)
    taps = np.clip(floor.astype(np.int64)[:, None] + np.arange(2), 0, side - 1)
    distance = np.abs(src[:, None] - floor[:, None] - offsets)
    return taps, np.maximum(np.float32(1) - distance, np.float32(0)).astype(np.float32)


def position_taps(grid_thws: GridsLike, vision: VisionSpec) -> tuple[np.ndarray, np.ndarray]:
    """``(pos_indices [S, 4] int64, pos_weights [S, 4] float32)`` in natural token order.

    Qwen3-VL adds to every patch its grid position's value of the learned ``side x side`` table
    bilinearly resampled to the image's (h, w) grid with align_corners: ``sum_k table[idx_k] * w_k`` over
    the 4 nearest table entries (rows ``r * side + c`` in the order (r0, c0), (r0, c1), (r1, c0), (r1, c1)),
    patches in merge-block order, repeated per frame - transformers'
    ``get_vision_interpolation_indices_and_weights(mode="bilinear", align_corners=True)``.
    """
    side = vision.position_side
    if side < 2:
        raise QvlError("this vision tower has no learned position table (num_position_embeddings); only "
                       "Qwen3-VL checkpoints use position_taps.")
    m = vision.spatial_merge_size
    grids = _grids(grid_thws, m)
    pos = vision_position_ids(grids, m)  # [S, 2] (row, col), merge-block order, frames repeated
    heights = np.concatenate([np.full(t * h * w, h, dtype=np.int64) for t, h, w in grids]) if grids else \
        np.zeros(0, np.int64)
    widths = np.concatenate([np.full(t * h * w, w, dtype=np.int64) for t, h, w in grids]) if grids else \
        np.zeros(0, np.int64)
    h_taps, h_weights = _axis_taps(pos[:, 0], heights, side)
    w_taps, w_weights = _axis_taps(pos[:, 1], widths, side)
    indices = (h_taps[:, :, None] * side + w_taps[:, None, :]).reshape(-1, 4)
    weights = (h_weights[:, :, None] * w_weights[:, None, :]).reshape(-1, 4)
    return np.ascontiguousarray(indices, dtype=np.int64), np.ascontiguousarray(weights, dtype=np.float32)


# ----------------------------------------------------------------------------- vision layout


@dataclass(frozen=True, eq=False)  # arrays: compare fields explicitly
class VisionLayout:
    """How natural-order patch tokens map onto the sequence the exported vision graph consumes.

    - ``slots [S_pad] int64``: natural-order patch row each graph slot takes, -1 for padding.
    - ``image_ids [S_pad] int64``: image (0..n-1) of each slot, -1 for padding.
    - ``unit_slots [N_units] int64``: for each merged unit in natural order (images concatenated),
      the index of its merged unit in the graph sequence (slot // merge_unit of its first token).
      ``merger_out_graph[unit_slots]`` is the merger output in natural (LLM) order.
    - ``window_tokens`` (L): slots per window; ``S_pad`` is a multiple of L. 0 = no windows.
    """

    slots: np.ndarray
    image_ids: np.ndarray
    unit_slots: np.ndarray
    window_tokens: int
    merge_unit: int = 4

    @property
    def num_tokens(self) -> int:
        """S: real patch tokens."""
        return int((self.slots >= 0).sum())

    @property
    def padded_len(self) -> int:
        """S_pad: graph sequence length (real + padding slots)."""
        return int(self.slots.shape[0])

    @property
    def num_windows(self) -> int:
        return self.padded_len // self.window_tokens if self.window_tokens else 0

    @property
    def valid(self) -> np.ndarray:
        """``[S_pad] bool``: True for real tokens (the key mask of windowed attention)."""
        return self.slots >= 0

    def gather(self, x: np.ndarray, fill: float | np.ndarray = 0) -> np.ndarray:
        """``x [S, ...]`` in natural order -> ``[S_pad, ...]`` in graph order, padding rows = ``fill``.

        Use ``fill=0`` for patches, ``fill=1`` for cos and ``fill=0`` for sin (identity rotation).
        """
        x = np.asarray(x)
        if x.shape[0] != self.num_tokens:
            raise QvlError(f"expected {self.num_tokens} rows in natural order, got {x.shape[0]}; "
                           "the array does not belong to this image grid.")
        out = np.empty((self.padded_len, *x.shape[1:]), dtype=x.dtype)
        valid = self.valid
        out[valid] = x[self.slots[valid]]
        out[~valid] = fill
        return out

    def window_order_rows(self) -> np.ndarray:
        """``[S] int64`` graph slots of the real tokens, in order.

        ``y_graph[window_order_rows()]`` drops the padding and gives the order of transformers'
        vision tower ``last_hidden_state`` (window order for Qwen2.5-VL, natural for Qwen2-VL).
        """
        return np.flatnonzero(self.valid).astype(np.int64)

    def natural_order_rows(self) -> np.ndarray:
        """``[S] int64`` graph slot of each natural-order token: ``y_graph[natural_order_rows()]``."""
        rows = np.empty(self.num_tokens, dtype=np.int64)
        valid = self.window_order_rows()
        rows[self.slots[valid]] = valid
        return rows

    def window_order(self) -> np.ndarray:
        """``[S] int64`` natural row of each token in transformers' window order (``slots`` minus padding)."""
        return self.slots[self.valid].astype(np.int64)


def _window_units(t: int, lh: int, lw: int, ws: int) -> np.ndarray:
    """``[num_windows, ws*ws] int64`` unit indices (frame-local, -1 = outside the image) per window.

    Windows are row-major over (frame, window row, window col), units row-major inside a window:
    the order of ``get_vision_window_index``; windows with no unit are not produced.
    """
    nwh, nww = -(-lh // ws), -(-lw // ws)
    index = np.full((t, nwh * ws, nww * ws), -1, dtype=np.int64)
    index[:, :lh, :lw] = np.arange(t * lh * lw, dtype=np.int64).reshape(t, lh, lw)
    index = index.reshape(t, nwh, ws, nww, ws).transpose(0, 1, 3, 2, 4)
    return index.reshape(t * nwh * nww, ws * ws)


def vision_layout(grid_thws: GridsLike, vision: VisionSpec) -> VisionLayout:
    """Graph token order for ``grid_thws`` (see :class:`VisionLayout`).

    Qwen2-VL: natural order, no padding, ``window_tokens`` 0. Qwen2.5-VL: tokens grouped into the
    windows of transformers' ``get_vision_window_index`` (each merged unit's tokens contiguous,
    windows never span two images or frames), each window padded at its end with -1 slots up to
    ``vision.window_tokens``.
    """
    m, mu = vision.spatial_merge_size, vision.merge_unit
    grids = _grids(grid_thws, m)
    if not grids:
        raise QvlError("no image grids given; the vision tower needs at least one image.")
    counts = [t * h * w for t, h, w in grids]
    n_tokens = sum(counts)
    if not vision.windowed:
        slots = np.arange(n_tokens, dtype=np.int64)
        image_ids = np.repeat(np.arange(len(grids), dtype=np.int64), counts)
        return VisionLayout(slots, image_ids, np.arange(n_tokens // mu, dtype=np.int64), 0, mu)

    ws = vision.window_units
    if ws <= 0:
        raise QvlError(f"window_size {vision.window_size} px is smaller than one merged unit "
                       f"({vision.patch_size * m} px); the vision config is inconsistent.")
    L = vision.window_tokens
    slot_parts, id_parts = [], []
    token_offset = 0
    for i, (t, h, w) in enumerate(grids):
        units = _window_units(t, h // m, w // m, ws)  # [nw, ws*ws]
        # Real units first inside each window, keeping their order (stable sort on "is padding").
        units = np.take_along_axis(units, np.argsort(units < 0, axis=1, kind="stable"), axis=1)
        tokens = units[:, :, None] * mu + np.arange(mu, dtype=np.int64)  # [nw, ws*ws, mu]
        tokens = np.where(units[:, :, None] >= 0, tokens + token_offset, -1).reshape(len(units), L)
        slot_parts.append(tokens.reshape(-1))
        id_parts.append(np.where(tokens.reshape(-1) >= 0, i, -1))
        token_offset += t * h * w
    slots = np.concatenate(slot_parts).astype(np.int64)
    image_ids = np.concatenate(id_parts).astype(np.int64)
    first = np.flatnonzero((slots >= 0) & (slots % mu == 0))  # slot of each unit's first token
    unit_slots = np.empty(n_tokens // mu, dtype=np.int64)
    unit_slots[slots[first] // mu] = first // mu
    return VisionLayout(slots, image_ids, unit_slots, L, mu)


# ----------------------------------------------------------------------------- LLM M-RoPE


def rope_index(
    input_ids: np.ndarray,
    image_grid_thws: GridsLike,
    tokens: TokenSpec,
    spatial_merge_size: int,
    video_grid_thws: GridsLike | None = None,
    second_per_grid_ts: Sequence[float] | None = None,
    tokens_per_second: float | None = None,
) -> tuple[np.ndarray, int]:
    """3-D M-RoPE positions of a prompt: ``(positions [3, T] int64, rope_delta)``.

    Same as transformers 5.x ``get_rope_index`` with ``mm_token_type_ids`` = 1 on image tokens and
    2 on video tokens: text tokens get t = h = w = running position; each run of vision tokens (one
    image or video, grids consumed in order per modality) gets (start + temporal id, start + row,
    start + col) over its merged grid, and the running position then advances by max(h, w) / merge
    - not by the largest temporal id, so text after a long video reuses positions its temporal axis
    reached (transformers 5.24's rule; older code used max over all three axes + 1).
    ``rope_delta = positions.max() + 1 - T``.

    Temporal ids: plain k (Qwen2-VL: ``tokens_per_second`` None). Qwen2.5-VL videos:
    ``int(k * tokens_per_second * second_per_grid_t)``, computed in float32 as torch does
    (``second_per_grid_ts`` float32, as the processor returns it); its images keep k.
    """
    ids = np.asarray(input_ids)
    if ids.ndim == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.ndim != 1 or ids.shape[0] == 0:
        raise QvlError(f"input_ids must be a non-empty 1-D token sequence, got shape {list(ids.shape)}.")
    ids = ids.astype(np.int64)
    m = spatial_merge_size

    def as_grids(g):
        arr = np.asarray(g if g is not None else [], dtype=np.int64).reshape(-1, 3)
        return _grids(arr, m) if len(arr) else []

    grids = {1: as_grids(image_grid_thws), 2: as_grids(video_grid_thws)}
    kinds = np.zeros(len(ids), dtype=np.int8)  # mm_token_type_ids: 0 text, 1 image, 2 video
    kinds[ids == tokens.image_token_id] = 1
    if tokens.video_token_id >= 0:
        kinds[ids == tokens.video_token_id] = 2
    edges = np.flatnonzero(np.diff(kinds)) + 1  # runs of one token type
    starts = np.concatenate([[0], edges])
    ends = np.concatenate([edges, [len(ids)]])
    for kind, name in ((1, "image"), (2, "video")):
        n_runs = int((kinds[starts] == kind).sum())
        if n_runs != len(grids[kind]):
            raise QvlError(f"the prompt has {n_runs} {name}(s) (runs of {name} tokens) but {len(grids[kind])} "
                           f"{name} grid(s) were given; pass one grid per {name}, in prompt order.")
    seconds = [1.0] * len(grids[2]) if second_per_grid_ts is None else [float(s) for s in second_per_grid_ts]
    if len(seconds) != len(grids[2]):
        raise QvlError(f"{len(seconds)} second_per_grid_ts for {len(grids[2])} video(s); give one per video.")

    parts = []
    pos = 0
    seen = {1: 0, 2: 0}
    for start, end in zip(starts.tolist(), ends.tolist()):
        length = end - start
        kind = int(kinds[start])
        if kind == 0:
            parts.append(np.broadcast_to(np.arange(length, dtype=np.int64) + pos, (3, length)))
            pos += length
            continue
        t, h, w = grids[kind][seen[kind]]
        lh, lw = h // m, w // m
        name = "image" if kind == 1 else "video"
        if length != t * lh * lw:
            raise QvlError(f"{name} {seen[kind] + 1} has {length} {name} tokens in the prompt but its grid "
                           f"{[t, h, w]} needs {t * lh * lw}; expand each {name} placeholder to t*h*w/{m * m} tokens.")
        temporal = np.arange(t, dtype=np.int64)
        if kind == 2 and tokens_per_second is not None:
            interval = np.float32(tokens_per_second) * np.float32(seconds[seen[kind]])  # float32, as torch
            temporal = (np.arange(t, dtype=np.float32) * interval).astype(np.int64)  # truncation, as .long()
        tt, hh, ww = np.meshgrid(temporal, np.arange(lh, dtype=np.int64) + pos,
                                 np.arange(lw, dtype=np.int64) + pos, indexing="ij")
        parts.append(np.stack([tt.reshape(-1) + pos, hh.reshape(-1), ww.reshape(-1)]))
        pos += max(h, w) // m
        seen[kind] += 1
    positions = np.ascontiguousarray(np.concatenate(parts, axis=1), dtype=np.int64)  # [3, T]
    return positions, int(positions.max()) + 1 - len(ids)


def frame_grids(grids: GridsLike, merge: int = 2) -> list[tuple[int, int, int]]:
    """Each ``(t, h, w)`` split into t grids ``(1, h, w)``: the vision graph's attention units.

    transformers' vision towers attend within each temporal patch (``cu_seqlens`` repeats h*w per t),
    repeat the rotary (row, col) ids per temporal patch and cut Qwen2.5-VL windows per temporal
    patch; the natural token order of (t, h, w) is that of its t frames concatenated. So a video runs
    through :func:`vision_rotary` / :func:`vision_layout` as t one-frame grids - no graph change.
    """
    return [(1, h, w) for t, h, w in _grids(grids, merge) for _ in range(t)]


def decode_positions(cache_len: int, rope_delta: int, n: int = 1) -> np.ndarray:
    """``positions [3, n] int64`` of ``n`` tokens appended after ``cache_len`` cached ones."""
    row = np.arange(n, dtype=np.int64) + (int(cache_len) + int(rope_delta))
    return np.ascontiguousarray(np.broadcast_to(row, (3, n)))
