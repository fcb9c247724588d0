"""Shared fixtures: tiny random checkpoints of the three architectures and their built artifacts.

The shapes differ from the built-in demo checkpoint on purpose (head dims, mrope sections,
window / full-attention layout, tied embeddings) so nothing is tuned to one configuration.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest

from qvl_export.loading.synthetic import CheckpointDims

# Qwen3-VL-Instruct's official chat template (no default system turn)
QWEN3_TEMPLATE = (Path(__file__).parent / "data" / "chat_templates" / "qwen3_vl.jinja").read_text(encoding="utf-8")

QWEN3 = CheckpointDims(family="qwen3_vl", vision_depth=3, vision_hidden=32, vision_heads=2, vision_intermediate=64,
                       num_position_embeddings=16, deepstack_visual_indexes=(0, 2), text_hidden=64, text_layers=3,
                       text_heads=4, text_kv_heads=2, text_head_dim=24, text_intermediate=128,
                       mrope_section=(5, 4, 3), tie_word_embeddings=True, min_pixels=32 * 32 * 4,
                       max_pixels=32 * 32 * 200, seed=13, chat_template=QWEN3_TEMPLATE)

TINY = {
    "qwen2_vl": CheckpointDims(family="qwen2_vl", vision_depth=3, vision_hidden=48, vision_heads=3,
                               vision_intermediate=96, text_hidden=96, text_layers=2, text_heads=4,
                               text_kv_heads=2, text_intermediate=160, mrope_section=(2, 5, 5),
                               tie_word_embeddings=True, seed=11),
    "qwen2_5_vl": CheckpointDims(family="qwen2_5_vl", vision_depth=4, vision_hidden=64, vision_heads=4,
                                 vision_intermediate=112, fullatt_block_indexes=(0, 3), text_hidden=128,
                                 text_layers=3, text_heads=4, text_kv_heads=1, text_intermediate=192,
                                 mrope_section=(4, 6, 6), seed=12),
    # DeepStack from ViT layers 0 and 2 into LLM layers 0 and 1; a 4x4 position table, so every test grid
    # is interpolated; head_dim 24 stated apart from hidden / heads (16); sections (5, 4, 3) interleaved
    # over 12 frequencies leave the last ones to t; tied embeddings; the official template
    "qwen3_vl": QWEN3,
    # the same shapes with weights 4x larger: its greedy answers vary (at 0.05 every prompt's answer is one
    # token repeated, as for the tiny Qwen2(.5)-VL models), so 64 identical tokens say more; its logits are
    # too sharp for the quantized gates (KL 2.6e-2 for int8, as for Qwen2.5-VL at this scale: 9e-2)
    "qwen3_vl-sharp": replace(QWEN3, init_std=0.2, seed=3),
}


def pytest_collection_modifyitems(config, items):
    """GPU tests run only where a GPU is visible through cuda-python: ``cuda`` tests need nothing more,
    ``gpu`` tests need TensorRT too (``-m "gpu or cuda"`` to select them)."""
    from qvl_export.runtimes.trt.cuda import gpu_compute_capability

    has_cuda = gpu_compute_capability() is not None
    try:
        import tensorrt  # noqa: F401

        has_trt = has_cuda
    except ImportError:
        has_trt = False
    skips = {"cuda": None if has_cuda else pytest.mark.skip(reason="needs an NVIDIA GPU and cuda-python"),
             "gpu": None if has_trt else pytest.mark.skip(reason="needs an NVIDIA GPU and TensorRT")}
    for item in items:
        for marker, skip in skips.items():
            if skip is not None and item.get_closest_marker(marker) is not None:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_dims():
    """The tiny checkpoint dimensions of each family (``TINY``), for tests that vary one setting."""
    return TINY


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """One trace cache for the test session (both xdist workers and the CLI's subprocesses), never the
    user's: each distinct part is traced once a session, every later build of it reads the graph back."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # pytest-N/, above the workers' own folders
    os.environ["QVL_EXPORT_TRACE_CACHE"] = str(base / "trace-cache")  # a user's setting is not inherited


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """checkpoint(family) -> path of a tiny random checkpoint (made once per session)."""
    from qvl_export.loading.synthetic import make_checkpoint

    made: dict[str, object] = {}

    def get(family: str):
        if family not in made:
            made[family] = make_checkpoint(tmp_path_factory.mktemp(f"ckpt-{family}"), TINY[family])
        return made[family]

    return get


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory, checkpoint):
    """artifacts(family) -> path of the fp32 ORT artifacts built from checkpoint(family)."""
    from qvl_export.building.artifacts import BuildOptions, build

    built: dict[str, object] = {}

    def get(family: str):
        if family not in built:
            out = tmp_path_factory.mktemp(f"art-{family}") / "artifacts"
            build(checkpoint(family), out, BuildOptions())
            built[family] = out
        return built[family]

    return get
