"""The built-in demo model: its task (rendered invoices), accuracy evaluation and the trained checkpoint.

``checkpoint_dir()`` is what ``qvl-export build`` builds when no model is given: a 1.5M-parameter
Qwen2.5-VL trained by ``tools/train_demo.py`` (a source-checkout script with torch; not shipped) to read
the total off a rendered invoice.
Its ``eval.json`` holds the fp32 exact match of transformers on held-out pages; builds of it report
their own exact match on the same pages beside it (``qvl_export.demo.accuracy``).
Other trained checkpoints (the form reader in ``tests/data/trained/form_reader``, the chart reader in
``tests/data/trained/chart_reader``) name their task the same way; ``qvl_export.demo.tasks`` holds every task by name.
"""

from __future__ import annotations

import json
from pathlib import Path

from qvl_export.core.errors import QvlError
from qvl_export.demo.tasks import INVOICE, TASKS, Task, task_for

__all__ = ["CHECKPOINT", "SAMPLES", "TASK", "TASKS", "Task", "checkpoint_dir", "task_for", "task_reference"]

CHECKPOINT = Path(__file__).resolve().parent / "checkpoint"
SAMPLES = Path(__file__).resolve().parent / "samples"
TASK = INVOICE.name  # the demo checkpoint's task


def checkpoint_dir() -> Path:
    """The shipped demo checkpoint folder (read-only package data)."""
    if not (CHECKPOINT / "model.safetensors").is_file():
        raise QvlError(f"The built-in demo checkpoint is missing from {CHECKPOINT}; reinstall qvl-export or "
                       "train it from a source checkout with 'python tools/train_demo.py --out DIR'.")
    return CHECKPOINT


def task_reference(model_dir: str | Path) -> dict | None:
    """The fp32 evaluation record of a checkpoint trained on one of our tasks (its ``eval.json``, whose
    ``"task"`` names one of ``TASKS``), or None for any other model. ``task_for(record["task"])`` is
    the task."""
    path = Path(model_dir) / "eval.json"
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or "exact_match" not in record:
        return None
    task = task_for(record.get("task"))
    if task is None or record.get("task") != task.name:  # the full string, as the training script writes it
        return None
    return record
