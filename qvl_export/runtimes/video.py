"""Host-side video input for the thin runtime (numpy, Pillow and PyAV only).

A video reaches the vision graph as temporal patches: two consecutive frames per patch row
(``temporal_patch_size``), laid out exactly as transformers' ``Qwen2VLVideoProcessor.patchify``
lays them out, so a clip of two identical frames gives the patches of the image processor for that
frame (the tests check both, against transformers' own code).

Sources (:func:`open_video`):

- a video file (mp4 / webm / mkv / mov / gif / ...), decoded with PyAV (``av``, which ships its own
  ffmpeg) and sampled at ``fps`` as Qwen's reference utilities (``qwen_vl_utils.smart_nframes``)
  sample it: ``n = total / native_fps * fps``, clamped to [min_frames 4, max_frames 768] and to the
  frame count, floored to a multiple of 2; indices ``round(linspace(0, total - 1, n))``; the
  sampling rate reported (and used for M-RoPE) is the one actually achieved,
  ``n / total * native_fps``, as qwen_vl_utils hands it to the processor;
- a folder of frame images, sorted by file name, taken as already sampled at ``fps``;
- a numpy array ``[T, H, W, 3] uint8``, or a list of frames (arrays, PIL images or image paths),
  also taken as already sampled at ``fps``.

Pre-sampled frames are not resampled; an odd count is padded by repeating the last frame, as the
processor does (a one-frame video therefore becomes one temporal patch of a duplicated frame, like
an image). All frames of a video must share one size: a folder or list of mixed sizes is refused
(resizing would silently distort some frames), naming the first frame that differs.

Sizes: every frame is resized by ``smart_resize`` with the video's own pixel range, as
qwen_vl_utils ``fetch_video`` does: ``min_pixels`` 128 merged tokens' worth, ``max_pixels``
``max(min(768 tokens' worth, total_pixels / n * 2), 1.05 * min_pixels)`` where ``total_pixels``
is 90 % of the model's context (at most 128000 tokens) in pixels - so a long video gets smaller
frames rather than more tokens. Frames are resized with Pillow's BICUBIC filter (as the image
path; transformers' torchvision video processor interpolates slightly differently, and it cannot be
installed beside the CPU torch here), then rescaled and normalised exactly like an image.

Qwen3-VL writes each temporal patch of a video as its own entry of the prompt, after a timestamp
(``Qwen3VLProcessor.replace_video_token``): every ``<|video_pad|>`` of the rendered template becomes,
per temporal patch, ``<{t:.1f} seconds><|vision_start|>`` + its pads + ``<|vision_end|>``, t the mean
time of the patch's frames (:func:`patch_timestamps`, :func:`timestamp_prompt`).

Memory: the plan (frames kept, size, tokens) is made from the container's header before anything is
decoded; frames are resized as they are decoded, so a 2-hour 4K video never holds more than the
kept, resized frames. When fps sampling asks for more frames than ``max_frames`` (default: 768, or
fewer when that many would not fit the context at the smallest frame size) the video is capped to
``max_frames`` evenly spaced frames and the plan carries a note saying so.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from PIL import Image

from qvl_export.core.errors import QvlError
from qvl_export.core.spec import PreprocessSpec, VisionSpec
from qvl_export.runtimes.preprocess import load_image, smart_resize

DEFAULT_FPS = 2.0  # qwen_vl_utils FPS
MIN_FRAMES = 4  # qwen_vl_utils FPS_MIN_FRAMES
MAX_FRAMES = 768  # qwen_vl_utils FPS_MAX_FRAMES
MIN_TOKENS_PER_FRAME = 128  # VIDEO_MIN_PIXELS = 128 * 28 * 28
MAX_TOKENS_PER_FRAME = 768  # VIDEO_MAX_PIXELS = 768 * 28 * 28
MAX_VIDEO_TOKENS = 128000  # qwen_vl_utils / transformers' max_video_tokens
TOTAL_SHARE = 0.9  # the total pixel budget is 90 % of the video tokens' worth
VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".mov", ".gif", ".avi", ".m4v", ".mpeg", ".mpg", ".ts", ".flv")
FRAME_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")


# ---------------------------------------------------------------------------- sampling


def _floor_by(n: float, f: int) -> int:
    return math.floor(n / f) * f


def _ceil_by(n: float, f: int) -> int:
    return math.ceil(n / f) * f


def sample_indices(total: int, native_fps: float, fps: float, max_frames: int = MAX_FRAMES,
                   min_frames: int = MIN_FRAMES, factor: int = 2) -> tuple[list[int], float, int]:
    """Frames to keep from a decoded video: ``(indices, sample_fps, wanted)``.

    ``qwen_vl_utils.smart_nframes`` + ``fetch_video``'s index and rate rule; ``wanted`` is the frame
    count fps sampling asked for before ``max_frames`` applied (> len(indices) means capped).
    Videos shorter than ``factor`` frames keep all their frames (padded later, like an image).
    """
    if total < factor:
        return list(range(total)), float(native_fps), total
    lo = _ceil_by(min_frames, factor)
    hi = _floor_by(min(max_frames, total), factor)
    wanted = total / native_fps * fps
    n = _floor_by(min(max(wanted, lo), hi, total), factor)
    n = max(n, factor)
    # qwen_vl_utils: torch.linspace(0, total - 1, n).round() (float32; float64 here: same indices
    # except on exact .5 ties that float32 rounding moves, which linspace(0, total-1, n) never hits
    # for integral spacing)
    indices = np.round(np.linspace(0, total - 1, n)).astype(np.int64).tolist()
    return indices, n / total * native_fps, int(math.floor(wanted))


def evenly_spaced(count: int, keep: int) -> list[int]:
    """``keep`` of ``count`` pre-sampled frames, evenly spaced (first and last kept)."""
    if keep >= count:
        return list(range(count))
    return np.round(np.linspace(0, count - 1, keep)).astype(np.int64).tolist()


# ---------------------------------------------------------------------------- readers


class _Reader:
    """A video source: its frame count, frame size and rate, and a way to read chosen frames."""

    describe: str
    count: int
    width: int
    height: int
    native_fps: float | None  # None: frames given already sampled

    def read(self, indices: Sequence[int], size: tuple[int, int]) -> Iterator[np.ndarray]:
        """Frames ``indices`` (increasing) resized to ``size`` (h, w): ``[h, w, 3] uint8`` each."""
        raise NotImplementedError


def _resize(frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``[H, W, 3] uint8`` -> ``[h, w, 3] uint8`` with Pillow's BICUBIC (always resampled, as transformers)."""
    h, w = size
    return np.asarray(Image.fromarray(frame, mode="RGB").resize((w, h), resample=Image.Resampling.BICUBIC))


