"""One measurement in its own process: ``python -m qvl_export.bench.worker TASK.json RESULT.json``.

Each engine and phase runs in a fresh process so its peak RSS (``ru_maxrss``) is its own. The
result file is rewritten after every figure, so what was measured survives if the harness has to
kill the worker (memory guard, timeout). Task kinds: bandwidth, checkpoint, export, torch_vision,
ort_vision (document pages, then a video clip), torch_llm, ort_llm, ort_profile. Only the torch
tasks import torch.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

log = logging.getLogger("qvl_export.bench.worker")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class Sink:
    """The result dict, written atomically to disk on every update."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict = {}

    def put(self, key: str, value) -> None:
        self.data[key] = value
        self.data["peak_rss_mb"] = peak_rss_mb()
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        tmp.replace(self.path)


def timed(fn: Callable[[], object], warmup: int, repeats: int) -> list[float]:
    """Seconds of ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def median_ms(seconds: list[float]) -> float:
    return statistics.median(seconds) * 1000.0


# ----------------------------------------------------------------------------- inputs


def page_patches(spec, px: int):
    """A rendered document page of px x px pixels -> (patches [S, 1176] float32, grid, preprocess s)."""
    from qvl_export.documents.render import sample_page as render_page
    from qvl_export.runtimes.preprocess import preprocess_image

    image = render_page(px, px, seed=px)
    t0 = time.perf_counter()
    patches, grid = preprocess_image(image, spec.vision, spec.preprocess)
    return patches, tuple(int(g) for g in grid), time.perf_counter() - t0


def clip_patches(spec, frames: int, px: int):
    """A clip of ``frames`` frames of px x px pixels (a document page panning, as a screen recording)
    through the runtime's video path (sampled as given at 2 fps, planned in the model's context,
    temporal patches) -> (patches [t*h*w, patch_dim] float32, grid (t, h, w), preprocess s)."""
    from qvl_export.documents.render import sample_page as render_page
    from qvl_export.runtimes import video

    page = np.asarray(render_page(px + 8 * frames, px, seed=px).convert("RGB"))
    clip = np.stack([page[:, 8 * i:8 * i + px] for i in range(frames)])  # [T, H, W, 3] uint8
    t0 = time.perf_counter()
    reader = video.open_video(clip)
    plan = video.plan_video(reader, spec.vision, max_frames=frames, context=spec.text.max_position_embeddings)
    patches = video.video_patches(reader, plan, spec.vision, spec.preprocess)
    return patches, plan.grid, time.perf_counter() - t0


def llm_inputs(spec, px: int, prompt_tokens: int, seed: int = 0):
    """One page (as image tokens) + ``prompt_tokens`` text tokens, identical for both engines.

    ``ids [T]`` = vision_start, N image pads, vision_end, text; ``positions [3, T]`` M-RoPE;
    ``embeds [N, H]`` float32 stand-ins for the merger output (values do not change the timing).
    """
    from qvl_export.runtimes import indexing
    from qvl_export.runtimes.preprocess import smart_resize

    v, tok = spec.vision, spec.tokens
    factor = v.patch_size * v.spatial_merge_size
    h, w = smart_resize(px, px, factor, spec.preprocess.min_pixels, spec.preprocess.max_pixels)
    grid = (1, h // v.patch_size, w // v.patch_size)
    n_image = h * w // v.patch_size**2 // v.merge_unit
    rng = np.random.default_rng(seed)
    limit = min(t for t in (tok.image_token_id, tok.video_token_id, tok.vision_start_token_id,
                            tok.vision_end_token_id) if t >= 0)  # specials follow the regular tokens
    text = rng.integers(0, limit, prompt_tokens)
    ids = np.concatenate([[tok.vision_start_token_id], np.full(n_image, tok.image_token_id),
                          [tok.vision_end_token_id], text]).astype(np.int64)
    positions, delta = indexing.rope_index(ids, [grid], tok, v.spatial_merge_size)
    embeds = rng.standard_normal((n_image, spec.text.hidden_size), dtype=np.float32)
    return ids, positions, int(delta), embeds, grid


def deepstack_inputs(spec, embeds: np.ndarray, seed: int = 1) -> np.ndarray | None:
    """Qwen3-VL: ``[L, N, H]`` float32 stand-ins for the DeepStack rows of the ``embeds`` image rows
    (None for a model without DeepStack); both engines add them after their first L layers."""
    layers = spec.vision.deepstack
    if not layers:
        return None
    return np.random.default_rng(seed).standard_normal((layers, *embeds.shape), dtype=np.float32)


# ----------------------------------------------------------------------------- tasks


def task_bandwidth(task: dict, sink: Sink) -> None:
    """Streaming copy (read + write bytes) and streaming read (dot) of a large float32 array, best
    of ``rounds`` (the first of each kind warms the pages and the thread pool)."""
    from concurrent.futures import ThreadPoolExecutor

    n = int(task["mib"]) * 2**20 // 4
    src = np.ones(n, dtype=np.float32)
    dst = np.zeros_like(src)  # touched: no page faults inside the timing
    threads = int(task["threads"])
    edges = [n * i // threads for i in range(threads + 1)]
    bounds = list(zip(edges[:-1], edges[1:]))
    pool = ThreadPoolExecutor(threads)  # numpy releases the GIL in copyto / dot

    def copy():
        list(pool.map(lambda b: np.copyto(dst[b[0]:b[1]], src[b[0]:b[1]]), bounds))

    def read():
        list(pool.map(lambda b: np.dot(src[b[0]:b[1]], src[b[0]:b[1]]), bounds))

    # best of many short runs spread over a few seconds: on a shared machine one quiet moment
    # shows what the memory system can do, which is what a roofline needs
    best_copy, best_read = float("inf"), float("inf")
    for _ in range(int(task.get("rounds", 15))):
        best_copy = min(best_copy, *timed(copy, 0, 1))
        best_read = min(best_read, *timed(read, 0, 1))
        time.sleep(0.2)
    sink.put("array_mib", int(task["mib"]))
    sink.put("threads", threads)
    sink.put("copy_gb_s", 2 * src.nbytes / best_copy / 1e9)
    sink.put("read_gb_s", src.nbytes / best_read / 1e9)


def task_checkpoint(task: dict, sink: Sink) -> None:
    from qvl_export.bench.checkpoint import make_bench_checkpoint
    from qvl_export.bench.configs import bench_model

    t0 = time.perf_counter()
    out = make_bench_checkpoint(task["out"], bench_model(task["model"], task.get("layers")))
    sink.put("seconds", time.perf_counter() - t0)
    sink.put("bytes", sum(p.stat().st_size for p in Path(out).glob("*.safetensors")))


def task_export(task: dict, sink: Sink) -> None:
    from qvl_export.building.artifacts import BuildOptions, build

    t0 = time.perf_counter()
    manifest = build(task["checkpoint"], task["out"],
                     BuildOptions(window_attention=task["window_attention"], force=True,
                                  precision=task.get("precision", "fp32"), calib_limit=task.get("calib_limit"),
                                  int4_block=task.get("int4_block")))
    sink.put("seconds", time.perf_counter() - t0)
    sink.put("bytes", sum(p.stat().st_size for p in Path(task["out"]).glob("*.onnx*")))
    sink.put("part_bytes", {part: sum(p.stat().st_size for p in Path(task["out"]).glob(f"{part}.onnx*"))
                            for part in manifest.parts})
    quant = manifest.calibration.quantization if manifest.calibration else None
    if quant:
        keys = ("precision", "method", "quantized_count", "kept_high_precision")
        sink.put("quantization", {part: {k: q.get(k) for k in keys}
                                  for part, q in quant.items()})


def task_torch_vision(task: dict, sink: Sink) -> None:
    import torch

    from qvl_export.bench.torch_engine import load_vision, vision_runner
    from qvl_export.loading.config import parse_model_config

    torch.set_num_threads(int(task["threads"]))
    model_dir = Path(task["checkpoint"])
    spec = parse_model_config(model_dir)
    t0 = time.perf_counter()
    visual = load_vision(model_dir)
    sink.put("load_s", time.perf_counter() - t0)
    sink.put("rss_after_load_mb", rss_mb())
    pages = {}
    for px in task["pages"]:
        patches, grid, _ = page_patches(spec, px)
        seconds = timed(vision_runner(visual, patches, grid), task["warmup"], task["repeats"])
        pages[str(px)] = {"px": px, "grid": grid, "tokens": len(patches), "ms": median_ms(seconds),
                          "samples_ms": [s * 1000 for s in seconds], "peak_rss_mb": peak_rss_mb()}
        sink.put("pages", pages)
    if task.get("video"):  # a clip: transformers' vision tower takes the video grid (t, h, w) as it is
        frames, px = task["video"]
        patches, grid, _ = clip_patches(spec, frames, px)
        seconds = timed(vision_runner(visual, patches, grid), task["warmup"], task["repeats"])
        sink.put("video", {"frames": frames, "px": px, "grid": list(grid), "patches": len(patches),
                           "tokens": len(patches) // spec.vision.merge_unit, "ms": median_ms(seconds),
                           "samples_ms": [s * 1000 for s in seconds], "peak_rss_mb": peak_rss_mb()})


def task_ort_vision(task: dict, sink: Sink) -> None:
    from qvl_export.bench.ort_engine import open_pipeline

    t0 = time.perf_counter()
    pipe, backend = open_pipeline(task["artifacts"], ("vision", "merger"), int(task["threads"]))
    sink.put("load_s", time.perf_counter() - t0)
    sink.put("rss_after_load_mb", rss_mb())
    pages = {}

    def figure(patches, grid, prep_s) -> dict:
        totals, graphs = [], []
        for i in range(task["warmup"] + task["repeats"]):
            backend.take()
            t = time.perf_counter()
            out = pipe.encode_images([patches], [grid])
            total = time.perf_counter() - t
            graph = backend.take()
            if i >= task["warmup"]:
                totals.append(total)
                graphs.append(graph)
        return {"grid": grid, "padded_tokens": out.layout.padded_len, "ms": median_ms(graphs),
                "samples_ms": [s * 1000 for s in graphs], "host_ms": median_ms([a - b for a, b in zip(totals, graphs)]),
                "total_ms": median_ms(totals), "preprocess_ms": prep_s * 1000, "peak_rss_mb": peak_rss_mb()}

    for px in task["pages"]:
        patches, grid, prep_s = page_patches(pipe.spec, px)
        pages[str(px)] = {"px": px, "tokens": len(patches), **figure(patches, grid, prep_s)}
        sink.put("pages", pages)
    if task.get("video"):  # a clip: t temporal patches, one-frame grids for the vision graph
        frames, px = task["video"]
        patches, grid, prep_s = clip_patches(pipe.spec, frames, px)
        sink.put("video", {"frames": frames, "px": px, "patches": len(patches),
                           "tokens": len(patches) // pipe.spec.vision.merge_unit,
                           **figure(patches, list(grid), prep_s)})


def _llm_figures(prefill: list[float], decode: list[float], n: int) -> dict:
    tps = [n / s for s in decode]
    return {"prefill_ms": median_ms(prefill), "prefill_samples_ms": [s * 1000 for s in prefill],
            "decode_tokens": n, "decode_tokens_per_s": statistics.median(tps),
            "decode_samples_tokens_per_s": tps, "decode_ms_per_token": 1000.0 / statistics.median(tps)}


def task_torch_llm(task: dict, sink: Sink) -> None:
    import torch

    from qvl_export.bench.torch_engine import TorchLLM
    from qvl_export.loading.config import parse_model_config

    torch.set_num_threads(int(task["threads"]))
    model_dir = Path(task["checkpoint"])
    spec = parse_model_config(model_dir)
    t0 = time.perf_counter()
    llm = TorchLLM(model_dir)
    sink.put("load_s", time.perf_counter() - t0)
    sink.put("rss_after_load_mb", rss_mb())
    ids, positions, delta, embeds, _ = llm_inputs(spec, task["page"], task["prompt_tokens"])
    deep = deepstack_inputs(spec, embeds)
    ids_t = torch.from_numpy(ids)[None]
    pos_t = torch.from_numpy(positions)[:, None, :]
    emb_t = torch.from_numpy(embeds)
    deep_t = None if deep is None else torch.from_numpy(deep)
    sink.put("prompt_tokens_total", len(ids))
    sink.put("image_tokens", len(embeds))

    def generate(steps: int) -> tuple[float, float]:
        t = time.perf_counter()
        logits, cache = llm.prefill(ids_t, emb_t, pos_t, deep_t)
        token = logits.argmax(-1)
        t_prefill = time.perf_counter() - t
        t = time.perf_counter()
        for step in range(steps):
            pos = torch.full((3, 1, 1), len(ids) + step + delta, dtype=torch.int64)
            token = llm.step(token.view(1, 1), pos, cache).argmax(-1)
        return t_prefill, time.perf_counter() - t

    for _ in range(task["warmup"]):
        generate(2)
    runs = [generate(task["decode_tokens"]) for _ in range(task["repeats"])]
    sink.put("llm", _llm_figures([r[0] for r in runs], [r[1] for r in runs], task["decode_tokens"]))


def task_ort_llm(task: dict, sink: Sink) -> None:
    from qvl_export.bench.ort_engine import open_pipeline
    from qvl_export.runtimes import indexing

    t0 = time.perf_counter()
    pipe, backend = open_pipeline(task["artifacts"], ("decoder",), int(task["threads"]))
    sink.put("load_s", time.perf_counter() - t0)
    sink.put("rss_after_load_mb", rss_mb())
    ids, positions, delta, embeds, _ = llm_inputs(pipe.spec, task["page"], task["prompt_tokens"])
    deep = deepstack_inputs(pipe.spec, embeds)
    text = pipe.spec.text
    no_image = np.zeros((0, text.hidden_size), dtype=np.float32)
    sink.put("prompt_tokens_total", len(ids))
    sink.put("image_tokens", len(embeds))
    graph: dict[str, list[float]] = {"prefill": [], "decode": []}

    def generate(steps: int) -> tuple[float, float]:
        cache = pipe.new_cache(capacity=len(ids) + steps)  # as generate() sizes it
        backend.take()
        t = time.perf_counter()
        logits = pipe.decoder_step(ids[None], embeds, positions[:, None, :], cache, deep)
        token = int(np.argmax(logits[0]))
        t_prefill = time.perf_counter() - t
        graph["prefill"].append(backend.take())
        t = time.perf_counter()
        for _ in range(steps):
            pos = indexing.decode_positions(cache.length, delta, 1)
            logits = pipe.decoder_step(np.asarray([[token]], dtype=np.int64), no_image, pos[:, None, :], cache)
            token = int(np.argmax(logits[0]))
        graph["decode"].append(backend.take())
        return t_prefill, time.perf_counter() - t

    for _ in range(task["warmup"]):
        generate(2)
    graph["prefill"].clear()
    graph["decode"].clear()
    runs = [generate(task["decode_tokens"]) for _ in range(task["repeats"])]
    figures = _llm_figures([r[0] for r in runs], [r[1] for r in runs], task["decode_tokens"])
    figures["prefill_graph_ms"] = median_ms(graph["prefill"])
    figures["decode_graph_ms_per_token"] = median_ms(graph["decode"]) / task["decode_tokens"]
    sink.put("llm", figures)


def task_ort_profile(task: dict, sink: Sink) -> None:
    """onnxruntime's profiler on the decoder (prefill, decode steps) and the vision graph."""
    import tempfile

    from qvl_export.bench.ort_engine import op_breakdown, open_profiling_pipeline
    from qvl_export.runtimes import indexing

    threads, steps = int(task["threads"]), int(task["decode_steps"])
    prefix = str(Path(tempfile.mkdtemp(prefix="ortprof-")) / "p")
    pipe, backend = open_profiling_pipeline(task["artifacts"], ("decoder",), threads, prefix + "-llm")
    ids, positions, delta, embeds, _ = llm_inputs(pipe.spec, task["page"], task["prompt_tokens"])
    deep = deepstack_inputs(pipe.spec, embeds)
    text = pipe.spec.text
    no_image = np.zeros((0, text.hidden_size), dtype=np.float32)
    for n in (2, steps):  # run 0 prefill + 2 decode steps are warm-up; then prefill + ``steps`` steps
        cache = pipe.new_cache(capacity=len(ids) + n)
        token = int(np.argmax(pipe.decoder_step(ids[None], embeds, positions[:, None, :], cache, deep)[0]))
        for _ in range(n):
            pos = indexing.decode_positions(cache.length, delta, 1)
            token = int(np.argmax(pipe.decoder_step(np.asarray([[token]], dtype=np.int64), no_image,
                                                    pos[:, None, :], cache)[0]))
    path = backend.end()["decoder"]
    sink.put("decoder_prefill", op_breakdown(path, slice(3, 4)))
    sink.put("decoder_decode", op_breakdown(path, slice(4, None)))
    sink.put("decoder_prompt_tokens", len(ids))
    del pipe, backend
    if task.get("vision_page"):
        pipe, backend = open_profiling_pipeline(task["artifacts"], ("vision", "merger"), threads, prefix + "-vis")
        patches, grid, _ = page_patches(pipe.spec, task["vision_page"])
        for _ in range(1 + int(task.get("vision_runs", 2))):  # the first run is warm-up
            pipe.encode_images([patches], [grid])
        paths = backend.end()
        sink.put("vision", {"px": task["vision_page"], **op_breakdown(paths["vision"], slice(1, None))})


