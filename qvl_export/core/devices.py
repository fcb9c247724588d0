"""Target devices, their precision rules, TensorRT optimization profiles and a memory estimate.

Pure Python (no TensorRT needed): every rule here is unit-tested on CPU. It lives in ``core`` because
both sides need it: the build machine checks a bundle against its device, and ``qvl-export engine``
on the device (a runtime-only install) makes the optimization profiles from the recorded ranges.

- What a precision needs comes from the precision registry (``core.precisions``): its targets and
  its minimum compute capability. FP8 needs SM 8.9+ (Ada / Hopper / Blackwell): Jetson Orin is
  Ampere SM 8.7 (no fp8; the error suggests int8), Jetson Thor is Blackwell SM 11.0.
- Jetson memory is shared by the CPU and the GPU: the estimate is checked against what is left
  after the OS and the runtime (``reserved_gb``).
- Engines are not portable across TensorRT versions or GPUs: the bundle is built on the device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from qvl_export.core import precisions as registry
from qvl_export.core.errors import QvlError
from qvl_export.core.spec import ModelSpec

TARGET = "trt"  # the devices here run TensorRT engines


@dataclass(frozen=True)
class Device:
    name: str
    description: str
    sm: tuple[int, int] | None  # None: any GPU (checked against the GPU present at build time)
    memory_gb: float | None  # None: unknown until the build machine is seen
    reserved_gb: float = 0.0
    jetson: bool = False

    @property
    def usable_gb(self) -> float | None:
        """Memory left to the engines (Jetson: shared by CPU and GPU, after the OS and the runtime)."""
        return None if self.memory_gb is None else self.memory_gb - self.reserved_gb


DEVICES = {
    "x86-gpu": Device("x86-gpu", "discrete NVIDIA GPU (fp8 needs SM 8.9+)", None, None),
    "jetson-orin": Device("jetson-orin", "Jetson AGX Orin 64 GB (Ampere SM 8.7)", (8, 7), 64.0, 3.0, jetson=True),
    "jetson-orin-nx": Device("jetson-orin-nx", "Jetson Orin NX 16 GB (SM 8.7)", (8, 7), 16.0, 2.5, jetson=True),
    "jetson-orin-nano": Device("jetson-orin-nano", "Jetson Orin Nano 8 GB (SM 8.7)", (8, 7), 8.0, 2.0, jetson=True),
    "jetson-thor": Device("jetson-thor", "Jetson AGX Thor 128 GB (Blackwell SM 11.0)", (11, 0), 128.0, 4.0, jetson=True),
}


def get_device(name: str) -> Device:
    if name not in DEVICES:
        raise QvlError(f"Unknown device {name!r}; choose one of {', '.join(DEVICES)}.")
    return DEVICES[name]


def check_precision(device: Device, precisions: dict[str, str], sm: tuple[int, int] | None = None) -> None:
    """Refuse a per-part precision the device cannot run, with the alternative to use.

    ``sm``: the GPU present (on-device engine builds); otherwise the device's own. The rules are the
    registry's: the precision must take the trt target, and the GPU must reach its ``min_sm``."""
    sm = sm or device.sm
    for part, name in precisions.items():
        p = registry.get(name)
        if TARGET not in p.targets:
            raise QvlError(p.hint or f"{name} is not available for TensorRT engines ({part}).")
        if p.min_sm is not None and sm is not None and sm < p.min_sm:
            others = [q.name for q in registry.REGISTRY.values()
                      if q.calibrated and TARGET in q.targets and (q.min_sm is None or sm >= q.min_sm)]
            instead = f"--precision {part}={others[0]}" if others else "another precision"
            raise QvlError(f"{name} needs an SM {p.min_sm[0]}.{p.min_sm[1]}+ GPU (FP8: Ada, Hopper, Blackwell, Jetson "
                           f"Thor); {device.name} (SM {sm[0]}.{sm[1]}) has none: build {part} with {instead} (or "
                           "fp16) instead.")


def available_precisions(device: Device, sm: tuple[int, int] | None = None) -> tuple[str, ...]:
    """The registry's precisions that ``device`` (or a GPU of compute capability ``sm``) can run."""
    sm = sm or device.sm
    return tuple(p.name for p in registry.REGISTRY.values()
                 if TARGET in p.targets and (p.min_sm is None or sm is None or sm >= p.min_sm))


