"""The peers' side of the benchmark: the text-only view they build from is the same LLM, unknown peers
are refused, a missing peer is skipped with its reason, and (where onnxruntime-genai is installed) its
builder and generator run end to end through the harness's worker tasks."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_text_view_is_the_same_llm(checkpoint, tmp_path, family):
    """Text-only logits of the Qwen-VL model (transformers) == those of the Qwen2ForCausalLM view."""
    from qvl_export.bench.peers import text_checkpoint

    src = checkpoint(family)
    view = text_checkpoint(src, tmp_path / "text", shard_bytes=1 << 16)  # several shards
    index = json.loads((view / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 1
    assert not any(k.startswith("visual") or "language_model" in k for k in index)

    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 61]])
    vl = transformers.AutoModelForImageTextToText.from_pretrained(src, dtype=torch.float32).eval()
    lm = transformers.AutoModelForCausalLM.from_pretrained(view, dtype=torch.float32).eval()
    assert type(lm).__name__ == ("Qwen3ForCausalLM" if family == "qwen3_vl" else "Qwen2ForCausalLM")
    with torch.no_grad():
        a = vl(input_ids=ids).logits
        b = lm(input_ids=ids).logits
    assert a.shape == b.shape
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-4)


def test_unknown_peer_is_refused():
    from qvl_export.bench.peers import parse
    from qvl_export.core.errors import QvlError

    assert parse("ort-genai, llama.cpp,ort-genai") == ("ort-genai", "llama.cpp")
    with pytest.raises(QvlError, match="unknown peer"):
        parse("vllm")


def test_missing_llama_cpp_source_is_a_reason(tmp_path, monkeypatch):
    from qvl_export.bench.peers import missing, plan

    monkeypatch.delenv("QVL_LLAMA_CPP_SRC", raising=False)
    reason = missing("llama.cpp", str(tmp_path))
    assert reason and ("llama-cpp-python" in reason or "convert_hf_to_gguf.py" in reason)
    builds, timings, skipped = plan(("llama.cpp",), tmp_path / "ckpt", tmp_path, {}, 1, str(tmp_path))
    assert not builds and not timings and skipped == {"llama.cpp": reason}


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("onnxruntime_genai") is None, reason="onnxruntime-genai not installed")
def test_ort_genai_builds_and_decodes_the_view(checkpoint, tmp_path):
    """onnxruntime-genai's builder on the text view; its greedy tokens == transformers' on the VL model."""
    from qvl_export.bench.peers import text_checkpoint
    from qvl_export.bench.worker import task_genai_build, task_genai_llm

    class Sink(dict):
        def put(self, key, value):
            self[key] = value

    src = checkpoint("qwen2_5_vl")
    view = text_checkpoint(src, tmp_path / "text")
    built = Sink()
    task_genai_build({"checkpoint": str(view), "out": str(tmp_path / "genai"), "precision": "fp32", "threads": 1},
                     built)
    assert built["bytes"] > 0
    timed = Sink()
    task_genai_llm({"model": str(tmp_path / "genai"), "checkpoint": str(src), "page": 112, "prompt_tokens": 8,
                    "decode_tokens": 4, "warmup": 0, "repeats": 1, "threads": 1}, timed)
    assert timed["llm"]["decode_tokens_per_s"] > 0

    import onnxruntime_genai as og

    ids = np.array([[5, 17, 42, 99, 3, 250, 7, 61]], dtype=np.int32)
    model = og.Model(str(tmp_path / "genai"))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=ids.shape[1] + 6, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(ids)
    ours = []
    while not gen.is_done():
        gen.generate_next_token()
        ours.append(int(gen.get_next_tokens()[0]))
    vl = transformers.AutoModelForImageTextToText.from_pretrained(src, dtype=torch.float32).eval()
    ref = vl.generate(torch.from_numpy(ids.astype(np.int64)), max_new_tokens=len(ours), do_sample=False,
                      eos_token_id=None)[0, ids.shape[1]:].tolist()
    assert ours == ref[:len(ours)]
