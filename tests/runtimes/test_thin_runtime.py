"""The thin runtime: no torch/transformers, streaming and sampling."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from qvl_export.runtimes.pipeline import Pipeline
BLOCKED = ("torch", "transformers", "onnx", "onnxscript", "onnx_ir", "safetensors")


def test_generation_runs_with_heavy_libraries_blocked(artifacts, tmp_path):
    img = tmp_path / "page.png"
    Image.new("RGB", (320, 240), (30, 120, 200)).save(img)
    code = textwrap.dedent(f"""
        import importlib.abc, json, sys
        BLOCKED = {BLOCKED!r}
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError("blocked in the thin runtime: " + name)
        sys.meta_path.insert(0, Block())
        from qvl_export.cli import main
        sys.argv = ["qvl-export", "run", {str(artifacts("qwen2_5_vl"))!r}, "--image", {str(img)!r},
                    "--prompt", "What is the total?", "--max-new-tokens", "6", "--json"]
        try:
            main()
        except SystemExit as e:
            assert e.code in (0, None), e.code
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        print(json.dumps({{"loaded": loaded}}))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    result, modules = json.loads(lines[0]), json.loads(lines[-1])
    assert 1 <= len(result["token_ids"]) <= 6
    assert modules["loaded"] == []


def test_stream_equals_generate_and_sampling_is_seeded(artifacts):
    pipe = Pipeline.load(artifacts("qwen2_vl"))
    img = Image.new("RGB", (200, 300), (10, 200, 30))
    greedy = pipe.generate([img], "Describe", max_new_tokens=12)
    streamed = "".join(pipe.stream([img], "Describe", max_new_tokens=12))
    assert streamed == greedy.text
    a = pipe.generate([img], "Describe", max_new_tokens=12, temperature=1.5, top_p=0.9, seed=7)
    b = pipe.generate([img], "Describe", max_new_tokens=12, temperature=1.5, top_p=0.9, seed=7)
    c = pipe.generate([img], "Describe", max_new_tokens=12, temperature=1.5, top_p=0.9, seed=8)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids or a.token_ids != greedy.token_ids


