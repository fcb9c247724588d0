"""``qvl-export bench --serve ART``: a bounded load test of the server on loopback.

For each server setting (batch 1, then continuous batching with ``max_batch`` rows) a fresh
``qvl-export serve`` process is started on 127.0.0.1 (a free port, ``--threads`` onnxruntime threads)
and driven by K client threads that send ``requests`` streamed chat completions in all, a fixed
mix (the bundled invoice page as a data URL, text-only prompts) at temperature 0, so both settings
generate the same tokens. Measured per setting, on the client side: requests/s and generated
tokens/s over the wall time of the run, p50/p95 request latency, p50/p95 time to the first token;
and from the server's /metrics: the mean rows per decode step. The server runs in its own process
so the clients' Python does not share its interpreter lock. Clients use the standard library's
http.client (no extra dependency); every request has a timeout and the run stops at ``requests``.
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from qvl_export.core.errors import QvlError

log = logging.getLogger(__name__)

REQUEST_TIMEOUT_S = 300.0
START_TIMEOUT_S = 180.0


@dataclass
class LoadResult:
    setting: str
    max_batch: int
    clients: int
    requests: int
    errors: int
    wall_s: float
    requests_per_s: float
    tokens: int  # generated (completion) tokens, all requests
    tokens_per_s: float  # aggregate: tokens / wall
    latency_p50_s: float
    latency_p95_s: float
    ttft_p50_s: float
    ttft_p95_s: float
    server_ttft_s: float  # mean, from submission to the first token chosen (server metrics)
    mean_batch: float  # rows per decode step (server metrics)
    latencies_s: list[float] = field(default_factory=list, repr=False)


def _percentile(values: list[float], q: float) -> float:
    """numpy's linear-interpolation percentile (q in 0..1); nan when nothing was measured."""
    import numpy as np

    return float(np.percentile(values, 100 * q)) if values else float("nan")


