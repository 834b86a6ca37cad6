"""Task registry: one module per task behind `tasks.base.Task`; add a task by adding it here."""

from __future__ import annotations

from typing import Any

from tasks.base import Task, TaskConfigError, TaskData
from tasks.mnns import MNNS
from tasks.prontoqa import ProntoQA
from tasks.prosqa import ProsQA

REGISTRY: dict[str, type[Task]] = {MNNS.name: MNNS, ProsQA.name: ProsQA, ProntoQA.name: ProntoQA}


def get_task(name_or_cfg: Any) -> Task | type[Task]:
    """`get_task("mnns")` gives the class; `get_task(cfg.task)` an instance built from the config."""
    name = name_or_cfg if isinstance(name_or_cfg, str) else name_or_cfg.name
    if name not in REGISTRY:
        raise TaskConfigError(f"unknown task {name!r}: allowed {', '.join(sorted(REGISTRY))}")
    cls = REGISTRY[name]
    return cls if isinstance(name_or_cfg, str) else cls(name_or_cfg)


__all__ = ["REGISTRY", "Task", "TaskConfigError", "TaskData", "get_task"]
