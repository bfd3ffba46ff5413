"""Task plug-ins: :func:`build_task` dispatches on ``data.task`` through a small registry.

>>> from glora.tasks import available_tasks
>>> "sst2" in available_tasks()
True

A new task type registers a builder ``(RunConfig) -> Task`` under its name (or a family name
with :func:`register_task`); the simulator and the CLI need no change.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from glora.tasks.base import Task, TaskError

if TYPE_CHECKING:
    from glora.config import RunConfig

__all__ = ["Task", "TaskError", "available_tasks", "build_task", "register_task"]

TaskBuilder = Callable[["RunConfig"], Task]

_REGISTRY: dict[str, TaskBuilder] = {}


def register_task(name: str, builder: TaskBuilder, *, force: bool = False) -> None:
    """Register ``builder`` for ``data.task == name`` (a task or a family of task names)."""
    key = name.lower()
    if key in _REGISTRY and not force:
        raise ValueError(f"task {name!r} is already registered; pass force=True to replace it")
    _REGISTRY[key] = builder


def _glue_builder(config: RunConfig) -> Task:
    from glora.tasks.glue import GlueTask

    return GlueTask(config)


def _superni_builder(config: RunConfig) -> Task:
    from glora.tasks.superni import SuperNIGenerationTask

    return SuperNIGenerationTask(config)


def _register_builtin() -> None:
    from glora.data.glue import GLUE_TASKS

    for name in GLUE_TASKS:
        _REGISTRY.setdefault(name, _glue_builder)
    _REGISTRY.setdefault("superni", _superni_builder)


def available_tasks() -> list[str]:
    """Registered task names, sorted."""
    _register_builtin()
    return sorted(_REGISTRY)


def build_task(config: RunConfig) -> Task:
    """The task plug-in for ``config.data.task`` (TaskError listing the valid names otherwise)."""
    _register_builtin()
    key = config.data.task.strip().lower()
    builder = _REGISTRY.get(key) or _REGISTRY.get(key.replace("-", "").replace("_", ""))
    if builder is None:
        family = key.split("/", 1)[0].split(":", 1)[0]
        builder = _REGISTRY.get(family)
    if builder is None:
        raise TaskError(
            f"data.task: unknown task {config.data.task!r}; allowed values: "
            f"{', '.join(available_tasks())}"
        )
    return builder(config)
