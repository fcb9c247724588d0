"""Parse a checkpoint's ``generation_config.json`` into ``core.spec.GenerationSpec``.

Missing keys (or keys set to ``null``) take transformers' global defaults, exactly as
``GenerationConfig._get_default_generation_params()`` fills them in ``generate`` (transformers 5.x):
``do_sample=False, temperature=1.0, top_p=1.0, top_k=50, repetition_penalty=1.0``. Note that ``top_k=50`` is
a default even though it only takes effect when sampling: transformers applies temperature / top-k / top-p
only when ``do_sample`` is true, the repetition penalty in both greedy and sampling modes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qvl_export.core.errors import QvlError
from qvl_export.core.spec import _FIX, GenerationSpec, check_value, read_json

# transformers.GenerationConfig._get_default_generation_params() (5.24), the keys this spec carries.
TRANSFORMERS_DEFAULTS: dict[str, Any] = {
    "do_sample": False,
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": 50,
    "repetition_penalty": 1.0,
}


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
