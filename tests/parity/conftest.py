"""Fixtures for the transformers reference tests: tiny random checkpoints of both families."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

FAMILIES = ("qwen2_vl", "qwen2_5_vl")


def _checkpoint(tmp_path_factory: pytest.TempPathFactory, family: str, **dims) -> Path:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from qvl_export.loading.synthetic import CheckpointDims, make_checkpoint

    name = family + ("_tied" if dims.get("tie_word_embeddings") else "")
    return make_checkpoint(tmp_path_factory.mktemp(name), CheckpointDims(family=family, **dims))


@pytest.fixture(scope="session", params=FAMILIES)
def reference_checkpoint(request, tmp_path_factory) -> Path:
    """A tiny checkpoint of each family (parametrised: every test runs on both)."""
    return _checkpoint(tmp_path_factory, request.param)


@pytest.fixture(scope="session")
def tied_checkpoint(tmp_path_factory) -> Path:
    """Qwen2.5-VL with tie_word_embeddings: no lm_head.weight in the safetensors."""
    return _checkpoint(tmp_path_factory, "qwen2_5_vl", tie_word_embeddings=True)


@pytest.fixture(scope="session")
def torch_reference(reference_checkpoint):
    from qvl_export.parity.reference import TorchReference

    return TorchReference(reference_checkpoint)


def _noise_image(height: int, width: int, seed: int):
    """Deterministic RGB noise image (PIL)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), mode="RGB")


@pytest.fixture(scope="session")
def noise_image():
    """Factory: noise_image(height, width, seed) -> PIL RGB image."""
    return _noise_image


@pytest.fixture(scope="session")
def two_image_case():
    """Two images of different sizes and aspect ratios (the second one tall, over two windows)."""
    from qvl_export.parity.reference import ReferenceCase

    return ReferenceCase(name="two_images", images=[_noise_image(100, 150, 0), _noise_image(250, 90, 1)],
                         prompt="What is the total amount due?", max_new_tokens=6)


@pytest.fixture(scope="session")
def two_image_result(torch_reference, two_image_case):
    return torch_reference.run(two_image_case)