@dataclass(frozen=True)
class Ranges:
    """Declared runtime ranges the engines are built for."""

    min_pixels: int = 56 * 56
    opt_pixels: int = 896 * 896
    max_pixels: int = 1344 * 1344
    max_images: int = 1
    max_seq: int = 4096  # prompt + generated tokens
    opt_seq: int = 1024
    max_batch: int = 1

    def validate(self, spec: ModelSpec) -> None:
        if not self.min_pixels <= self.opt_pixels <= self.max_pixels:
            raise QvlError("Pixel ranges must satisfy min <= opt <= max.")
        if self.max_images < 1 or self.max_batch < 1:
            raise QvlError("--max-images and --max-batch must be at least 1.")
        if not 1 <= self.opt_seq <= self.max_seq:
            raise QvlError("Sequence ranges must satisfy 1 <= opt <= max.")
        if self.max_seq > spec.text.max_position_embeddings:
            raise QvlError(f"--max-seq {self.max_seq} exceeds the model's context "
                           f"{spec.text.max_position_embeddings}.")
        tokens = self.max_images * vision_tokens(spec, self.max_pixels) // spec.vision.merge_unit
        if tokens >= self.max_seq:
            raise QvlError(f"{self.max_images} image(s) of {self.max_pixels} pixels take {tokens} tokens, more "
                           f"than --max-seq {self.max_seq}: raise --max-seq or lower --max-pixels.")


def vision_tokens(spec: ModelSpec, pixels: int) -> int:
    """Patch tokens of a square-ish page of ``pixels`` (grid rounded to merge units)."""
    unit = spec.vision.patch_size * spec.vision.spatial_merge_size
    side = max(1, round(math.sqrt(pixels) / unit))
    return (side * spec.vision.spatial_merge_size) ** 2


