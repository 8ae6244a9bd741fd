"""Tasks: how a model family computes its training loss and is evaluated; stages never re-implement these."""
from __future__ import annotations

from compress.registry import Registry
from compress.tasks.base import Task
from compress.tasks.classification import ClassificationTask
from compress.tasks.detection import DetectionTask

TASKS: Registry[type[Task]] = Registry("task")
TASKS.add("classification", ClassificationTask)
TASKS.add("detection", DetectionTask)


def get_task(name: str) -> Task:
    """The task object for a recipe's `task` field."""
    return TASKS.lookup(name)()


__all__ = ["Task", "ClassificationTask", "DetectionTask", "get_task", "TASKS"]
