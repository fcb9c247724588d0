"""The HTTP side: a FastAPI app over one ``Scheduler`` (imported lazily: ``pip install "qvl-export[serve]"``).

Routes: ``POST /v1/chat/completions`` (JSON, or server-sent events with ``stream: true``), ``GET /v1/models``,
``GET /health``, ``GET /metrics`` (Prometheus text). Every refusal is an OpenAI-style error object with a
one-line message: 400 for a bad request, 404 for another model's name or an unknown route, 413 for a body
over the limit, 503 when the queue is full or the scheduler is down; an unexpected failure is a 500 whose
message is one line (the traceback goes to the server's log, never to the client). A request that fails
after its stream started ends with an ``error`` event, then ``[DONE]``.
"""

# no ``from __future__ import annotations``: FastAPI reads the route signatures' annotations at runtime
import asyncio
import json
import logging
import os
import time
from dataclasses import dataclass

from qvl_export.core.errors import QvlError
from qvl_export.runtimes.batching import Request as BatchRequest
from qvl_export.serving import openai_api as api
from qvl_export.serving.scheduler import Job, QueueFull, Scheduler, internal_error

log = logging.getLogger(__name__)


@dataclass
class ServerState:
    scheduler: Scheduler
    model_name: str
    limits: api.Limits
    started: int = 0

    @property
    def pipe(self):
        return self.scheduler.pipe


def prepare(state: ServerState, chat: api.ChatRequest):
    """(Prepared, max_new_tokens) of a checked request: media decoded, prompt rendered and tokenized, the context
    checked. Runs in a worker thread (never on the event loop, never on the scheduler thread)."""
    pipe = state.pipe
    messages = api.resolve_media(chat, state.limits)
    prep = pipe.prepare(messages=messages)
    room = state.scheduler.capacity - len(prep.input_ids)
    max_tokens = chat.max_tokens
    if max_tokens is None:  # the checkpoint's max_new_tokens (128 when it says none), as far as the context allows
        max_tokens = max(1, min(pipe.spec.generation.max_new_tokens or 128, room,
                                state.limits.max_tokens or room))
    pipe.check_fits(prep, max_tokens, state.scheduler.capacity)
    return prep, max_tokens


DRAIN_BYTES = 64 << 20  # a body over the limit by at most this much is read and dropped before the 413


async def read_body(request, limit: int) -> bytes:
    """The body, refused with 413 once it passes ``limit`` bytes (Content-Length or counted). Up to
    ``DRAIN_BYTES`` past the limit are read and dropped first, so an ordinary client that is still sending
    gets the 413 and its reason instead of a broken connection; a larger body is cut off."""
    declared = request.headers.get("content-length")
    declared = int(declared) if declared and declared.isdigit() else None
    size, chunks = 0, []
    if declared is None or declared <= limit + DRAIN_BYTES:
        async for part in request.stream():
            size += len(part)
            if size <= limit:
                chunks.append(part)
            elif size > limit + DRAIN_BYTES:
                break
    if (declared or 0) > limit or size > limit:
        shown = f"{declared} bytes" if declared else f"over {limit} bytes"
        raise api.ApiError(f"the request body is {shown}; this server takes at most {limit} (--max-body-mb).", 413)
    return b"".join(chunks)


def create_app(state: ServerState):
    """The ASGI app; the scheduler is started and stopped with the app's lifespan."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @asynccontextmanager
    async def lifespan(app):
        if not state.scheduler.alive:
            state.scheduler.start()
        state.started = int(time.time())
        try:
            yield
        finally:
            await run_in_threadpool(state.scheduler.stop)

    app = FastAPI(title="qvl-export", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    metrics = state.scheduler.metrics

    def error(status: int, message: str, kind: str | None = None):
        kind = kind or ("invalid_request_error" if status < 500 else
                        "service_unavailable" if status == 503 else "internal_error")
        return JSONResponse(api.error_body(message, kind, status), status_code=status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):
        message = {404: f"no route {request.method} {request.url.path}; see /v1/chat/completions, /v1/models, "
                        "/health, /metrics.",
                   405: f"{request.method} is not allowed on {request.url.path}."}.get(exc.status_code, str(exc.detail))
        return error(exc.status_code, message)

    @app.exception_handler(Exception)
    async def unexpected(request, exc):  # the last resort: one line, never a traceback
        log.exception("unexpected error on %s", request.url.path)
        metrics.count("error")
        return error(500, internal_error(exc))

    @app.get("/health")
    async def health():
        if not state.scheduler.alive:
            return error(503, "the scheduler thread is not running; restart the server.")
        return {"status": "ok", "model": state.model_name, "running": metrics.running, "queued": metrics.queued,
                "pid": os.getpid()}  # which process answered (Ray Serve: which replica)

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": state.started,
                                            "owned_by": "qvl-export"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            body = api.read_json(await read_body(request, state.limits.max_body_bytes))
            chat = api.parse_chat(body, state.model_name, state.limits)
            prep, max_tokens = await run_in_threadpool(prepare, state, chat)
        except api.ApiError as err:
            metrics.count("bad_request")
            return error(err.status, str(err), err.kind)
        except QvlError as err:
            metrics.count("bad_request")
            return error(400, str(err))
        loop = asyncio.get_running_loop()
        job = Job(None, loop)
        job.request = BatchRequest(prep, max_tokens, temperature=chat.temperature, top_p=chat.top_p, seed=chat.seed,
                                   on_text=lambda piece: job.emit("text", piece), tag=job)
        try:
            state.scheduler.submit(job)
        except QueueFull as err:
            metrics.count("rejected")
            return error(503, str(err))
        cid = api.completion_id()
        if chat.stream:
            return StreamingResponse(_events(job, cid, state.model_name, chat.include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        pieces = []
        try:
            while True:
                kind, value = await job.events.get()
                if kind == "text":
                    pieces.append(value)
                elif kind == "error":
                    status, message = value
                    return error(status, message)
                else:
                    return JSONResponse(api.completion(cid, state.model_name, value.text, value.finish_reason,
                                                       value.prompt_tokens, len(value.token_ids)))
        finally:  # the client went away (the handler is cancelled) or the request ended: nothing left to run
            job.cancelled = True

    return app


def _sse(data) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


async def _events(job: Job, cid: str, model: str, include_usage: bool):
    """Server-sent events of one streamed completion: the role, text deltas, the finish reason, usage, [DONE]."""
    created = int(time.time())
    try:
        yield _sse(api.chunk(cid, model, {"role": "assistant", "content": ""}, created=created))
        while True:
            kind, value = await job.events.get()
            if kind == "text":
                yield _sse(api.chunk(cid, model, {"content": value}, created=created))
            elif kind == "error":
                status, message = value
                kind_name = "invalid_request_error" if status < 500 else "internal_error"
                yield _sse(api.error_body(message, kind_name, status))
                break
            else:
                yield _sse(api.chunk(cid, model, {}, value.finish_reason, created=created))
                if include_usage:
                    yield _sse(api.chunk(cid, model, {}, created=created, choices=False,
                                         usage_block=api.usage(value.prompt_tokens, len(value.token_ids))))
                break
        yield _sse("[DONE]")
    finally:
        job.cancelled = True  # a client that disconnects mid-stream frees its row at the next step
