"""The tasks our trained checkpoints were trained on, by name: what builds score them on.

A trained checkpoint's ``eval.json`` names its task (``"task"``: one of the ``Task.name`` strings
below) beside transformers' fp32 exact match on that task's held-out pages; ``task_for`` maps the
string back to the task, and the parity gate scores a build on the same pages
(``qvl_export.demo.accuracy``). Each task module (``documents``: invoices, ``forms``: forms,
``charts``: bar charts) is a pure function of the seed: ``make_example(seed) -> (image, question, answer digits)``,
``heldout_set(n, offset)`` and its ``PROMPTS``. The modules are imported on first use, so reading
the registry costs no image library.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType


@dataclass(frozen=True)
class Task:
    """One task: its ``key`` (short name), ``name`` (the ``eval.json`` string), the module that makes
    its examples, the longest answer, where its held-out seeds start, and its gate case's name."""

    key: str
    name: str
    module: str
    max_answer_digits: int
    heldout_seed_offset: int
    case: str  # the parity report's case name
    noun: str  # what its pages are, for messages ("invoices")

    @property
    def max_new_tokens(self) -> int:
        """Greedy budget: the digits, the end token and one spare."""
        return self.max_answer_digits + 2

    def examples(self) -> ModuleType:
        return importlib.import_module(self.module)

    def make_example(self, seed: int):
        """(page image, question, answer digits) of ``seed``."""
        return self.examples().make_example(seed)

    def heldout_set(self, n: int, seed_offset: int | None = None) -> list:
        """``n`` held-out examples from ``seed_offset`` (default: the task's own offset)."""
        offset = self.heldout_seed_offset if seed_offset is None else seed_offset
        return self.examples().heldout_set(n, offset)

    @property
    def prompts(self) -> tuple[str, ...]:
        """Every phrasing of the question."""
        prompts = self.examples().PROMPTS
        if isinstance(prompts, dict):  # per field
            return tuple(p for group in prompts.values() for p in group)
        return tuple(prompts)


INVOICE = Task(key="invoice", name="read the TOTAL off a rendered invoice (qvl_export.demo.documents)",
               module="qvl_export.demo.documents", max_answer_digits=4, heldout_seed_offset=10_000_000,
               case="demo-task", noun="invoices")
FORM = Task(key="form", name="read the asked field (account number or amount) off a rendered form (qvl_export.demo.forms)",
            module="qvl_export.demo.forms", max_answer_digits=4, heldout_seed_offset=10_000_000,
            case="form-task", noun="forms")
CHART = Task(key="chart", name="read the asked category's value off a rendered bar chart (qvl_export.demo.charts)",
             module="qvl_export.demo.charts", max_answer_digits=4, heldout_seed_offset=10_000_000,
             case="chart-task", noun="charts")

TASKS: dict[str, Task] = {t.key: t for t in (INVOICE, FORM, CHART)}


def task_for(name: str | None) -> Task | None:
    """The task whose ``eval.json`` string (or key) is ``name``; None for any other."""
    for task in TASKS.values():
        if name in (task.name, task.key):
            return task
    return None