def request_mix(model: str, max_tokens: int) -> list[dict]:
    """The fixed request bodies the clients cycle through: the invoice page with two questions, two text prompts."""
    page = Path(__file__).resolve().parents[1] / "demo" / "samples" / "invoice.png"  # the bundled sample page
    url = "data:image/png;base64," + base64.b64encode(page.read_bytes()).decode()

    def body(content):
        return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
                "temperature": 0, "stream": True}

    return [body([{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is the total?"}]),
            body("Write a short story about a lighthouse keeper."),
            body([{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Who is the vendor?"}]),
            body("List the planets of the solar system.")]


def stream_request(port: int, body: dict) -> tuple[float, float, int]:
    """(latency s, time to first token s, completion tokens) of one streamed request; raises on an error."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT_S)
    start = time.perf_counter()
    first = None
    tokens = 0
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(dict(body, stream_options={"include_usage": True})),
                     {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise QvlError(f"the server answered {resp.status}: {resp.read()[:300]!r}")
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            if data == "[DONE]":
                break
            event = json.loads(data)
            if "error" in event:
                raise QvlError(f"the stream failed: {event['error']['message']}")
            if first is None and event.get("choices") and event["choices"][0]["delta"].get("content"):
                first = time.perf_counter()
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    finally:
        conn.close()
    end = time.perf_counter()
    return end - start, (first or end) - start, tokens


def free_port() -> int:
    """A port free on 127.0.0.1 now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(port: int, path: str) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


class ServerProcess:
    """``qvl-export serve`` in a child process on a free loopback port; stopped (terminate, then kill) on exit."""

    def __init__(self, artifacts: Path, max_batch: int, threads: int, context: int, model_name: str):
        self.port = free_port()
        cmd = [sys.executable, "-m", "qvl_export.cli", "serve", str(artifacts), "--host", "127.0.0.1", "--port",
               str(self.port), "--max-batch", str(max_batch), "--threads", str(threads), "--context", str(context),
               "--model-name", model_name, "--skip-verify"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                raise QvlError(f"the server did not start: {(self.proc.stderr.read() or '').strip()[-400:]}")
            try:
                if _get(self.port, "/health")[0] == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise QvlError(f"the server did not answer /health within {START_TIMEOUT_S:g} s.")
            time.sleep(0.2)

    def metrics(self) -> str:
        return _get(self.port, "/metrics")[1]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def drive(port: int, bodies: list[dict], clients: int, requests: int) -> tuple[list[tuple[float, float, int]], int,
                                                                                float]:
    """``requests`` requests from ``clients`` threads (each takes the next body of the mix until all are sent):
    (per-request results, errors, wall seconds)."""
    lock = threading.Lock()
    counter = iter(range(requests))
    results, errors = [], [0]

    def client():
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            try:
                out = stream_request(port, bodies[i % len(bodies)])
            except (OSError, QvlError, ValueError) as err:
                log.warning("request %d failed: %s", i, err)
                with lock:
                    errors[0] += 1
                continue
            with lock:
                results.append(out)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(REQUEST_TIMEOUT_S * requests)
    return results, errors[0], time.perf_counter() - start


def _measure(server: ServerProcess, label: str, batch: int, bodies: list[dict], clients: int,
             requests: int) -> LoadResult:
    before = server.metrics()
    results, errors, wall = drive(server.port, bodies, clients, requests)
    after = server.metrics()

    def delta(name: str) -> float:
        return _metric(after, name) - _metric(before, name)

    steps, rows = delta("qvl_decode_steps_total"), delta("qvl_decode_batch_size_sum")
    ttft_count = delta("qvl_time_to_first_token_seconds_count")
    latencies = [r[0] for r in results]
    ttfts = [r[1] for r in results]
    tokens = sum(r[2] for r in results)
    return LoadResult(label, batch, clients, len(results), errors, wall, len(results) / wall, tokens, tokens / wall,
                      _percentile(latencies, 0.5), _percentile(latencies, 0.95), _percentile(ttfts, 0.5),
                      _percentile(ttfts, 0.95),
                      delta("qvl_time_to_first_token_seconds_sum") / ttft_count if ttft_count else float("nan"),
                      rows / steps if steps else 0.0, latencies)


def run_load_test(artifacts: str | Path, clients: int = 4, requests: int = 32, max_tokens: int = 64,
                  max_batch: int | None = None, threads: int = 2, context: int = 1024, warmup: int = 2,
                  progress=None) -> list[LoadResult]:
    """Three figures on the same requests: one client on the batching server, ``clients`` clients on a batch-1
    server, ``clients`` clients on the batching server (``max_batch`` rows, ``clients`` by default)."""
    artifacts = Path(artifacts)
    if not (artifacts / "manifest.json").is_file():
        raise QvlError(f"{artifacts} is not an artifacts folder (no manifest.json); pass one made by "
                       "'qvl-export build'.")
    if clients < 1 or requests < 1 or max_tokens < 1:
        raise QvlError("--clients, --requests and --max-tokens must be at least 1.")
    say = progress or (lambda msg: None)
    batch = max_batch or clients
    name = "bench"
    bodies = request_mix(name, max_tokens)
    out = []
    for server_batch, runs in ((1, [("batch 1", clients)]), (batch, [("1 client", 1), ("continuous", clients)])):
        say(f"starting the server (max batch {server_batch})")
        with ServerProcess(artifacts, server_batch, threads, context, name) as server:
            drive(server.port, bodies, 1, warmup)  # sessions warm, first-call costs out of the figures
            for label, k in runs:
                say(f"{label}: {requests} requests from {k} client(s), max batch {server_batch}")
                out.append(_measure(server, label, server_batch, bodies, k, requests))
    return [out[1], out[0], out[2]]  # 1 client, batch 1, continuous


def table(results: list[LoadResult]) -> str:
    head = (f"{'setting':<12} {'batch':>5} {'clients':>7} {'req':>4} {'err':>3} {'req/s':>7} {'tok/s':>8} "
            f"{'p50 s':>7} {'p95 s':>7} {'ttft50':>7} {'ttft95':>7} {'srv ttft':>8} {'rows/step':>9}")
    lines = [head]
    for r in results:
        lines.append(f"{r.setting:<12} {r.max_batch:>5} {r.clients:>7} {r.requests:>4} {r.errors:>3} "
                     f"{r.requests_per_s:>7.2f} {r.tokens_per_s:>8.1f} {r.latency_p50_s:>7.3f} {r.latency_p95_s:>7.3f} "
                     f"{r.ttft_p50_s:>7.3f} {r.ttft_p95_s:>7.3f} {r.server_ttft_s:>8.3f} {r.mean_batch:>9.2f}")
    by = {r.setting: r for r in results}
    cont = by.get("continuous")
    for base in ("1 client", "batch 1"):
        if cont and base in by and by[base].tokens_per_s > 0:
            lines.append(f"continuous / {base}: {cont.tokens_per_s / by[base].tokens_per_s:.2f}x tokens/s")
    lines.append("ttft: client side, to the first text delta; srv ttft: server side mean, submission to the first "
                 "token chosen")
    return "\n".join(lines)


def report(results: list[LoadResult], out_dir: str | Path) -> Path:
    """``serve.json`` in ``out_dir``: every figure, the machine's load average at the end."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "serve.json"
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    payload = {"results": [{k: v for k, v in asdict(r).items() if k != "latencies_s"} for r in results],
               "cpus": os.cpu_count(), "loadavg": load}
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return path
