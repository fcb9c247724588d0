"""qvl_export.runtimes.video (sampling, sizes, temporal patches) and video M-RoPE against transformers'
own code; bad video inputs as one QvlError line each."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from qvl_export.core.errors import QvlError
from qvl_export.core.spec import PreprocessSpec, VisionSpec
from qvl_export.runtimes import video
from qvl_export.runtimes.indexing import frame_grids, rope_index, vision_layout, vision_position_ids
from qvl_export.runtimes.preprocess import preprocess_image

VISION = VisionSpec(family="qwen2_5_vl", depth=1, hidden_size=64, num_heads=2, intermediate_size=128,
                    hidden_act="silu", out_hidden_size=128)
PP = PreprocessSpec()


def write_clip(path: Path, frames: int = 25, size=(96, 64), rate: int = 10, codec: str = "libx264") -> Path:
    """A small synthetic video written with PyAV: a colour ramp with a moving bar."""
    av = pytest.importorskip("av")
    w, h = size
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for i in range(frames):
            img = np.zeros((h, w, 3), np.uint8)
            img[:] = (i * 9 % 256, 255 - i * 9 % 256, 128)
            img[:, (i * 4) % w: (i * 4) % w + 8] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def _hf_patchify():
    """transformers' own ``Qwen2VLVideoProcessor.patchify``, taken from its source file (the module
    imports torchvision, which does not import here; the method itself needs torch only)."""
    import transformers.models.qwen2_vl as pkg

    source = (Path(inspect.getfile(pkg)).parent / "video_processing_qwen2_vl.py").read_text()
    tree = ast.parse(source)
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Qwen2VLVideoProcessor")
    fn = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "patchify")
    fn.decorator_list = []
    module = ast.Module(body=[fn], type_ignores=[])
    namespace = {"torch": torch}
    exec(compile(ast.fix_missing_locations(module), "video_processing_qwen2_vl.py", "exec"), namespace)
    return namespace["patchify"]


# ---------------------------------------------------------------------------- sampling


def test_sampling_follows_qwen_vl_utils():
    # 2.5 s at 10 fps, asked at 2 fps: 5 frames -> floored to 4 (min 4); linspace(0, 24, 4).round()
    assert video.sample_indices(25, 10.0, 2.0) == ([0, 8, 16, 24], 1.6, 5)
    # 10 s at 30 fps -> 20 frames
    idx, fps, wanted = video.sample_indices(300, 30.0, 2.0)
    assert len(idx) == 20 and idx[0] == 0 and idx[-1] == 299 and fps == pytest.approx(2.0) and wanted == 20
    # short clip: min 4 frames; 3 frames: 2 kept; 1 frame: kept alone
    assert video.sample_indices(6, 30.0, 2.0)[0] == [0, 2, 3, 5]
    assert video.sample_indices(3, 30.0, 2.0)[0] == [0, 2]
    assert video.sample_indices(1, 30.0, 2.0)[0] == [0]


def test_sampling_indices_match_torch_linspace():
    for total, n in [(25, 4), (300, 20), (1001, 768), (17, 6), (9, 4)]:
        ref = torch.linspace(0, total - 1, n).round().long().tolist()
        assert np.round(np.linspace(0, total - 1, n)).astype(int).tolist() == ref


class _HeaderOnly(video._Reader):
    """A 2-hour 1080p 30 fps video known from its header only: reading it would fail the test."""

    describe, count, width, height, native_fps = "Video file long.mp4", 2 * 3600 * 30, 1920, 1080, 30.0

    def read(self, indices, size):
        raise AssertionError("a plan must not decode")


def test_long_video_is_capped_with_a_note_before_decoding():
    plan = video.plan_video(_HeaderOnly(), VISION, fps=2.0, context=32768)
    assert len(plan.indices) <= video.MAX_FRAMES and len(plan.indices) % 2 == 0
    assert plan.notes and "kept" in plan.notes[0] and "tokens" in plan.notes[0]
    assert plan.tokens <= 32768 * 0.9 + 1e-9
    assert plan.timestamps[-1] == pytest.approx((2 * 3600 * 30 - 1) / 30.0)
    assert plan.grid[0] == len(plan.indices) // 2
    # explicit --max-frames wins, and the per-frame budget grows with fewer frames
    small = video.plan_video(_HeaderOnly(), VISION, fps=2.0, max_frames=16, context=32768)
    assert len(small.indices) == 16 and small.size[0] * small.size[1] >= plan.size[0] * plan.size[1]
    assert small.size[0] * small.size[1] <= video.MAX_TOKENS_PER_FRAME * 28 * 28


def test_pixel_budget_as_qwen_vl_utils():
    lo, hi = video.video_pixel_range(VISION, None, 16)
    assert lo == 128 * 28 * 28 and hi == 768 * 28 * 28  # 16 frames: per-frame cap binds
    lo, hi = video.video_pixel_range(VISION, None, 768)
    total = int(128000 * 28 * 28 * 0.9)
    assert hi == int(max(min(768 * 28 * 28, total / 768 * 2), int(lo * 1.05)))


# ---------------------------------------------------------------------------- patches


@pytest.mark.parametrize("frames,size", [(4, (56, 84)), (3, (112, 56)), (1, (28, 28)), (6, (84, 140))])
def test_patchify_matches_transformers_video_processor(frames, size):
    rng = np.random.default_rng(frames)
    x = rng.standard_normal((frames, 3, *size)).astype(np.float32)  # [T, C, H, W]
    ours, grid = video.patchify_video(x, VISION)
    ref, gt, gh, gw = _hf_patchify()(None, torch.from_numpy(x)[None], 14, 2, 2)
    assert grid == (gt, gh, gw)
    assert np.array_equal(ours, ref[0].numpy())


def test_two_identical_frames_equal_the_image_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    rng = np.random.default_rng(3)
    frame = rng.integers(0, 256, (150, 230, 3), dtype=np.uint8)
    reader = video.open_video(np.stack([frame, frame]))
    plan = video.plan_video(reader, VISION, fps=2.0, min_pixels=56 * 56, max_pixels=28 * 28 * 256)
    patches = video.video_patches(reader, plan, VISION, PP)
    hf = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=28 * 28 * 256)(images=Image.fromarray(frame),
                                                                                   return_tensors="np")
    assert plan.grid == tuple(int(v) for v in hf["image_grid_thw"][0])
    assert np.array_equal(patches, hf["pixel_values"])
    ours, grid = preprocess_image(Image.fromarray(frame), VISION, PP, min_pixels=56 * 56, max_pixels=28 * 28 * 256)
    assert np.array_equal(patches, ours) and grid == plan.grid


def test_one_frame_video_is_duplicated_like_an_image():
    frame = np.random.default_rng(1).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    reader = video.open_video([frame])
    plan = video.plan_video(reader, VISION, min_pixels=56 * 56, max_pixels=28 * 28 * 64)
    assert plan.grid[0] == 1 and any("one frame" in n for n in plan.notes)
    patches = video.video_patches(reader, plan, VISION, PP)
    image, grid = preprocess_image(Image.fromarray(frame), VISION, PP, min_pixels=56 * 56, max_pixels=28 * 28 * 64)
    assert grid == plan.grid and np.array_equal(patches, image)


def test_file_folder_and_array_sources(tmp_path):
    clip = write_clip(tmp_path / "clip.mp4")
    reader = video.open_video(clip)
    assert (reader.count, reader.native_fps, reader.width, reader.height) == (25, 10.0, 96, 64)
    plan = video.plan_video(reader, VISION, fps=2.0, min_pixels=56 * 56, max_pixels=112 * 112)
    assert plan.indices == [0, 8, 16, 24] and plan.timestamps == [0.0, 0.8, 1.6, 2.4]
    assert plan.fps == pytest.approx(1.6) and plan.second_per_grid == pytest.approx(1.25)
    patches = video.video_patches(reader, plan, VISION, PP)
    assert patches.shape == (plan.grid[0] * plan.grid[1] * plan.grid[2], VISION.patch_dim)

    # the same decoded frames as a folder (sorted by name) and as an array give the same patches
    import av

    with av.open(str(clip)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in plan.indices:
        Image.fromarray(frames[i]).save(folder / f"f{i:03d}.png")
    for source in (folder, np.stack([frames[i] for i in plan.indices]), [frames[i] for i in plan.indices]):
        r = video.open_video(source)
        p = video.plan_video(r, VISION, fps=1.6, min_pixels=56 * 56, max_pixels=112 * 112)
        assert p.grid == plan.grid and p.timestamps == pytest.approx([0.0, 0.625, 1.25, 1.875])
        assert np.array_equal(video.video_patches(r, p, VISION, PP), patches)


# ---------------------------------------------------------------------------- layout and M-RoPE


def test_frame_grids_give_per_temporal_patch_layout():
    grids = [(3, 8, 12)]
    units = frame_grids(grids)
    assert units == [(1, 8, 12)] * 3
    assert np.array_equal(vision_position_ids(units, 2), vision_position_ids(grids, 2))
    layout = vision_layout(units, VISION)
    assert sorted(set(layout.image_ids[layout.image_ids >= 0].tolist())) == [0, 1, 2]


def _video_prompt(tokens, media, rng):
    ids = [int(i) for i in rng.integers(0, 600, 5)]
    for kind, (t, h, w) in media:
        pad = tokens.video_token_id if kind == "video" else tokens.image_token_id
        ids += [int(i) for i in rng.integers(0, 600, 3)]
        ids += [tokens.vision_start_token_id] + [pad] * (t * h * w // 4) + [tokens.vision_end_token_id]
    return ids + [int(i) for i in rng.integers(0, 600, 4)]


@pytest.mark.parametrize("media,seconds", [
    ([("video", (2, 4, 6))], [1.25]),
    ([("video", (5, 4, 4))], [2 / 3]),  # temporal ids run past max(h, w)/2: the two text rules differ here
    ([("image", (1, 4, 6)), ("video", (3, 6, 4)), ("video", (2, 2, 2))], [1.0, 0.5]),
    ([("video", (4, 2, 4)), ("image", (1, 8, 2))], [3.0]),
], ids=["clip", "long-temporal", "image-then-videos", "video-then-image"])
def test_video_rope_index_matches_transformers(tiny, media, seconds):
    tokens = tiny.spec.tokens
    ids = _video_prompt(tokens, media, np.random.default_rng(len(media)))
    images = [g for k, g in media if k == "image"]
    videos = [g for k, g in media if k == "video"]
    windowed = tiny.spec.vision.windowed
    tps = tiny.model.config.vision_config.tokens_per_second if windowed else None
    positions, delta = rope_index(np.array(ids), images, tokens, 2, video_grid_thws=videos,
                                  second_per_grid_ts=seconds, tokens_per_second=tps)
    input_ids = torch.tensor([ids])
    mm = torch.where(input_ids == tokens.image_token_id, 1, 0)
    mm = torch.where(input_ids == tokens.video_token_id, 2, mm)
    kwargs = dict(mm_token_type_ids=mm, image_grid_thw=torch.tensor(images) if images else None,
                  video_grid_thw=torch.tensor(videos))
    if windowed:
        kwargs["second_per_grid_ts"] = torch.tensor(seconds, dtype=torch.float32)
    ref_pos, ref_delta = tiny.model.model.get_rope_index(input_ids, **kwargs)
    assert np.array_equal(positions, ref_pos[:, 0].numpy())
    assert delta == int(ref_delta.reshape(-1)[0])


# ---------------------------------------------------------------------------- bad input


def _error(source) -> str:
    with pytest.raises(QvlError) as info:
        reader = video.open_video(source)
        plan = video.plan_video(reader, VISION, min_pixels=56 * 56, max_pixels=28 * 28 * 16)
        video.video_patches(reader, plan, VISION, PP)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_bad_video_inputs_are_one_line(tmp_path):
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    assert "empty (0 bytes)" in _error(empty)
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    assert "not a readable video" in _error(corrupt)
    assert "does not exist" in _error(tmp_path / "missing.mp4")
    # a real header whose frame data is cut off: no frame decodes
    clip = write_clip(tmp_path / "clip.mp4", frames=10)
    truncated = tmp_path / "truncated.mp4"
    data = clip.read_bytes()
    truncated.write_bytes(data[: len(data) // 8])
    message = _error(truncated)
    assert "decodable frames" in message or "not a readable video" in message
    # a folder without frames, and a folder of mixed sizes (refused, naming the frame)
    (tmp_path / "none").mkdir()
    assert "no frame images" in _error(tmp_path / "none")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.new("RGB", (64, 48)).save(mixed / "a.png")
    Image.new("RGB", (64, 48)).save(mixed / "b.png")
    Image.new("RGB", (80, 48)).save(mixed / "c.png")
    assert "c.png" in _error(mixed) and "share one size" in _error(mixed)
    assert "[T, H, W, 3] uint8" in _error(np.zeros((4, 8, 8, 3), np.float32))
    assert "no frames" in _error([])


def test_qwen3_timestamped_prompt_equals_transformers():
    """Qwen3-VL's per-temporal-patch entries (``<t seconds>`` + vision start/pads/end) equal
    transformers' own Qwen3VLProcessor.replace_video_token, odd frame counts included."""
    from types import SimpleNamespace

    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
    from transformers.video_utils import VideoMetadata

    proc = object.__new__(Qwen3VLProcessor)  # the method reads only these attributes
    proc.video_processor = SimpleNamespace(merge_size=2, temporal_patch_size=2)
    proc.video_token, proc.vision_start_token, proc.vision_end_token = \
        "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"
    plans = []
    for indices, fps in (([0, 6, 12, 19, 25, 31, 37, 44], 29.97), ([0, 1, 2, 3, 4], 2.0), ([3], 24.0)):
        plans.append(video.VideoPlan("v", indices, fps, [i / fps for i in indices], (64, 64), (64, 64),
                                     (-(-len(indices) // 2), 4, 4), 4, 2 / fps))
    prompt = "a<|vision_start|><|video_pad|><|vision_end|>b<|vision_start|><|video_pad|><|vision_end|>c" \
             "<|vision_start|><|video_pad|><|vision_end|>"
    ours = video.timestamp_prompt(prompt, plans, 2)
    parts = prompt.split("<|video_pad|>")
    expected = parts[0]
    for i, rest in enumerate(parts[1:]):
        inputs = {"video_grid_thw": np.asarray([[p.grid[0], 2, 2] for p in plans]),
                  "video_metadata": [VideoMetadata(total_num_frames=len(p.indices), fps=p.fps,
                                                   frames_indices=list(p.indices)) for p in plans]}
        # one pad per entry on our side (expanded when tokenized); transformers writes h*w/4 = 1 here too
        expected += proc.replace_video_token(inputs, i) + rest
    assert ours == expected
    assert "<0.1 seconds>" in ours and ours.count("<|video_pad|>") == 4 + 3 + 1
    with pytest.raises(QvlError, match="video placeholders"):
        video.timestamp_prompt(prompt, plans[:2], 2)
