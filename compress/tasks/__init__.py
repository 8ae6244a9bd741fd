"""Tasks: how a model family computes its training loss and is evaluated; stages never re-implement these."""
from __future__ import annotations

from compress.errors import unknown_choice
from compress.tasks.base import Task
from compress.tasks.classification import ClassificationTask
from compress.tasks.detection import DetectionTask

TASKS: dict[str, type[Task]] = {"classification": ClassificationTask, "detection": DetectionTask}


def get_task(name: str) -> Task:
    """The task object for a recipe's `task` field."""
    if name not in TASKS:
        raise ValueError(unknown_choice("task", name, TASKS))
    return TASKS[name]()


__all__ = ["Task", "ClassificationTask", "DetectionTask", "get_task", "TASKS"]