class _FileReader(_Reader):
    """A video file decoded with PyAV; only the header is read until :meth:`read`."""

    def __init__(self, path: Path):
        self.path = path
        self.describe = f"Video file {path}"
        if not path.exists():
            raise QvlError(f"{self.describe} does not exist; check the path.")
        if path.stat().st_size == 0:
            raise QvlError(f"{self.describe} is empty (0 bytes); re-save or re-download the video.")
        av = _import_av()
        try:
            with av.open(str(path)) as container:
                if not container.streams.video:
                    raise QvlError(f"{self.describe} has no video stream; pass a video with pictures "
                                   "(mp4, webm, mkv, mov or gif).")
                stream = container.streams.video[0]
                rate = stream.average_rate or stream.guessed_rate or stream.base_rate
                self.native_fps = float(rate) if rate else 0.0
                self.width, self.height = int(stream.codec_context.width), int(stream.codec_context.height)
                self.count = int(stream.frames or 0)
        except QvlError:
            raise
        except Exception as err:  # noqa: BLE001 - av.error.InvalidDataError, OSError, ...
            raise QvlError(f"{self.describe} is not a readable video ({type(err).__name__}: {err}); "
                           "pass an mp4, webm, mkv, mov or gif file.") from None
        if self.count <= 0 or self.native_fps <= 0 or self.width <= 0 or self.height <= 0:
            self._scan()  # a header without frame count, rate or size: count by decoding once

    def _frames(self) -> Iterator[Any]:
        av = _import_av()
        with av.open(str(self.path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            yield from container.decode(stream)

    def _scan(self) -> None:
        count, first, last_time = 0, None, None
        try:
            for frame in self._frames():
                if first is None:
                    first = frame
                count += 1
                last_time = frame.time
        except Exception as err:  # noqa: BLE001
            if count == 0:
                raise QvlError(f"{self.describe} has no decodable frames ({type(err).__name__}: {err}); "
                               "re-encode it (e.g. ffmpeg -i in -c:v libx264 out.mp4).") from None
        if count == 0 or first is None:
            raise QvlError(f"{self.describe} has no decodable frames; re-encode it or pass another video.")
        self.count = count
        self.width, self.height = int(first.width), int(first.height)
        if self.native_fps <= 0:
            self.native_fps = (count - 1) / last_time if last_time and count > 1 else DEFAULT_FPS

    def read(self, indices: Sequence[int], size: tuple[int, int]) -> Iterator[np.ndarray]:
        wanted = list(indices)
        if not wanted:
            return
        pos, produced, last = 0, 0, None
        try:
            for i, frame in enumerate(self._frames()):
                if i < wanted[pos]:
                    continue
                last = _resize(frame.to_ndarray(format="rgb24"), size)
                while pos < len(wanted) and wanted[pos] == i:
                    yield last
                    pos += 1
                    produced += 1
                if pos == len(wanted):
                    return
        except QvlError:
            raise
        except Exception as err:  # noqa: BLE001 - a corrupt packet mid-stream
            if produced == 0:
                raise QvlError(f"{self.describe} has no decodable frames ({type(err).__name__}: {err}); "
                               "re-encode it or pass another video.") from None
        if produced == 0:
            raise QvlError(f"{self.describe} has no decodable frames; re-encode it or pass another video.")
        # The header promised more frames than the stream holds: repeat the last one decoded (at
        # most a few frames; the timestamps stay those planned).
        while produced < len(wanted):
            yield last
            produced += 1


class _FramesReader(_Reader):
    """Frames already in memory or in files (a folder, a list, an array), taken as sampled at ``fps``."""

    def __init__(self, frames: Sequence[Any], describe: str, names: Sequence[str] | None = None):
        if len(frames) == 0:
            raise QvlError(f"{describe} holds no frames; pass at least one frame image.")
        self.frames, self.describe, self.names = frames, describe, names
        self.native_fps = None
        self.count = len(frames)
        first = self._load(0)
        self.height, self.width = first.shape[:2]
        self._first = first

    def _load(self, i: int) -> np.ndarray:
        frame = self.frames[i]
        if isinstance(frame, np.ndarray):
            if frame.ndim != 3 or frame.shape[-1] != 3 or frame.dtype != np.uint8:
                raise QvlError(f"{self.describe}: frame {i} is an array of shape {list(frame.shape)} and dtype "
                               f"{frame.dtype}; frames must be [H, W, 3] uint8 RGB.")
            if frame.shape[0] == 0 or frame.shape[1] == 0:
                raise QvlError(f"{self.describe}: frame {i} is empty ({frame.shape[1]}x{frame.shape[0]}).")
            return np.ascontiguousarray(frame)
        if isinstance(frame, Image.Image):
            return np.asarray(load_image(frame), dtype=np.uint8)
        if isinstance(frame, (str, os.PathLike, bytes, bytearray)):
            return np.asarray(load_image(frame), dtype=np.uint8)
        raise QvlError(f"{self.describe}: frame {i} is a {type(frame).__name__}; give [H, W, 3] uint8 arrays, "
                       "PIL images or image paths.")

    def read(self, indices: Sequence[int], size: tuple[int, int]) -> Iterator[np.ndarray]:
        for i in indices:
            frame = self._first if i == 0 else self._load(i)
            if frame.shape[:2] != (self.height, self.width):
                name = f" ({self.names[i]})" if self.names else ""
                raise QvlError(f"{self.describe}: frame {i}{name} is {frame.shape[1]}x{frame.shape[0]} but the "
                               f"first frame is {self.width}x{self.height}; all frames of a video must share one "
                               "size - resize them first.")
            yield _resize(frame, size)


def _import_av():
    try:
        import av
    except ImportError:
        raise QvlError("Reading video files needs PyAV: pip install av (frame folders and arrays work "
                       "without it).") from None
    try:  # ffmpeg's own console messages would interleave with ours; errors still raise
        av.logging.set_level(av.logging.PANIC)
    except Exception:  # noqa: BLE001
        pass
    return av


def open_video(source: Any) -> _Reader:
    """A reader for a video file, a folder of frame images, an array ``[T, H, W, 3] uint8`` or a list of
    frames. Every bad input raises :class:`QvlError`."""
    if isinstance(source, np.ndarray):
        if source.ndim != 4 or source.shape[-1] != 3 or source.dtype != np.uint8:
            raise QvlError(f"A video array must be [T, H, W, 3] uint8 RGB; got shape {list(source.shape)} "
                           f"and dtype {source.dtype}.")
        return _FramesReader(source, f"The video array ({source.shape[0]} frames)")
    if isinstance(source, (list, tuple)):
        return _FramesReader(list(source), f"The frame list ({len(source)} frames)")
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        if text.startswith("file://"):
            text = text[len("file://"):]
        if text.startswith(("http://", "https://")):
            raise QvlError("video URLs are not fetched; download the video and pass its path.")
        path = Path(text)
        if path.is_dir():
            names = sorted(p.name for p in path.iterdir() if p.is_file() and p.suffix.lower() in FRAME_EXTENSIONS)
            if not names:
                raise QvlError(f"Frame folder {path} holds no frame images ({', '.join(FRAME_EXTENSIONS)}); "
                               "pass a folder of frames or a video file.")
            return _FramesReader([path / n for n in names], f"Frame folder {path}", names)
        return _FileReader(path)
    raise QvlError(f"Unsupported video input of type {type(source).__name__}; pass a video file, a folder of "
                   "frames, an array [T, H, W, 3] uint8 or a list of frames.")


# ---------------------------------------------------------------------------- plan


@dataclass
class VideoPlan:
    """What a video becomes, decided from its header before any frame is decoded."""

    describe: str
    indices: list[int]  # source frames kept, in order
    fps: float  # rate of the kept frames (frames per second), used for M-RoPE and timestamps
    timestamps: list[float]  # seconds of each kept frame in the source
    source_size: tuple[int, int]  # (height, width) of the source frames
    size: tuple[int, int]  # (height, width) after smart_resize
    grid: tuple[int, int, int]  # (t, h, w) in patches
    tokens: int  # LLM tokens of the video (t * h * w / merge_unit)
    second_per_grid: float  # seconds per temporal patch: temporal_patch_size / fps
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """JSON-friendly description (what ``run --json`` reports per video)."""
        return {"source": self.describe, "frames": len(self.indices), "frame_indices": list(self.indices),
                "timestamps": [round(t, 3) for t in self.timestamps], "fps": round(self.fps, 6),
                "size": [self.size[1], self.size[0]], "grid_thw": list(self.grid), "tokens": self.tokens,
                "notes": list(self.notes)}


def video_pixel_range(vision: VisionSpec, context: int | None, nframes: int, min_pixels: int | None = None,
                      max_pixels: int | None = None, total_pixels: int | None = None) -> tuple[int, int]:
    """(min_pixels, max_pixels) per frame for a video of ``nframes`` frames (qwen_vl_utils fetch_video)."""
    factor = vision.patch_size * vision.spatial_merge_size
    tp = vision.temporal_patch_size
    lo = int(min_pixels) if min_pixels is not None else MIN_TOKENS_PER_FRAME * factor * factor
    if total_pixels is None:
        total_pixels = int(min(MAX_VIDEO_TOKENS, context or MAX_VIDEO_TOKENS) * factor * factor * TOTAL_SHARE)
    hi = max(min(MAX_TOKENS_PER_FRAME * factor * factor, total_pixels / max(nframes, 1) * tp), int(lo * 1.05))
    if max_pixels is not None:
        hi = min(int(max_pixels), hi)
    hi = int(hi)
    if lo <= 0 or hi < lo:
        raise QvlError(f"video min_pixels={lo} / max_pixels={hi} are invalid; need 0 < min_pixels <= max_pixels.")
    return lo, hi


def fit_frames(vision: VisionSpec, context: int, min_pixels: int) -> int:
    """The most frames that fit 90 % of ``context`` tokens at ``min_pixels`` per frame (a multiple of 2)."""
    factor = vision.patch_size * vision.spatial_merge_size
    per_patch = max(1, min_pixels // (factor * factor))  # tokens per temporal patch, about
    return max(vision.temporal_patch_size,
               _floor_by(int(context * TOTAL_SHARE) // per_patch * vision.temporal_patch_size,
                         vision.temporal_patch_size))


def plan_video(reader: _Reader, vision: VisionSpec, *, fps: float = DEFAULT_FPS, max_frames: int | None = None,
               min_pixels: int | None = None, max_pixels: int | None = None, total_pixels: int | None = None,
               context: int | None = None) -> VideoPlan:
    """Frames, size, grid and tokens of a video (header only; nothing decoded)."""
    if not fps or fps <= 0:
        raise QvlError(f"fps must be positive, got {fps}.")
    if max_frames is not None and max_frames < 1:
        raise QvlError(f"max_frames must be at least 1, got {max_frames}.")
    tp = vision.temporal_patch_size
    factor = vision.patch_size * vision.spatial_merge_size
    lo_default = int(min_pixels) if min_pixels is not None else MIN_TOKENS_PER_FRAME * factor * factor
    notes: list[str] = []
    capped = None
    cap = MAX_FRAMES if max_frames is None else int(max_frames)
    if max_frames is None and context:
        cap = min(cap, fit_frames(vision, context, lo_default))
    if reader.native_fps is not None:  # a decoded video: sample at fps
        indices, sample_fps, wanted = sample_indices(reader.count, reader.native_fps, fps, max_frames=max(cap, tp),
                                                     factor=tp)
        timestamps = [i / reader.native_fps for i in indices]
        duration = reader.count / reader.native_fps
        if wanted > len(indices) and len(indices) >= cap:
            capped = (f"{reader.describe}: {duration:.1f} s at {fps:g} fps would be {wanted} frames; kept "
                      f"{len(indices)} evenly spaced ({sample_fps:.3g} fps, max frames {cap})")
    else:  # frames given already sampled at fps
        indices = evenly_spaced(reader.count, max(cap, 1))
        sample_fps = fps * (len(indices) - 1) / (reader.count - 1) if 1 < len(indices) < reader.count else fps
        timestamps = [i / fps for i in indices]
        if len(indices) < reader.count:
            capped = f"{reader.describe}: {reader.count} frames; kept {len(indices)} evenly spaced (max frames {cap})"
    if len(indices) == 1:
        notes.append(f"{reader.describe}: one frame; duplicated into one temporal patch, like an image")
    nframes = _ceil_by(len(indices), tp)  # padded by repeating the last frame
    lo, hi = video_pixel_range(vision, context, nframes, min_pixels, max_pixels, total_pixels)
    size = smart_resize(reader.height, reader.width, factor=factor, min_pixels=lo, max_pixels=hi)
    grid = (nframes // tp, size[0] // vision.patch_size, size[1] // vision.patch_size)
    tokens = grid[0] * grid[1] * grid[2] // vision.merge_unit
    if capped:
        notes.insert(0, f"{capped}: {tokens} tokens")
    return VideoPlan(reader.describe, list(indices), float(sample_fps), timestamps, (reader.height, reader.width),
                     size, grid, tokens, tp / float(sample_fps), notes)


# ---------------------------------------------------------------------------- Qwen3-VL prompt


def patch_timestamps(plan: VideoPlan, temporal_patch_size: int) -> list[float]:
    """Seconds of each temporal patch: the mean of its first and last frame's time, the frames padded
    by repeating the last one (``Qwen3VLProcessor._calculate_timestamps``)."""
    times = list(plan.timestamps)
    if not times:
        return []
    times += [times[-1]] * (-len(times) % temporal_patch_size)
    return [(times[i] + times[i + temporal_patch_size - 1]) / 2 for i in range(0, len(times), temporal_patch_size)]


def timestamp_prompt(prompt: str, plans: Sequence[VideoPlan], temporal_patch_size: int,
                     pad: str = "<|video_pad|>", start: str = "<|vision_start|>", end: str = "<|vision_end|>") -> str:
    """``prompt`` with its i-th ``pad`` replaced by the timestamped entries of video i, one per temporal
    patch, each holding one ``pad`` (expanded to the patch's tokens when tokenized)."""
    parts = prompt.split(pad)
    if len(parts) - 1 != len(plans):
        raise QvlError(f"The prompt has {len(parts) - 1} video placeholders for {len(plans)} videos; give one "
                       f"video per {pad}.")
    out = [parts[0]]
    for plan, rest in zip(plans, parts[1:]):
        out += [f"<{t:.1f} seconds>{start}{pad}{end}" for t in patch_timestamps(plan, temporal_patch_size)]
        out.append(rest)
    return "".join(out)


# ---------------------------------------------------------------------------- patches


def patchify_video(frames: np.ndarray, vision: VisionSpec) -> tuple[np.ndarray, tuple[int, int, int]]:
    """``frames [T, C, H, W] float32`` -> ``(patches [gt*gh*gw, C*tp*p*p] float32, (gt, gh, gw))``.

    The last frame is repeated up to a multiple of ``tp``; rows are (gt, gh/m, gw/m, m, m), each row
    (C, tp, p, p): ``Qwen2VLVideoProcessor.patchify`` (permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)) without
    the batch axis.
    """
    p, m, tp = vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size
    if pad := -frames.shape[0] % tp:
        frames = np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)], axis=0)
    t, c, h, w = frames.shape
    gt, gh, gw = t // tp, h // p, w // p
    x = frames.reshape(gt, tp, c, gh // m, m, p, gw // m, m, p)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)  # (gt, gh/m, gw/m, m, m, C, tp, p, p)
    return np.ascontiguousarray(x.reshape(gt * gh * gw, c * tp * p * p), dtype=np.float32), (gt, gh, gw)


def normalize(pixels: np.ndarray, pp: PreprocessSpec) -> np.ndarray:
    """``[..., 3] uint8`` -> float32, as the image path: float64 rescale, float32 normalise."""
    x = (pixels.astype(np.float64) * pp.rescale_factor).astype(np.float32)
    return (x - np.asarray(pp.image_mean, dtype=np.float32)) / np.asarray(pp.image_std, dtype=np.float32)


def video_patches(reader: _Reader, plan: VideoPlan, vision: VisionSpec,
                  pp: PreprocessSpec) -> np.ndarray:
    """Decode the planned frames and return ``patches [t*h*w, patch_dim] float32`` in processor order."""
    if vision.in_channels != 3:
        raise QvlError(f"The vision tower expects {vision.in_channels} input channels; only RGB (3) is supported.")
    h, w = plan.size
    frames = np.empty((len(plan.indices), 3, h, w), dtype=np.float32)  # [T, C, H, W]
    n = 0
    for n, frame in enumerate(reader.read(plan.indices, plan.size), start=1):
        frames[n - 1] = normalize(frame, pp).transpose(2, 0, 1)
    if n != len(plan.indices):
        raise QvlError(f"{plan.describe}: decoded {n} of {len(plan.indices)} planned frames; re-encode the video.")
    patches, grid = patchify_video(frames, vision)
    if grid != plan.grid:
        raise QvlError(f"{plan.describe}: grid {grid} differs from the planned {plan.grid}; this is a bug.")
    return patches
