"""Chat prompts from the checkpoint's own chat template, rendered the way transformers renders it.

A checkpoint states its prompt format in a Jinja chat template; fine-tunes change it (another
system turn, none at all, extra markers), and Qwen3-VL's official template has no default system
turn. So the runtime never writes a format of its own: it renders the template that the build
copied into the artifacts (``chat_template.jinja``) in a sandboxed Jinja environment configured
as ``transformers.utils.chat_template_utils`` configures its own (``ImmutableSandboxedEnvironment``,
``trim_blocks``, ``lstrip_blocks``, loop controls, the same ``tojson`` / ``raise_exception`` /
``strftime_now`` / ``namespace`` helpers, the tokenizer's special tokens as variables). A test
renders the official Qwen2-VL, Qwen2.5-VL and Qwen3-VL templates, a template without a system turn
and multi-turn chats with both and compares the strings.

Messages use the structured form of transformers and OpenAI clients::

    [{"role": "system", "content": "Answer briefly."},
     {"role": "user", "content": [{"type": "image", "image": "page.png"},
                                  {"type": "text", "text": "What is the total?"}]},
     {"role": "assistant", "content": "42"},
     {"role": "user", "content": "And the date?"}]

Image items are ``{"type": "image", "image": PATH}`` (also ``"path"``/``"url"``), or OpenAI's
``{"type": "image_url", "image_url": {"url": PATH_OR_DATA_URL}}``. Video items are
``{"type": "video", "video": SOURCE}`` (SOURCE a video file, a folder of frames, a list of frames
or an array [T, H, W, 3] uint8) with optional ``fps``, ``max_frames``, ``min_pixels``,
``max_pixels`` and ``total_pixels`` as in qwen_vl_utils; the template renders each as
``<|vision_start|><|video_pad|><|vision_end|>``.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Sequence

from qvl_export.core.errors import QvlError
from qvl_export.core.spec import read_json

TEMPLATE_FILE = "chat_template.jinja"  # the resolved template, as the build writes it into the artifacts
ROLES = ("system", "user", "assistant", "tool")
IMAGE_TYPES = ("image", "image_url")
VIDEO_TYPES = ("video", "video_url")
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


# ---- where a checkpoint keeps its template -----------------------------------------------------

def resolve_template(model_dir: str | Path) -> tuple[str, str]:
    """(template source, where it came from) for a checkpoint folder, in the order an
    ``AutoProcessor`` of transformers resolves it for these models: ``chat_template.json`` (the
    processor's file), then ``chat_template.jinja``, then ``tokenizer_config.json``'s
    ``chat_template`` (a named list picks ``default``)."""
    folder = Path(model_dir)
    as_json = folder / "chat_template.json"
    if as_json.exists():
        data = read_json(as_json, "the chat template")
        template = data.get("chat_template")
        if isinstance(template, str) and template:
            return template, as_json.name
    jinja = folder / TEMPLATE_FILE
    if jinja.exists():
        try:
            text = jinja.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise QvlError(f"{jinja} is unreadable ({err}); restore it from the original checkpoint.") from None
        if text:
            return text, jinja.name
    tok_config = folder / "tokenizer_config.json"
    if tok_config.exists():
        template = read_json(tok_config, "the tokenizer config").get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        if isinstance(template, str) and template:
            return template, f"{tok_config.name} (chat_template)"
    raise QvlError(f"{folder} has no chat template (chat_template.json, chat_template.jinja or tokenizer_config.json "
                   "'chat_template'): the prompt format is part of the model; copy it from the original checkpoint, "
                   "or pass --chat-template FILE.")


def special_tokens(folder: str | Path) -> dict[str, str]:
    """The tokenizer's special tokens (``bos_token``, ``eos_token``, ...) that templates may use as variables."""
    path = Path(folder) / "tokenizer_config.json"
    if not path.exists():
        return {}
    data = read_json(path, "the tokenizer config")
    out = {}
    for key in SPECIAL_TOKEN_KEYS:
        value = data.get(key)
        if isinstance(value, dict):  # serialised AddedToken
            value = value.get("content")
        if isinstance(value, str):
            out[key] = value
    return out


# ---- the sandboxed environment -----------------------------------------------------------------

def _environment():
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Namespace(jinja2.utils.Namespace):
        """``namespace()`` that refuses underscore attributes (no way to reach interpreter internals)."""

        def __init__(*args, **kwargs):  # noqa: N805 - Jinja's own signature trick (``namespace(self=...)``)
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates cannot set {name!r} on a namespace")

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters; transformers' does not, so neither do we
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["dict"] = lambda *a, **k: dict(*a, **k)
    env.globals["namespace"] = Namespace
    return env


def _plain(value: Any) -> Any:
    """What the template may see: JSON types only (anything else becomes an inert ``<type>`` string)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return f"<{type(value).__name__}>"


class ChatTemplate:
    """A compiled chat template plus the tokenizer's special tokens."""

    def __init__(self, source: str, special: dict[str, str] | None = None, origin: str = "chat template"):
        import jinja2

        self.source = source
        self.origin = origin
        self.special = dict(special or {})
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateError as err:
            raise QvlError(f"The chat template ({origin}) does not compile: {err}; fix or replace it "
                           "(--chat-template FILE at build time).") from None

    @classmethod
    def from_artifacts(cls, folder: str | Path) -> "ChatTemplate":
        path = Path(folder) / TEMPLATE_FILE
        try:
            source = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise QvlError(f"{folder} has no {TEMPLATE_FILE}; rebuild the artifacts with this qvl-export "
                           "(the build copies the checkpoint's chat template).") from None
        except (OSError, UnicodeDecodeError) as err:
            raise QvlError(f"{path} is unreadable ({err}); rebuild the artifacts.") from None
        return cls(source, special_tokens(folder), origin=str(path))

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """The prompt string for ``messages`` (checked with :func:`check_messages`)."""
        import jinja2

        chat = [{k: v for k, v in m.items() if v is not None} for m in _plain(check_messages(messages))]
        variables = {**self.special, **_plain(kwargs)}
        try:
            return self._template.render(messages=chat, tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.TemplateError as err:  # raise_exception() of the template, or a template bug
            raise QvlError(f"The chat template ({self.origin}) refused these messages: {err}") from None


# ---- messages ------------------------------------------------------------------------------------

def user_messages(prompt: str, num_images: int = 0, system: str | None = None,
                  images: Sequence[Any] | None = None, videos: Sequence[Any] = ()) -> list[dict]:
    """One user turn (images first, then videos, then the text), after a system turn when ``system`` is given.

    Without ``system`` the template decides: Qwen2-VL's writes a default system turn of its own,
    Qwen3-VL's writes none."""
    items: list[dict] = []
    for i in range(num_images if images is None else len(images)):
        item: dict[str, Any] = {"type": "image"}
        if images is not None and isinstance(images[i], (str, Path)):
            item["image"] = str(images[i])
        items.append(item)
    for source in videos:
        items.append({"type": "video", "video": str(source)} if isinstance(source, (str, Path)) else {"type": "video"})
    items.append({"type": "text", "text": prompt})
    head = [] if system is None else [{"role": "system", "content": system}]
    return head + [{"role": "user", "content": items}]


def check_messages(messages: Any) -> list[dict]:
    """Messages in the structured form, or one line saying what is wrong."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise QvlError("messages must be a non-empty list of {\"role\": ..., \"content\": ...} objects.")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise QvlError(f"message {i} must be an object with 'role' and 'content'.")
        if m["role"] not in ROLES:
            raise QvlError(f"message {i} has role {m['role']!r}; use one of {', '.join(ROLES)}.")
        content = m["content"]
        if isinstance(content, str):
            continue
        if not isinstance(content, (list, tuple)):
            raise QvlError(f"message {i}: content must be a string or a list of items.")
        for j, item in enumerate(content):
            if not isinstance(item, dict):
                raise QvlError(f"message {i} item {j} must be an object such as {{\"type\": \"text\", \"text\": ...}}.")
            kind = _kind(item)
            if kind == "text" and not isinstance(item.get("text"), str):
                raise QvlError(f"message {i} item {j}: a text item needs a string 'text'.")
            if kind not in ("text",) + IMAGE_TYPES + VIDEO_TYPES:
                raise QvlError(f"message {i} item {j} has type {kind!r}; use text, image, image_url or video.")
    return list(messages)


def _kind(item: dict) -> str | None:
    return item.get("type") or next((k for k in ("image_url", "image", "video_url", "video", "text") if k in item),
                                    None)


def item_kind(item: dict) -> str | None:
    """An item's type: its ``type``, else the first of image_url / image / video_url / video / text it holds."""
    return _kind(item)


VIDEO_OPTIONS = ("fps", "max_frames", "min_pixels", "max_pixels", "total_pixels")


def video_source(item: dict) -> Any:
    """The video file, frame folder, frame list or array a video item points to."""
    if _kind(item) == "video_url":
        url = item.get("video_url")
        url = url.get("url") if isinstance(url, dict) else url
    else:
        url = next((item[k] for k in ("video", "path", "url") if item.get(k) is not None), None)
    if url is None:
        raise QvlError("a video item has no video: give {\"type\": \"video\", \"video\": PATH} (a video file or a "
                       "folder of frames), a list of frames or an array [T, H, W, 3] uint8.")
    if isinstance(url, str) and url.startswith("file://"):
        url = url[len("file://"):]
    if isinstance(url, str) and url.startswith(("http://", "https://", "data:")):
        raise QvlError("video URLs are not fetched; download the video and pass its path.")
    return url


def video_options(item: dict) -> dict[str, Any]:
    """A video item's sampling options (``fps``, ``max_frames``, ``min_pixels``, ``max_pixels``,
    ``total_pixels``), checked to be positive numbers."""
    out = {}
    for key in VIDEO_OPTIONS:
        value = item.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise QvlError(f"a video item's {key!r} must be a positive number, got {value!r}.")
        out[key] = value
    return out


def media_items(messages: Iterable[dict], kinds: Sequence[str] = IMAGE_TYPES) -> list[dict]:
    """The image (or video) items of all messages, in the order the template renders them."""
    out = []
    for m in messages:
        if isinstance(m.get("content"), (list, tuple)):
            out.extend(item for item in m["content"] if isinstance(item, dict) and _kind(item) in kinds)
    return out


def image_source(item: dict) -> Any:
    """The file path, data URL, PIL image or array an image item points to."""
    if _kind(item) == "image_url":
        url = item.get("image_url")
        url = url.get("url") if isinstance(url, dict) else url
    else:
        url = next((item[k] for k in ("image", "path", "url") if item.get(k) is not None), None)
    if url is None:
        raise QvlError("an image item has no image: give {\"type\": \"image\", \"image\": PATH} or "
                       "{\"type\": \"image_url\", \"image_url\": {\"url\": PATH_OR_DATA_URL}}.")
    if isinstance(url, str) and url.startswith("file://"):
        url = url[len("file://"):]
    if isinstance(url, str) and url.startswith("data:"):
        return _data_url_bytes(url)
    if isinstance(url, str) and url.startswith(("http://", "https://")):
        raise QvlError("image URLs are not fetched; download the image and pass its path or a data: URL.")
    return url


def _data_url_bytes(url: str) -> bytes:
    """The bytes of a ``data:image/...;base64,...`` URL."""
    import base64
    import binascii

    head, _, body = url.partition(",")
    if not head.endswith(";base64") or not body:
        raise QvlError("an image data URL must be base64: data:image/png;base64,....")
    try:
        return base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        raise QvlError("an image data URL holds invalid base64; encode the image file's bytes again.") from None


def probe(template: ChatTemplate, image_pad: str) -> None:
    """Render a one-image chat to check the template carries images; fails in one line when it cannot."""
    count = template.render(user_messages("probe", 1)).count(image_pad)
    if count != 1:
        raise QvlError(f"The chat template ({template.origin}) writes {count} {image_pad} markers for one image "
                       "item; qvl-export needs one per image. Fix the template or pass --chat-template FILE.")


def video_support(template: ChatTemplate) -> str | None:
    """Why ``template`` cannot take a video item (a checkpoint trained on images only may ship such a
    template), or None when it renders one ``<|video_pad|>`` per video."""
    try:
        text = template.render(user_messages("probe", videos=["clip"]))
    except QvlError as err:
        return f"the chat template cannot render a video item ({err})"
    if text.count("<|video_pad|>") != 1:
        return "the chat template writes no <|video_pad|> for a video item"
    return None
