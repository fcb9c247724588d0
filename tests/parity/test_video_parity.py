"""Video parity: the thin runtime against transformers on the tiny checkpoints of both families.

The reference gets ``pixel_values_videos`` built on the host (transformers' video processor needs
torchvision; the layout is checked against its own patchify code in tests/runtimes/test_video.py),
``video_grid_thw``, ``second_per_grid_ts`` and ``mm_token_type_ids`` 2; greedy generation must
give the same 64 tokens, with the same M-RoPE positions and nearly equal logits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("torch")
pytest.importorskip("transformers")
av = pytest.importorskip("av")

FAMILIES = ("qwen2_vl", "qwen2_5_vl")
PIXELS = dict(video_min_pixels=56 * 56, video_max_pixels=112 * 168)  # small frames: fast, still several windows
NEW_TOKENS = 64


def _clip(path: Path, frames: int = 40, size=(200, 120), rate: int = 8) -> Path:
    w, h = size
    rng = np.random.default_rng(7)
    base = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for i in range(frames):
            img = np.roll(base, 5 * i, axis=1)
            img[: h // 4, (6 * i) % w:(6 * i) % w + 20] = (255, 40, 40)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("video-media")
    clip = _clip(root / "clip.mp4")
    folder = root / "frames"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (90, 160, 3), dtype=np.uint8)).save(folder / f"frame_{i:02d}.png")
    image = Image.fromarray(rng.integers(0, 256, (100, 150, 3), dtype=np.uint8))
    return {"clip": clip, "folder": folder, "image": image}


CASES = {
    "clip": dict(images=[], videos=["clip"], prompt="What happens in this video?"),
    "folder": dict(images=[], videos=["folder"], prompt="Describe the frames."),
    "image+clip": dict(images=["image"], videos=["clip"], prompt="Does the page appear in the video?"),
    "clip-then-image": dict(images=["image"], videos=["clip"], prompt="Which comes first?", video_first=True),
}


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def reference(family, checkpoint):
    from qvl_export.parity.reference import TorchReference

    return TorchReference(checkpoint(family))


@pytest.fixture(scope="module")
def pipe(family, artifacts):
    from qvl_export.runtimes.pipeline import Pipeline

    return Pipeline.load(artifacts(family))


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


@pytest.mark.parametrize("name", list(CASES))
def test_video_generation_matches_transformers(name, pipe, reference, media):
    from qvl_export.parity.reference import ReferenceCase

    spec = CASES[name]
    images = [media[k] for k in spec["images"]]
    videos = [str(media[k]) for k in spec["videos"]]
    messages = None
    if spec.get("video_first"):  # a chat whose video item comes before its image item
        messages = [{"role": "user", "content": [
            {"type": "video", "video": videos[0], "fps": 2.0, "min_pixels": PIXELS["video_min_pixels"],
             "max_pixels": PIXELS["video_max_pixels"]},
            {"type": "image", "image": images[0]}, {"type": "text", "text": spec["prompt"]}]}]
    ref = reference.run(ReferenceCase(name, images=images, prompt=spec["prompt"], max_new_tokens=NEW_TOKENS,
                                      videos=videos, fps=2.0, video_min_pixels=PIXELS["video_min_pixels"],
                                      video_max_pixels=PIXELS["video_max_pixels"],
                                      messages=[{"role": "user", "content": [
                                          {"type": "video"}, {"type": "image"},
                                          {"type": "text", "text": spec["prompt"]}]}] if messages else None))
    if messages:
        prep = pipe.prepare(messages=messages)
        gen_args = dict(messages=messages)
    else:
        prep = pipe.prepare(images, spec["prompt"], videos=videos, fps=2.0, **PIXELS)
        gen_args = dict(images=images, prompt=spec["prompt"], videos=videos, fps=2.0, **PIXELS)
    assert np.array_equal(prep.input_ids, ref.input_ids)
    assert np.array_equal(np.where(prep.input_ids == pipe.spec.tokens.video_token_id, 2,
                                   (prep.input_ids == pipe.spec.tokens.image_token_id).astype(np.int64)),
                          ref.mm_token_type_ids)
    assert np.array_equal(prep.position_ids, ref.position_ids) and prep.rope_delta == ref.rope_delta
    assert [p.grid for p in prep.videos] == [tuple(g) for g in ref.video_grid_thw.tolist()]
    video_patches = [p for p, k in zip(prep.patches, prep.kinds) if k == "video"]
    assert np.array_equal(np.concatenate(video_patches), ref.pixel_values_videos)
    if ref.second_per_grid_ts is not None:
        assert np.allclose([p.second_per_grid for p in prep.videos], ref.second_per_grid_ts)

    # vision + merger on the videos alone: per temporal patch attention, rotary and windows
    grids = [g for g, k in zip(prep.grids, prep.kinds) if k == "video"]
    embeds = pipe.encode_images(video_patches, grids).image_embeds
    assert embeds.shape == ref.video_merger_out.shape
    assert _cosine(embeds, ref.video_merger_out).min() > 0.99999
    assert np.abs(embeds - ref.video_merger_out).max() < 1e-4

    gen = pipe.generate(max_new_tokens=NEW_TOKENS, temperature=0, keep_logits=True, **gen_args)
    assert gen.token_ids == ref.generated_ids.tolist()
    ours = np.stack(gen.step_logits)
    assert _cosine(ours, ref.step_logits[: len(ours)]).min() > 0.99999
    assert np.abs(ours - ref.step_logits[: len(ours)]).max() < 1e-3
    assert [v["grid_thw"] for v in gen.videos] == ref.video_grid_thw.tolist()


def test_cli_run_video_json_and_errors(family, artifacts, media, tmp_path):
    from click.testing import CliRunner

    from qvl_export.cli import main

    art = str(artifacts(family))
    image = tmp_path / "page.png"
    media["image"].save(image)
    result = CliRunner().invoke(main, ["run", art, "--image", str(image), "--video", str(media["clip"]),
                                       "--video", str(media["folder"]), "--fps", "2", "--max-frames", "6",
                                       "--prompt", "What changes?", "--max-new-tokens", "4", "--greedy", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout.strip().splitlines()[-1])
    clip, folder = out["videos"]
    assert clip["frames"] == 6 and len(clip["timestamps"]) == 6 and clip["timestamps"][0] == 0.0
    assert folder["frames"] == 6 and folder["timestamps"] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
    assert len(out["token_ids"]) == 4

    corrupt = tmp_path / "bad.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(200))
    bad = CliRunner().invoke(main, ["run", art, "--video", str(corrupt), "--prompt", "x"])
    assert bad.exit_code == 2
    assert bad.output.startswith("error: ") and "Traceback" not in bad.output and len(bad.output.splitlines()) == 1


def test_video_over_the_context_is_refused_before_decoding(family, artifacts, media):
    from qvl_export.core.errors import QvlError
    from qvl_export.runtimes.pipeline import Pipeline

    pipe = Pipeline.load(artifacts(family))
    frames = np.zeros((1200, 28 * 20, 28 * 20, 3), np.uint8)  # 1200 frames of 560x560, never decoded
    with pytest.raises(QvlError, match="context") as info:
        pipe.prepare([], "x", videos=[frames], max_frames=1200, video_min_pixels=28 * 28 * 400)
    assert "--max-frames" in str(info.value)
