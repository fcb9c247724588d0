"""Shared fixtures for the runtime tests: tiny random checkpoints of both families and their
transformers models (the reference the numpy runtime code is compared against)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from qvl_export.core.spec import ModelSpec
from qvl_export.loading.config import parse_model_config
from qvl_export.loading.synthetic import CheckpointDims, make_checkpoint

FAMILIES = ("qwen2_vl", "qwen2_5_vl")


@dataclass
class Tiny:
    path: Path
    spec: ModelSpec
    model: object  # transformers *ForConditionalGeneration, eval mode


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Tiny]:
    import transformers

    root = tmp_path_factory.mktemp("runtime-ckpts")
    classes = {
        "qwen2_vl": transformers.Qwen2VLForConditionalGeneration,
        "qwen2_5_vl": transformers.Qwen2_5_VLForConditionalGeneration,
    }
    out = {}
    for family in FAMILIES:
        path = make_checkpoint(root / family, CheckpointDims(family=family))
        model = classes[family].from_pretrained(path).eval()
        out[family] = Tiny(path, parse_model_config(path), model)
    return out


@pytest.fixture(params=FAMILIES)
def tiny(request, tiny_models) -> Tiny:
    return tiny_models[request.param]
