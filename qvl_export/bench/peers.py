"""Peers in the same benchmark run: onnxruntime-genai and llama.cpp, built by their own tools from
the same random-weight checkpoint and timed with our protocol.

What each peer gets (``qvl-export bench --peers ort-genai,llama.cpp``):

- **ort-genai** (the ``onnxruntime-genai`` package): its model builder
  (``onnxruntime_genai.models.builder.create_model``) at fp32 and int4 (its CPU defaults), then
  ``og.Generator`` for prefill and greedy decode.
- **llama.cpp** (the ``llama-cpp-python`` package, compiled from its sdist - see
  ``tools/build_llama_cpp.sh``: on this machine AMX is advertised but not enabled, so it is built
  without AMX): the tree's ``convert_hf_to_gguf.py`` at f32, ``llama_model_quantize`` to Q8_0 and
  Q4_K_M, then ``llama_cpp.Llama`` for prefill and greedy decode. The converter needs the llama.cpp
  source tree: ``--llama-cpp-src DIR`` or ``QVL_LLAMA_CPP_SRC``.

Both peers take the LLM only (neither builds a Qwen-VL vision tower from a checkpoint folder:
onnxruntime-genai leaves it to Olive recipes, llama.cpp to a separate mmproj converter), so they are
compared on the decoder: a text-only view of the checkpoint (``Qwen2ForCausalLM``: the same
weights, ``model.*`` and ``lm_head``; M-RoPE with equal ids on its three axes is plain RoPE, so a
text prompt decodes the same work). The prompt has as many tokens as ours (page + text), random
ids; 64 greedy steps follow; warm-up and medians as for our engines. The converter of llama.cpp
identifies a BPE tokenizer by a hash of its output and refuses the benchmark's small trained
tokenizer; the worker tells it the pre-tokenizer is Qwen2's (the vocabulary does not change any
timing).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

PEERS = ("ort-genai", "llama.cpp")
# each peer's builds: name in the report -> the peer's own precision name
VARIANTS = {"ort-genai": {"fp32": "fp32", "int4": "int4"},
            "llama.cpp": {"fp32": "f32", "int8": "q8_0", "int4": "q4_k_m"}}
# llama_ftype values of llama.h (LLAMA_FTYPE_MOSTLY_Q8_0, LLAMA_FTYPE_MOSTLY_Q4_K_M)
LLAMA_FTYPES = {"q8_0": 7, "q4_k_m": 15}


def parse(peers: str) -> tuple[str, ...]:
    """``"ort-genai,llama.cpp"`` -> the peer names; an unknown name is refused in one line."""
    from qvl_export.core.errors import QvlError

    names = tuple(dict.fromkeys(p for p in peers.replace(" ", "").split(",") if p))
    unknown = [p for p in names if p not in PEERS]
    if unknown:
        raise QvlError(f"--peers {','.join(unknown)}: unknown peer; choose from {', '.join(PEERS)}.")
    return names


def llama_cpp_source(given: str | None = None) -> Path | None:
    """The llama.cpp source tree holding ``convert_hf_to_gguf.py`` (option, then environment)."""
    for candidate in (given, os.environ.get("QVL_LLAMA_CPP_SRC")):
        if candidate and (Path(candidate) / "convert_hf_to_gguf.py").is_file():
            return Path(candidate)
    return None


def missing(peer: str, llama_src: str | None = None) -> str | None:
    """Why ``peer`` cannot run here (None when it can)."""
    import importlib.util

    if peer == "ort-genai":
        if importlib.util.find_spec("onnxruntime_genai") is None:
            return "onnxruntime-genai is not installed (pip install onnxruntime-genai)"
        return None
    if importlib.util.find_spec("llama_cpp") is None:
        return "llama-cpp-python is not installed (tools/build_llama_cpp.sh builds it from its sdist without AMX)"
    if llama_cpp_source(llama_src) is None:
        return "the llama.cpp source tree (convert_hf_to_gguf.py) was not found: --llama-cpp-src DIR or QVL_LLAMA_CPP_SRC"
    return None


# ----------------------------------------------------------------------------- the text-only view


def text_checkpoint(checkpoint: Path, out: Path, shard_bytes: int = 1 << 30) -> Path:
    """Write ``out``: the LLM of a Qwen-VL checkpoint as a ``Qwen2ForCausalLM`` (Qwen3-VL:
    ``Qwen3ForCausalLM``) folder (config,
    tokenizer files, the ``model.*`` / ``lm_head`` weights in shards of about ``shard_bytes``,
    written one shard at a time)."""
    from safetensors import safe_open

    from qvl_export.bench.checkpoint import weight_files, write_shards
    from qvl_export.loading.config import parse_model_config

    spec = parse_model_config(checkpoint)
    t = spec.text
    raw = json.loads((checkpoint / "config.json").read_text())
    text_raw = raw.get("text_config") or raw
    out.mkdir(parents=True, exist_ok=True)
    qwen3 = t.qk_norm  # Qwen3-VL's LLM is a Qwen3 decoder (q/k RMSNorm, head_dim from the config)
    config = {
        "architectures": ["Qwen3ForCausalLM" if qwen3 else "Qwen2ForCausalLM"],
        "model_type": "qwen3" if qwen3 else "qwen2", "head_dim": t.head_dim,
        "attention_bias": t.qkv_bias,
        "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
        "num_hidden_layers": t.num_hidden_layers, "num_attention_heads": t.num_attention_heads,
        "num_key_value_heads": t.num_key_value_heads, "vocab_size": t.vocab_size,
        "rms_norm_eps": t.rms_norm_eps, "rope_theta": t.rope_theta, "hidden_act": "silu",
        "max_position_embeddings": text_raw.get("max_position_embeddings", 32768),
        "tie_word_embeddings": t.tie_word_embeddings, "torch_dtype": "float32",
        "bos_token_id": text_raw.get("bos_token_id"), "eos_token_id": text_raw.get("eos_token_id"),
    }
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (checkpoint / name).exists():
            shutil.copy2(checkpoint / name, out / name)

    def tensors():
        for path in weight_files(checkpoint):
            with safe_open(str(path), "pt") as f:
                for key in f.keys():
                    if key.startswith("model.language_model."):
                        name = "model." + key[len("model.language_model."):]
                    elif key.startswith(("model.layers.", "model.embed_tokens.", "model.norm.", "lm_head.")):
                        name = key
                    else:
                        continue  # the vision tower
                    tensor = f.get_tensor(key)
                    config["torch_dtype"] = str(tensor.dtype).replace("torch.", "")
                    yield name, tensor

    write_shards(tensors(), out, shard_bytes)
    (out / "config.json").write_text(json.dumps(config, indent=1))
    return out


# ----------------------------------------------------------------------------- harness side


def plan(peers: tuple[str, ...], checkpoint: Path, work: Path, llm: dict, threads: int,
         llama_src: str | None = None) -> tuple[list[tuple[str, dict]], list[tuple[str, dict]], dict]:
    """(build calls, timing calls, skipped peers with the reason): the workers to run for ``peers``."""
    builds: list[tuple[str, dict]] = []
    timings: list[tuple[str, dict]] = []
    skipped = {}
    text = work / "peer-text-checkpoint"
    for peer in peers:
        reason = missing(peer, llama_src)
        if reason:
            skipped[peer] = reason
    ready = [p for p in peers if p not in skipped]
    if not ready:
        return builds, timings, skipped
    builds.append(("peer-text", {"kind": "peer_text_checkpoint", "checkpoint": str(checkpoint), "out": str(text)}))
    timing = {"checkpoint": str(checkpoint), "threads": threads, **llm}
    if "ort-genai" in ready:
        for label, precision in VARIANTS["ort-genai"].items():
            out = work / f"peer-genai-{label}"
            builds.append((f"peer-build-ort-genai-{label}", {"kind": "genai_build", "checkpoint": str(text),
                                                             "out": str(out), "precision": precision,
                                                             "threads": threads}))
            timings.append((f"peer-llm-ort-genai-{label}", {"kind": "genai_llm", "model": str(out), **timing}))
    if "llama.cpp" in ready:
        f32 = work / "peer-llama-f32.gguf"
        builds.append(("peer-build-llama.cpp-fp32", {"kind": "llama_convert", "checkpoint": str(text),
                                                     "out": str(f32), "source": str(llama_cpp_source(llama_src))}))
        for label, kind in VARIANTS["llama.cpp"].items():
            gguf = f32 if kind == "f32" else work / f"peer-llama-{kind}.gguf"
            if kind != "f32":
                builds.append((f"peer-build-llama.cpp-{label}", {"kind": "llama_quantize", "source": str(f32),
                                                                 "out": str(gguf), "type": kind,
                                                                 "threads": threads}))
            timings.append((f"peer-llm-llama.cpp-{label}", {"kind": "llama_llm", "model": str(gguf), **timing}))
    return builds, timings, skipped


def report(peers: tuple[str, ...], runs: dict, skipped: dict) -> dict:
    """Per peer and precision: build seconds / peak RSS / bytes, prefill ms, decode tokens/s."""
    out: dict = {}
    text = runs.get("peer-text")
    for peer in peers:
        if peer in skipped:
            out[peer] = {"skipped": skipped[peer]}
            continue
        rows = {}
        for label, native in VARIANTS[peer].items():
            row: dict = {"format": native}
            build = runs.get(f"peer-build-{peer}-{label}")
            if peer == "llama.cpp" and label != "fp32":
                convert = runs.get(f"peer-build-{peer}-fp32")
                row["convert"] = _build_figures(convert)
            row["build"] = _build_figures(build)
            llm = runs.get(f"peer-llm-{peer}-{label}")
            figs = llm.result.get("llm") if llm is not None else None
            if figs:
                row.update(prefill_ms=figs["prefill_ms"], decode_tokens_per_s=figs["decode_tokens_per_s"],
                           decode_samples_tokens_per_s=figs["decode_samples_tokens_per_s"],
                           llm_peak_rss_mb=llm.result.get("peak_rss_mb"),
                           prompt_tokens_total=llm.result.get("prompt_tokens_total"))
            else:
                row["llm_skipped"] = (llm.error if llm is not None and llm.error else
                                      (text.error if text is not None and text.error else "not run"))
            rows[label] = row
        out[peer] = rows
    return out


def _build_figures(run) -> dict:
    if run is None:
        return {"skipped": "not run"}
    if not run.ok:
        return {"skipped": run.error.splitlines()[0] if run.error else "failed"}
    return {"seconds": run.result.get("seconds"), "peak_rss_mb": run.result.get("peak_rss_mb"),
            "bytes": run.result.get("bytes")}


def table_lines(peers: dict, ours: dict) -> list[str]:
    """Decode side by side: ours (fp32 / int8 / int4) and each peer's builds."""
    if not peers:
        return []
    lines = ["", "Decoder side by side (same checkpoint, same prompt length, greedy, median tok/s; build wall / peak RSS)"]
    header = f"{'engine':<26}{'decode tok/s':>14}{'prefill ms':>12}{'build s':>10}{'build peak MiB':>16}"
    lines += [header, "-" * len(header)]
    for label, fig in ours.items():
        lines.append(f"{'ours ' + label:<26}{_num(fig.get('decode_tokens_per_s'), 2):>14}"
                     f"{_num(fig.get('prefill_ms'), 0):>12}{_num(fig.get('build_s'), 0):>10}"
                     f"{_num(fig.get('build_peak_mb'), 0):>16}")
    for peer, rows in peers.items():
        if "skipped" in rows:
            lines.append(f"{peer:<26}skipped: {rows['skipped']}")
            continue
        for label, row in rows.items():
            build = row.get("build", {})
            lines.append(f"{peer + ' ' + row['format']:<26}{_num(row.get('decode_tokens_per_s'), 2):>14}"
                         f"{_num(row.get('prefill_ms'), 0):>12}{_num(build.get('seconds'), 0):>10}"
                         f"{_num(build.get('peak_rss_mb'), 0):>16}"
                         + (f"  ({row['llm_skipped'].splitlines()[0][:80]})" if "llm_skipped" in row else ""))
    return lines


def _num(x, digits: int) -> str:
    return "-" if x is None else f"{x:.{digits}f}"
