"""The ONNX Runtime side of the benchmark: our artifacts through the thin runtime's own code path.

Timing goes through ``Pipeline.encode_images`` / ``Pipeline.decoder_step`` exactly as ``generate``
uses them; a thin wrapper around the backend's ``run`` splits each call into graph time (inside
``InferenceSession.run``) and host time (layout, rotary tables, gathers, feeds, casts). Each
worker opens only the parts it measures, so its peak RSS is theirs.

numpy + onnxruntime only, like the runtime.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from qvl_export.core.manifest import Manifest
from qvl_export.runtimes.pipeline import Pipeline


class TimedBackend:
    """Wraps a runtime backend; accumulates seconds spent in ``run`` per part."""

    def __init__(self, backend):
        self.inner = backend
        self.seconds: dict[str, float] = defaultdict(float)

    def run(self, part: str, feeds):
        t0 = time.perf_counter()
        out = self.inner.run(part, feeds)
        self.seconds[part] += time.perf_counter() - t0
        return out

    def take(self) -> float:
        """Seconds in graph runs since the last call (all parts), then reset."""
        total = sum(self.seconds.values())
        self.seconds.clear()
        return total

    def __getattr__(self, name):
        return getattr(self.inner, name)


class _ProfilingBackend:
    """One profiling InferenceSession per part, run as ``OrtBackend`` runs them (same session
    options, IOBinding with the KV buffers in place for a GroupQueryAttention decoder)."""

    def __init__(self, folder: Path, manifest: Manifest, parts: tuple[str, ...], threads: int, prefix: str):
        import onnxruntime as ort

        from qvl_export.runtimes.onnxrt import in_place_outputs, session_options

        self.sessions = {}
        for name in parts:
            part = manifest.parts[name]
            opts, disabled = session_options(part, threads, path=folder / part.file)  # as OrtBackend opens it
            opts.enable_profiling = True
            opts.profile_file_prefix = f"{prefix}-{name}"
            self.sessions[name] = ort.InferenceSession(str(folder / part.file), opts,
                                                       providers=["CPUExecutionProvider"], disabled_optimizers=disabled)
        self.output_names = {n: [o.name for o in s.get_outputs()] for n, s in self.sessions.items()}
        self.in_place = {n: in_place_outputs([i.name for i in s.get_inputs()], self.output_names[n])
                         for n, s in self.sessions.items()}

    def run(self, part, feeds):
        from qvl_export.runtimes.onnxrt import run_in_place

        if self.in_place[part]:
            return run_in_place(self.sessions[part], self.output_names[part], feeds, self.in_place[part])
        return self.sessions[part].run(self.output_names[part], feeds)

    def end(self) -> dict[str, str]:
        return {n: s.end_profiling() for n, s in self.sessions.items()}


def open_pipeline(folder: str | Path, parts: tuple[str, ...], threads: int) -> tuple[Pipeline, TimedBackend]:
    """A Pipeline whose backend holds sessions for ``parts`` only."""
    from qvl_export.runtimes.onnxrt import OrtBackend

    manifest = Manifest.read(folder)
    subset = dataclasses.replace(manifest, parts={k: v for k, v in manifest.parts.items() if k in parts})
    backend = TimedBackend(OrtBackend(folder, subset, threads=threads))
    return Pipeline(folder, backend, manifest), backend


def open_profiling_pipeline(folder: str | Path, parts: tuple[str, ...], threads: int,
                            prefix: str) -> tuple[Pipeline, _ProfilingBackend]:
    manifest = Manifest.read(folder)
    backend = _ProfilingBackend(Path(folder), manifest, parts, threads, prefix)
    return Pipeline(folder, backend, manifest), backend


def _node_times(profile_json: str | Path, runs: slice) -> tuple[dict, list[float]]:
    """``({(node, op): [ms in each selected run]}, [wall ms of each selected run])``."""
    events = json.loads(Path(profile_json).read_text())
    spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                   if e.get("cat") == "Session" and e.get("name") == "model_run")[runs]
    times: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0] * len(spans))
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        for i, (a, b) in enumerate(spans):
            if a <= e["ts"] <= b:
                key = (e["name"].removesuffix("_kernel_time"), e.get("args", {}).get("op_name", "?"))
                times[key][i] += e["dur"] / 1000.0
                break
    return times, [(b - a) / 1000.0 for a, b in spans]


def op_breakdown(profile_json: str | Path, runs: slice = slice(None), top_nodes: int = 12) -> dict:
    """Kernel time per op type and the slowest nodes, over the selected session runs.

    Each node's time is its median over the runs (a node preempted in one run by another process
    does not dominate), op types sum their nodes' medians. Returns ``{"runs", "wall_ms_per_run",
    "kernel_ms_per_run", "ops": [{"op", "ms_per_run", "share", "nodes"}], "top_nodes": [...]}``.
    """
    import statistics

    times, walls = _node_times(profile_json, runs)
    if not walls:
        return {"runs": 0, "wall_ms_per_run": 0.0, "kernel_ms_per_run": 0.0, "ops": [], "top_nodes": []}
    node_ms = {key: statistics.median(v) for key, v in times.items()}
    per_op: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    for (_, op), ms in node_ms.items():
        per_op[op] += ms
        count[op] += 1
    total = sum(per_op.values())
    ops = [{"op": op, "ms_per_run": ms, "share": ms / total if total else 0.0, "nodes": count[op]}
           for op, ms in sorted(per_op.items(), key=lambda kv: -kv[1])]
    top = [{"node": k[0], "op": k[1], "ms_per_run": v}
           for k, v in sorted(node_ms.items(), key=lambda kv: -kv[1])[:top_nodes]]
    return {"runs": len(walls), "wall_ms_per_run": statistics.median(walls), "kernel_ms_per_run": total,
            "ops": ops, "top_nodes": top}


def decoder_weight_bytes(decoder_onnx: str | Path) -> dict:
    """Bytes a decode step must stream from memory for the weights of ``decoder.onnx``.

    Rule: every initializer counts in full, except one consumed only as the data input of
    ``Gather`` (the token embedding table when untied): a decode step reads one row of it, so it
    counts as 0. A tied table is also the lm_head's weight (read in full) and so counts in full;
    a transposed copy made for the lm_head counts as what it is, a second table.
    """
    import onnx

    model = onnx.load(str(decoder_onnx), load_external_data=False)
    graph = model.graph
    uses: dict[str, list[tuple[str, int]]] = defaultdict(list)

    def scan(g):
        for node in g.node:
            for i, name in enumerate(node.input):
                uses[name].append((node.op_type, i))
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    scan(attr.g)
                for sub in attr.graphs:
                    scan(sub)

    scan(graph)
    total = gather_only = 0
    largest = []
    for init in graph.initializer:
        size = int(np.prod(init.dims, dtype=np.int64)) * np.dtype(
            onnx.helper.tensor_dtype_to_np_dtype(init.data_type)).itemsize
        consumers = uses.get(init.name, [])
        if consumers and all(op == "Gather" and i == 0 for op, i in consumers):
            gather_only += size
            continue
        total += size
        largest.append((size, init.name, [op for op, _ in consumers]))
    largest.sort(reverse=True)
    return {"bytes_per_token": total, "gather_only_bytes": gather_only,
            "largest": [{"name": n, "bytes": s, "consumers": c} for s, n, c in largest[:4]]}
