"""``qvl-export serve``: the server process without torch or transformers, and bad options in one line."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from click.testing import CliRunner

from qvl_export.cli import main

BLOCKED = ("torch", "transformers", "onnx", "onnxscript", "onnx_ir", "safetensors")


def test_server_runs_with_heavy_libraries_blocked(serve_artifacts):
    """A LocalServer answers a request in a process where importing torch & co. fails."""
    code = textwrap.dedent(f"""
        import importlib.abc, json, sys, urllib.request
        BLOCKED = {BLOCKED!r}
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError("blocked in the server: " + name)
        sys.meta_path.insert(0, Block())
        import qvl_export.cli
        from qvl_export.serving.server import LocalServer
        with LocalServer({str(serve_artifacts)!r}, max_batch=2, context=256, threads=1, model_name="m") as s:
            body = json.dumps({{"model": "m", "messages": [{{"role": "user", "content": "hi"}}], "max_tokens": 5}})
            req = urllib.request.Request(s.url + "/v1/chat/completions", data=body.encode(),
                                         headers={{"Content-Type": "application/json"}})
            reply = json.loads(urllib.request.urlopen(req, timeout=60).read())
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        print(json.dumps({{"tokens": reply["usage"]["completion_tokens"], "loaded": loaded}}))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert 1 <= out["tokens"] <= 5 and out["loaded"] == []


def test_serve_refuses_bad_input_in_one_line(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["serve", str(tmp_path / "missing"), "--port", "0"])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    result = runner.invoke(main, ["serve", str(tmp_path), "--max-batch", "0"])
    assert result.exit_code == 2 and "--max-batch" in result.output
