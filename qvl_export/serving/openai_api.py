"""OpenAI chat completions on our runtime: the request read and checked, the response objects written.

No web framework here (``app.py`` holds the routes): a request body is checked field by field and
every bad one is an ``ApiError`` with its HTTP status and one line that says what to send instead.
Media are resolved here too, before anything is queued: ``image_url`` items as ``data:`` URLs or local
paths (plain or ``file://``) inside ``Limits.allowed_media``, decoded with the runtime's own loader under
the pixel limit; ``video`` / ``video_url`` items as local paths inside the same folder (frames capped).
Remote URLs are never fetched.

Fields read: ``model``, ``messages``, ``max_tokens`` / ``max_completion_tokens``, ``temperature``,
``top_p``, ``seed``, ``stream``, ``stream_options.include_usage``, ``n`` (1 only), ``stop`` (none only).
Fields that would change the answer and are not implemented (penalties, logprobs, tools, response
formats) are refused when set; other fields (``user``, ``metadata``, ...) are ignored. Sampling settings
left out take the checkpoint's ``generation_config.json`` (OpenAI's defaults are temperature 1 and top_p
1; ours are the model's own, as ``qvl-export run``).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qvl_export.core.errors import QvlError
from qvl_export.runtimes import preprocess
from qvl_export.runtimes.chat import (IMAGE_TYPES, ROLES, VIDEO_TYPES, image_source, item_kind, video_options,
                                      video_source)

MiB = 1 << 20


class ApiError(QvlError):
    """A request the server refuses: HTTP ``status`` with a one-line reason."""

    def __init__(self, message: str, status: int = 400, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.kind = status, kind


@dataclass(frozen=True)
class Limits:
    """What one request may ask for (``qvl-export serve`` options)."""

    max_body_bytes: int = 32 * MiB  # --max-body-mb
    max_images: int = 8  # images and videos per request (--max-images)
    max_image_pixels: int = 16 * MiB  # pixels of an image as sent, checked from its header before decoding
    max_video_frames: int = 64  # frames kept per video (--max-video-frames)
    max_tokens: int | None = None  # cap on max_tokens (None: the context)
    allowed_media: Path | None = None  # local media must resolve inside this folder (None: no local paths)


@dataclass
class ChatRequest:
    """A checked chat completion request, media resolved (images as PIL images, videos as paths)."""

    messages: list[dict]
    max_tokens: int | None
    temperature: float | None
    top_p: float | None
    seed: int | None
    stream: bool
    include_usage: bool
    media: int = 0
    options: dict[str, Any] = field(default_factory=dict)


# set to anything but these values, these fields would change the answer: refused rather than ignored
_UNSUPPORTED = {"presence_penalty": (0, 0.0, None), "frequency_penalty": (0, 0.0, None), "logprobs": (False, None),
                "top_logprobs": (0, None), "logit_bias": (None, {}), "tools": (None, []), "tool_choice": (None, "none"),
                "functions": (None, []), "function_call": (None, "none"), "response_format": (None,),
                "prediction": (None,), "audio": (None,), "modalities": (None, ["text"])}


def read_json(body: bytes) -> dict:
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ApiError(f"the request body is not valid JSON ({err}); send a chat completion object.") from None
    if not isinstance(data, dict):
        raise ApiError("the request body must be a JSON object with 'model' and 'messages'.")
    return data


def _number(body: dict, key: str, lo: float, hi: float, *, lo_open: bool = False) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ApiError(f"'{key}' must be a number, got {json.dumps(value)[:40]}.")
    if value < lo or value > hi or (lo_open and value == lo):
        raise ApiError(f"'{key}' must be {'>' if lo_open else '>='} {lo:g} and <= {hi:g}, got {value}.")
    return float(value)


def _integer(body: dict, key: str, lo: int, hi: int | None = None) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(f"'{key}' must be an integer, got {json.dumps(value)[:40]}.")
    if value < lo or (hi is not None and value > hi):
        raise ApiError(f"'{key}' must be between {lo} and {hi}, got {value}." if hi is not None
                       else f"'{key}' must be at least {lo}, got {value}.")
    return value


def parse_chat(body: dict, model_name: str, limits: Limits) -> ChatRequest:
    """The request's fields checked (no media opened yet: ``resolve_media`` does that, off the event loop)."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(f"'model' is required; this server serves {model_name!r} (GET /v1/models).")
    if model != model_name:
        raise ApiError(f"the model {model!r} does not exist; this server serves {model_name!r}.", 404,
                       "not_found_error")
    for key, defaults in _UNSUPPORTED.items():
        if key in body and body[key] not in defaults:
            raise ApiError(f"'{key}' is not supported by this server; leave it out.")
    if _integer(body, "n", 1) not in (None, 1):
        raise ApiError("'n' must be 1: this server returns one choice per request.")
    if body.get("stop") not in (None, [], ""):
        raise ApiError("'stop' sequences are not supported; leave 'stop' out (generation ends at the model's "
                       "end token or max_tokens).")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise ApiError("'stream' must be true or false.")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError("'stream_options' must be an object such as {\"include_usage\": true}.")
    max_tokens = _integer(body, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", 1)
    if max_tokens is not None and limits.max_tokens is not None and max_tokens > limits.max_tokens:
        raise ApiError(f"'max_tokens' is {max_tokens}; this server allows at most {limits.max_tokens} "
                       "(--max-tokens).")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError("'messages' must be a non-empty list of {\"role\": ..., \"content\": ...} objects.")
    checked, media = [], 0
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise ApiError(f"messages[{i}] must be an object with 'role' and 'content'.")
        role = m["role"]
        if role == "developer":  # OpenAI's newer name for the system turn
            role = "system"
        if role not in ROLES:
            raise ApiError(f"messages[{i}] has role {json.dumps(role)[:40]}; use one of {', '.join(ROLES)}.")
        content = m.get("content")
        if isinstance(content, str):
            checked.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise ApiError(f"messages[{i}].content must be a string or a list of content parts.")
        items = []
        for j, part in enumerate(content):
            if not isinstance(part, dict):
                raise ApiError(f"messages[{i}].content[{j}] must be an object such as "
                               "{\"type\": \"text\", \"text\": ...}.")
            kind = item_kind(part)
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise ApiError(f"messages[{i}].content[{j}]: a text part needs a string 'text'.")
                items.append({"type": "text", "text": part["text"]})
            elif kind in IMAGE_TYPES + VIDEO_TYPES:
                media += 1
                items.append(dict(part, _where=f"messages[{i}].content[{j}]"))
            else:
                raise ApiError(f"messages[{i}].content[{j}] has type {json.dumps(kind)[:40]}; use text, image_url "
                               "or video.")
        checked.append({"role": role, "content": items})
    if media > limits.max_images:
        raise ApiError(f"the request has {media} images and videos; this server takes at most {limits.max_images} "
                       "per request (--max-images).")
    seed = _integer(body, "seed", -(2**63), 2**64 - 1)
    return ChatRequest(checked, max_tokens, _number(body, "temperature", 0.0, 2.0),
                       _number(body, "top_p", 0.0, 1.0, lo_open=True), None if seed is None else seed % 2**64,
                       stream, bool(options.get("include_usage")), media)


def local_media(source: str, limits: Limits, where: str, folder_ok: bool = False) -> Path:
    """A local media path, checked to resolve (links followed) inside ``limits.allowed_media``; ``folder_ok``:
    a folder (a video's frames) is taken too."""
    if limits.allowed_media is None:
        raise ApiError(f"{where}: local paths are not allowed on this server (start it with --allowed-media DIR), "
                       "send the image as a data: URL.")
    root = Path(os.path.realpath(limits.allowed_media))
    path = Path(os.path.realpath(source if os.path.isabs(source) else root / source))
    if path != root and root not in path.parents:
        raise ApiError(f"{where}: {source} is outside the folder this server may read (--allowed-media).")
    if not (path.is_file() or (folder_ok and path.is_dir() and path != root)):
        raise ApiError(f"{where}: {source} is not a file in the allowed media folder.")
    return path


def resolve_media(chat: ChatRequest, limits: Limits) -> list[dict]:
    """The messages with every image decoded (a PIL image, upright RGB) and every video a checked local path
    with its frames capped; bad media raise ApiError naming the part."""
    out = []
    for m in chat.messages:
        if isinstance(m["content"], str):
            out.append(m)
            continue
        items = []
        for part in m["content"]:
            where = part.get("_where")
            if where is None:
                items.append(part)
                continue
            part = {k: v for k, v in part.items() if k != "_where"}
            kind = item_kind(part)
            try:
                if kind in IMAGE_TYPES:
                    source = image_source(part)
                    if isinstance(source, str):
                        source = local_media(source, limits, where)
                    elif not isinstance(source, bytes):
                        raise ApiError(f"{where}: an image_url's url must be a string (a data: URL or a path).")
                    image = preprocess.load_image(source, max_image_pixels=limits.max_image_pixels)
                    items.append({"type": "image", "image": image})
                else:
                    source = video_source(part)
                    if not isinstance(source, str):
                        raise ApiError(f"{where}: a video must be a path in the allowed media folder.")
                    opts = video_options(part)
                    opts["max_frames"] = min(int(opts.get("max_frames", limits.max_video_frames)),
                                             limits.max_video_frames)
                    items.append({"type": "video", "video": str(local_media(source, limits, where, folder_ok=True)),
                                  **opts})
            except ApiError:
                raise
            except QvlError as err:
                raise ApiError(f"{where}: {err}") from None
        out.append({"role": m["role"], "content": items})
    return out


# ---- responses ---------------------------------------------------------------------------------------------

def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(cid: str, model: str, text: str, finish_reason: str, prompt_tokens: int,
               completion_tokens: int) -> dict:
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": finish_reason}],
            "usage": usage(prompt_tokens, completion_tokens)}


def chunk(cid: str, model: str, delta: dict, finish_reason: str | None = None, created: int | None = None,
          usage_block: dict | None = None, choices: bool = True) -> dict:
    out = {"id": cid, "object": "chat.completion.chunk", "created": created or int(time.time()), "model": model,
           "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
           if choices else []}
    if usage_block is not None:
        out["usage"] = usage_block
    return out


def error_body(message: str, kind: str = "invalid_request_error", status: int = 400) -> dict:
    return {"error": {"message": message, "type": kind, "param": None, "code": status}}
