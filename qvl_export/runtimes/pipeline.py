"""The thin runtime: load an artifacts folder once, generate many times.

Imports numpy, onnxruntime (or tensorrt), tokenizers and pillow only. The host does what the
graphs don't: image pre-processing, vision rotary tables and window layout, M-RoPE positions and
the rope delta, the chat prompt, the KV cache loop and sampling.

    pipe = Pipeline.load("build/q25")
    result = pipe.generate(["invoice.png"], "What is the total?", max_new_tokens=64)
    for piece in pipe.stream(["invoice.png"], "What is the total?"): print(piece, end="")
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from qvl_export.errors import QvlError
from qvl_export.manifest import Manifest
from qvl_export.runtimes import indexing, preprocess
from qvl_export.runtimes.text import StreamDecoder, TextCodec, chat_prompt

log = logging.getLogger(__name__)


@dataclass
class VisionOutput:
    vision_hidden: np.ndarray  # [S_pad, C] float32, graph order (windows padded for Qwen2.5-VL)
    image_embeds: np.ndarray  # [N, D] float32, natural order, images concatenated
    layout: indexing.VisionLayout
    grids: list[tuple[int, int, int]]


@dataclass
class Prepared:
    input_ids: np.ndarray  # [T] int64, image pads expanded
    position_ids: np.ndarray  # [3, T] int64 M-RoPE positions
    rope_delta: int
    patches: list[np.ndarray]  # per image [t*h*w, patch_dim] float32
    grids: list[tuple[int, int, int]]


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop" (end token) or "length"
    timings: dict[str, float] = field(default_factory=dict)  # seconds
    step_logits: list[np.ndarray] = field(default_factory=list)  # [V] float32 each, if asked for


class KVCache:
    """Past keys/values as arrays [B, kv_heads, P, head_dim], one pair per layer."""

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, dtype=np.float32, batch: int = 1):
        empty = np.zeros((batch, kv_heads, 0, head_dim), dtype=dtype)
        self.arrays = [empty] * (2 * num_layers)

    @property
    def length(self) -> int:
        return self.arrays[0].shape[2]


class Pipeline:
    def __init__(self, folder: str | Path, backend, manifest: Manifest):
        self.folder = Path(folder)
        self.backend = backend
        self.manifest = manifest
        self.spec = manifest.spec
        self.codec = TextCodec(self.folder / "tokenizer.json", self.spec.tokens)
        text = self.spec.text
        self.max_context = text.max_position_embeddings
        self.kv_dtype = np.float16 if manifest.parts["decoder"].input("past_key_values.0.key").dtype == "float16" \
            else np.float32
        self.embed_dtype = np.float16 if manifest.parts["decoder"].input("image_embeds").dtype == "float16" \
            else np.float32

    @classmethod
    def load(cls, folder: str | Path, threads: int | None = None, backend: str | None = None) -> "Pipeline":
        manifest = Manifest.read(folder)
        kind = backend or ("tensorrt" if manifest.target == "trt" and _has_engines(manifest) else "onnxruntime")
        if kind == "onnxruntime":
            from qvl_export.runtimes.onnxrt import OrtBackend

            impl = OrtBackend(folder, manifest, threads=threads)
        elif kind == "tensorrt":
            from qvl_export.runtimes.tensorrt import TrtBackend  # noqa: F401  (GPU only)

            impl = TrtBackend(folder, manifest)
        else:
            raise QvlError(f"Unknown backend {kind!r}; use onnxruntime or tensorrt.")
        return cls(folder, impl, manifest)

    # ---- host-side preparation -------------------------------------------------------------
    def prepare(self, images: Sequence, prompt: str, *, min_pixels: int | None = None,
                max_pixels: int | None = None, system: str | None = "You are a helpful assistant.") -> Prepared:
        patches, grids = [], []
        for source in images:
            image = preprocess.load_image(source)
            p, grid = preprocess.preprocess_image(image, self.spec.vision, self.spec.preprocess,
                                                  min_pixels=min_pixels, max_pixels=max_pixels)
            patches.append(p)
            grids.append(tuple(int(g) for g in grid))
        merge = self.spec.vision.merge_unit
        counts = [t * h * w // merge for t, h, w in grids]
        ids = self.codec.encode_prompt(chat_prompt(prompt, len(images), system), counts)
        positions, delta = indexing.rope_index(ids, grids, self.spec.tokens, self.spec.vision.spatial_merge_size)
        return Prepared(ids, positions, int(delta), patches, grids)

    # ---- parts -----------------------------------------------------------------------------
    def encode_images(self, patches: list[np.ndarray], grids: list[tuple[int, int, int]]) -> VisionOutput:
        """Vision encoder + merger for all images of a prompt in one run of each part."""
        vision = self.spec.vision
        layout = indexing.vision_layout(grids, vision)
        cos, sin = indexing.vision_rotary(grids, vision)  # [S, hd] natural order
        feeds = {
            "patches": layout.gather(np.concatenate(patches, axis=0), 0.0),
            "rope_cos": layout.gather(cos, 1.0),
            "rope_sin": layout.gather(sin, 0.0),
            "image_ids": layout.image_ids,
        }
        (hidden,) = self.backend.run("vision", self._cast("vision", feeds))
        (merged,) = self.backend.run("merger", {"vision_hidden": hidden})
        embeds = merged[layout.unit_slots]  # [N, D] back to natural order, padding units dropped
        return VisionOutput(hidden, embeds, layout, list(grids))

    def decoder_step(self, input_ids: np.ndarray, image_embeds: np.ndarray, position_ids: np.ndarray,
                     cache: KVCache) -> np.ndarray:
        """input_ids [B, T], image_embeds [N, D], position_ids [3, B, T] -> logits [B, V]; cache grows."""
        feeds = {"input_ids": input_ids, "image_embeds": image_embeds.astype(self.embed_dtype, copy=False),
                 "position_ids": position_ids}
        for i in range(self.spec.text.num_hidden_layers):
            feeds[f"past_key_values.{i}.key"] = cache.arrays[2 * i]
            feeds[f"past_key_values.{i}.value"] = cache.arrays[2 * i + 1]
        out = self.backend.run("decoder", feeds)
        cache.arrays = out[1:]
        return out[0][:, -1, :].astype(np.float32, copy=False)

    def _cast(self, part: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        info = self.manifest.parts[part]
        out = {}
        for name, arr in feeds.items():
            want = np.dtype(info.input(name).dtype)
            out[name] = arr.astype(want, copy=False)
        return out

    # ---- generation ------------------------------------------------------------------------
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

    def _generate(self, images: Sequence, prompt: str, *, max_new_tokens: int = 128, temperature: float = 0.0,
                  top_p: float = 1.0, seed: int | None = None, min_pixels: int | None = None,
                  max_pixels: int | None = None, on_text: Callable[[str], None] | None = None,
                  keep_logits: bool = False, prepared: Prepared | None = None):
        if max_new_tokens < 1:
            raise QvlError("max_new_tokens must be at least 1.")
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        prep = prepared or self.prepare(images, prompt, min_pixels=min_pixels, max_pixels=max_pixels)
        total = len(prep.input_ids) + max_new_tokens
        if total > self.max_context:
            raise QvlError(f"The prompt is {len(prep.input_ids)} tokens (images included) and {max_new_tokens} new "
                           f"tokens were asked for; the model's context is {self.max_context}. Use smaller "
                           "images (--max-pixels), fewer images, a shorter prompt or fewer new tokens.")
        timings["preprocess_s"] = time.perf_counter() - t0

        t1 = time.perf_counter()
        if prep.patches:
            embeds = self.encode_images(prep.patches, prep.grids).image_embeds
        else:
            embeds = np.zeros((0, self.spec.text.hidden_size), dtype=np.float32)
        timings["vision_s"] = time.perf_counter() - t1

        text = self.spec.text
        cache = KVCache(text.num_hidden_layers, text.num_key_value_heads, text.head_dim, self.kv_dtype)
        t2 = time.perf_counter()
        logits = self.decoder_step(prep.input_ids[None], embeds, prep.position_ids[:, None, :], cache)[0]
        timings["prefill_s"] = time.perf_counter() - t2

        rng = np.random.default_rng(seed)
        eos = set(self.spec.tokens.eos_token_ids)
        no_image = np.zeros((0, text.hidden_size), dtype=np.float32)
        stream = StreamDecoder(self.codec)
        tokens: list[int] = []
        kept: list[np.ndarray] = []
        finish = "length"
        t3 = time.perf_counter()
        for step in range(max_new_tokens):
            if keep_logits:
                kept.append(logits.copy())
            token = sample(logits, temperature, top_p, rng)
            if token in eos:
                tokens.append(token)
                finish = "stop"
                break
            tokens.append(token)
            piece = stream.push(token)
            if piece and on_text:
                on_text(piece)
            yield token
            if step == max_new_tokens - 1:
                break
            pos = indexing.decode_positions(cache.length, prep.rope_delta, 1)  # [3, 1]
            logits = self.decoder_step(np.asarray([[token]], dtype=np.int64), no_image, pos[:, None, :], cache)[0]
        timings["decode_s"] = time.perf_counter() - t3
        decoded = len(tokens) - 1 if tokens else 0
        timings["decode_tokens_per_s"] = decoded / timings["decode_s"] if decoded and timings["decode_s"] > 0 else 0.0
        text_out = self.codec.decode([t for t in tokens if t not in eos])
        return Generation(text_out, tokens, len(prep.input_ids), finish, timings, kept)


def sample(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """Greedy when temperature <= 0, else temperature + nucleus (top-p) sampling."""
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    z -= z.max()
    probs = np.exp(z)
    probs /= probs.sum()
    if top_p < 1.0:
        order = np.argsort(-probs)
        cum = np.cumsum(probs[order])
        keep = order[: int(np.searchsorted(cum, top_p)) + 1]
        mask = np.zeros_like(probs)
        mask[keep] = probs[keep]
        probs = mask / mask.sum()
    return int(rng.choice(len(probs), p=probs))


def _has_engines(manifest: Manifest) -> bool:
    return all(p.engine for p in manifest.parts.values())
