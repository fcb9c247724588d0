"""Load an artifacts folder once and serve it with uvicorn: ``qvl-export serve`` and ``LocalServer`` (tests, the
load test) share this.

    with LocalServer("build/q25", max_batch=8) as server:      # 127.0.0.1, an ephemeral port, its own thread
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from qvl_export.core.errors import QvlError
from qvl_export.serving import openai_api as api

log = logging.getLogger(__name__)


def require_serve_extra():
    """fastapi and uvicorn, or one line saying how to install them."""
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ModuleNotFoundError as err:
        raise QvlError(f"'qvl-export serve' needs the serve extra ({err.name} is not installed): "
                       'pip install "qvl-export[serve]"') from None
    return uvicorn


@dataclass
class ServeOptions:
    max_batch: int = 8
    context: int | None = None  # KV rows per sequence (prompt + new tokens); None: min(model context, 4096)
    max_queue: int = 256
    threads: int | None = None
    backend: str | None = None
    verify: bool = True
    model_name: str | None = None  # None: the artifacts folder's name
    limits: api.Limits = api.Limits()


DEFAULT_CONTEXT = 4096  # KV rows per sequence unless --context says otherwise: max_batch x 4096 rows are allocated


def build_state(artifacts: str | Path, options: ServeOptions):
    """Load the artifacts and make the server state (the scheduler is not started yet)."""
    from qvl_export.runtimes.pipeline import Pipeline
    from qvl_export.serving.app import ServerState
    from qvl_export.serving.scheduler import Scheduler

    artifacts = Path(artifacts)
    pipe = Pipeline.load(artifacts, threads=options.threads, backend=options.backend, verify=options.verify)
    context = options.context or min(pipe.max_context, DEFAULT_CONTEXT)
    if pipe.ranges and pipe.ranges.get("max_seq"):
        context = min(context, int(pipe.ranges["max_seq"]))
    scheduler = Scheduler(pipe, max_batch=options.max_batch, capacity=context, max_queue=options.max_queue)
    name = options.model_name or artifacts.resolve().name
    return ServerState(scheduler, name, options.limits)


def serve(artifacts: str | Path, host: str = "127.0.0.1", port: int = 8000,
          options: ServeOptions | None = None, log_level: str = "info") -> None:
    """Run the server in the foreground until interrupted."""
    uvicorn = require_serve_extra()
    from qvl_export.serving.app import create_app

    state = build_state(artifacts, options or ServeOptions())
    app = create_app(state)
    log.info("serving %s on http://%s:%d (batch %d, %d tokens per sequence)", state.model_name, host, port,
             state.scheduler.batcher.max_batch, state.scheduler.capacity)
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False, timeout_graceful_shutdown=5)


class LocalServer:
    """The server on 127.0.0.1 at an ephemeral port, in a thread of this process; a context manager that stops
    it (and its scheduler) on exit, within ``stop_timeout`` seconds."""

    def __init__(self, artifacts: str | Path, options: ServeOptions | None = None, start_timeout: float = 60.0,
                 stop_timeout: float = 15.0, **kwargs):
        self.uvicorn = require_serve_extra()
        from qvl_export.serving.app import create_app

        options = options or ServeOptions(**kwargs)
        self.state = build_state(artifacts, options)
        self.app = create_app(self.state)
        self.start_timeout, self.stop_timeout = start_timeout, stop_timeout
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = self.uvicorn.Config(self.app, log_level="warning", access_log=False, timeout_graceful_shutdown=2,
                                     lifespan="on")
        self.server = self.uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="qvl-local-server", daemon=True)

    @property
    def metrics(self):
        return self.state.scheduler.metrics

    def __enter__(self) -> "LocalServer":
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise QvlError(f"the local server did not start within {self.start_timeout:g} s.")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(self.stop_timeout)
        if self.thread.is_alive():
            self.server.force_exit = True
            self.thread.join(self.stop_timeout)
        self.state.scheduler.stop()
        self.sock.close()

    def __exit__(self, *exc) -> None:
        self.stop()