# ----------------------------------------------------------------------------- peers (``peers.py``)


def prompt_ids(checkpoint: Path, page: int, prompt_tokens: int) -> np.ndarray:
    """As many random text ids as our LLM prompt has tokens (page + text), from the regular vocabulary."""
    from qvl_export.loading.config import parse_model_config

    spec = parse_model_config(checkpoint)
    ids = llm_inputs(spec, page, prompt_tokens)[0]
    tok = spec.tokens
    limit = min(t for t in (tok.image_token_id, tok.video_token_id, tok.vision_start_token_id,
                            tok.vision_end_token_id) if t >= 0)
    return np.random.default_rng(1).integers(0, limit, len(ids)).astype(np.int64)


# ----------------------------------------------------------------------------- worker tasks


def _bytes(paths) -> int:
    return sum(p.stat().st_size for p in paths if p.is_file())


def task_text_checkpoint(task: dict, sink) -> None:
    t0 = time.perf_counter()
    from qvl_export.bench.peers import text_checkpoint

    out = text_checkpoint(Path(task["checkpoint"]), Path(task["out"]))
    sink.put("seconds", time.perf_counter() - t0)
    sink.put("bytes", _bytes(out.glob("*.safetensors")))


def task_genai_build(task: dict, sink) -> None:
    """onnxruntime-genai's builder command line, run in this process (so its peak RSS is this worker's)."""
    import runpy

    out = Path(task["out"])
    shutil.rmtree(out, ignore_errors=True)
    cache = out.parent / (out.name + "-cache")
    sys.argv = ["builder", "-i", str(task["checkpoint"]), "-o", str(out), "-p", task["precision"], "-e", "cpu",
                "-c", str(cache), "--extra_options", "hf_token=false"]
    t0 = time.perf_counter()
    _run_main(lambda: runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__"))
    sink.put("seconds", time.perf_counter() - t0)
    shutil.rmtree(cache, ignore_errors=True)
    config_path = out / "genai_config.json"
    config = json.loads(config_path.read_text())
    session = config["model"]["decoder"].setdefault("session_options", {})
    session["intra_op_num_threads"] = int(task["threads"])  # the same threads as every engine
    session["inter_op_num_threads"] = 1
    config_path.write_text(json.dumps(config, indent=1))
    sink.put("bytes", _bytes(out.glob("*.onnx*")))


def task_genai_llm(task: dict, sink) -> None:
    import onnxruntime_genai as og

    t0 = time.perf_counter()
    model = og.Model(task["model"])
    sink.put("load_s", time.perf_counter() - t0)
    sink.put("rss_after_load_mb", rss_mb())
    ids = prompt_ids(Path(task["checkpoint"]), task["page"], task["prompt_tokens"])
    sink.put("prompt_tokens_total", len(ids))

    def generate(steps: int) -> tuple[float, float]:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + steps + 1, do_sample=False)
        gen = og.Generator(model, params)
        t = time.perf_counter()
        gen.append_tokens(ids[None].astype(np.int32))
        t_prefill = time.perf_counter() - t
        t = time.perf_counter()
        for _ in range(steps):
            gen.generate_next_token()
        return t_prefill, time.perf_counter() - t

    _timed_generate(task, sink, generate)


