"""Run evaluation episodes with a plain ``act(observation) -> action`` function and summarise them.

Two ways to run episodes: ``run_episode`` plays one episode on one environment (training-time evaluation), and
``run_lockstep`` plays a fixed set of episodes on several environments at once, batching their observations into
one ``act`` call per step. In ``run_lockstep`` episode k always starts where a reference environment (built like the
others, same seed) is at its k-th reset when reset back to back (``EpisodeStarts``), so the results do not depend on
how many environments share the work. For modes whose randomness is drawn at reset (every mode but
``distracting_cs``, whose distractions keep drifting through a sequential run's episodes) that is exactly the
sequential one-environment protocol.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import dm_env
import numpy as np
import torch
from torchmetrics.aggregation import CatMetric

from lightning_pieg.envs import get_reset_state, restore_reset_state

EVAL_SEED_OFFSET = 42  # evaluation environments are seeded with the training seed + 42, as the authors'
EVAL_RANK_SEED_STRIDE = 10_000  # under DDP, process r evaluates with seed + 42 + r * stride


@dataclass
class Episode:
    """One evaluation episode: return, length in agent steps, success (tasks that report it) and frames."""

    reward: float
    length: int
    success: bool | None = None
    frames: list[np.ndarray] = field(default_factory=list)


def _advance(env: dm_env.Environment, episode: Episode, action: np.ndarray, record: bool,
             stop_on_success: bool) -> tuple[dm_env.TimeStep, bool]:
    """One agent step of ``episode``; returns the time step and whether the episode is over."""
    time_step = env.step(action)
    episode.reward += float(time_step.reward)
    episode.length += 1
    if record:
        episode.frames.append(env.frame.copy())
    done = time_step.last()
    if "success" in env.info:
        episode.success = bool(episode.success or env.info["success"])
        done = done or (episode.success and stop_on_success)
    return time_step, done


def run_episode(env: dm_env.Environment, act: Callable[[np.ndarray], np.ndarray], record: bool = False,
                stop_on_success: bool = True) -> Episode:
    """Play one episode. Tasks whose ``env.info`` reports ``success`` end at the first successful step."""
    time_step = env.reset()
    episode = Episode(reward=0.0, length=0)
    if record:
        episode.frames.append(env.frame.copy())
    done = False
    while not done:
        time_step, done = _advance(env, episode, act(time_step.observation), record, stop_on_success)
    return episode


class EpisodeStarts:
    """Episode k's start: the reset state and first observation of ``reference`` at its k-th back-to-back reset.

    The reference is only ever reset (lazily, as far as asked), so an environment's steps never shift the starts.
    """

    def __init__(self, reference: dm_env.Environment):
        self.reference = reference
        self._states: list[list] = []
        self._observations: list[np.ndarray] = []

    def __getitem__(self, index: int) -> tuple[list, np.ndarray]:
        while len(self._states) <= index:
            self._states.append(get_reset_state(self.reference))
            self._observations.append(self.reference.reset().observation.copy())
        return self._states[index], self._observations[index]


class _Worker:
    """An environment of ``run_lockstep`` and the episode it is playing."""

    def __init__(self, env: dm_env.Environment):
        self.env, self.resets = env, 0
        self.index, self.episode, self.time_step = -1, Episode(0.0, 0), None

    def start(self, index: int, starts: EpisodeStarts, record: bool) -> None:
        state, first_observation = starts[index]
        restore_reset_state(self.env, state, later_reset_on_fresh_env=index > 0 and self.resets == 0)
        self.time_step = self.env.reset()
        self.resets = index + 1
        if not np.array_equal(self.time_step.observation, first_observation):
            raise RuntimeError(f"episode {index} did not start as the reference environment's reset {index} did: "
                               f"this environment family does not restore its whole reset state; fix its "
                               f"reset_state/load_reset_state (see lightning_pieg.envs.get_reset_state).")
        self.index, self.episode = index, Episode(reward=0.0, length=0)
        if record:
            self.episode.frames.append(self.env.frame.copy())


def run_lockstep(envs: Sequence[dm_env.Environment], act: Callable[[np.ndarray], np.ndarray], num_episodes: int,
                 starts: EpisodeStarts, record_first: bool = False, stop_on_success: bool = True,
                 on_episode: Callable[[Episode], None] | None = None) -> list[Episode]:
    """Play episodes ``0 .. num_episodes - 1`` on ``envs`` in lockstep; returns them in that order.

    ``act`` maps a ``(B, *obs_shape)`` batch of observations (one per running environment) to ``(B, *action_shape)``
    actions. An environment that finishes takes the next episode; ``record_first`` keeps episode 0's frames;
    ``on_episode`` is called with every finished episode (progress bars, metrics).
    """
    if not envs:
        raise ValueError("run_lockstep needs at least one environment.")
    workers = [_Worker(env) for env in envs]
    episodes: list[Episode | None] = [None] * num_episodes
    running: list[_Worker] = []
    next_index = 0
    for worker in workers[:num_episodes]:
        worker.start(next_index, starts, record_first and next_index == 0)
        running.append(worker)
        next_index += 1
    while running:
        actions = act(np.stack([worker.time_step.observation for worker in running]))
        still_running = []
        for worker, action in zip(running, actions):
            worker.time_step, done = _advance(worker.env, worker.episode, action,
                                              record_first and worker.index == 0, stop_on_success)
            if not done:
                still_running.append(worker)
                continue
            episodes[worker.index] = worker.episode
            if on_episode is not None:
                on_episode(worker.episode)
            if next_index < num_episodes:
                worker.start(next_index, starts, False)
                next_index += 1
                still_running.append(worker)
        running = still_running
    return episodes


def evaluation_seed(training_seed: int, rank: int = 0) -> int:
    """The seed of evaluation environments: the training seed + 42, as the authors evaluate; under DDP, process
    ``rank`` adds ``rank * EVAL_RANK_SEED_STRIDE`` so that processes play different episodes."""
    return training_seed + EVAL_SEED_OFFSET + rank * EVAL_RANK_SEED_STRIDE


def episodes_per_process(num_episodes: int, world_size: int) -> int:
    """Episodes each process plays so that together they play at least ``num_episodes``."""
    return math.ceil(num_episodes / max(world_size, 1))


class EpisodeMetrics:
    """Mean and (population) std of returns, mean length and success rate, aggregated with torchmetrics:
    ``compute`` gathers the episodes of every process under DDP (call it on every process)."""

    def __init__(self, device: torch.device | str = "cpu"):
        # float64: returns of 1000-step episodes lose digits in float32; .to() resets the dtype, so it comes first
        self.rewards = CatMetric().to(device).set_dtype(torch.float64)
        self.lengths = CatMetric().to(device).set_dtype(torch.float64)
        self.successes = CatMetric().to(device).set_dtype(torch.float64)
        self._reports_success = False

    def update(self, episode: Episode) -> None:
        self.rewards.update(torch.tensor([episode.reward], dtype=torch.float64))
        self.lengths.update(torch.tensor([float(episode.length)], dtype=torch.float64))
        if episode.success is not None:
            self._reports_success = True
            self.successes.update(torch.tensor([float(episode.success)], dtype=torch.float64))

    def compute(self) -> dict[str, float]:
        rewards, lengths = self.rewards.compute().reshape(-1), self.lengths.compute().reshape(-1)
        summary = {"episode_reward": rewards.mean().item(), "episode_reward_std": rewards.std(correction=0).item(),
                   "episode_length": lengths.mean().item()}
        if self._reports_success:
            summary["success_rate"] = self.successes.compute().reshape(-1).mean().item()
        return summary

    def count(self) -> int:
        """Episodes aggregated (over every process)."""
        return int(self.rewards.compute().numel())
