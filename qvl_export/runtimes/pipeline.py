"""The thin runtime: load an artifacts folder once, generate many times.

Imports numpy, onnxruntime (or tensorrt), tokenizers, pillow and jinja2 only. The host does what
the graphs don't: image pre-processing, vision rotary tables and window layout, M-RoPE positions and
the rope delta, the chat prompt (the checkpoint's own template), the KV cache loop and sampling
(the checkpoint's generation settings unless overridden).

    pipe = Pipeline.load("build/q25")
    result = pipe.generate(["invoice.png"], "What is the total?", max_new_tokens=64)
    result = pipe.generate(messages=[{"role": "user", "content": [{"type": "image", "image": "a.png"},
                                                                  {"type": "text", "text": "Total?"}]}])
    for piece in pipe.stream(["invoice.png"], "What is the total?"): print(piece, end="")
    result = pipe.generate(videos=["clip.mp4"], prompt="What happens?", fps=2.0)  # result.videos: frames, timestamps

Video (``runtimes/video.py``): each video becomes temporal patches (two frames per patch) run
through the same vision and merger graphs as images - the vision graph sees a video of grid
(t, h, w) as t one-frame grids (``indexing.frame_grids``), which is exactly transformers'
per-temporal-patch attention, rotary ids and windows. The decoder graph is unchanged: it writes
``image_embeds`` rows into the rows whose id is ``image_token_id``, in order; for the prefill the
host hands it the prompt with every ``<|video_pad|>`` id replaced by ``<|image_pad|>`` and the
image and video embeddings concatenated in prompt order. Both pad tokens' own embeddings are
overwritten, so this is the same computation as transformers' two masked scatters, without a
second graph input; M-RoPE positions (video tokens: ``mm_token_type_ids`` 2, temporal ids per
family) come from the true ids. Generated tokens are never remapped (a sampled ``<|video_pad|>``
is embedded as text, as transformers does).

Qwen3-VL: the vision graph also takes each patch's 4 taps into the learned position table
(``indexing.position_taps``) and returns the DeepStack features, which the merger graph turns into
``deepstack_embeds [L, N, D]`` (rows in the order of ``image_embeds``) and the prefill feeds to the
decoder; a video is written as one timestamped entry per temporal patch (``video.timestamp_prompt``)
and its M-RoPE positions are those of its temporal patches as one-frame grids, as transformers'
``Qwen3VLModel.get_rope_index`` splits ``video_grid_thw``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from qvl_export.core.errors import QvlError
from qvl_export.core.manifest import Manifest
from qvl_export.runtimes import indexing, preprocess, video
from qvl_export.runtimes.chat import (IMAGE_TYPES, VIDEO_TYPES, ChatTemplate, image_source, item_kind, media_items,
                                      user_messages, video_options, video_source)
from qvl_export.runtimes.sampling import SamplingParams, choose_token
from qvl_export.runtimes.text import StreamDecoder, TextCodec

log = logging.getLogger(__name__)


@dataclass
class VisionOutput:
    vision_hidden: np.ndarray  # [S_pad, C] float32, graph order (windows padded for Qwen2.5-VL)
    image_embeds: np.ndarray  # [N, D] float32, natural order, images concatenated
    layout: indexing.VisionLayout
    grids: list[tuple[int, int, int]]
    deepstack_embeds: np.ndarray | None = None  # [L, N, D] float32 (Qwen3-VL), rows as image_embeds


@dataclass
class Prepared:
    input_ids: np.ndarray  # [T] int64, image and video pads expanded
    position_ids: np.ndarray  # [3, T] int64 M-RoPE positions
    rope_delta: int
    patches: list[np.ndarray]  # per image / video, prompt order: [t*h*w, patch_dim] float32
    grids: list[tuple[int, int, int]]
    kinds: list[str] = field(default_factory=list)  # "image" / "video" per grid ([] = all images)
    videos: list[video.VideoPlan] = field(default_factory=list)  # per video: frames, timestamps, notes
    decoder_ids: np.ndarray | None = None  # [T] int64: input_ids with video pads as image pads (None: same)


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop" (end token) or "length"
    timings: dict[str, float] = field(default_factory=dict)  # seconds
    step_logits: list[np.ndarray] = field(default_factory=list)  # [V] float32 each, if asked for
    videos: list[dict] = field(default_factory=list)  # per video: VideoPlan.summary() (frames, timestamps, notes)


KV_CONCAT = "concat"  # plain decoder graph: present = Concat(past, new), a new array every step
KV_BUFFER = "buffer"  # GroupQueryAttention graph (pass fuse_decoder_attention): fixed buffers updated in place


def kv_layout(decoder_input_names) -> str:
    """The decoder's KV cache layout, read from its inputs: ``seqlens_k`` marks the in-place buffer graph."""
    return KV_BUFFER if "seqlens_k" in set(decoder_input_names) else KV_CONCAT


