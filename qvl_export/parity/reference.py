"""The PyTorch/transformers reference that the parity gate compares our ONNX artifacts against.

Why this exists: every number our exported parts produce (pixel patches, vision hidden states,
merger output, M-RoPE positions, prefill and per-step logits, greedy tokens) must be checked
against what transformers itself computes for the same checkpoint and prompt. This module builds
that ground truth, stage by stage, and hands it back as numpy arrays.

It is assembled by hand rather than with ``AutoProcessor`` because on our CPU machines the
processor also loads a video processor that needs torchvision, which does not import beside the
CPU torch build (see FIELD_NOTES.md). The hand-built pipeline follows ``Qwen2VLProcessor``:
chat template -> expand each ``<|image_pad|>`` to ``t*h*w/4`` copies -> tokenize ->
``mm_token_type_ids`` (0 text, 1 image, 2 video). Without ``mm_token_type_ids`` transformers 5.x does not
apply M-RoPE to image tokens (``generate`` silently falls back to 1-D positions), and a reference
built that way - and any runtime that matches it - is wrong.

Videos: transformers' video processor needs torchvision too, so ``pixel_values_videos`` are built
on the host by ``qvl_export.runtimes.video`` (frame sampling, smart-resize, temporal patches; its
layout is checked against transformers' own ``Qwen2VLVideoProcessor.patchify`` code and against the
image processor for a clip of two identical frames in tests/runtimes/test_video.py). The model
then gets ``pixel_values_videos``, ``video_grid_thw``, ``second_per_grid_ts`` (Qwen2.5-VL:
temporal_patch_size / sampling fps) and ``mm_token_type_ids`` 2 on video tokens, as
``Qwen2VLProcessor`` / ``Qwen2_5_VLProcessor`` would hand them over. For Qwen3-VL the video
placeholders are expanded by transformers' own ``Qwen3VLProcessor.replace_video_token`` (the
timestamped entry per temporal patch), given the frames' indices and rate as video metadata.

Qwen3-VL's vision tower also returns its DeepStack features; the result keeps them
(``deepstack_out [L, N, D]``) for the per-stage comparison.

Choices, measured on the tiny synthetic checkpoints (CPU, transformers 5.23, 3 images, T=245):
- attention: ``eager``. In float32 eager and ``sdpa`` agree within 1.8e-6 on the logits and are
  equally close to a float64 sdpa run (max 2-3e-6, mean 3e-7 for both): the choice does not move
  the reference (float64 eager is no yardstick: its softmax runs in float32).
  Eager is kept because it is the literal math our ONNX graphs spell out and it does the
  softmax in float32 even when the model runs in bf16/fp16.
- ``generate`` runs with a clean generation config (only bos/eos/pad from the checkpoint): hub
  configs carry ``repetition_penalty`` etc., and transformers fills every unset field of a passed
  config from the checkpoint's, so greedy would not pick the argmax of the raw logits.
- ``generate``'s first-step logits equal the prefill forward's last row within ~1e-6: both use
  the same M-RoPE positions. ``run`` checks this and that every token is the raw-logit argmax.

torch and transformers are imported lazily so importing this module stays cheap.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from qvl_export.core.errors import QvlError
from qvl_export.core.spec import read_json
from qvl_export.loading.config import ARCHITECTURES, SUPPORTED

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch
    from PIL import Image

log = logging.getLogger(__name__)

ATTN_IMPLEMENTATION = "eager"
DTYPES = ("float32", "float64", "bfloat16", "float16")
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
# Modality ids of transformers' ``mm_token_type_ids``.
MM_TEXT, MM_IMAGE, MM_VIDEO = 0, 1, 2


@dataclass
class ReferenceCase:
    """One prompt: the images come first in the user message, then the text."""

    name: str
    images: list["Image.Image"]  # RGB, already loaded
    prompt: str
    max_new_tokens: int = 64
    min_pixels: int | None = None  # override preprocessor_config.json
    max_pixels: int | None = None
    system: str | None = None  # a system turn (None: whatever the template writes without one)
    messages: list[dict] | None = None  # a whole chat instead of prompt/system (images: its image items, in order)
    videos: list[Any] = field(default_factory=list)  # after the images: files, frame folders, arrays, frame lists
    fps: float = 2.0  # video sampling (runtimes.video); per-frame pixel range below (None: Qwen's video defaults)
    max_frames: int | None = None
    video_min_pixels: int | None = None
    video_max_pixels: int | None = None


@dataclass
class ReferenceResult:
    input_ids: np.ndarray  # int64 [T] full prompt after chat template + image pad expansion
    pixel_values: np.ndarray | None  # float32 [S, patch_dim] all images concatenated
    image_grid_thw: np.ndarray | None  # int64 [n_images, 3]
    vision_hidden: np.ndarray | None  # float32 [S, C] ViT last_hidden_state (Qwen2.5-VL: window order)
    merger_out: np.ndarray | None  # float32 [S/4, D] merger output, natural order, all images
    prefill_logits: np.ndarray  # float32 [T, V] prefill logits at every prompt position
    generated_ids: np.ndarray  # int64 [N] greedy new tokens (eos included when reached)
    step_logits: np.ndarray  # float32 [N, V] raw logits that chose each generated token
    position_ids: np.ndarray  # int64 [3, T] M-RoPE positions of the prefill
    rope_delta: int  # decode position = cache_length + rope_delta
    step0_prefill_max_abs: float = 0.0  # max |step_logits[0] - prefill_logits[-1]| (self-check)
    pixel_values_videos: np.ndarray | None = None  # float32 [S_v, patch_dim] all videos, host-built
    video_grid_thw: np.ndarray | None = None  # int64 [n_videos, 3]
    second_per_grid_ts: np.ndarray | None = None  # float32 [n_videos]
    video_merger_out: np.ndarray | None = None  # float32 [S_v/4, D] merger output of the videos, natural order
    mm_token_type_ids: np.ndarray | None = None  # int64 [T] 0 text, 1 image, 2 video
    deepstack_out: np.ndarray | None = None  # float32 [L, S/4, D] Qwen3-VL DeepStack features of the images
    video_deepstack_out: np.ndarray | None = None  # float32 [L, S_v/4, D] the same for the videos


@dataclass
class PreparedInputs:
    """Model inputs for one case, batch 1, as ``Qwen2VLProcessor`` would return them."""

    prompt: str  # chat-templated text before image pad expansion
    input_ids: "torch.Tensor"  # int64 [1, T]
    attention_mask: "torch.Tensor"  # int64 [1, T] all ones
    mm_token_type_ids: "torch.Tensor"  # int64 [1, T] 0 text, 1 image
    pixel_values: "torch.Tensor | None" = None  # float32 [S, patch_dim]
    image_grid_thw: "torch.Tensor | None" = None  # int64 [n_images, 3]
    pixel_values_videos: "torch.Tensor | None" = None  # float32 [S_v, patch_dim]
    video_grid_thw: "torch.Tensor | None" = None  # int64 [n_videos, 3]
    second_per_grid_ts: "torch.Tensor | None" = None  # float32 [n_videos] (Qwen2.5-VL only)

    @property
    def has_images(self) -> bool:
        return self.pixel_values is not None

    @property
    def has_videos(self) -> bool:
        return self.pixel_values_videos is not None

    def model_kwargs(self, with_mm_token_type_ids: bool = True) -> dict[str, Any]:
        """Keyword arguments for ``model(...)`` / ``model.generate(...)``.

        ``with_mm_token_type_ids=False`` reproduces the pitfall (no M-RoPE for image tokens); it
        exists only so tests can pin that transformers does not silently do the right thing.
        """
        kwargs: dict[str, Any] = {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        if self.has_images:
            kwargs["pixel_values"] = self.pixel_values
            kwargs["image_grid_thw"] = self.image_grid_thw
        if self.has_videos:
            kwargs["pixel_values_videos"] = self.pixel_values_videos
            kwargs["video_grid_thw"] = self.video_grid_thw
            if self.second_per_grid_ts is not None:
                kwargs["second_per_grid_ts"] = self.second_per_grid_ts
        if with_mm_token_type_ids:
            kwargs["mm_token_type_ids"] = self.mm_token_type_ids
        return kwargs


def _to_numpy(t: "torch.Tensor", dtype: type) -> np.ndarray:
    """Detach to a numpy array of ``dtype`` (floats go through float32: bf16 has no numpy type)."""
    t = t.detach().to("cpu")
    if t.is_floating_point():
        t = t.float()
    return np.ascontiguousarray(t.numpy(), dtype=dtype)


def stored_float_dtype(model_dir: Path) -> str | None:
    """``"bfloat16"`` / ``"float16"`` when every floating-point tensor of the checkpoint is stored in
    that one dtype (from the safetensors headers); None otherwise (float32, or mixed)."""
    from qvl_export.loading.weights import CheckpointWeights

    weights = CheckpointWeights(model_dir)
    stored = {weights.dtype(n) for n in weights.names()} & {"F32", "F64", "BF16", "F16"}
    return {frozenset({"BF16"}): "bfloat16", frozenset({"F16"}): "float16"}.get(frozenset(stored))


# a weight above this many float32 bytes is widened a slice of output rows at a time (the lm_head,
# 1.2 GB for Qwen2.5-VL-3B's tied table, 2.2 GB for 7B's): never a whole float32 copy beside the stored one
WIDEN_SLICE_BYTES = 256 << 20


def widen_while_running(model: Any, slice_bytes: int | None = None) -> None:
    """Keep ``model``'s weights in their loaded (16-bit) dtype and give every module its own weights in
    float32 for the duration of its forward call (pre-hook widens, post-hook restores the stored
    tensor), so at most one module's weights are widened at a time.

    - Token tables (``nn.Embedding``) are never widened: the rows are gathered as stored and the
      gathered rows widened (the same values; a widened copy of the table would be 1.2 GB at 3B).
    - A ``nn.Linear`` whose float32 weight exceeds ``slice_bytes`` (the lm_head, which may share the
      token table) computes its output ``slice_bytes`` (default ``WIDEN_SLICE_BYTES``) of widened rows at a time, each slice a float32
      ``F.linear`` over its own output columns: the same float32 arithmetic per logit (the BLAS kernel's
      summation order may differ in the last bit from one whole-matrix call).
    - The first floating parameter of every ``PreTrainedModel`` inside that is not a token table stays
      float32 throughout: it is what transformers reads as the model's ``dtype``, to which it casts
      inputs such as pixel values (the vision tower's patch embedding), so inputs stay float32 as in a
      float32 load. A language model's ``dtype`` (its token table's) is not read: its
      embeddings' dtype is, and those come out float32.
    """
    import torch
    import torch.nn.functional as F
    from transformers import PreTrainedModel

    slice_bytes = slice_bytes or WIDEN_SLICE_BYTES
    tables = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    for sub in model.modules():
        if isinstance(sub, PreTrainedModel):
            first = next((p for p in sub.parameters() if p.is_floating_point()), None)
            if first is not None and id(first) not in tables:
                first.data = first.data.float()
    stored: dict[int, torch.Tensor] = {}

    def widen(module, args):
        for p in module.parameters(recurse=False):
            if p.is_floating_point() and p.dtype != torch.float32:
                stored[id(p)] = p.data
                p.data = p.data.float()

    def restore(module, args, output):
        for p in module.parameters(recurse=False):
            if id(p) in stored:
                p.data = stored.pop(id(p))

    def widened_rows(module, args, output):
        return output.float() if output.is_floating_point() else output

    def sliced_linear(module):
        rows = max(1, slice_bytes // (4 * module.in_features))

        def forward(x):
            w, b = module.weight, module.bias
            if w.dtype == torch.float32:
                return F.linear(x, w, b)
            out = x.new_empty((*x.shape[:-1], module.out_features), dtype=torch.float32)
            for r0 in range(0, module.out_features, rows):
                r1 = min(r0 + rows, module.out_features)
                out[..., r0:r1] = F.linear(x, w[r0:r1].float(), None if b is None else b[r0:r1].float())
            return out
        return forward

    for sub in model.modules():
        if isinstance(sub, torch.nn.Embedding):
            sub.register_forward_hook(widened_rows)
        elif isinstance(sub, torch.nn.Linear) and sub.weight.numel() * 4 > slice_bytes:
            sub.forward = sliced_linear(sub)
        elif next(sub.parameters(recurse=False), None) is not None:
            sub.register_forward_pre_hook(widen)
            sub.register_forward_hook(restore)


class TorchReference:
    """transformers model + hand-assembled processor for one local checkpoint."""

    def __init__(self, model_dir: Path, dtype: str = "float32",
                 attn_implementation: str = ATTN_IMPLEMENTATION, num_threads: int | None = None,
                 stored_weights: bool = True):
        """Load model, tokenizer and image processor of ``model_dir``.

        ``num_threads``: torch intra-op threads while this reference computes (restored after each
        call); None keeps torch's own default (one per physical core). ``stored_weights``: a float32
        reference of a bf16 / fp16 checkpoint holds the weights as stored and widens them module by
        module while it runs (same results, about half the memory); False widens all of them at load.
        """
        import torch
        import transformers
        from transformers import GenerationConfig, PreTrainedTokenizerFast
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        self.model_dir = Path(model_dir)
        if dtype not in DTYPES:
            raise QvlError(f"reference dtype {dtype!r} is not one of {', '.join(DTYPES)}.")
        self.dtype = dtype
        self.num_threads = num_threads
        self.attn_implementation = attn_implementation

        config = read_json(self.model_dir / "config.json", "the model config")
        arch = next((a for a in config.get("architectures") or [] if a in ARCHITECTURES), None)
        if arch is None:
            raise QvlError(f"Unsupported architecture {config.get('architectures')}; the reference supports "
                           f"{SUPPORTED}.")
        self.family = ARCHITECTURES[arch]
        model_cls = getattr(transformers, arch)
        transformers.utils.logging.disable_progress_bar()  # one gate table, not a bar per load

        # a float32 reference of a bf16 / fp16 checkpoint keeps the weights as stored and widens each
        # module's own weights to float32 while it runs: the same float32 arithmetic (widening is
        # exact), about half the resident memory
        self.resident_dtype = stored_float_dtype(self.model_dir) if dtype == "float32" and stored_weights else None
        with self._threads():
            try:
                model, info = model_cls.from_pretrained(
                    self.model_dir, dtype=getattr(torch, self.resident_dtype or dtype),
                    attn_implementation=attn_implementation, output_loading_info=True)
            except (OSError, ValueError, RuntimeError, KeyError) as err:
                raise QvlError(f"transformers could not load {self.model_dir} as {arch}: {err}") from err
        self._check_loading(model, info)
        if self.resident_dtype:
            widen_while_running(model)
        self.model = model.eval()
        log.info("reference: %s from %s (%s%s, attn=%s)", arch, self.model_dir, dtype,
                 f" compute, {self.resident_dtype} weights" if self.resident_dtype else "", attn_implementation)

        # Generation: keep only the token ids of the checkpoint's generation config, so greedy
        # picks argmax of the raw logits (hub configs carry repetition_penalty, top_k, ...).
        self.checkpoint_generation_config = model.generation_config
        gen = model.generation_config
        eos = gen.eos_token_id if gen.eos_token_id is not None else model.config.get_text_config().eos_token_id
        dropped = {k: v for k, v in gen.to_diff_dict().items()
                   if k not in ("bos_token_id", "eos_token_id", "pad_token_id", "transformers_version",
                                "do_sample", "_from_model_config")}
        if dropped:
            log.info("reference: ignoring generation settings %s (plain greedy on raw logits)", dropped)
        self.eos_token_ids: list[int] = [int(e) for e in (eos if isinstance(eos, list) else [eos])
                                         if e is not None]
        pad = gen.pad_token_id if gen.pad_token_id is not None else (self.eos_token_ids or [None])[0]
        self.model.generation_config = GenerationConfig(
            bos_token_id=gen.bos_token_id, eos_token_id=self.eos_token_ids or None, pad_token_id=pad,
            do_sample=False, num_beams=1)

        tok_path = self.model_dir / "tokenizer.json"
        if not tok_path.exists():
            raise QvlError(f"{tok_path} is missing: the reference needs the fast tokenizer file.")
        tok_config_path = self.model_dir / "tokenizer_config.json"
        tok_config = read_json(tok_config_path, "the tokenizer config") if tok_config_path.exists() else {}
        specials = {k: tok_config[k] for k in ("eos_token", "pad_token", "bos_token", "unk_token")
                    if isinstance(tok_config.get(k), str)}
        from qvl_export.runtimes.chat import resolve_template

        # the same file the build copies into the artifacts, rendered here by transformers' own Jinja code
        self.chat_template, _ = resolve_template(self.model_dir)
        self.tokenizer = PreTrainedTokenizerFast(
            tokenizer_file=str(tok_path), chat_template=self.chat_template, **specials)
        self.image_token_id = int(model.config.image_token_id)
        self.video_token_id = int(model.config.video_token_id)
        if self.tokenizer.convert_tokens_to_ids(IMAGE_PAD) != self.image_token_id:
            raise QvlError(f"tokenizer id of {IMAGE_PAD} ({self.tokenizer.convert_tokens_to_ids(IMAGE_PAD)}) "
                           f"differs from config.json image_token_id ({self.image_token_id}).")

        if not (self.model_dir / "preprocessor_config.json").exists():
            raise QvlError(f"{self.model_dir / 'preprocessor_config.json'} is missing: the reference needs the "
                           "image pre-processing settings.")
        try:
            self.image_processor = Qwen2VLImageProcessorPil.from_pretrained(self.model_dir)
        except (OSError, ValueError, TypeError) as err:
            raise QvlError(f"could not read {self.model_dir / 'preprocessor_config.json'}: {err}") from err
        self.merge_unit = int(self.image_processor.merge_size) ** 2

    # ------------------------------------------------------------------ loading

    def _check_loading(self, model: Any, info: dict[str, Any]) -> None:
        """Fail loudly on missing or mismatched weights; a tied lm_head is expected to be absent."""
        tied = bool(getattr(model.config, "tie_word_embeddings", False)
                    or getattr(model.config.get_text_config(), "tie_word_embeddings", False))
        missing = set(info.get("missing_keys") or ())
        if tied:
            missing -= {"lm_head.weight"}
        problems = []
        if missing:
            problems.append(f"missing weights {sorted(missing)[:8]}")
        if info.get("mismatched_keys"):
            problems.append(f"shape-mismatched weights {sorted(info['mismatched_keys'])[:8]}")
        if info.get("error_msgs"):
            problems.append("; ".join(str(m) for m in info["error_msgs"][:3]))
        if problems:
            raise QvlError(f"transformers loaded {self.model_dir} incompletely: {', '.join(problems)}.")
        if info.get("unexpected_keys"):
            log.warning("reference: %d unused weights in %s, e.g. %s", len(info["unexpected_keys"]),
                        self.model_dir, sorted(info["unexpected_keys"])[:4])
        embed = model.get_input_embeddings().weight
        if tied and model.lm_head.weight.data_ptr() != embed.data_ptr():
            import torch

            if not torch.equal(model.lm_head.weight, embed):
                raise QvlError("tie_word_embeddings is true but lm_head differs from the token embeddings "
                               f"after loading {self.model_dir}.")

    @contextlib.contextmanager
    def _threads(self) -> Iterator[None]:
        """Use ``num_threads`` torch threads inside the block, then restore the previous setting."""
        import torch

        if self.num_threads is None:
            yield
            return
        before = torch.get_num_threads()
        torch.set_num_threads(self.num_threads)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    # ------------------------------------------------------------------ inputs

    def build_prompt(self, case: ReferenceCase) -> str:
        """The checkpoint's chat template over the case's messages (one user turn, images first, then
        the text, unless the case gives its own messages), rendered by transformers."""
        from qvl_export.runtimes.chat import user_messages

        messages = case.messages or user_messages(case.prompt, len(case.images), system=case.system,
                                                  videos=[None] * len(case.videos))
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def prepare(self, case: ReferenceCase) -> PreparedInputs:
        """Pre-process images, expand image pads and tokenize, like ``Qwen2VLProcessor.__call__``."""
        import torch

        prompt = self.build_prompt(case)
        n_pads = prompt.count(IMAGE_PAD)
        if n_pads != len(case.images):
            raise QvlError(f"case {case.name!r}: the chat template produced {n_pads} {IMAGE_PAD} markers for "
                           f"{len(case.images)} images; the prompt text must not contain {IMAGE_PAD}.")
        pixel_values = grid_thw = None
        text = prompt
        if case.images:
            size = dict(shortest_edge=self.image_processor.size.shortest_edge,
                        longest_edge=self.image_processor.size.longest_edge)
            if case.min_pixels is not None:
                size["shortest_edge"] = int(case.min_pixels)
            if case.max_pixels is not None:
                size["longest_edge"] = int(case.max_pixels)
            images = [im.convert("RGB") for im in case.images]
            processed = self.image_processor(images=images, size=size, return_tensors="np")
            pixel_values = torch.from_numpy(np.ascontiguousarray(processed["pixel_values"], dtype=np.float32))
            grid_thw = torch.from_numpy(np.asarray(processed["image_grid_thw"], dtype=np.int64))  # [n, 3]
            # Same string expansion as Qwen2VLProcessor.replace_image_token.
            parts = text.split(IMAGE_PAD)
            counts = [int(np.prod(g)) // self.merge_unit for g in grid_thw.tolist()]
            text = parts[0] + "".join(IMAGE_PAD * n + rest for n, rest in zip(counts, parts[1:]))
        videos = self.prepare_videos(case, prompt) if case.videos else None
        if videos is not None and self.family == "qwen3_vl":
            text = self.qwen3_video_text(text, videos)
        elif videos is not None:
            parts = text.split(VIDEO_PAD)
            counts = [int(np.prod(g)) // self.merge_unit for g in videos[1].tolist()]
            text = parts[0] + "".join(VIDEO_PAD * n + rest for n, rest in zip(counts, parts[1:]))
        # The chat template already holds every special token.
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        input_ids = torch.tensor([ids], dtype=torch.long)  # [1, T]
        mm_types = torch.where(input_ids == self.image_token_id, MM_IMAGE, MM_TEXT).long()  # [1, T]
        mm_types = torch.where(input_ids == self.video_token_id, MM_VIDEO, mm_types)
        if videos is not None:
            n_video = int((mm_types == MM_VIDEO).sum())
            if n_video != int(np.prod(videos[1], axis=-1).sum()) // self.merge_unit:
                raise QvlError(f"case {case.name!r}: {n_video} video tokens after tokenizing do not match the "
                               f"video grids {videos[1].tolist()}.")
        if pixel_values is not None:
            expected = int(grid_thw.prod(-1).sum()) // self.merge_unit
            if int((mm_types == MM_IMAGE).sum()) != expected:
                raise QvlError(f"case {case.name!r}: {int(mm_types.sum())} image tokens after tokenizing, "
                               f"expected {expected}; does the tokenizer keep {IMAGE_PAD} as one token?")
        inputs = PreparedInputs(prompt=prompt, input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                mm_token_type_ids=mm_types, pixel_values=pixel_values, image_grid_thw=grid_thw)
        if videos is not None:
            inputs.pixel_values_videos = torch.from_numpy(videos[0])
            inputs.video_grid_thw = torch.from_numpy(videos[1])
            if self.family == "qwen2_5_vl":  # Qwen2-VL's forward takes no second_per_grid_ts
                inputs.second_per_grid_ts = torch.from_numpy(videos[2])
        return inputs

    def qwen3_video_text(self, text: str, videos: tuple) -> str:
        """Each video placeholder expanded by transformers' ``Qwen3VLProcessor.replace_video_token``: one
        ``<t seconds><|vision_start|>pads<|vision_end|>`` entry per temporal patch (timestamps from the
        frames' indices and rate, as the video metadata carries them)."""
        from types import SimpleNamespace

        from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
        from transformers.video_utils import VideoMetadata

        grids, metadata = videos[1], videos[3]
        # the processor's own method on an instance without its sub-processors (the video processor needs
        # torchvision): it reads only these attributes
        proc = object.__new__(Qwen3VLProcessor)
        proc.video_processor = SimpleNamespace(merge_size=int(self.image_processor.merge_size),
                                               temporal_patch_size=int(self.image_processor.temporal_patch_size))
        proc.video_token, proc.vision_start_token, proc.vision_end_token = \
            VIDEO_PAD, "<|vision_start|>", "<|vision_end|>"
        inputs = {"video_grid_thw": grids,
                  "video_metadata": [VideoMetadata(total_num_frames=len(idx), fps=fps, frames_indices=list(idx))
                                     for idx, fps in metadata]}
        parts = text.split(VIDEO_PAD)
        return parts[0] + "".join(proc.replace_video_token(inputs, i) + rest for i, rest in enumerate(parts[1:]))

    def prepare_videos(self, case: ReferenceCase, prompt: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, list]:
        """Host-built video inputs: (pixel_values_videos float32 [S_v, patch_dim], video_grid_thw int64
        [n, 3], second_per_grid_ts float32 [n], [(frame indices, their rate)] per video) - the same frames,
        sizes and patches the runtime makes."""
        from qvl_export.core.spec import PreprocessSpec
        from qvl_export.loading.config import parse_model_config
        from qvl_export.runtimes import video

        if prompt.count(VIDEO_PAD) != len(case.videos):
            raise QvlError(f"case {case.name!r}: the chat template produced {prompt.count(VIDEO_PAD)} {VIDEO_PAD} "
                           f"markers for {len(case.videos)} videos.")
        spec = parse_model_config(self.model_dir)
        proc = self.image_processor
        pp = PreprocessSpec(image_mean=tuple(proc.image_mean), image_std=tuple(proc.image_std),
                            rescale_factor=float(proc.rescale_factor))
        patches, grids, seconds, metadata = [], [], [], []
        for source in case.videos:
            reader = video.open_video(source)
            plan = video.plan_video(reader, spec.vision, fps=case.fps, max_frames=case.max_frames,
                                    min_pixels=case.video_min_pixels, max_pixels=case.video_max_pixels,
                                    context=spec.text.max_position_embeddings)
            patches.append(video.video_patches(reader, plan, spec.vision, pp))
            grids.append(plan.grid)
            seconds.append(plan.second_per_grid)
            # the rate the frame indices count in: the file's own, or the given fps for frames already sampled
            metadata.append((plan.indices, reader.native_fps or case.fps))
        return (np.concatenate(patches, axis=0), np.asarray(grids, dtype=np.int64),
                np.asarray(seconds, dtype=np.float32), metadata)

    # ------------------------------------------------------------------ stages

    def vision(self, inputs: PreparedInputs, videos: bool = False) -> tuple["torch.Tensor", "torch.Tensor",
                                                                           "torch.Tensor | None"]:
        """Vision tower on all images (``videos``: all videos): (last_hidden_state [S, C], pooler_output
        [S/4, D], Qwen3-VL's DeepStack features stacked [L, S/4, D] or None).

        Qwen2.5-VL leaves last_hidden_state in window order; its pooler_output (merger) is already
        un-permuted to natural order.
        """
        import torch

        pixels, grids = ((inputs.pixel_values_videos, inputs.video_grid_thw) if videos
                         else (inputs.pixel_values, inputs.image_grid_thw))
        if pixels is None:
            raise ValueError(f"vision() needs a case with {'videos' if videos else 'images'}")
        visual = self.model.model.visual
        with self._threads(), torch.inference_mode():
            out = visual(pixels.to(visual.dtype), grid_thw=grids)
        deep = getattr(out, "deepstack_features", None)
        return out.last_hidden_state, out.pooler_output, torch.stack(list(deep)) if deep else None

    def rope_index(self, inputs: PreparedInputs) -> tuple["torch.Tensor", int]:
        """M-RoPE positions of the prefill: (position_ids int64 [3, T], rope_delta)."""
        import torch

        with torch.inference_mode():
            extra = {} if inputs.second_per_grid_ts is None else {"second_per_grid_ts": inputs.second_per_grid_ts}
            position_ids, deltas = self.model.model.get_rope_index(
                inputs.input_ids, mm_token_type_ids=inputs.mm_token_type_ids,
                image_grid_thw=inputs.image_grid_thw, video_grid_thw=inputs.video_grid_thw,
                attention_mask=inputs.attention_mask, **extra)
        return position_ids[:, 0, :], int(deltas.reshape(-1)[0])  # [3, 1, T] -> [3, T]

    def prefill_logits(self, inputs: PreparedInputs, with_mm_token_type_ids: bool = True) -> "torch.Tensor":
        """One forward over the whole prompt: logits [T, V] at every position (model dtype)."""
        import torch

        self.model.model.rope_deltas = None  # no stale M-RoPE state from an earlier case
        with self._threads(), torch.inference_mode():
            out = self.model(**inputs.model_kwargs(with_mm_token_type_ids), use_cache=False)
        return out.logits[0]  # [1, T, V] -> [T, V]

    def generate(self, inputs: PreparedInputs, max_new_tokens: int,
                 with_mm_token_type_ids: bool = True) -> tuple["torch.Tensor", "torch.Tensor"]:
        """Greedy ``generate``: (new token ids int64 [N], raw logits [N, V] that chose them)."""
        import torch

        self.model.model.rope_deltas = None
        with self._threads(), torch.inference_mode():
            out = self.model.generate(
                **inputs.model_kwargs(with_mm_token_type_ids), do_sample=False, max_new_tokens=max_new_tokens,
                output_logits=True, return_dict_in_generate=True)
        new_ids = out.sequences[0, inputs.input_ids.shape[1]:]  # [N]
        step_logits = torch.stack([step[0] for step in out.logits])  # N x [1, V] -> [N, V]
        return new_ids, step_logits

    def reader(self, max_new_tokens: int):
        """``read(image, prompt) -> (answer text, stopped on an end token)`` over greedy ``generate``
        (the ``Reader`` that ``demo.accuracy.exact_match`` scores)."""
        def read(image, prompt: str) -> tuple[str, bool]:
            ids, _ = self.generate(self.prepare(ReferenceCase("heldout", [image], prompt)), max_new_tokens)
            return self.tokenizer.decode(ids, skip_special_tokens=True), int(ids[-1]) in self.eos_token_ids
        return read

    def run(self, case: ReferenceCase) -> ReferenceResult:
        """All reference stages for one case."""
        inputs = self.prepare(case)
        vision_hidden = merger_out = deepstack_out = None
        if inputs.has_images:
            vision_hidden, merger_out, deepstack_out = self.vision(inputs)  # [S, C], [S/4, D], [L, S/4, D]
            n_image_tokens = int((inputs.mm_token_type_ids == MM_IMAGE).sum())
            if merger_out.shape[0] != n_image_tokens:
                raise QvlError(f"case {case.name!r}: merger gave {merger_out.shape[0]} rows for "
                               f"{n_image_tokens} image tokens.")
        video_merger_out = video_deepstack_out = None
        if inputs.has_videos:
            _, video_merger_out, video_deepstack_out = self.vision(inputs, videos=True)  # [S_v/4, D] natural order
        position_ids, rope_delta = self.rope_index(inputs)  # [3, T]
        logits = self.prefill_logits(inputs)  # [T, V]
        new_ids, step_logits = self.generate(inputs, case.max_new_tokens)  # [N], [N, V]

        step0_diff = float((step_logits[0].float() - logits[-1].float()).abs().max())
        scale = max(1.0, float(logits[-1].float().abs().max()))
        tol = (1e-3 if self.dtype in ("float32", "float64") else 5e-2) * scale
        log.info("reference %s: T=%d images=%d new=%d rope_delta=%d |step0-prefill|=%.3g",
                 case.name, inputs.input_ids.shape[1], len(case.images), new_ids.shape[0], rope_delta, step0_diff)
        if step0_diff > tol:
            raise QvlError(f"case {case.name!r}: generate's first-step logits differ from the prefill forward by "
                           f"{step0_diff:.3g} (> {tol:.3g}); the transformers reference is inconsistent "
                           "(M-RoPE positions?).")
        if not bool((step_logits.argmax(-1) == new_ids).all()):
            raise QvlError(f"case {case.name!r}: generate chose tokens that are not the argmax of its raw logits; "
                           "a logits processor is active in the reference.")

        return ReferenceResult(
            input_ids=_to_numpy(inputs.input_ids[0], np.int64),
            pixel_values=None if inputs.pixel_values is None else _to_numpy(inputs.pixel_values, np.float32),
            image_grid_thw=None if inputs.image_grid_thw is None else _to_numpy(inputs.image_grid_thw, np.int64),
            vision_hidden=None if vision_hidden is None else _to_numpy(vision_hidden, np.float32),
            merger_out=None if merger_out is None else _to_numpy(merger_out, np.float32),
            prefill_logits=_to_numpy(logits, np.float32),
            generated_ids=_to_numpy(new_ids, np.int64),
            step_logits=_to_numpy(step_logits, np.float32),
            position_ids=_to_numpy(position_ids, np.int64),
            rope_delta=rope_delta,
            step0_prefill_max_abs=step0_diff,
            pixel_values_videos=None if inputs.pixel_values_videos is None
            else _to_numpy(inputs.pixel_values_videos, np.float32),
            video_grid_thw=None if inputs.video_grid_thw is None else _to_numpy(inputs.video_grid_thw, np.int64),
            second_per_grid_ts=None if inputs.second_per_grid_ts is None
            else _to_numpy(inputs.second_per_grid_ts, np.float32),
            video_merger_out=None if video_merger_out is None else _to_numpy(video_merger_out, np.float32),
            mm_token_type_ids=_to_numpy(inputs.mm_token_type_ids[0], np.int64),
            deepstack_out=None if deepstack_out is None else _to_numpy(deepstack_out, np.float32),
            video_deepstack_out=None if video_deepstack_out is None else _to_numpy(video_deepstack_out, np.float32),
        )
