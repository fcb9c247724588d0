"""Traced graphs kept between builds: a part's graph depends on the checkpoint's config, never its weights.

``torch.onnx.export`` is the slowest step of a small build (about 6 s a part on a 2-core machine, ~2
minutes for the 2B decoder) and its result - before the weights are bound - is a function of the
part's module definition, the model spec, the traced dtype and the exporter's versions. Building the
same checkpoint again at another precision, or a fine-tune of the same architecture, re-traces
nothing: the graph is read back from the cache and its weights bound from the new checkpoint.

What is stored: the traced graph with every parameter initializer written as an external-data
reference to a file that does not exist (``skeleton.weights``) - no weight values, so an entry is a
few MB even for a 7B decoder - and the module's buffers (rotary tables) with their values.
``bind_lazy`` then replaces every parameter, and refuses a graph where one was left unbound.

The key hashes the part's description (spec minus the generation settings, options such as the
window-attention form), the dtype, the exporter's library versions and the source of this package:
any edit to a module definition is a new key. Where: ``$QVL_EXPORT_TRACE_CACHE`` (a folder; ``off``
disables it), else ``$XDG_CACHE_HOME/qvl-export/traces`` or ``~/.cache/qvl-export/traces``. A
cache that cannot be read or written is skipped with a log line; a build never fails on it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

PLACEHOLDER = "skeleton.weights"  # the external file every cached parameter names (never written)
_LIBRARIES = ("torch", "onnxscript", "onnx-ir", "onnx")


def cache_dir() -> Path | None:
    """The cache folder, or None when ``QVL_EXPORT_TRACE_CACHE=off``."""
    chosen = os.environ.get("QVL_EXPORT_TRACE_CACHE", "")
    if chosen.lower() in ("off", "0", "no", "false"):
        return None
    if chosen:
        return Path(chosen)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "qvl-export" / "traces"


@functools.lru_cache(maxsize=1)
def _code_fingerprint() -> str:
    """The exporter libraries' versions and this package's source: a new version of either is a new key."""
    from importlib.metadata import PackageNotFoundError, version

    h = hashlib.sha256()
    for pkg in _LIBRARIES:
        try:
            h.update(f"{pkg}={version(pkg)};".encode())
        except PackageNotFoundError:
            h.update(f"{pkg}=none;".encode())
    root = Path(__file__).resolve().parents[1]
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def trace_key(description: dict, dtype: str) -> str:
    """The cache key of a part traced in ``dtype``; ``description``: JSON-able, everything the module
    and its example inputs are built from."""
    text = json.dumps({"part": description, "dtype": dtype, "code": _code_fingerprint()}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def load(key: str):
    """The cached graph (``onnx_ir.Model``, parameters as unread placeholders) or None."""
    folder = cache_dir()
    path = folder / f"{key}.onnx" if folder else None
    if path is None or not path.is_file():
        return None
    try:
        return _model(path.read_bytes())
    except Exception as err:  # a truncated or foreign file: trace again, and overwrite it
        log.warning("trace cache: %s could not be read (%s); tracing again", path, err)
        return None


def settle(model, parameters: set[str], key: str | None):
    """A freshly traced ``model`` as the cache holds it: each initializer named in ``parameters``
    becomes a placeholder (``bind_lazy`` binds them next), the graph is written under ``key`` (None:
    not cached) and the model read back from those bytes - so a traced and a cached graph are the
    same object graph, and their builds write the same bytes (node names included)."""
    import onnx_ir as ir

    for name in parameters:
        value = model.graph.initializers.get(name)
        if value is None or value.const_value is None:
            continue
        const = value.const_value
        value.const_value = ir.ExternalTensor(PLACEHOLDER, offset=0, length=int(const.size * const.dtype.itemsize),
                                              dtype=const.dtype, shape=ir.Shape(tuple(const.shape)), name=name)
    data = ir.to_proto(model).SerializeToString()
    folder = cache_dir() if key else None
    if folder is not None:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".tmp", dir=folder)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(tmp, folder / f"{key}.onnx")  # whole or not at all: concurrent builds race safely
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        except OSError as err:
            log.warning("trace cache: could not write to %s (%s); the build goes on without it", folder, err)
    return _model(data)


def _model(data: bytes):
    import onnx
    import onnx_ir as ir

    return ir.from_proto(onnx.ModelProto.FromString(data))


def is_placeholder(tensor) -> bool:
    """A parameter read back from the cache and not bound yet."""
    import onnx_ir as ir

    return isinstance(tensor, ir.ExternalTensor) and tensor.location == PLACEHOLDER
