"""The scheduler: one thread owns the Pipeline and runs the continuous batch; requests queue to it.

HTTP handlers prepare a request (images decoded and checked, the prompt rendered and tokenized, the
context checked) in a worker thread, then ``submit`` a ``Job``; the scheduler thread admits queued jobs
into free rows (each prefilled on its own) and runs one batched decode step after another
(``runtimes/batching.py``). Tokens go back to the handler's event loop as events on the job's
``asyncio.Queue``: ``("text", piece)``, then ``("done", Generation)`` or ``("error", (status, line))``.

A request that fails (bad input found at admission, or an internal error in its prefill) fails alone:
its job gets an error event and the other rows keep running. A failed decode step fails the rows of
that step (their caches are in an unknown state) and the scheduler goes on with the queue.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import logging
import threading
import time
from dataclasses import dataclass, field

from qvl_export.core.errors import QvlError
from qvl_export.runtimes.batching import BatchDecoder, Request, Row
from qvl_export.runtimes.pipeline import Pipeline

log = logging.getLogger(__name__)


class QueueFull(QvlError):
    """More requests are waiting than ``max_queue``: the client should retry later (HTTP 503)."""


@dataclass
class Job:
    """One request on its way through the scheduler; events go to ``events`` on ``loop``."""

    request: Request
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    submitted: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    cancelled: bool = False  # set by the handler when its client goes away

    def emit(self, kind: str, value) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the handler's loop is closed (server shutting down)
            self.cancelled = True


def internal_error(err: BaseException) -> str:
    """An unexpected failure as one line for the client (the traceback goes to the server's log only)."""
    first = (str(err).strip().splitlines() or [""])[0][:300]
    return f"internal error: {type(err).__name__}: {first}" if first else f"internal error: {type(err).__name__}"


class Metrics:
    """Counters and gauges of the server, rendered in the Prometheus text format (version 0.0.4).

    Hand-written rather than prometheus_client: a dozen series, and a registry per server instance (tests
    run several servers in one process, which the client library's global registry does not like)."""

    BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
    WINDOW_S = 10.0  # tokens/s over the last 10 seconds

    def __init__(self):
        self.lock = threading.Lock()
        self.requests = collections.Counter()  # outcome -> count: ok, bad_request, rejected, error, cancelled
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.steps = 0
        self.step_rows = 0  # sum of the batch sizes of all steps
        self.batch_hist = [0] * (len(self.BATCH_BUCKETS) + 1)
        self.batch_size = 0
        self.batch_peak = 0
        self.running = 0
        self.queued = 0
        self.latency_sum = self.latency_count = 0.0
        self.ttft_sum = self.ttft_count = 0.0
        self.recent: collections.deque[tuple[float, int]] = collections.deque()  # (time, tokens) per step
        self.start = time.perf_counter()

    def count(self, outcome: str) -> None:
        with self.lock:
            self.requests[outcome] += 1

    def step(self, rows: int, now: float) -> None:
        with self.lock:
            self.steps += 1
            self.step_rows += rows
            self.batch_size = rows
            self.batch_peak = max(self.batch_peak, rows)
            self.batch_hist[bisect.bisect_left(self.BATCH_BUCKETS, rows)] += 1
            self._tokens(rows, now)

    def _tokens(self, n: int, now: float) -> None:
        self.generated_tokens += n
        self.recent.append((now, n))
        while self.recent and self.recent[0][0] < now - self.WINDOW_S:
            self.recent.popleft()

    def admitted(self, prompt_tokens: int, now: float) -> None:
        with self.lock:
            self.prompt_tokens += prompt_tokens
            self._tokens(1, now)  # the prefill's token

    def finished(self, latency_s: float, ttft_s: float | None) -> None:
        with self.lock:
            self.requests["ok"] += 1
            self.latency_sum += latency_s
            self.latency_count += 1
            if ttft_s is not None:
                self.ttft_sum += ttft_s
                self.ttft_count += 1

    def tokens_per_s(self, now: float) -> float:
        with self.lock:
            while self.recent and self.recent[0][0] < now - self.WINDOW_S:
                self.recent.popleft()
            span = min(self.WINDOW_S, now - self.start)  # a server up for less than the window: its uptime
            return sum(n for _, n in self.recent) / span if span > 0 else 0.0

    def render(self) -> str:
        now = time.perf_counter()
        rate = self.tokens_per_s(now)
        with self.lock:
            lines = ["# HELP qvl_requests_total Chat completion requests by outcome.",
                     "# TYPE qvl_requests_total counter"]
            for outcome in ("ok", "bad_request", "rejected", "error", "cancelled"):
                lines.append(f'qvl_requests_total{{outcome="{outcome}"}} {self.requests[outcome]}')
            series = [
                ("qvl_prompt_tokens_total", "counter", "Prompt tokens prefilled.", self.prompt_tokens),
                ("qvl_generated_tokens_total", "counter", "Tokens generated.", self.generated_tokens),
                ("qvl_generation_tokens_per_second", "gauge",
                 f"Tokens generated per second over the last {self.WINDOW_S:g} s (or the uptime).", round(rate, 3)),
                ("qvl_queue_length", "gauge", "Requests waiting for a row.", self.queued),
                ("qvl_requests_running", "gauge", "Requests decoding in the batch.", self.running),
                ("qvl_batch_size", "gauge", "Rows in the last decode step.", self.batch_size),
                ("qvl_batch_size_peak", "gauge", "Most rows in one decode step since start.", self.batch_peak),
                ("qvl_decode_steps_total", "counter", "Batched decode steps run.", self.steps),
            ]
            for name, kind, text, value in series:
                lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", f"{name} {value}"]
            lines += ["# HELP qvl_decode_batch_size Rows per decode step.", "# TYPE qvl_decode_batch_size histogram"]
            total = 0
            for bound, n in zip(self.BATCH_BUCKETS, self.batch_hist):
                total += n
                lines.append(f'qvl_decode_batch_size_bucket{{le="{bound}"}} {total}')
            lines += [f'qvl_decode_batch_size_bucket{{le="+Inf"}} {self.steps}',
                      f"qvl_decode_batch_size_sum {self.step_rows}", f"qvl_decode_batch_size_count {self.steps}"]
            for name, text, s, c in (("qvl_request_latency_seconds", "Time from submission to the last token.",
                                      self.latency_sum, self.latency_count),
                                     ("qvl_time_to_first_token_seconds", "Time from submission to the first token.",
                                      self.ttft_sum, self.ttft_count)):
                lines += [f"# HELP {name} {text}", f"# TYPE {name} summary", f"{name}_sum {s:.6f}",
                          f"{name}_count {int(c)}"]
        return "\n".join(lines) + "\n"


class Scheduler:
    """Owns ``pipe`` and a ``BatchDecoder`` of ``max_batch`` rows of ``capacity`` tokens; runs in its own thread."""

    IDLE_WAIT_S = 0.2

    def __init__(self, pipe: Pipeline, max_batch: int = 8, capacity: int | None = None, max_queue: int = 256):
        self.pipe = pipe
        self.batcher = BatchDecoder(pipe, max_batch=max_batch, capacity=capacity)
        self.max_queue = int(max_queue)
        self.metrics = Metrics()
        self._queue: collections.deque[Job] = collections.deque()
        self._cv = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="qvl-scheduler", daemon=True)

    @property
    def capacity(self) -> int:
        return self.batcher.capacity

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stop.is_set()

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        with self._cv:
            self._cv.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)
        for job in list(self._queue) + [r.request.tag for r in self.batcher.clear()]:
            job.emit("error", (503, "the server is shutting down; retry on another instance."))
        self._queue.clear()

    def submit(self, job: Job) -> None:
        """Queue ``job`` (refused with QueueFull when ``max_queue`` jobs wait already)."""
        with self._cv:
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"{len(self._queue)} requests are waiting already (--max-queue {self.max_queue}); "
                                "retry later.")
            self._queue.append(job)
            self.metrics.queued = len(self._queue)
            self._cv.notify()

    # ---- the scheduler thread ------------------------------------------------------------------
    def _run(self) -> None:
        log.info("scheduler: %d rows of %d tokens", self.batcher.max_batch, self.batcher.capacity)
        while not self._stop.is_set():
            with self._cv:
                if not self._queue and not self.batcher.rows:
                    self._cv.wait(self.IDLE_WAIT_S)
                    continue
            self._admit()
            self._drop_cancelled()
            if self.batcher.rows:
                self._step()

    def _next_job(self) -> Job | None:
        with self._cv:
            job = self._queue.popleft() if self._queue else None
            self.metrics.queued = len(self._queue)
            return job

    def _admit(self) -> None:
        while self.batcher.free and not self._stop.is_set():
            job = self._next_job()
            if job is None:
                return
            if job.cancelled:
                self.metrics.count("cancelled")
                continue
            try:
                row = self.batcher.admit(job.request)
            except QvlError as err:
                self.metrics.count("bad_request")
                job.emit("error", (400, str(err)))
                continue
            except Exception as err:  # noqa: BLE001 - one request's failure must not stop the server
                log.exception("prefill failed")
                self.metrics.count("error")
                job.emit("error", (500, internal_error(err)))
                continue
            now = time.perf_counter()
            job.first_token = now
            self.metrics.admitted(len(job.request.prep.input_ids), now)
            if row.generation is not None:
                self._done(job, row)
        self.metrics.running = len(self.batcher.rows)

    def _drop_cancelled(self) -> None:
        for row in [r for r in self.batcher.rows if r.request.tag.cancelled]:
            self.batcher.drop(row)
            self.metrics.count("cancelled")
        self.metrics.running = len(self.batcher.rows)

    def _step(self) -> None:
        rows = len(self.batcher.rows)
        try:
            finished = self.batcher.step()
        except Exception as err:  # noqa: BLE001
            log.exception("decode step failed")
            for row in self.batcher.clear():
                self.metrics.count("error")
                row.request.tag.emit("error", (500, internal_error(err)))
            self.metrics.running = 0
            return
        self.metrics.step(rows, time.perf_counter())
        for row in finished:
            self._done(row.request.tag, row)
        self.metrics.running = len(self.batcher.rows)

    def _done(self, job: Job, row: Row) -> None:
        now = time.perf_counter()
        self.metrics.finished(now - job.submitted, (job.first_token - job.submitted) if job.first_token else None)
        job.emit("done", row.generation)
