"""Environment factory: ``make(task, mode, seed, **options)`` returns a dm_env environment from pixels.

Every environment gives ``TimeStep``s whose observation is a uint8 ``(3 * frame_stack, 84, 84)`` frame stack,
takes actions in [-1, 1], and exposes the last step's extra information as ``env.info``.
"""
from __future__ import annotations

import importlib

import dm_env

from lightning_pieg.envs.rendering import select_backend

select_backend()

# Task family modules, each with ``TASKS`` (names) and ``MODES`` (evaluation modes) and a ``make`` function.
FAMILIES = ("lightning_pieg.envs.suite",)


def _families():
    return [importlib.import_module(name) for name in FAMILIES]


def task_names() -> list[str]:
    return sorted(task for family in _families() for task in family.TASKS)


def mode_names(task: str) -> list[str]:
    return sorted(_family_of(task).MODES)


def _family_of(task: str):
    for family in _families():
        if task in family.TASKS:
            return family
    raise ValueError(f"Unknown task {task!r}. Valid tasks: {', '.join(task_names())}.")


def check(task: str, mode: str = "train") -> None:
    """Raise a clear ``ValueError`` for an unknown task or mode, without building anything."""
    family = _family_of(task)
    if mode not in family.MODES:
        raise ValueError(f"Unknown mode {mode!r} for task {task!r}. Valid modes: {', '.join(sorted(family.MODES))}.")


def make(task: str, mode: str = "train", seed: int = 0, **options) -> dm_env.Environment:
    """Build ``task`` in evaluation ``mode`` (``train`` is the unchanged training scene), seeded by ``seed``.

    ``options`` go to the task family: ``frame_stack`` (3), ``action_repeat`` (2), ``image_size`` (84), and
    mode-specific settings such as data directories.
    """
    check(task, mode)
    return _family_of(task).make(task, mode=mode, seed=seed, **options)
