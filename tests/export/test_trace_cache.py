"""The trace cache: a cached graph builds the same bytes as a fresh trace, holds no weights, and a
broken or unwritable cache never fails a build."""

from __future__ import annotations

import logging
from dataclasses import replace

import onnx
import pytest

from qvl_export.building.artifacts import BuildOptions, build
from qvl_export.core.manifest import Manifest
from qvl_export.export import trace_cache
from qvl_export.export.parts import decoder_part, trace_part, vision_part
from qvl_export.loading.config import parse_model_config as load_spec
from qvl_export.loading.synthetic import make_checkpoint
from qvl_export.loading.weights import CheckpointWeights


def _part_bytes(folder) -> dict[str, bytes]:
    m = Manifest.read(folder)
    out = {}
    for part in m.parts.values():
        out[part.file] = (folder / part.file).read_bytes()
        if part.external_data:
            out[part.external_data] = (folder / part.external_data).read_bytes()
    return out


def test_cached_graph_builds_the_same_bytes_with_another_checkpoints_weights(tiny_dims, tmp_path, monkeypatch,
                                                                             caplog):
    """A checkpoint of the same config and other weights reads the graph back and binds its own weights:
    the artifacts equal those of a build with the cache off, byte for byte (node names included)."""
    dims = tiny_dims["qwen2_vl"]
    first = make_checkpoint(tmp_path / "first", dims)
    second = make_checkpoint(tmp_path / "second", replace(dims, seed=dims.seed + 1))
    cache = tmp_path / "cache"
    monkeypatch.setenv("QVL_EXPORT_TRACE_CACHE", str(cache))
    build(first, tmp_path / "a", BuildOptions())
    entries = sorted(p.name for p in cache.iterdir())
    assert len(entries) == 3  # vision, merger, decoder
    with caplog.at_level(logging.INFO, logger="qvl_export.export.parts"):
        build(second, tmp_path / "b", BuildOptions())
    assert caplog.text.count("read from the trace cache") == 3
    assert sorted(p.name for p in cache.iterdir()) == entries  # read back: nothing traced anew
    monkeypatch.setenv("QVL_EXPORT_TRACE_CACHE", "off")
    build(second, tmp_path / "c", BuildOptions())
    cached, fresh = _part_bytes(tmp_path / "b"), _part_bytes(tmp_path / "c")
    assert sorted(cached) == sorted(fresh)
    assert [f for f in cached if cached[f] != fresh[f]] == []
    other = _part_bytes(tmp_path / "a")
    assert [f for f in other if f.endswith(".data") and other[f] == cached[f]] == []  # its own weights

    # an entry holds the graph and the buffers, every parameter a placeholder: no weight values
    for entry in cache.iterdir():
        model = onnx.load(entry, load_external_data=False)
        external = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
        assert external
        assert {e.value for t in external for e in t.external_data if e.key == "location"} == {trace_cache.PLACEHOLDER}
        inline = sum(len(t.raw_data) for t in model.graph.initializer)
        assert inline < 64 * 1024  # rotary tables and the like


def test_key_follows_what_the_graph_is_built_from(checkpoint):
    ckpt = checkpoint("qwen2_5_vl")
    spec, weights = load_spec(ckpt), CheckpointWeights(ckpt)
    fused, dense = vision_part(spec, weights, "fused"), vision_part(spec, weights, "dense")
    key = trace_cache.trace_key
    assert key(fused.description, "float32") == key(vision_part(spec, weights, "fused").description, "float32")
    assert key(fused.description, "float32") != key(dense.description, "float32")
    assert key(fused.description, "float32") != key(fused.description, "float16")
    deeper = replace(spec, text=replace(spec.text, num_hidden_layers=spec.text.num_hidden_layers + 1))
    assert key(decoder_part(spec, weights).description, "float32") != \
        key(decoder_part(deeper, weights).description, "float32")
    # the sampling settings are not part of a graph
    sampled = replace(spec, generation=replace(spec.generation, temperature=0.3))
    assert key(decoder_part(spec, weights).description, "float32") == \
        key(decoder_part(sampled, weights).description, "float32")


def test_broken_entry_is_traced_again_and_rewritten(checkpoint, tmp_path, monkeypatch, caplog):
    ckpt = checkpoint("qwen2_vl")
    part = vision_part(load_spec(ckpt), CheckpointWeights(ckpt))
    monkeypatch.setenv("QVL_EXPORT_TRACE_CACHE", str(tmp_path))
    entry = tmp_path / f"{trace_cache.trace_key(part.description, 'float32')}.onnx"
    entry.write_bytes(b"not a model")
    with caplog.at_level(logging.WARNING, logger="qvl_export.export.trace_cache"):
        model = trace_part(part)
    assert "could not be read" in caplog.text
    assert len(model.graph) > 0 and onnx.load(entry, load_external_data=False).graph.node


def test_unwritable_cache_is_skipped(checkpoint, tmp_path, monkeypatch, caplog):
    ckpt = checkpoint("qwen2_vl")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("QVL_EXPORT_TRACE_CACHE", str(blocker / "traces"))  # under a file: cannot be made
    with caplog.at_level(logging.WARNING, logger="qvl_export.export.trace_cache"):
        model = trace_part(vision_part(load_spec(ckpt), CheckpointWeights(ckpt)))
    assert "goes on without it" in caplog.text and len(model.graph) > 0


@pytest.mark.parametrize("value", ["off", "0"])
def test_cache_can_be_turned_off(value, monkeypatch):
    monkeypatch.setenv("QVL_EXPORT_TRACE_CACHE", value)
    assert trace_cache.cache_dir() is None
