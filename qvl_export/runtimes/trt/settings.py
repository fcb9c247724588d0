"""What a TensorRT builder is given, decided without TensorRT (a unit test checks it on CPU).

``engine_settings`` is a pure function; ``loaders.EngineBytesFromNetwork`` only applies its result,
as Polygraphy's ``CreateConfig`` records settings before any builder exists.

- Strongly typed networks: precision comes from the graph (fp16/bf16 casts, Q/DQ nodes), never from
  builder flags. TensorRT 10 needs ``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` for that;
  TensorRT 11 builds strongly typed only, so the flag is not set there.
- TF32 is cleared unless asked for: TensorRT enables it by default on Ampere and newer, where fp32
  MatMuls then run with 10-bit mantissas. An fp32 engine would fail the fp32 parity gate (cosine
  0.99999, 64 identical tokens), and the fp32 islands of fp16 / int8 / fp8 graphs (norm statistics,
  rotary tables, softmax, the int8 decoder's fp32 token table) are fp32 for accuracy.
- Workspace: 4 GB by default, at most a quarter of what a Jetson leaves to the engines (its memory
  is shared with the CPU, and the build already needs 3-4x the weights, Edge-LLM#30).
- Profiles: one per ``core.devices.Profile`` (prefill and decode for the decoder).
"""

from __future__ import annotations

from dataclasses import dataclass

from qvl_export.core import precisions as registry
from qvl_export.core.devices import Profile
from qvl_export.core.errors import QvlError

DEFAULT_WORKSPACE_GB = 4.0
SHARED_MEMORY_WORKSPACE_SHARE = 0.25  # of a Jetson's usable memory


@dataclass(frozen=True)
class EngineSettings:
    strongly_typed_flag: bool  # set NetworkDefinitionCreationFlag.STRONGLY_TYPED (TensorRT 10; always on in 11)
    tf32: bool  # leave BuilderFlag.TF32 set (False: cleared)
    workspace_bytes: int  # MemoryPoolType.WORKSPACE limit
    profiles: tuple[Profile, ...]
    precision: str  # the part's precision (registry name): recorded, never turned into a flag

    def describe(self) -> str:
        typed = "strongly typed" + (" (flag)" if self.strongly_typed_flag else "")
        return (f"{self.precision}, {typed}, TF32 {'on' if self.tf32 else 'off'}, workspace "
                f"{self.workspace_bytes / (1 << 30):.2f} GiB, profiles {', '.join(p.name for p in self.profiles)}")


def trt_major(version: str) -> int:
    """Major version of a TensorRT version string ("10.3.0.30" -> 10)."""
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        raise QvlError(f"Cannot read the TensorRT version {version!r}; install TensorRT 10 or newer.") from None


def engine_settings(precision: str, profiles: list[Profile], trt_major: int, workspace_gb: float = DEFAULT_WORKSPACE_GB,
                    allow_tf32: bool = False, usable_memory_gb: float | None = None) -> EngineSettings:
    """The builder settings of one engine.

    ``usable_memory_gb``: memory the device leaves to the engines when the GPU shares it with the CPU
    (Jetson); the workspace is capped at a quarter of it. ``allow_tf32`` is for speed experiments
    only: no parity gate passes with it on fp32 parts."""
    registry.get(precision)  # an unknown precision fails here, in one line
    if trt_major < 10:
        raise QvlError(f"TensorRT {trt_major} is too old: strongly typed networks and the name-based tensor API need "
                       "TensorRT 10 or newer (JetPack 6.1+ on Jetson).")
    if workspace_gb <= 0:
        raise QvlError("The TensorRT workspace must be larger than 0 GB.")
    if not profiles:
        raise QvlError("A TensorRT engine needs at least one optimization profile.")
    for prof in profiles:
        for name, (lo, opt, hi) in prof.shapes.items():
            if not (len(lo) == len(opt) == len(hi) and all(a <= b <= c for a, b, c in zip(lo, opt, hi))):
                raise QvlError(f"The {prof.name} profile's shapes for {name} must satisfy min <= opt <= max "
                               f"per axis: {lo}, {opt}, {hi}.")
    if usable_memory_gb is not None:
        if usable_memory_gb <= 0:
            raise QvlError("The device leaves no memory to the engines; check the device's reserved memory.")
        workspace_gb = min(workspace_gb, SHARED_MEMORY_WORKSPACE_SHARE * usable_memory_gb)
    return EngineSettings(strongly_typed_flag=trt_major < 11, tf32=bool(allow_tf32),
                          workspace_bytes=int(workspace_gb * (1 << 30)), profiles=tuple(profiles),
                          precision=precision)
