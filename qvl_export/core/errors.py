"""User-facing errors: one line that says what is wrong and what to do next."""

import errno as _errno
import os as _os
import re as _re


class QvlError(Exception):
    """An error caused by the user's input or environment.

    The CLI prints ``str(err)`` as a single line (no traceback) and exits with ``exit_code``.
    """

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(message.split()))


class GateFailed(QvlError):
    """A parity gate failed; the report says which stage and by how much."""

    exit_code = 1


# --- one-line messages for failures of the environment rather than of the code (used by the CLI) ---

# top-level module -> the pip package of the ``build`` extra that provides it
BUILD_EXTRA_MODULES = {
    "torch": "torch", "transformers": "transformers", "onnx": "onnx", "onnx_ir": "onnx-ir",
    "onnxscript": "onnxscript", "safetensors": "safetensors", "psutil": "psutil", "pypdfium2": "pypdfium2",
    "ml_dtypes": "ml-dtypes", "matplotlib": "matplotlib", "rich": "rich",
}
TENSORRT_MODULES = {"tensorrt": "tensorrt", "cuda": "cuda-python"}


def missing_module_message(err: ModuleNotFoundError, command: str) -> str | None:
    """``'qvl-export build' needs the build extra (...)`` when an optional package is absent, else None."""
    name = err.name
    if not name:
        found = _re.search(r"No module named '([^']+)'", str(err))
        name = found.group(1) if found else ""
    top = name.split(".")[0]
    if top in BUILD_EXTRA_MODULES:
        return (f"'{command}' needs the build extra ({BUILD_EXTRA_MODULES[top]} is not installed): "
                f'pip install "qvl-export[build]"')
    if top in TENSORRT_MODULES:
        return (f"'{command}' needs TensorRT ({TENSORRT_MODULES[top]} is not installed): install TensorRT and "
                "cuda-python (pip install tensorrt cuda-python; on Jetson both come with JetPack).")
    return None


# errno -> (what failed, why, what to do when the command has -o, what to do otherwise)
_DISK_REASONS = {
    _errno.EROFS: ("cannot write", "the file system is read-only", "choose another output folder with -o",
                   "copy the folder to a writable disk"),
    _errno.ENOSPC: ("cannot write", "the disk is full", "free space or choose another output folder with -o",
                    "free space"),
    getattr(_errno, "EDQUOT", None): ("cannot write", "the disk quota is exceeded",
                                      "free space or choose another output folder with -o", "free space"),
    _errno.EACCES: ("cannot access", "permission denied", "fix its permissions or choose another output folder "
                    "with -o", "fix its permissions"),
    _errno.EPERM: ("cannot access", "permission denied (operation not permitted)", "fix its permissions or choose "
                   "another output folder with -o", "fix its permissions"),
}
DISK_REASONS = {code: why for code, why in _DISK_REASONS.items() if code is not None}
_TEMP_PART = _re.compile(r"^\.(.+)\.(?:tmp|old)-[^/\\]+$")  # building/artifacts.py: .NAME.tmp-XXXX beside NAME


def disk_error(err: BaseException) -> OSError | None:
    """The OSError (itself or a cause) that says the disk is read-only, full or not writable."""
    seen = 0
    while err is not None and seen < 8:
        if isinstance(err, OSError) and err.errno in DISK_REASONS:
            return err
        err, seen = err.__cause__ or err.__context__, seen + 1
    return None


def disk_error_message(err: OSError, fallback: str | _os.PathLike | None = None,
                       has_output_option: bool = True) -> str:
    """``cannot write PATH: the disk is full; free space or choose another output folder with -o``.

    A temporary build folder in the path (``.out.tmp-XXXX``, removed by then) is shown as the folder
    it would have become."""
    verb, reason, with_o, without_o = DISK_REASONS[err.errno]
    path = err.filename if isinstance(err.filename, (str, bytes, _os.PathLike)) else fallback
    if path is None:
        shown = "the output"
    else:
        path = _os.fsdecode(path)
        parts = [(_TEMP_PART.match(p).group(1) if _TEMP_PART.match(p) else p) for p in path.split(_os.sep)]
        shown = _os.sep.join(parts) or path
    return f"{verb} {shown}: {reason}; {with_o if has_output_option else without_o}."


def _first_undecodable(text: str) -> str:
    for i, ch in enumerate(text):
        if "\udc80" <= ch <= "\udcff":
            return f"byte 0x{ord(ch) - 0xDC00:02x} at position {i}"
        if "\ud800" <= ch <= "\udfff":
            return f"lone surrogate U+{ord(ch):04X} at position {i}"
    return "undecodable text"


def invalid_utf8(value: str) -> bool:
    """True for a str that cannot be encoded as UTF-8: command-line bytes Python decoded as surrogate escapes."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def invalid_utf8_message(label: str, value: str, is_path: bool) -> str:
    where = _first_undecodable(value)
    if is_path:
        shown = _os.fsencode(value).decode("utf-8", "backslashreplace") if _os.name != "nt" else ascii(value)
        return (f"the {label} path {shown} is not valid UTF-8 ({where}); use a path whose names are UTF-8 "
                "(rename the file or folder).")
    return (f"{label} is not valid UTF-8 ({where}); pass UTF-8 text (check the encoding of the terminal or "
            "script that runs qvl-export).")


def unicode_error_message(err: UnicodeError) -> str:
    """A UnicodeEncodeError/UnicodeDecodeError that reached the CLI, as one line."""
    encoding = (getattr(err, "encoding", "") or "").lower().replace("_", "-")
    if isinstance(err, UnicodeEncodeError) and encoding not in ("utf-8", "utf8"):
        return (f"cannot write text in the {err.encoding} encoding ({err}); use a UTF-8 locale or set "
                "PYTHONIOENCODING=utf-8.")
    return (f"text is not valid UTF-8 ({err}); use UTF-8 for prompts, paths and text files (prompts.txt, "
            "JSON, templates).")