def task_llama_convert(task: dict, sink) -> None:
    """llama.cpp's own converter (f32 GGUF), run in this process."""
    import runpy

    src = Path(task["source"])
    sys.path[:0] = [str(src), str(src / "gguf-py")]
    from conversion.base import TextModel  # llama.cpp's conversion package

    # the benchmark's small trained tokenizer has no registered pre-tokenizer hash; it is Qwen2's
    TextModel.get_vocab_base_pre = lambda self, tokenizer: "qwen2"
    out = Path(task["out"])
    out.unlink(missing_ok=True)
    sys.argv = ["convert_hf_to_gguf.py", str(task["checkpoint"]), "--outfile", str(out), "--outtype", "f32"]
    t0 = time.perf_counter()
    _run_main(lambda: runpy.run_path(str(src / "convert_hf_to_gguf.py"), run_name="__main__"))
    sink.put("seconds", time.perf_counter() - t0)
    sink.put("bytes", out.stat().st_size)


def _run_main(call) -> None:
    """Run a tool's ``__main__`` in this process; its ``sys.exit(0)`` is success."""
    try:
        call()
    except SystemExit as e:
        if e.code not in (None, 0):
            raise RuntimeError(f"exited with {e.code}") from None


def task_llama_quantize(task: dict, sink) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    from qvl_export.bench.peers import LLAMA_FTYPES

    params.ftype = LLAMA_FTYPES[task["type"]]
    params.nthread = int(task["threads"])
    out = Path(task["out"])
    out.unlink(missing_ok=True)
    t0 = time.perf_counter()
    rc = llama_cpp.llama_model_quantize(str(task["source"]).encode(), str(out).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize returned {rc}")
    sink.put("seconds", time.perf_counter() - t0)
    sink.put("bytes", out.stat().st_size)


def task_llama_llm(task: dict, sink) -> None:
    from llama_cpp import Llama

    ids = prompt_ids(Path(task["checkpoint"]), task["page"], task["prompt_tokens"])
    steps_max = int(task["decode_tokens"])
    t0 = time.perf_counter()
    llm = Llama(model_path=task["model"], n_ctx=len(ids) + steps_max + 16, n_batch=512, n_ubatch=512,
                n_threads=int(task["threads"]), n_threads_batch=int(task["threads"]), verbose=False)
    sink.put("load_s", time.perf_counter() - t0)
    sink.put("rss_after_load_mb", rss_mb())
    sink.put("prompt_tokens_total", len(ids))
    prompt = [int(i) for i in ids]

    import llama_cpp

    n_vocab = llm.n_vocab()

    def last_logits() -> np.ndarray:  # the last evaluated token's row (Llama keeps no scores without logits_all)
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))

    def generate(steps: int) -> tuple[float, float]:
        llm.reset()
        t = time.perf_counter()
        llm.eval(prompt)
        token = int(np.argmax(last_logits()))
        t_prefill = time.perf_counter() - t
        t = time.perf_counter()
        for _ in range(steps):
            llm.eval([token])
            token = int(np.argmax(last_logits()))
        return t_prefill, time.perf_counter() - t

    _timed_generate(task, sink, generate)


