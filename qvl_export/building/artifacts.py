"""``build(model_dir, out_dir, options)``: checkpoint -> artifacts folder, the Python entry point.

The build itself is ``building.plan.STAGES``; ``BuildOptions`` (``building.settings``) is its flat
keyword form, split here into frozen ``Settings`` and a ``Reporter``.
"""

from __future__ import annotations

from pathlib import Path

from qvl_export.building.plan import run_build
from qvl_export.building.settings import BuildOptions
from qvl_export.core.manifest import Manifest

__all__ = ["BuildOptions", "build"]


def build(model_dir: str | Path, out_dir: str | Path, options: BuildOptions | None = None) -> Manifest:
    """Trace every part, run the passes, quantize, write the artifacts folder atomically."""
    options = options or BuildOptions()
    return run_build(model_dir, out_dir, options.settings(), options.reporter())