class KVCache:
    """Past keys/values, one pair per layer, in the layout of the decoder graph that fills it.

    - ``concat`` (plain graph, trt target / no passes): ``arrays`` are [B, kv_heads, P, head_dim]; each step
      the graph returns past + new as new arrays (the whole cache is copied).
    - ``buffer`` (fused graph): ``arrays`` are buffers [B, kv_heads, C, head_dim] whose first ``length`` rows
      are valid. A step writes only its T new rows, in place: the backend binds ``present.{i}.*`` to the
      memory of ``past_key_values.{i}.*``. ``capacity`` rows are allocated on first use (``generate`` asks
      for prompt + max_new_tokens); a step that needs more grows them to max(needed, 2 x C), rounded up
      to ``ALIGN`` rows - one copy of the valid rows per doubling.
    """

    ALIGN = 256

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, dtype=np.float32, batch: int = 1,
                 capacity: int = 0):
        self.kv_heads, self.head_dim, self.dtype = kv_heads, head_dim, np.dtype(dtype)
        self.capacity_hint = int(capacity)
        self.length = 0  # valid rows (tokens) per layer
        empty = np.zeros((batch, kv_heads, 0, head_dim), dtype=dtype)
        self.arrays = [empty] * (2 * num_layers)

    @property
    def capacity(self) -> int:
        return self.arrays[0].shape[2]

    def reserve(self, batch: int, total: int) -> None:
        """``buffer`` layout: make room for ``total`` rows of a batch of ``batch``, keeping the valid rows."""
        if total <= self.capacity and batch == self.arrays[0].shape[0]:
            return
        if batch != self.arrays[0].shape[0] and self.length:
            raise QvlError(f"The KV cache holds a batch of {self.arrays[0].shape[0]}; a step of batch {batch} "
                           "needs a new cache.")
        rows = max(total, self.capacity_hint, 2 * self.capacity)
        rows = -(-rows // self.ALIGN) * self.ALIGN
        grown = []
        for old in self.arrays:
            new = np.zeros((batch, self.kv_heads, rows, self.head_dim), dtype=self.dtype)
            new[:, :, :self.length] = old[:, :, :self.length]
            grown.append(new)
        self.arrays = grown

    def valid(self) -> list[np.ndarray]:
        """Cached rows per layer, [B, kv_heads, length, head_dim] views (key, value, key, value, ...)."""
        return [a[:, :, :self.length] for a in self.arrays]


def decoder_feeds(layout: str, input_ids: np.ndarray, image_embeds: np.ndarray, position_ids: np.ndarray,
                  cache: KVCache, deepstack_embeds: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The decoder's feeds for one step in ``layout``; ``buffer`` makes room in the cache for the step.
    ``deepstack_embeds [L, N, D]`` only for a decoder that takes them (Qwen3-VL)."""
    feeds = {"input_ids": input_ids, "image_embeds": image_embeds, "position_ids": position_ids}
    if deepstack_embeds is not None:
        feeds["deepstack_embeds"] = deepstack_embeds
    if layout == KV_BUFFER:
        batch, steps = input_ids.shape
        total = cache.length + steps
        cache.reserve(batch, total)
        feeds["seqlens_k"] = np.full(batch, total - 1, dtype=np.int32)  # per sequence: valid rows after the step - 1
        feeds["total_sequence_length"] = np.asarray(total, dtype=np.int32)
    for i in range(len(cache.arrays) // 2):
        feeds[f"past_key_values.{i}.key"] = cache.arrays[2 * i]
        feeds[f"past_key_values.{i}.value"] = cache.arrays[2 * i + 1]
    return feeds


def advance_cache(layout: str, cache: KVCache, presents: Sequence[np.ndarray], steps: int) -> None:
    """Take the decoder's ``present`` outputs as the cache after a step of ``steps`` tokens.

    In ``buffer`` layout they are the cache buffers themselves when the backend bound them in place, or
    full-capacity copies when it did not (a backend without IOBinding): both hold the same rows.
    """
    cache.arrays = list(presents)
    cache.length = cache.length + steps if layout == KV_BUFFER else cache.arrays[0].shape[2]


class Pipeline:
    def __init__(self, folder: str | Path, backend, manifest: Manifest):
        self.folder = Path(folder)
        self.backend = backend
        self.manifest = manifest
        self.spec = manifest.spec
        self.codec = TextCodec(self.folder / "tokenizer.json", self.spec.tokens)
        self.template = ChatTemplate.from_artifacts(self.folder)
        self.ranges = manifest.tensorrt.ranges if manifest.tensorrt else None  # trt target: the shapes the engines were built for
        text = self.spec.text
        self.max_context = text.max_position_embeddings
        self.kv_dtype = np.float16 if manifest.parts["decoder"].input("past_key_values.0.key").dtype == "float16" \
            else np.float32
        self.embed_dtype = np.float16 if manifest.parts["decoder"].input("image_embeds").dtype == "float16" \
            else np.float32
        self.kv_layout = kv_layout(t.name for t in manifest.parts["decoder"].inputs)
        # Qwen3-VL: L DeepStack features, fed to the decoder as deepstack_embeds [L, N, D]
        decoder_inputs = {t.name for t in manifest.parts["decoder"].inputs}
        self.deepstack = self.spec.vision.deepstack if "deepstack_embeds" in decoder_inputs else 0
        self.qwen3 = self.spec.vision.family == "qwen3_vl"

    @classmethod
    def load(cls, folder: str | Path, threads: int | None = None, backend: str | None = None,
             verify: bool = True) -> "Pipeline":
        """``verify``: check every file against the manifest's sha256 first (``--skip-verify`` turns it off)."""
        manifest = Manifest.read(folder)
        if verify:
            manifest.verify(Path(folder))
        kind = backend or ("tensorrt" if manifest.target == "trt" and _has_engines(manifest) else "onnxruntime")
        if kind == "onnxruntime":
            from qvl_export.runtimes.onnxrt import OrtBackend

            impl = OrtBackend(folder, manifest, threads=threads)
        elif kind == "tensorrt":
            from qvl_export.runtimes.trt.runner import TrtBackend  # GPU only

            impl = TrtBackend(folder, manifest)
        else:
            raise QvlError(f"Unknown backend {kind!r}; use onnxruntime or tensorrt.")
        return cls(folder, impl, manifest)

    # ---- host-side preparation -------------------------------------------------------------
    def prepare(self, images: Sequence = (), prompt: str = "", *, messages: Sequence[dict] | None = None,
                system: str | None = None, min_pixels: int | None = None, max_pixels: int | None = None,
                videos: Sequence = (), fps: float | None = None, max_frames: int | None = None,
                video_min_pixels: int | None = None, video_max_pixels: int | None = None) -> Prepared:
        """Prompt ids, M-RoPE positions and patches for ``messages`` - or for one user turn of ``images``,
        then ``videos``, then ``prompt`` (after a ``system`` turn when given) - in the checkpoint's chat
        format. ``fps`` / ``max_frames`` / ``video_min_pixels`` / ``video_max_pixels`` apply to every
        video unless its item says otherwise (item keys ``fps``, ``max_frames``, ``min_pixels``,
        ``max_pixels``, ``total_pixels`` as in qwen_vl_utils). Videos are planned from their headers and
        refused in one line when they cannot fit the context, before any frame is decoded."""
        defaults = {"fps": fps, "max_frames": max_frames, "min_pixels": video_min_pixels,
                    "max_pixels": video_max_pixels}
        if messages is None:
            messages = user_messages(prompt, images=list(images), system=system, videos=list(videos))
            media = [("image", s, {}) for s in images] + [("video", v, {}) for v in videos]
        else:
            if images or prompt or system is not None or videos:
                raise QvlError("Give either messages or images/videos/prompt/system, not both.")
            media = [("video", video_source(item), video_options(item)) if item_kind(item) in VIDEO_TYPES
                     else ("image", image_source(item), {})
                     for item in media_items(messages, IMAGE_TYPES + VIDEO_TYPES)]
        vision, merge = self.spec.vision, self.spec.vision.merge_unit
        # plan every video from its header first: nothing is decoded before the prompt is known to fit
        readers, plans = {}, {}
        for i, (kind, source, options) in enumerate(media):
            if kind == "video":
                opts = {k: v for k, v in defaults.items() if v is not None} | options
                readers[i] = video.open_video(source)
                plans[i] = video.plan_video(readers[i], vision, fps=float(opts.get("fps") or video.DEFAULT_FPS),
                                            max_frames=opts.get("max_frames"), min_pixels=opts.get("min_pixels"),
                                            max_pixels=opts.get("max_pixels"), total_pixels=opts.get("total_pixels"),
                                            context=self.max_context)
                for note in plans[i].notes:
                    log.warning("note: %s", note)
        video_tokens = sum(p.tokens for p in plans.values())
        if video_tokens >= self.max_context:
            worst = max(plans.values(), key=lambda p: p.tokens)
            raise QvlError(f"{worst.describe} needs {worst.tokens} tokens ({len(worst.indices)} frames of "
                           f"{worst.size[1]}x{worst.size[0]}); the videos of this prompt need {video_tokens}, over "
                           f"the model's context of {self.max_context}: pass a smaller --max-frames or --fps "
                           "(or max_frames / fps in the video item).")
        grids: list[tuple[int, int, int]] = []
        kinds = [kind for kind, _, _ in media]
        self._check_ranges_images(sum(plans[i].grid[0] if k == "video" else 1 for i, (k, _, _) in enumerate(media)))
        patches = []
        for i, (kind, source, _) in enumerate(media):
            if kind == "video":
                patches.append(video.video_patches(readers[i], plans[i], vision, self.spec.preprocess))
                grids.append(plans[i].grid)
                continue
            image = preprocess.load_image(source)
            p, grid = preprocess.preprocess_image(image, vision, self.spec.preprocess,
                                                  min_pixels=min_pixels, max_pixels=max_pixels)
            patches.append(p)
            grids.append(tuple(int(g) for g in grid))
        self._check_ranges_pixels(grids)
        counts = [t * h * w // merge for t, h, w in grids]
        tokens = self.spec.tokens
        image_grids = [g for g, k in zip(grids, kinds) if k == "image"]
        video_grids = [g for g, k in zip(grids, kinds) if k == "video"]
        video_plans = [plans[i] for i in sorted(plans)]
        video_counts = [c for c, k in zip(counts, kinds) if k == "video"]
        text = self.template.render(messages)
        seconds = [p.second_per_grid for p in video_plans]
        if self.qwen3 and video_plans:
            # one timestamped entry per temporal patch; positions per temporal patch (one-frame grids)
            text = video.timestamp_prompt(text, video_plans, vision.temporal_patch_size)
            video_grids = indexing.frame_grids(video_grids, vision.spatial_merge_size)
            video_counts = [h * w // merge for _, h, w in video_grids]
            seconds = None
        ids = self.codec.encode_prompt(text, [c for c, k in zip(counts, kinds) if k == "image"],
                                       video_token_counts=video_counts)
        positions, delta = indexing.rope_index(
            ids, image_grids, tokens, vision.spatial_merge_size, video_grid_thws=video_grids,
            second_per_grid_ts=seconds, tokens_per_second=self.tokens_per_second)
        decoder_ids = np.where(ids == tokens.video_token_id, tokens.image_token_id, ids) if video_grids else None
        return Prepared(ids, positions, int(delta), patches, grids, kinds, video_plans, decoder_ids)

    @property
    def tokens_per_second(self) -> float | None:
        """Qwen2.5-VL's ``vision_config.tokens_per_second`` (from the artifacts' config.json; transformers'
        default 4 when absent); None for Qwen2-VL, whose video temporal ids are plain k, and Qwen3-VL
        (one-frame grids: temporal id 0, the timestamps are in the text)."""
        if self.spec.vision.family != "qwen2_5_vl":
            return None
        if not hasattr(self, "_tokens_per_second"):
            value = 4
            path = self.folder / "config.json"
            if path.exists():
                from qvl_export.core.spec import read_json

                config = read_json(path, "the model config")
                vision_config = config.get("vision_config") or {}
                value = vision_config.get("tokens_per_second", config.get("tokens_per_second", value))
            self._tokens_per_second = float(value)
        return self._tokens_per_second

    def _check_ranges_images(self, n: int) -> None:
        if self.ranges and n > int(self.ranges.get("max_images", n)):
            raise QvlError(f"{n} images (each temporal patch of a video counts one) in one prompt; these artifacts "
                           f"were built for at most {self.ranges['max_images']} (--max-images at build time): "
                           "rebuild with a larger --max-images or send fewer images or frames.")

    def _check_ranges_pixels(self, grids: list[tuple[int, int, int]]) -> None:
        if not self.ranges:
            return
        patch = self.spec.vision.patch_size
        for t, h, w in grids:
            pixels = h * w * patch * patch
            lo, hi = int(self.ranges.get("min_pixels", 0)), int(self.ranges.get("max_pixels", pixels))
            if not lo <= pixels <= hi:
                raise QvlError(f"An image resizes to {w * patch}x{h * patch} = {pixels} pixels; the engines were "
                               f"built for {lo}..{hi} pixels per image: pass --max-pixels {hi} (or --min-pixels "
                               f"{lo}), or rebuild with other --engine-min/max-pixels.")

    # ---- parts -----------------------------------------------------------------------------
    def encode_images(self, patches: list[np.ndarray], grids: list[tuple[int, int, int]]) -> VisionOutput:
        """Vision encoder + merger for all images and videos of a prompt in one run of each part.

        A video grid (t, h, w) runs as t one-frame grids (``indexing.frame_grids``): attention, rotary
        ids and windows per temporal patch, as transformers; ``image_embeds`` come back in the order of
        ``patches`` (images and videos as given)."""
        vision = self.spec.vision
        units = indexing.frame_grids(grids, vision.spatial_merge_size)
        layout = indexing.vision_layout(units, vision)
        cos, sin = indexing.vision_rotary(units, vision)  # [S, hd] natural order
        feeds = {
            "patches": layout.gather(np.concatenate(patches, axis=0), 0.0),
            "rope_cos": layout.gather(cos, 1.0),
            "rope_sin": layout.gather(sin, 0.0),
            "image_ids": layout.image_ids,
        }
        if self.qwen3:  # the learned position table's taps (natural order: Qwen3-VL has no windows)
            feeds["pos_indices"], feeds["pos_weights"] = indexing.position_taps(units, vision)
        hidden, *deep = self.backend.run("vision", self._cast("vision", feeds))
        merger_feeds = {"vision_hidden": hidden}
        if deep:
            merger_feeds["deepstack_hidden"] = deep[0]  # [L, S, C]
        # parts may be built in different float types (vision fp16, merger fp32): the merger takes its own
        merged, *deep_embeds = self.backend.run("merger", self._cast("merger", merger_feeds))
        embeds = merged[layout.unit_slots]  # [N, D] back to natural order, padding units dropped
        deepstack = deep_embeds[0][:, layout.unit_slots] if deep_embeds else None  # [L, N, D]
        return VisionOutput(hidden, embeds, layout, list(grids), deepstack)

    def no_images(self) -> tuple[np.ndarray, np.ndarray | None]:
        """(image_embeds [0, D], deepstack_embeds [L, 0, D] or None): the vision inputs of a text-only step."""
        hidden = self.spec.text.hidden_size
        return (np.zeros((0, hidden), np.float32),
                np.zeros((self.deepstack, 0, hidden), np.float32) if self.deepstack else None)

    def decoder_step(self, input_ids: np.ndarray, image_embeds: np.ndarray, position_ids: np.ndarray,
                     cache: KVCache, deepstack_embeds: np.ndarray | None = None) -> np.ndarray:
        """input_ids [B, T], image_embeds [N, D], position_ids [3, B, T] -> logits [B, V]; cache grows by T.
        ``deepstack_embeds [L, N, D]`` (Qwen3-VL; None: none for a decoder that takes them, i.e. N = 0 rows)."""
        if not self.deepstack:
            deepstack_embeds = None
        elif deepstack_embeds is None and image_embeds.shape[0] == 0:  # a decode step or a text-only prompt
            deepstack_embeds = self.no_images()[1]
        elif deepstack_embeds is None or deepstack_embeds.shape[:2] != (self.deepstack, image_embeds.shape[0]):
            raise QvlError(f"this decoder takes deepstack_embeds [{self.deepstack}, N, D] with the N = "
                           f"{image_embeds.shape[0]} rows of image_embeds; take both from encode_images.")
        if deepstack_embeds is not None:
            deepstack_embeds = deepstack_embeds.astype(self.embed_dtype, copy=False)
        if hasattr(cache, "step"):  # the backend's device-resident cache (TensorRT): K/V stay on the device
            return cache.step(input_ids, image_embeds, position_ids, deepstack_embeds)
        feeds = decoder_feeds(self.kv_layout, input_ids, image_embeds.astype(self.embed_dtype, copy=False),
                              position_ids, cache, deepstack_embeds)
        out = self.backend.run("decoder", feeds)
        advance_cache(self.kv_layout, cache, out[1:], input_ids.shape[1])
        return out[0][:, -1, :].astype(np.float32, copy=False)

    def new_cache(self, batch: int = 1, capacity: int = 0) -> KVCache:
        """An empty KV cache for this decoder; ``capacity`` tokens are allocated up front (buffer layout).
        A backend with its own ``new_cache`` (TensorRT) keeps the cache on the device instead."""
        if hasattr(self.backend, "new_cache"):
            return self.backend.new_cache(batch, capacity)
        text = self.spec.text
        return KVCache(text.num_hidden_layers, text.num_key_value_heads, text.head_dim, self.kv_dtype, batch,
                       capacity)

    def _cast(self, part: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        info = self.manifest.parts[part]
        out = {}
        for name, arr in feeds.items():
            want = np.dtype(info.input(name).dtype)
            out[name] = arr.astype(want, copy=False)
        return out

    # ---- generation ------------------------------------------------------------------------
    def sampling(self, **overrides) -> SamplingParams:
        """The checkpoint's generation settings (generation_config.json) with ``overrides`` (None: keep)."""
        return SamplingParams.from_spec(self.spec.generation, **overrides)

    def stream(self, images: Sequence = (), prompt: str = "", **kwargs) -> Iterator[str]:
        """Yields text pieces as they are generated (same arguments as ``generate``)."""
        pieces: list[str] = []
        gen = self._generate(images, prompt, on_text=pieces.append, **kwargs)
        for _ in gen:
            while pieces:
                yield pieces.pop(0)
        while pieces:
            yield pieces.pop(0)

    def generate(self, images: Sequence = (), prompt: str = "", **kwargs) -> Generation:
        result = None
        gen = self._generate(images, prompt, **kwargs)
        while True:
            try:
                next(gen)
            except StopIteration as stop:
                result = stop.value
                break
        return result

    def _generate(self, images: Sequence, prompt: str, *, messages: Sequence[dict] | None = None,
                  system: str | None = None, max_new_tokens: int | None = None, temperature: float | None = None,
                  top_p: float | None = None, top_k: int | None = None, repetition_penalty: float | None = None,
                  do_sample: bool | None = None, seed: int | None = None, min_pixels: int | None = None,
                  max_pixels: int | None = None, on_text: Callable[[str], None] | None = None,
                  keep_logits: bool = False, prepared: Prepared | None = None, videos: Sequence = (),
                  fps: float | None = None, max_frames: int | None = None, video_min_pixels: int | None = None,
                  video_max_pixels: int | None = None):
        """Sampling settings left None take the checkpoint's generation_config.json (transformers'
        defaults where it says nothing); ``temperature=0`` is greedy."""
        params = self.sampling(temperature=temperature, top_p=top_p, top_k=top_k,
                               repetition_penalty=repetition_penalty, do_sample=do_sample)
        if max_new_tokens is None:
            max_new_tokens = self.spec.generation.max_new_tokens or 128
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        prep = prepared or self.prepare(images, prompt, messages=messages, system=system, min_pixels=min_pixels,
                                        max_pixels=max_pixels, videos=videos, fps=fps, max_frames=max_frames,
                                        video_min_pixels=video_min_pixels, video_max_pixels=video_max_pixels)
        self.check_fits(prep, max_new_tokens)
        timings["preprocess_s"] = time.perf_counter() - t0

        cache = self.new_cache(capacity=len(prep.input_ids) + max_new_tokens)
        logits = self.prefill(prep, cache, timings)
        seq = Decoding(self, prep, params, max_new_tokens, seed, on_text=on_text, keep_logits=keep_logits)
        t3 = time.perf_counter()
        while True:
            token = seq.push(logits)
            if seq.finish == "stop":
                break
            yield token
            if seq.finish:
                break
            pos = indexing.decode_positions(cache.length, prep.rope_delta, 1)  # [3, 1]
            logits = self.decoder_step(np.asarray([[token]], dtype=np.int64), self.no_images()[0], pos[:, None, :],
                                       cache)[0]
        timings["decode_s"] = time.perf_counter() - t3
        return seq.result(timings)

    def check_fits(self, prep: Prepared, max_new_tokens: int, capacity: int | None = None) -> None:
        """Refuse in one line a prompt that, with ``max_new_tokens``, exceeds the engines' ``max_seq`` (trt),
        the model's context or ``capacity`` (a KV pool's rows per sequence, ``runtimes/batching.py``)."""
        if max_new_tokens < 1:
            raise QvlError("max_new_tokens must be at least 1.")
        total = len(prep.input_ids) + max_new_tokens
        if self.ranges and total > int(self.ranges.get("max_seq", total)):
            raise QvlError(f"The prompt is {len(prep.input_ids)} tokens and {max_new_tokens} new tokens were asked "
                           f"for; the engines were built for {self.ranges['max_seq']} (--max-seq at build time). "
                           "Use smaller images, a shorter prompt or fewer new tokens, or rebuild.")
        if total > self.max_context:
            raise QvlError(f"The prompt is {len(prep.input_ids)} tokens (images and videos included) and "
                           f"{max_new_tokens} new tokens were asked for; the model's context is {self.max_context}. "
                           "Use smaller images (--max-pixels), fewer images or video frames (--max-frames), a "
                           "shorter prompt or fewer new tokens.")
        if capacity is not None and total > capacity:
            raise QvlError(f"The prompt is {len(prep.input_ids)} tokens (images and videos included) and "
                           f"{max_new_tokens} new tokens were asked for; this server holds {capacity} tokens per "
                           "sequence (--context): use smaller or fewer images, a shorter prompt or fewer new tokens.")

    def prefill(self, prep: Prepared, cache: KVCache, timings: dict[str, float] | None = None) -> np.ndarray:
        """Vision + merger for the prompt's images and videos, then the prompt through the decoder into the empty
        ``cache``: the last position's logits [V] float32. ``timings`` gets vision_s and prefill_s."""
        timings = {} if timings is None else timings
        t1 = time.perf_counter()
        if prep.patches:
            vis = self.encode_images(prep.patches, prep.grids)
            embeds, deepstack = vis.image_embeds, vis.deepstack_embeds
        else:
            embeds, deepstack = self.no_images()
        timings["vision_s"] = time.perf_counter() - t1
        t2 = time.perf_counter()
        prompt_ids = prep.input_ids if prep.decoder_ids is None else prep.decoder_ids  # video pads -> image pads
        logits = self.decoder_step(prompt_ids[None], embeds, prep.position_ids[:, None, :], cache, deepstack)[0]
        timings["prefill_s"] = time.perf_counter() - t2
        return logits


class Decoding:
    """One sequence's token choices after its prefill: the sampling settings, its own generator (``seed``),
    the history the repetition penalty sees (the prompt too, as transformers), the text stream and when it
    stops (an end token: "stop"; ``max_new_tokens`` tokens: "length"). ``generate`` and the batched decoder
    (``runtimes/batching.py``) both choose through it, so a row of a batch chooses exactly as it would alone."""

    def __init__(self, pipe: Pipeline, prep: Prepared, params: SamplingParams, max_new_tokens: int,
                 seed: int | None = None, on_text: Callable[[str], None] | None = None, keep_logits: bool = False):
        self.pipe, self.prep, self.params, self.max_new_tokens = pipe, prep, params, int(max_new_tokens)
        self.rng = np.random.default_rng(seed)
        self.eos = set(pipe.spec.generation.eos_token_ids or pipe.spec.tokens.eos_token_ids)
        self.history = [int(i) for i in prep.input_ids]
        self.stream = StreamDecoder(pipe.codec)
        self.on_text, self.keep_logits = on_text, keep_logits
        self.tokens: list[int] = []
        self.kept: list[np.ndarray] = []
        self.finish: str | None = None  # None while running, then "stop" or "length"

    def push(self, logits: np.ndarray) -> int:
        """Choose the next token from ``logits [V]``; sets ``finish`` when it is the last one."""
        if self.keep_logits:
            self.kept.append(np.array(logits, dtype=np.float32))
        token = choose_token(logits, self.history, self.params, self.rng)
        self.history.append(token)
        self.tokens.append(token)
        if token in self.eos:
            self.finish = "stop"
        else:
            self._emit(self.stream.push(token))
            if len(self.tokens) >= self.max_new_tokens:
                self.finish = "length"
        if self.finish:
            self._emit(self.stream.flush())  # the streamed pieces add up to the final text
        return token

    def _emit(self, piece: str) -> None:
        if piece and self.on_text:
            self.on_text(piece)

    def result(self, timings: dict[str, float]) -> Generation:
        decoded = len(self.tokens) - 1 if self.tokens else 0
        decode_s = timings.get("decode_s", 0.0)
        timings["decode_tokens_per_s"] = decoded / decode_s if decoded and decode_s > 0 else 0.0
        text = self.pipe.codec.decode([t for t in self.tokens if t not in self.eos])
        return Generation(text, list(self.tokens), len(self.prep.input_ids), self.finish or "length", timings,
                          self.kept, [p.summary() for p in self.prep.videos])


def _has_engines(manifest: Manifest) -> bool:
    return all(p.engine for p in manifest.parts.values())
