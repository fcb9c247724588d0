"""What a build is asked to do (frozen settings) and whom it tells (a reporter), kept apart.

``Settings`` groups the choices: the target and precisions, the graph layout and passes, the
checkpoint overrides, then ``CalibrationSettings`` (int8 / fp8 builds) and ``TrtSettings`` (trt
target). ``Reporter`` carries the two callbacks, ``say`` (progress) and ``warn``. ``BuildOptions``
is the flat keyword form that ``building.artifacts.build`` takes (tests, benchmarks): it makes one
of each. The CLI builds them through ``settings_from_cli``. The small policies the CLI used to hold
(the demo checkpoint when no model is given, when the parity gate cannot run here) live here too.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from qvl_export.core import precisions

log = logging.getLogger("qvl_export.building")


@dataclass(frozen=True)
class CalibrationSettings:
    """int8 / fp8 builds (and AWQ int4): where the calibration documents come from and how ranges are measured."""

    docs: Path | None = None  # folder of PNG/JPEG/WebP/PDF (None: the built-in documents)
    limit: int | None = None  # at most this many documents
    cache: Path | None = None  # reuse / store the calibration feeds here
    calibrator: str = "percentile"  # int8 activation calibrator (fp8 is always max-calibrated)
    sensitivity: bool = False  # print every quantized op's local error
    activations: str = "auto"  # int8 activation scales: auto / static / dynamic (calibration.qdq.activation_mode)
    int4_method: str = "rtn"  # int4 weights: "rtn" (round to nearest) or "awq" (activation-aware, calibrated)
    int4_block: int | None = None  # int4 values per scale (None: the target's, building.weight_only.block_size_for)
    # static int8 ranges searched per tensor between the calibrator's and the max (calibration.qdq.search_ranges)
    range_search: bool = True


@dataclass(frozen=True)
class TrtSettings:
    """trt target: the device the engines are for, and the shape ranges they cover."""

    device: str = "x86-gpu"  # building.devices.DEVICES
    bundle: bool = False  # write a bundle to build the engines on the device
    ranges: "Ranges | None" = None  # None: building.devices.Ranges()  # noqa: F821


@dataclass(frozen=True)
class Settings:
    target: str = "ort"
    precision: str = "fp32"  # ``int8`` or per part ``vision=fp16,decoder=int8`` (core.precisions.parse)
    window_attention: str = "fused"  # Qwen2.5-VL window blocks: "fused" (per window) or "dense" (S x S mask)
    passes: tuple[str, ...] | None = None  # only these passes (None: the target's full lists)
    skip_passes: tuple[str, ...] = ()
    force: bool = False  # replace an existing artifacts folder
    chat_template: Path | None = None  # a Jinja file replacing the checkpoint's chat template
    assume_default_preprocessing: bool = False  # a checkpoint without preprocessor_config.json
    calibration: CalibrationSettings = CalibrationSettings()
    tensorrt: TrtSettings = TrtSettings()

    @property
    def precisions(self) -> dict[str, str]:
        """part -> precision name (raises on an unknown part or precision)."""
        return precisions.parse(self.precision)


def _log_say(msg: str) -> None:
    log.info("%s", msg)


def _log_warn(msg: str) -> None:
    log.warning("%s", msg)


@dataclass(frozen=True)
class Reporter:
    """Where a build's progress lines and warnings go (default: the ``qvl_export.building`` logger)."""

    say: Callable[[str], None] = _log_say
    warn: Callable[[str], None] = _log_warn


@dataclass(frozen=True)
class BuildOptions:
    """Flat keyword form of ``Settings`` + ``Reporter`` for ``build(model_dir, out_dir, options)``."""

    target: str = "ort"
    precision: str = "fp32"
    window_attention: str = "fused"
    passes: list[str] | None = None
    skip_passes: list[str] | tuple[str, ...] = ()
    device: str = "x86-gpu"
    bundle: bool = False
    ranges: "Ranges | None" = None  # noqa: F821
    calib_docs: Path | None = None
    calib_limit: int | None = None
    calib_cache: Path | None = None
    calibrator: str = "percentile"
    sensitivity: bool = False
    activations: str = "auto"
    int4_method: str = "rtn"
    int4_block: int | None = None
    range_search: bool = True
    force: bool = False
    chat_template: Path | None = None
    assume_default_preprocessing: bool = False
    progress: Callable[[str], None] | None = field(default=None, compare=False)
    warn: Callable[[str], None] | None = field(default=None, compare=False)

    def settings(self) -> Settings:
        return Settings(
            target=self.target, precision=self.precision, window_attention=self.window_attention,
            passes=None if self.passes is None else tuple(self.passes), skip_passes=tuple(self.skip_passes),
            force=self.force, chat_template=self.chat_template,
            assume_default_preprocessing=self.assume_default_preprocessing,
            calibration=CalibrationSettings(self.calib_docs, self.calib_limit, self.calib_cache, self.calibrator,
                                            self.sensitivity, self.activations, self.int4_method,
                                            self.int4_block, self.range_search),
            tensorrt=TrtSettings(self.device, self.bundle, self.ranges))

    def reporter(self) -> Reporter:
        return Reporter(self.progress or _log_say, self.warn or _log_warn)


def settings_from_cli(params: dict) -> Settings:
    """``qvl-export build``'s options (click's parameter dict) -> ``Settings``: one place maps them."""
    from qvl_export.core.devices import Ranges

    only = params.get("only_passes")
    return Settings(
        target=params["target"], precision=params["precision"], window_attention=params["window_attention"],
        passes=None if only is None else tuple(p for p in only.split(",") if p.strip() and p != "none"),
        skip_passes=tuple(params.get("skip_passes") or ()), force=params["force"],
        chat_template=params.get("chat_template"),
        assume_default_preprocessing=params["assume_default_preprocessing"],
        calibration=CalibrationSettings(params.get("calib_docs"), params.get("calib_limit"),
                                        params.get("calib_cache"), params["calibrator"], params["sensitivity"],
                                        params.get("activations") or "auto", params.get("int4_method") or "rtn",
                                        params.get("int4_block"), params.get("range_search", True)),
        tensorrt=TrtSettings(params["device"], params["bundle"],
                             Ranges(min_pixels=params["engine_min_pixels"], opt_pixels=params["engine_opt_pixels"],
                                    max_pixels=params["engine_max_pixels"], max_images=params["max_images"],
                                    max_seq=params["max_seq"], max_batch=params["max_batch"])))


def resolve_model(model_dir: Path | None, output: Path | None,
                  say: Callable[[str], None]) -> tuple[Path, Path]:
    """The checkpoint and artifacts folder of ``qvl-export build``: with no MODEL_DIR, the built-in
    demo model into ``build/demo``; else ``build/<model name>`` unless ``-o`` names one."""
    if model_dir is None:
        from qvl_export.demo import checkpoint_dir

        say("no MODEL_DIR given: building the built-in demo model (a 1.5M-parameter Qwen2.5-VL trained to read "
            "invoice totals)")
        return Path(checkpoint_dir()), Path(output or Path("build") / "demo")
    return Path(model_dir), Path(output or Path("build") / Path(model_dir).name)


def parity_skip_reason(settings: Settings) -> str | None:
    """Why the parity gate cannot run on this machine after the build (None: it can)."""
    chosen = settings.precisions
    if precisions.runs_on_cpu(chosen):
        return None
    names = sorted({p for p in chosen.values() if not precisions.get(p).cpu_kernels})
    return (f"parity skipped: {', '.join(names)} runs on TensorRT only; run 'qvl-export parity' where the "
            "engines run")
