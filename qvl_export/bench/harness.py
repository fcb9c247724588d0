"""``qvl-export bench``: PyTorch eager vs our ONNX Runtime artifacts, side by side, same threads.

One run: make a random-weight checkpoint at the real widths (``configs.py``), build the artifacts
(fused window attention, and for Qwen2.5-VL the dense S x S mask baseline too), then measure every
engine and phase in its own worker process (``worker.py``) so each peak RSS is its own:

- vision encoder (ViT + merger) on document pages of P x P pixels, per engine, and on a video clip
  (``DEFAULT_VIDEO``: 16 frames of 448 x 448, temporal patches through the runtime's video path);
- LLM prefill of one page + ``prompt_tokens`` text tokens, decode tokens/s over ``decode_tokens``;
- export time and peak RSS of each build;
- the machine's memory bandwidth, the decode roofline (bandwidth / weight bytes per token) and the
  fraction of it each engine reaches;
- onnxruntime's profile of our decoder (prefill and decode steps) and vision graph.

Workers run one at a time (``jobs=1``) so they never compete for the cores; the harness also
records how much CPU *other* processes used while each worker ran (``other_cpu_cores``), since a
shared machine skews timings. A memory guard kills a worker when the machine's available memory
falls below ``memory_reserve_mb``, and whatever that worker measured before is kept; what it did
not reach is reported as skipped with the reason, never as a crash.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from qvl_export.bench.configs import bench_model
from qvl_export.bench.runs import CONTENTION, WorkerRun
from qvl_export.core.errors import QvlError

log = logging.getLogger(__name__)

DEFAULT_PIXELS = (448, 896, 1344)
DEFAULT_VIDEO = (16, 448)  # (frames, side) of the clip whose vision time and visual tokens are measured
# Quantized builds the harness can time here: int8 runs real integer kernels on onnxruntime CPU
# (fp8 runs as fake quantization on CPU, fp16/bf16 lack CPU kernels: their timings would mislead).
# precision option of each: int4 is decoder weight-only (its vision part is our fp32 one, not re-timed)
# --quantized name -> build options; int4-b128: the decoder's int4 weights in blocks of 128 (--int4-block)
QUANTIZED_VARIANTS = {"int8": {"precision": "int8"}, "int4": {"precision": "decoder=int4"},
                      "int4-b128": {"precision": "decoder=int4", "int4_block": 128}}


@dataclass
class _Context:
    work: Path
    threads: int
    timeout_s: float
    memory_reserve_mb: float
    say: Callable[[str], None]
    idle_wait_s: float = 0.0
    retries: int = 0
    runs: dict[str, WorkerRun] = field(default_factory=dict)


def _tail(path: Path, lines: int = 12) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _wait_for_idle(ctx: _Context) -> float:
    """Wait (up to ``ctx.idle_wait_s``) until other processes use < CONTENTION cores for 3 s in a row."""
    import psutil

    if ctx.idle_wait_s <= 0:
        return 0.0
    t0 = time.perf_counter()
    quiet = 0
    ncpu = psutil.cpu_count() or 1
    told = False
    while quiet < 3 and time.perf_counter() - t0 < ctx.idle_wait_s:
        busy = psutil.cpu_percent(interval=1.0) / 100.0 * ncpu
        quiet = quiet + 1 if busy < CONTENTION else 0
        if not quiet and not told:
            ctx.say(f"waiting for other processes to go quiet ({busy:.2f} cores busy)")
            told = True
    return time.perf_counter() - t0


def _run_worker(ctx: _Context, name: str, task: dict, reuse: bool = False, timing: bool = True) -> WorkerRun:
    """Run ``task`` in a worker. For a ``timing`` worker, first wait for the machine to go quiet,
    and when other processes competed for the CPU meanwhile, run it again (``ctx.retries`` times
    at most); the checkpoint and exports are neither waited for nor repeated."""
    run = None
    contended = max(0, ctx.retries) if timing else 0
    squeezed = 1  # one more try when other processes' memory, not the worker's, set off the guard
    attempt = 0
    while True:
        waited = _wait_for_idle(ctx) if timing else 0.0
        run = _run_worker_once(ctx, name, task, reuse and attempt == 0)
        attempt += 1
        run.waited_s, run.attempts = waited, attempt
        if run.cached:
            break
        if run.memory_guard and squeezed and run.max_rss_mb < 0.5 * _used_mb():
            squeezed -= 1
            _wait_for_memory(ctx, run.max_rss_mb)
            continue
        if run.ok and run.other_cpu_cores > CONTENTION and contended:
            contended -= 1
            continue
        break
    ctx.runs[name] = run
    return run


def _used_mb() -> float:
    import psutil

    vm = psutil.virtual_memory()
    return (vm.total - vm.available) / 2**20


def _wait_for_memory(ctx: _Context, need_mb: float) -> None:
    """Wait (up to ``max(ctx.idle_wait_s, 60)`` s) until ``need_mb`` + twice the reserve is available."""
    import psutil

    t0 = time.perf_counter()
    want = need_mb + 2 * ctx.memory_reserve_mb
    ctx.say(f"other processes hold the memory; waiting for {want:.0f} MiB to be available")
    while psutil.virtual_memory().available / 2**20 < want and time.perf_counter() - t0 < max(ctx.idle_wait_s, 60):
        time.sleep(2.0)


def _run_worker_once(ctx: _Context, name: str, task: dict, reuse: bool = False) -> WorkerRun:
    """Run ``task`` in ``python -m qvl_export.bench.worker``, guarding memory and time."""
    import psutil

    tasks, results, logs = (ctx.work / d for d in ("tasks", "results", "logs"))
    for d in (tasks, results, logs):
        d.mkdir(parents=True, exist_ok=True)
    task_path, result_path, log_path = tasks / f"{name}.json", results / f"{name}.json", logs / f"{name}.log"
    if reuse and result_path.exists() and task_path.exists() and json.loads(task_path.read_text()) == task:
        result = json.loads(result_path.read_text())
        if result.get("done"):
            ctx.say(f"{name}: reusing the earlier result")
            return WorkerRun(name, result, 0, 0.0, cached=True)
    task_path.write_text(json.dumps(task, indent=1))
    result_path.unlink(missing_ok=True)
    env = dict(os.environ)
    threads = str(ctx.threads)
    env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, OPENBLAS_NUM_THREADS=threads,
               TOKENIZERS_PARALLELISM="false")
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-m", "qvl_export.bench.worker", str(task_path), str(result_path)]
    ctx.say(f"{name}: running")
    t0 = time.perf_counter()
    error = None
    other, samples, max_rss = 0.0, 0, 0.0
    ncpu = psutil.cpu_count() or 1
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env)
        try:
            child = psutil.Process(proc.pid)
            psutil.cpu_percent(None)
            child.cpu_percent(None)
            last = time.perf_counter()
            while proc.poll() is None:
                time.sleep(0.2)
                try:
                    max_rss = max(max_rss, child.memory_info().rss / 2**20)
                except psutil.Error:
                    pass
                available = psutil.virtual_memory().available / 2**20
                if available < ctx.memory_reserve_mb:
                    proc.kill()
                    error = (f"stopped by the memory guard: available memory fell to {available:.0f} MiB "
                             f"(reserve {ctx.memory_reserve_mb:.0f} MiB) with the worker at {max_rss:.0f} MiB RSS")
                    break
                if time.perf_counter() - t0 > ctx.timeout_s:
                    proc.kill()
                    error = f"stopped after the {ctx.timeout_s:.0f} s time limit"
                    break
                if time.perf_counter() - last >= 1.0:
                    try:
                        mine = child.cpu_percent(None) / 100.0  # cores
                    except psutil.Error:
                        mine = 0.0
                    total = psutil.cpu_percent(None) / 100.0 * ncpu
                    other += max(0.0, total - mine)
                    samples += 1
                    last = time.perf_counter()
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    wall = time.perf_counter() - t0
    result = {}
    if result_path.exists():
        try:
            result = json.loads(result_path.read_text())
        except ValueError:
            result = {}
    if error is None and proc.returncode != 0:
        error = f"worker exited with code {proc.returncode}: {_tail(log_path)}"
    run = WorkerRun(name, result, proc.returncode, wall, error, other / samples if samples else 0.0, max_rss,
                    memory_guard=error is not None and error.startswith("stopped by the memory guard"))
    ctx.say(f"{name}: {'done' if run.ok else 'FAILED: ' + error.splitlines()[0]} in {wall:.1f} s"
            + (f" (other processes used {run.other_cpu_cores:.2f} cores meanwhile)" if run.other_cpu_cores > 0.25
               else ""))
    return run


def _parallel(ctx: _Context, jobs: int, calls: list[tuple[str, dict]], reuse: bool = False,
              timing: bool = True) -> None:
    if jobs <= 1:
        for name, task in calls:
            _run_worker(ctx, name, task, reuse, timing)
        return
    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(lambda c: _run_worker(ctx, c[0], c[1], reuse, timing), calls))


def run_bench(model: str, layers: int | None = None, threads: int = 2, out_dir: str | Path = "bench-out",
              pixels: tuple[int, ...] = DEFAULT_PIXELS, decode_tokens: int = 64, prompt_tokens: int = 32,
              skip_torch: bool = False, *, repeats: int = 3, warmup: int = 1, prefill_pixels: int | None = None,
              profile: bool = True, bandwidth_mib: int = 1024, reuse: bool = False, keep_work: bool = False,
              jobs: int = 1, memory_reserve_mb: float = 1024.0, timeout_s: float = 3600.0,
              idle_wait_s: float = 0.0, retries: int = 0, quantized: tuple[str, ...] = (),
              calib_limit: int | None = 4, peers: tuple[str, ...] = (), llama_cpp_src: str | None = None,
              video: tuple[int, int] | None = DEFAULT_VIDEO, progress: Callable[[str], None] | None = None) -> dict:
    """Benchmark ``model`` (see ``configs.MODELS``) and write ``bench.json``, ``table.txt`` and
    ``encoder_time_vs_pixels.png`` into ``out_dir``. Returns the report dict.

    ``layers`` cuts vision and LLM depth (None: full depth). ``pixels``: square page sides for the
    vision figures (multiples of 28 give exactly (P/14)^2 patches). ``prefill_pixels``: the page of
    the prefill / decode prompt (default 896 if measured, else the largest page). ``repeats``
    timed runs after ``warmup`` untimed ones; figures are medians. ``reuse`` keeps and reuses the
    checkpoint and artifacts of an earlier identical run in ``out_dir/work`` (implies
    ``keep_work``); otherwise they are deleted at the end. ``jobs > 1`` runs independent workers
    at once: only for smoke tests, the timings then compete for the cores. ``quantized``: extra
    builds of our artifacts at these precisions (``int8``), calibrated on ``calib_limit`` built-in
    documents, measured like the fp32 ones (vision, prefill, decode, bytes, peak RSS) and reported
    against our fp32 build. ``peers`` (``peers.PEERS``): onnxruntime-genai and llama.cpp build the
    same checkpoint's LLM with their own tools and are timed with the same protocol (``peers.py``).
    ``video``: (frames, side) of a clip timed on the vision encoder like the pages (None: skipped).
    On a shared machine,
    ``idle_wait_s`` waits (at most that long) for other processes to go quiet before each worker,
    and a worker during which they used more than 0.25 cores is run again up to ``retries`` times.
    """
    from qvl_export.bench import report

    spec = bench_model(model, layers)
    out = Path(out_dir)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    pixels = tuple(sorted(int(p) for p in pixels))
    if not pixels:
        raise QvlError("--pixels must name at least one page size, e.g. 448,896.")
    prefill_px = int(prefill_pixels or (896 if 896 in pixels else pixels[-1]))
    say = progress or (lambda msg: log.info("%s", msg))
    ctx = _Context(work, threads, timeout_s, memory_reserve_mb, say, idle_wait_s, retries)
    windowed = spec.dims.family == "qwen2_5_vl"
    unknown = sorted(set(quantized) - set(QUANTIZED_VARIANTS))
    if unknown:
        raise QvlError(f"--quantized {','.join(unknown)} cannot be timed on onnxruntime CPU (fp8 runs as fake "
                       f"quantization, fp16/bf16 have no CPU kernels); choose from {', '.join(QUANTIZED_VARIANTS)}.")
    variants = (("fused", "dense") if windowed else ("fused",)) + tuple(dict.fromkeys(quantized))
    keep = keep_work or reuse
    started = time.time()
    load_before = os.getloadavg()

    code = _code_fingerprint()  # a reused checkpoint / build must come from the same code
    checkpoint = work / "checkpoint"
    artifacts = {v: work / f"artifacts-{v}" for v in variants}
    common = {"threads": threads, "warmup": warmup, "repeats": repeats}
    clip = {"video": [int(video[0]), int(video[1])]} if video else {}

    _run_worker(ctx, "bandwidth", {"kind": "bandwidth", "mib": bandwidth_mib, "threads": threads})
    made = _run_worker(ctx, "checkpoint", {"kind": "checkpoint", "model": model, "layers": layers,
                                           "out": str(checkpoint), "code": code}, reuse and (checkpoint / "config.json").exists(),
                       timing=False)
    if made.ok:
        _parallel(ctx, jobs, [(f"export-{v}", {"kind": "export", "checkpoint": str(checkpoint),
                                               "out": str(artifacts[v]), "model": model, "layers": layers,
                                               "code": code, **_variant_options(v, calib_limit)})
                              for v in variants], reuse, timing=False)
    built = {v: made.ok and ctx.runs[f"export-{v}"].ok for v in variants}

    calls = []
    if made.ok and not skip_torch:
        calls.append(("torch-vision", {"kind": "torch_vision", "checkpoint": str(checkpoint),
                                       "pages": list(pixels), **clip, **common}))
    for v in variants:
        if built[v] and QUANTIZED_VARIANTS.get(v, {}).get("precision", v) == v:  # layouts and whole-model precisions
            calls.append((f"ort-vision-{v}", {"kind": "ort_vision", "artifacts": str(artifacts[v]),
                                              "pages": list(pixels), **clip, **common}))
    llm = {"page": prefill_px, "prompt_tokens": prompt_tokens, "decode_tokens": decode_tokens, **common}
    if made.ok and not skip_torch:
        calls.append(("torch-llm", {"kind": "torch_llm", "checkpoint": str(checkpoint), **llm}))
    if built["fused"]:
        calls.append(("ort-llm", {"kind": "ort_llm", "artifacts": str(artifacts["fused"]), **llm}))
    for q in quantized:
        if built[q]:
            calls.append((f"ort-llm-{q}", {"kind": "ort_llm", "artifacts": str(artifacts[q]), **llm}))
    peer_builds, peer_timings, peer_skipped = [], [], {}
    if made.ok and peers:
        from qvl_export.bench import peers as peer_mod

        peer_builds, peer_timings, peer_skipped = peer_mod.plan(tuple(peers), checkpoint, work, llm, threads,
                                                                llama_cpp_src)
        _parallel(ctx, jobs, peer_builds, reuse, timing=False)
    _parallel(ctx, jobs, calls + [c for c in peer_timings if ctx.runs.get("peer-text") and ctx.runs["peer-text"].ok])
    if profile and built["fused"]:
        _run_worker(ctx, "ort-profile", {"kind": "ort_profile", "artifacts": str(artifacts["fused"]),
                                         "page": prefill_px, "prompt_tokens": prompt_tokens,
                                         "decode_steps": min(decode_tokens, 16), "threads": threads,
                                         "vision_page": prefill_px})

    weights = None
    if built["fused"]:
        from qvl_export.bench.ort_engine import decoder_weight_bytes

        weights = decoder_weight_bytes(artifacts["fused"] / "decoder.onnx")

    meta = {
        "model": model, "layers": layers, "threads": threads, "pixels": list(pixels),
        "video": clip.get("video"),
        "prefill_pixels": prefill_px, "prompt_tokens": prompt_tokens, "decode_tokens": decode_tokens,
        "repeats": repeats, "warmup": warmup, "skip_torch": skip_torch, "variants": list(variants),
        "quantized": list(dict.fromkeys(quantized)), "calib_limit": calib_limit, "peers": list(peers),
        "peers_skipped": peer_skipped,
        "config": spec.describe(), "machine": _machine(load_before), "versions": _versions(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "wall_s": time.time() - started,
    }
    result = report.assemble(meta, ctx.runs, weights)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(result, indent=1))
    text = report.table(result)
    (out / "table.txt").write_text(text + "\n")
    report.plot(result, out / "encoder_time_vs_pixels.png")
    if not keep:
        for path in [checkpoint, *artifacts.values(), *(Path(t["out"]) for _, t in peer_builds)]:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
    return result


def _variant_options(variant: str, calib_limit: int | None) -> dict:
    """Build options of an artifacts variant: a window-attention layout, or a quantized precision
    (fused windows)."""
    if variant in QUANTIZED_VARIANTS:
        return {"window_attention": "fused", **QUANTIZED_VARIANTS[variant], "calib_limit": calib_limit}
    return {"window_attention": variant}


def _code_fingerprint() -> str:
    """sha256 over the package's source files outside ``bench/`` (what a checkpoint or build depends on)."""
    import hashlib

    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        if "bench" not in path.relative_to(root).parts:
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


ISA_FLAGS = frozenset({"avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile",
                       "amx_int8", "amx_bf16"})


def _machine(load_before: tuple[float, float, float]) -> dict:
    import platform

    import psutil

    first: dict[str, str] = {}  # /proc/cpuinfo field -> its value for the first processor
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            first.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    # the vector extensions the kernels choose from (the int8 / fp32 figures differ by them); AMX as
    # advertised, which is not always enabled
    return {"cpu": first.get("model name") or platform.processor(),
            "isa": sorted(set(first.get("flags", "").split()) & ISA_FLAGS),
            "logical_cpus": psutil.cpu_count(), "physical_cpus": psutil.cpu_count(logical=False),
            "memory_gib": psutil.virtual_memory().total / 2**30, "loadavg_before": list(load_before),
            "loadavg_after": list(os.getloadavg()), "python": platform.python_version()}


def _versions() -> dict:
    from qvl_export.building.versions import library_versions

    return library_versions()