def padded_vision_tokens(spec: ModelSpec, pixels: int, images: int = 1, worst: bool = False) -> int:
    """Slots the vision graph sees: windows padded to L (Qwen2.5-VL); worst case for max profiles."""
    tokens = vision_tokens(spec, pixels)
    if not spec.vision.windowed:
        return images * tokens
    v = spec.vision
    units_side = int(math.sqrt(tokens // v.merge_unit))
    if worst:  # any aspect ratio: at most one partial window per row and per column more
        windows = (math.ceil(units_side / v.window_units) + 1) ** 2
    else:
        windows = math.ceil(units_side / v.window_units) ** 2
    return images * windows * v.window_tokens


@dataclass
class Profile:
    """min/opt/max shape per dynamic input of one optimization profile."""

    name: str
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)


def profiles(spec: ModelSpec, part: str, r: Ranges) -> list[Profile]:
    """TensorRT optimization profiles of ``part`` for the declared ranges.

    The decoder gets two: prefill (T tokens, empty cache) and decode (1 token, growing cache), so
    each is tuned for its own shapes.
    """
    v, t = spec.vision, spec.text
    if part in ("vision", "merger"):
        group = v.window_tokens if v.windowed else v.merge_unit
        lo = _round_up(padded_vision_tokens(spec, r.min_pixels), group)
        opt = _round_up(padded_vision_tokens(spec, r.opt_pixels), group)
        hi = _round_up(padded_vision_tokens(spec, r.max_pixels, r.max_images, worst=True), group)
        opt = min(max(opt, lo), hi)
        if part == "vision":
            shapes = {"patches": ((lo, v.patch_dim), (opt, v.patch_dim), (hi, v.patch_dim)),
                      "rope_cos": ((lo, v.head_dim), (opt, v.head_dim), (hi, v.head_dim)),
                      "rope_sin": ((lo, v.head_dim), (opt, v.head_dim), (hi, v.head_dim)),
                      "image_ids": ((lo,), (opt,), (hi,))}
            if v.position_side:  # Qwen3-VL: the position table's 4 taps per patch
                shapes["pos_indices"] = shapes["pos_weights"] = ((lo, 4), (opt, 4), (hi, 4))
        else:
            shapes = {"vision_hidden": ((lo, v.hidden_size), (opt, v.hidden_size), (hi, v.hidden_size))}
            if v.deepstack:  # Qwen3-VL: the DeepStack blocks' outputs
                shapes["deepstack_hidden"] = tuple((v.deepstack, n, v.hidden_size) for n in (lo, opt, hi))
        return [Profile(part, shapes)]
    if part != "decoder":
        raise ValueError(part)
    b = r.max_batch
    kv = (t.num_key_value_heads, t.head_dim)
    img_max = r.max_images * vision_tokens(spec, r.max_pixels) // v.merge_unit
    img_opt = min(img_max, vision_tokens(spec, r.opt_pixels) // v.merge_unit)
    prefill = Profile("prefill", {
        "input_ids": ((1, 1), (1, r.opt_seq), (b, r.max_seq)),
        "image_embeds": ((0, t.hidden_size), (img_opt, t.hidden_size), (img_max, t.hidden_size)),
        "position_ids": ((3, 1, 1), (3, 1, r.opt_seq), (3, b, r.max_seq)),
    })
    decode = Profile("decode", {
        "input_ids": ((1, 1), (1, 1), (b, 1)),
        "image_embeds": ((0, t.hidden_size), (0, t.hidden_size), (0, t.hidden_size)),
        "position_ids": ((3, 1, 1), (3, 1, 1), (3, b, 1)),
    })
    if v.deepstack:  # Qwen3-VL: deepstack_embeds [L, N, D], N as image_embeds
        prefill.shapes["deepstack_embeds"] = tuple((v.deepstack, *s) for s in prefill.shapes["image_embeds"])
        decode.shapes["deepstack_embeds"] = tuple((v.deepstack, *s) for s in decode.shapes["image_embeds"])
    for i in range(t.num_hidden_layers):
        for kind in ("key", "value"):
            name = f"past_key_values.{i}.{kind}"
            prefill.shapes[name] = ((1, *kv[:1], 0, kv[1]), (1, kv[0], 0, kv[1]), (b, kv[0], 0, kv[1]))
            decode.shapes[name] = ((1, kv[0], 1, kv[1]), (1, kv[0], r.opt_seq, kv[1]),
                                   (b, kv[0], r.max_seq - 1, kv[1]))
    return [prefill, decode]


def _round_up(x: int, m: int) -> int:
    return max(m, (x + m - 1) // m * m)


@dataclass
class MemoryEstimate:
    weights_gb: float
    activations_gb: float
    kv_cache_gb: float
    build_peak_gb: float  # host RAM the engine build needs (weights x3-4, Edge-LLM#30)

    @property
    def runtime_gb(self) -> float:
        return self.weights_gb + self.activations_gb + self.kv_cache_gb

    def to_dict(self) -> dict:
        return {"weights_gb": round(self.weights_gb, 3), "activations_gb": round(self.activations_gb, 3),
                "kv_cache_gb": round(self.kv_cache_gb, 3), "runtime_gb": round(self.runtime_gb, 3),
                "build_peak_gb": round(self.build_peak_gb, 3)}


def parameter_counts(spec: ModelSpec) -> dict[str, int]:
    v, t = spec.vision, spec.text
    if v.family == "qwen2_5_vl":
        mlp = 3 * v.hidden_size * v.intermediate_size + 2 * v.intermediate_size + v.hidden_size
        norms = 2 * v.hidden_size
    else:
        mlp = 2 * v.hidden_size * v.intermediate_size + v.intermediate_size + v.hidden_size
        norms = 4 * v.hidden_size
    block = 4 * v.hidden_size * v.hidden_size + 4 * v.hidden_size + mlp + norms
    vision = v.patch_dim * v.hidden_size + v.depth * block
    unit = v.hidden_size * v.merge_unit
    merger = unit * unit + unit + unit * v.out_hidden_size + v.out_hidden_size + norms // 2
    if v.family == "qwen3_vl":  # patch bias, position table; DeepStack mergers (LayerNorm over 4C)
        vision += v.hidden_size + v.num_position_embeddings * v.hidden_size
        merger += v.deepstack * (unit * unit + unit + unit * v.out_hidden_size + v.out_hidden_size + 2 * unit)
    q, kv = t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
    biases = (q + 2 * kv if t.qkv_bias else 0) + (t.hidden_size if t.o_proj_bias else 0)
    layer = (t.hidden_size * (q + 2 * kv) + biases + q * t.hidden_size
             + 3 * t.hidden_size * t.intermediate_size + 2 * t.hidden_size + (2 * t.head_dim if t.qk_norm else 0))
    embed = t.vocab_size * t.hidden_size
    decoder = embed + t.num_hidden_layers * layer + t.hidden_size + (0 if t.tie_word_embeddings else embed)
    return {"vision": vision, "merger": merger, "decoder": decoder}


def part_weight_bytes(spec: ModelSpec, part: str, precision: str, target: str = TARGET) -> float:
    """Bytes of one part's weights in an engine (scales not counted).

    The decoder's token table is a Gather, not a weighted op: on TensorRT it stays in the traced dtype
    (fp32 for int8 / fp8 decoders), so it is counted at ``token_table_bytes(target)``; with tied
    embeddings a quantized LM head keeps its own quantized copy of the table beside it."""
    p = registry.get(precision)
    count = parameter_counts(spec)[part]
    if part != "decoder":
        return count * p.weight_bytes
    t = spec.text
    table = t.vocab_size * t.hidden_size
    table_b = p.token_table_bytes(target)
    lm_head_copy = table * p.weight_bytes if t.tie_word_embeddings and table_b != p.weight_bytes else 0.0
    return (count - table) * p.weight_bytes + table * table_b + lm_head_copy


def estimate_memory(spec: ModelSpec, precisions: dict[str, str], r: Ranges, target: str = TARGET) -> MemoryEstimate:
    """Engine weights + peak activations + KV cache at the declared ranges (GB, 1e9 bytes); bytes per
    weight, activation and token-table entry come from the precision registry."""
    weights = sum(part_weight_bytes(spec, part, precisions.get(part, "fp16"), target)
                  for part in parameter_counts(spec))
    v, t = spec.vision, spec.text
    s = padded_vision_tokens(spec, r.max_pixels, r.max_images, worst=True)
    act_b = registry.get(precisions.get("vision", "fp16")).act_bytes_on(target)
    # vision: a few [S, C] / [S, I] buffers live at once + full-attention scores [heads, S, S] (fp32 softmax)
    vision_act = (6 * s * v.hidden_size + 2 * s * v.intermediate_size) * act_b + v.num_heads * s * s * 4
    dec_b = registry.get(precisions.get("decoder", "fp16")).act_bytes_on(target)
    seq = r.max_batch * r.max_seq
    decoder_act = (6 * seq * t.hidden_size + 2 * seq * t.intermediate_size) * dec_b \
        + r.max_batch * t.num_attention_heads * r.max_seq * r.max_seq * 4 + r.max_batch * t.vocab_size * 4
    kv = 2 * t.num_hidden_layers * r.max_batch * t.num_key_value_heads * r.max_seq * t.head_dim * dec_b
    if target == TARGET:  # the concat decoder's cache lives in two device buffers (runtimes.trt.kv_cache)
        kv *= 2
    # parts run one after the other: the larger activation peak counts; KV is live with the decoder
    return MemoryEstimate(weights / 1e9, max(vision_act, decoder_act) / 1e9, kv / 1e9, 3.5 * weights / 1e9)


def check_memory(device: Device, est: MemoryEstimate, warn) -> None:
    """Error when the engines cannot fit the device; warn when the on-device build may not."""
    usable = device.usable_gb
    if usable is None:
        return
    if est.runtime_gb > usable:
        raise QvlError(f"Estimated {est.runtime_gb:.1f} GB (weights {est.weights_gb:.1f} + activations "
                       f"{est.activations_gb:.1f} + KV cache {est.kv_cache_gb:.1f}) exceeds the "
                       f"{usable:.1f} GB usable on {device.name}: lower --max-seq / --max-pixels / --max-batch "
                       "or use a lower precision (int8).")
    if device.jetson and est.build_peak_gb > usable:
        warn(f"building the engines on {device.name} may need ~{est.build_peak_gb:.1f} GB of RAM (more than "
             f"{usable:.1f} GB usable): add swap on the device or build the largest part with a smaller "
             "--max-seq.")
