"""Acceptance: the runtime installed alone in a fresh, plain venv (no torch, no onnx-ir) runs
``qvl-export engine``: its help, and on a real bundle the checks that need no GPU - every file
against its checksum, then one line saying TensorRT / a GPU is missing (exit 2, no traceback).

The venv is plain (no --system-site-packages); the runtime's dependencies come from pip's configured
index; qvl-export itself is installed with --no-deps. A meta-path finder also refuses torch,
transformers, onnx, onnx_ir, onnxscript and safetensors, so a stray import fails loudly.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
RUNTIME_DEPS = ["numpy", "onnxruntime", "tokenizers", "pillow", "click", "jinja2"]
BLOCKED = ("torch", "transformers", "onnx", "onnx_ir", "onnxscript", "safetensors")
WRAPPER = textwrap.dedent(f"""
    import importlib.abc, sys
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {BLOCKED!r}:
                raise ImportError("blocked in the runtime-only install: " + name)
    sys.meta_path.insert(0, Block())
    from qvl_export.cli import main
    sys.argv = ["qvl-export", *sys.argv[1:]]
    main()
""")


@pytest.fixture(scope="module")
def runtime_venv(tmp_path_factory):
    """A fresh venv holding the runtime only; its python."""
    venv = tmp_path_factory.mktemp("runtime-venv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=120)
    python = venv / "bin" / "python"
    deps = subprocess.run([str(python), "-m", "pip", "install", "-q", *RUNTIME_DEPS], check=False,
                          capture_output=True, text=True, timeout=600)
    if deps.returncode != 0:
        pytest.skip(f"pip cannot install the runtime's dependencies into a fresh venv here: {deps.stderr[-600:]}")
    own = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "-e", str(REPO)], check=False,
                         capture_output=True, text=True, timeout=600)
    assert own.returncode == 0, own.stderr[-2000:]
    find = "import importlib.util as u; print([m for m in ('torch', 'onnx_ir', 'onnx', 'tensorrt') if u.find_spec(m)])"
    probe = subprocess.run([str(python), "-c", find], check=False, capture_output=True, text=True, timeout=60)
    assert probe.stdout.strip() == "[]", probe.stdout  # nothing heavy leaks in from the build environment
    return python


def qvl(python: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(python), "-c", WRAPPER, *args], check=False, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, checkpoint):
    """A real bundle of the tiny Qwen2-VL checkpoint, built here (build environment) for a Jetson Orin."""
    from qvl_export.cli import main

    out = tmp_path_factory.mktemp("bundle") / "q2-orin"
    r = CliRunner().invoke(main, ["build", str(checkpoint("qwen2_vl")), "-o", str(out), "--target", "trt", "--bundle",
                                  "--device", "jetson-orin", "--no-parity", "--engine-opt-pixels", "200704",
                                  "--engine-max-pixels", "409600", "--max-seq", "1024"])
    assert r.exit_code == 0, r.output
    return out


def test_engine_help_in_a_runtime_only_venv(runtime_venv):
    r = qvl(runtime_venv, "engine", "--help")
    assert r.returncode == 0, r.stderr
    assert "BUNDLE" in r.stdout and "sha256" in r.stdout


def test_engine_checks_the_bundle_then_needs_tensorrt(runtime_venv, bundle, tmp_path):
    readme = (bundle / "BUILD_ON_DEVICE.md").read_text()
    assert f"qvl-export engine {bundle.name}\n" in readme and ".tmp" not in readme
    assert "pip install qvl-export " in readme and "pip install cuda-python" in readme

    r = qvl(runtime_venv, "engine", str(bundle))
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    assert "tensorrt" in lines[0] and "cuda-python" in lines[0]
    assert not list(bundle.glob("*.engine")) and not list(bundle.glob(".*pending"))  # nothing half-written

    damaged = tmp_path / bundle.name
    shutil.copytree(bundle, damaged)
    with open(damaged / "decoder.onnx", "ab") as f:
        f.write(b"\0")
    r = qvl(runtime_venv, "engine", str(damaged))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "decoder.onnx does not match the manifest" in r.stderr  # refused by checksum, before TensorRT
