"""A real server on 127.0.0.1 (ephemeral port, its own thread, stopped at the end of the module) over the tiny
Qwen2-VL checkpoint at init_std 0.2 (its greedy answers vary token by token; see tests/runtimes/test_batching.py)."""

from __future__ import annotations

import base64
import io
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

MODEL = "tiny-qwen2-vl"


@pytest.fixture(scope="session")
def serve_artifacts(tmp_path_factory, tiny_dims):
    from qvl_export.building.artifacts import BuildOptions, build
    from qvl_export.loading.synthetic import make_checkpoint

    root = tmp_path_factory.mktemp("serve")
    ckpt = make_checkpoint(root / "ckpt", replace(tiny_dims["qwen2_vl"], init_std=0.2))
    build(ckpt, root / "art", BuildOptions())
    return root / "art"


@pytest.fixture(scope="session")
def media(tmp_path_factory):
    """The allowed media folder: three PNGs of different sizes and a folder of 4 frames; a file outside it."""
    root = tmp_path_factory.mktemp("media")
    allowed = root / "allowed"
    allowed.mkdir()
    rng = np.random.default_rng(0)
    for name, (h, w) in {"a.png": (56, 84), "b.png": (112, 56), "c.png": (84, 84)}.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(allowed / name)
    Image.new("RGB", (28, 28)).save(root / "outside.png")
    clip = allowed / "clip"  # a video as a folder of frames
    clip.mkdir()
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (56, 84, 3), dtype=np.uint8)).save(clip / f"{i:02d}.png")
    return allowed


def data_url(path) -> str:
    return "data:image/png;base64," + base64.b64encode(open(path, "rb").read()).decode()


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def user(*parts) -> list[dict]:
    return [{"role": "user", "content": list(parts)}]


def text(t: str) -> dict:
    return {"type": "text", "text": t}


def png_bytes(size=(28, 28)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 10, 10)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def server(serve_artifacts, media):
    from qvl_export.serving.openai_api import Limits
    from qvl_export.serving.server import LocalServer, ServeOptions

    limits = Limits(max_body_bytes=2 << 20, max_images=3, max_image_pixels=200 * 200, max_tokens=300,
                    allowed_media=media)
    options = ServeOptions(max_batch=4, context=512, threads=1, model_name=MODEL, limits=limits, max_queue=16)
    with LocalServer(serve_artifacts, options) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
