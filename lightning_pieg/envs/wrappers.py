"""dm_env wrappers: action repeat, action scaling, pixel rendering, frame stacking.

A pixel environment is built bottom-up::

    dm_control env -> ActionRepeat -> ActionScale -> [scene modes] -> PixelObservation -> [frame modes] -> FrameStack

Scene modes (colours, textures) change the physics model below the renderer; frame modes (video backgrounds)
edit each rendered frame. Every wrapper forwards unknown attributes (``physics``, ``task``) to the wrapped env.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

import dm_env
import numpy as np
from dm_env import specs


EnvTransform = Callable[[dm_env.Environment, int, dict], dm_env.Environment]


@dataclass(frozen=True)
class Mode:
    """How an evaluation mode changes a task's scene.

    ``scene`` wraps the action-scaled env below the renderer (it may edit the physics model, e.g. colours);
    ``frames`` wraps the single-frame pixel env (it may edit each rendered frame, e.g. video backgrounds).
    Both are called as ``transform(env, seed, options)`` and return the wrapped env.
    """

    scene: EnvTransform | None = None
    frames: EnvTransform | None = None


def first_step(observation: Any) -> dm_env.TimeStep:
    """A FIRST time step with reward 0 and discount 1, so the replay never sees ``None``."""
    return dm_env.TimeStep(dm_env.StepType.FIRST, 0.0, 1.0, observation)


class Wrapper(dm_env.Environment):
    """Forwards everything to ``env``; subclasses override what they change."""

    def __init__(self, env: dm_env.Environment):
        self._env = env

    def reset(self) -> dm_env.TimeStep:
        return self._env.reset()

    def step(self, action: np.ndarray) -> dm_env.TimeStep:
        return self._env.step(action)

    def observation_spec(self):
        return self._env.observation_spec()

    def action_spec(self):
        return self._env.action_spec()

    @property
    def info(self) -> dict:
        """The last step's extra information (e.g. ``success``); empty where the task has none."""
        return getattr(self._env, "info", {})

    def close(self) -> None:
        close = getattr(self._env, "close", None)
        if close is not None:
            close()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self._env, name)


class ActionRepeat(Wrapper):
    """Repeats each action ``num_repeats`` times; rewards add up, discounts multiply."""

    def __init__(self, env: dm_env.Environment, num_repeats: int):
        super().__init__(env)
        self._num_repeats = num_repeats

    def reset(self) -> dm_env.TimeStep:
        return first_step(self._env.reset().observation)

    def step(self, action: np.ndarray) -> dm_env.TimeStep:
        reward, discount = 0.0, 1.0
        for _ in range(self._num_repeats):
            time_step = self._env.step(action)
            reward += (time_step.reward or 0.0) * discount
            discount *= time_step.discount
            if time_step.last():
                break
        return time_step._replace(reward=reward, discount=discount)


class ActionScale(Wrapper):
    """Exposes actions in [-1, 1] and maps them linearly onto the wrapped env's bounds."""

    def __init__(self, env: dm_env.Environment):
        super().__init__(env)
        spec = env.action_spec()
        self._low = spec.minimum.astype(np.float64)
        self._high = spec.maximum.astype(np.float64)
        self._spec = specs.BoundedArray(spec.shape, np.float32, -1.0, 1.0, "action")

    def action_spec(self) -> specs.BoundedArray:
        return self._spec

    def step(self, action: np.ndarray) -> dm_env.TimeStep:
        action = np.clip(np.asarray(action, dtype=np.float64), -1.0, 1.0)
        scaled = self._low + (action + 1.0) * 0.5 * (self._high - self._low)
        return self._env.step(scaled)


class PixelObservation(Wrapper):
    """Replaces the observation by one channels-first uint8 frame, rendered once per agent step."""

    def __init__(self, env: dm_env.Environment, size: int, render: Callable[[int, int], np.ndarray]):
        super().__init__(env)
        self._size = size
        self._render = render

    def _frame(self) -> np.ndarray:
        return np.ascontiguousarray(self._render(self._size, self._size).transpose(2, 0, 1))

    def observation_spec(self) -> specs.BoundedArray:
        return specs.BoundedArray((3, self._size, self._size), np.uint8, 0, 255, "pixels")

    def reset(self) -> dm_env.TimeStep:
        return self._env.reset()._replace(observation=self._frame())

    def step(self, action: np.ndarray) -> dm_env.TimeStep:
        return self._env.step(action)._replace(observation=self._frame())


class FrameStack(Wrapper):
    """Stacks the last ``num_frames`` frames on the channel axis; the reset frame fills the stack."""

    def __init__(self, env: dm_env.Environment, num_frames: int):
        super().__init__(env)
        self._num_frames = num_frames
        self._frames: deque[np.ndarray] = deque(maxlen=num_frames)
        spec = env.observation_spec()
        shape = (spec.shape[0] * num_frames, *spec.shape[1:])
        self._spec = specs.BoundedArray(shape, np.uint8, 0, 255, "pixels")

    def observation_spec(self) -> specs.BoundedArray:
        return self._spec

    def _stacked(self, time_step: dm_env.TimeStep) -> dm_env.TimeStep:
        return time_step._replace(observation=np.concatenate(list(self._frames), axis=0))

    def reset(self) -> dm_env.TimeStep:
        time_step = self._env.reset()
        for _ in range(self._num_frames):
            self._frames.append(time_step.observation)
        return self._stacked(time_step)

    def step(self, action: np.ndarray) -> dm_env.TimeStep:
        time_step = self._env.step(action)
        self._frames.append(time_step.observation)
        return self._stacked(time_step)

    @property
    def frame(self) -> np.ndarray:
        """The newest single frame (3, H, W): what a video of the episode shows."""
        return self._frames[-1]


def pixel_env(env: dm_env.Environment, render: Callable[[int, int], np.ndarray], *, action_repeat: int,
              image_size: int, frame_stack: int, mode: Mode = Mode(), seed: int = 0,
              options: dict | None = None) -> FrameStack:
    """The standard stack over a base env: action repeat and scaling, the mode's scene edits, one render per agent
    step (``render(height, width)`` -> HxWx3 uint8), the mode's frame edits, frame stacking."""
    env = ActionScale(ActionRepeat(env, action_repeat))
    if mode.scene is not None:
        env = mode.scene(env, seed, options or {})
    env = PixelObservation(env, image_size, render)
    if mode.frames is not None:
        env = mode.frames(env, seed, options or {})
    return FrameStack(env, frame_stack)