def _timed_generate(task: dict, sink, generate) -> None:
    """Our protocol: ``warmup`` short untimed runs, then ``repeats`` timed ones, medians."""
    for _ in range(int(task["warmup"])):
        generate(2)
    runs = [generate(int(task["decode_tokens"])) for _ in range(int(task["repeats"]))]
    sink.put("llm", _llm_figures([r[0] for r in runs], [r[1] for r in runs], int(task["decode_tokens"])))


PEER_TASKS = {
    "peer_text_checkpoint": task_text_checkpoint,
    "genai_build": task_genai_build,
    "genai_llm": task_genai_llm,
    "llama_convert": task_llama_convert,
    "llama_quantize": task_llama_quantize,
    "llama_llm": task_llama_llm,
}



TASKS = {
    "bandwidth": task_bandwidth,
    "checkpoint": task_checkpoint,
    "export": task_export,
    "torch_vision": task_torch_vision,
    "ort_vision": task_ort_vision,
    "torch_llm": task_torch_llm,
    "ort_llm": task_ort_llm,
    "ort_profile": task_ort_profile,
}


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    task = json.loads(Path(argv[0]).read_text())
    sink = Sink(Path(argv[1]))
    {**TASKS, **PEER_TASKS}[task["kind"]](task, sink)
    sink.put("done", True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
