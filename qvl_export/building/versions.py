"""Versions of the libraries a build (or a benchmark) ran with, for the manifest and reports."""

from __future__ import annotations

PACKAGES = ("qvl-export", "torch", "transformers", "onnx", "onnx-ir", "onnxscript", "onnxruntime", "numpy")


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in PACKAGES:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out
