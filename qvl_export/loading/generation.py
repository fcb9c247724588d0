"""Generation settings of a checkpoint (``generation_config.json``) as a plain, serialisable spec.

Pure Python (json only): the thin runtime reads the same spec back from ``manifest.json``.

Missing keys (or keys set to ``null``) take transformers' global defaults, exactly as
``GenerationConfig._get_default_generation_params()`` fills them in ``generate`` (transformers 5.x):
``do_sample=False, temperature=1.0, top_p=1.0, top_k=50, repetition_penalty=1.0``. Note that ``top_k=50`` is
a default even though it only takes effect when sampling: transformers applies temperature / top-k / top-p
only when ``do_sample`` is true, the repetition penalty in both greedy and sampling modes.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qvl_export.errors import QvlError
from qvl_export.loading.config import read_json

# transformers.GenerationConfig._get_default_generation_params() (5.24), the keys this spec carries.
TRANSFORMERS_DEFAULTS: dict[str, Any] = {
    "do_sample": False,
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": 50,
    "repetition_penalty": 1.0,
}

_FIX = {
    "temperature": "use a number >= 0 (1.0 leaves the logits unchanged)",
    "top_p": "use a number in (0, 1] (1.0 turns nucleus filtering off)",
    "top_k": "use a whole number >= 0 (0 turns top-k filtering off)",
    "repetition_penalty": "use a number > 0 (1.0 means no penalty)",
    "do_sample": "use true or false",
    "max_new_tokens": "use a whole number >= 1 or remove the key",
    "eos_token_id": "use a token id (a whole number >= 0) or a list of them",
}


@dataclass(frozen=True)
class GenerationSpec:
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0
    eos_token_ids: tuple[int, ...] = ()
    max_new_tokens: int | None = None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GenerationSpec:
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        if "eos_token_ids" in kw:
            kw["eos_token_ids"] = tuple(int(v) for v in kw["eos_token_ids"])
        return cls(**kw)


def check_value(key: str, value: Any, where: str) -> Any:
    """Validate one generation setting and return it normalised (floats as float, ints as int).

    ``where`` names the source for the error message (a file path, or e.g. "the --temperature option").
    Raises QvlError (one line: the source, the key, the value and what to do) for a bad value.
    """
    ok = True
    out = value
    is_num = isinstance(value, (int, float)) and not isinstance(value, bool)
    if key in ("temperature", "top_p", "repetition_penalty"):
        ok = is_num and math.isfinite(value)
        if ok:
            out = float(value)
            ok = {"temperature": out >= 0, "top_p": 0 < out <= 1, "repetition_penalty": out > 0}[key]
    elif key == "top_k":
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
    elif key == "max_new_tokens":
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
    elif key == "do_sample":
        ok = isinstance(value, bool)
    else:
        raise ValueError(f"unknown generation setting {key!r}")
    if not ok:
        raise QvlError(f"{where}: {key}={value!r} is not valid; {_FIX[key]}.")
    return out


def _eos_list(value: Any, where: str) -> tuple[int, ...]:
    ids: list[int] = []
    for v in value if isinstance(value, list) else [value]:
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise QvlError(f"{where}: eos_token_id={value!r} is not valid; {_FIX['eos_token_id']}.")
        if v not in ids:
            ids.append(v)
    return tuple(ids)


def parse_generation_config(model_dir: Path, fallback_eos: tuple[int, ...]) -> GenerationSpec:
    """Read ``generation_config.json`` of a local checkpoint (transformers' defaults when it is missing).

    ``fallback_eos`` is used when the file is missing or has no ``eos_token_id``.
    """
    path = Path(model_dir) / "generation_config.json"
    data = read_json(path, "the generation config") if path.exists() else {}
    values: dict[str, Any] = {}
    for key, default in TRANSFORMERS_DEFAULTS.items():
        raw = data.get(key)
        values[key] = default if raw is None else check_value(key, raw, str(path))
    raw = data.get("max_new_tokens")
    values["max_new_tokens"] = None if raw is None else check_value("max_new_tokens", raw, str(path))
    raw = data.get("eos_token_id")
    eos = _eos_list(raw, str(path)) if raw is not None and raw != [] else ()
    values["eos_token_ids"] = eos or tuple(int(v) for v in fallback_eos)
    return GenerationSpec(**values)
