"""Environment factory: ``make(task, mode, seed, **options)`` returns a dm_env environment from pixels.

Every environment gives ``TimeStep``s whose observation is a uint8 ``(3 * frame_stack, 84, 84)`` frame stack,
takes actions in [-1, 1], and exposes the last step's extra information as ``env.info``.
"""
from __future__ import annotations

import importlib
import importlib.util

import dm_env

from lightning_pieg.envs.options import check_known
from lightning_pieg.envs.rendering import RenderingError, load_gl, select_backend  # noqa: F401
from lightning_pieg.envs.wrappers import Wrapper

select_backend()

# Task family modules, each with ``TASKS`` (names), ``MODES`` (evaluation modes), ``OPTIONS`` (the ``make`` options
# it takes besides ``options.COMMON_OPTIONS``) and a ``make`` function.
FAMILIES = ("lightning_pieg.envs.suite", "lightning_pieg.envs.manipulation", "lightning_pieg.envs.drawerworld")


def _families():
    load_gl()
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
    for package, install in getattr(family, "REQUIRES", {}).items():
        if importlib.util.find_spec(package) is None:
            raise ValueError(f"task {task} needs the {package} package, which is not installed: {install}")
    if mode not in family.MODES:
        raise ValueError(f"Unknown mode {mode!r} for task {task}. Valid modes: {', '.join(sorted(family.MODES))}.")


def check_options(task: str, options: dict) -> None:
    """Raise a clear ``ValueError`` for an option ``task``'s family does not take, without building anything."""
    check_known(task, options, _family_of(task).OPTIONS)


def make(task: str, mode: str = "train", seed: int = 0, **options) -> dm_env.Environment:
    """Build ``task`` in evaluation ``mode`` (``train`` is the unchanged training scene), seeded by ``seed``.

    ``options`` go to the task family: ``frame_stack`` (3), ``action_repeat`` (2), ``image_size`` (84), and
    mode-specific settings such as data directories.
    """
    check(task, mode)
    check_options(task, options)
    return _family_of(task).make(task, mode=mode, seed=seed, **options)


def _layers(env: dm_env.Environment) -> list:
    layers = [env]
    while isinstance(layers[-1], Wrapper):
        layers.append(layers[-1]._env)
    return layers


def _base_random(base):
    """The numpy RandomState a dm_control env draws its episodes from (suite: task.random; composer: random_state)."""
    if hasattr(base, "task") and hasattr(base.task, "random"):
        return base.task.random
    return getattr(base, "random_state", None)


def get_reset_state(env: dm_env.Environment) -> list:
    """Everything the next ``reset()`` draws from: each layer's ``reset_state()`` and the base env's RNG state.

    Layers with state of their own (a colour generator, a video counter) define ``reset_state`` and
    ``load_reset_state``; restoring this list and calling ``reset()`` reproduces the same episode start.
    """
    states = []
    for layer in _layers(env):
        if hasattr(type(layer), "reset_state"):  # defined by the layer itself, not forwarded to the wrapped env
            states.append(layer.reset_state())
        elif not isinstance(layer, Wrapper) and _base_random(layer) is not None:
            states.append(_base_random(layer).get_state())
        else:
            states.append(None)
    return states


def set_reset_state(env: dm_env.Environment, states: list) -> None:
    layers = _layers(env)
    if len(states) != len(layers):
        raise ValueError("saved environment state does not match this environment's wrappers")
    for layer, state in zip(layers, states):
        if state is None:
            continue
        if hasattr(type(layer), "load_reset_state"):
            layer.load_reset_state(state)
        else:
            _base_random(layer).set_state(state)


def restore_reset_state(env: dm_env.Environment, states: list, later_reset_on_fresh_env: bool) -> None:
    """``set_reset_state`` for an environment whose next ``reset()`` should replay a saved reset.

    dm_control's composer environments (``reach_duplo``) draw more on their very first reset than on later ones:
    when the saved state is of a later reset and this environment has never been reset, it is reset once first.
    """
    if later_reset_on_fresh_env:
        env.reset()
    set_reset_state(env, states)
