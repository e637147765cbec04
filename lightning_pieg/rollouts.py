"""Run evaluation episodes with a plain ``act(observation) -> action`` function and summarise them.

Two ways to run episodes: ``run_episode`` plays one episode on one environment (training-time evaluation unless
``eval_workers`` is set), and ``run_lockstep`` plays a fixed set of episodes on several environments at once,
batching their observations into one ``act`` call per step; in worker processes (``EnvWorkers``) the environments
step in parallel. In ``run_lockstep`` episode k always starts where a reference environment (built like the others,
same seed) is at its k-th reset when reset back to back (``EpisodeStarts``), so the results do not depend on how
many environments share the work. For modes whose randomness is drawn at reset (every mode but ``distracting_cs``,
whose distractions keep drifting through a sequential run's episodes) that is exactly the sequential
one-environment protocol.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import dm_env
import numpy as np
import torch
from torchmetrics.aggregation import CatMetric

from lightning_pieg.envs import get_reset_state
from lightning_pieg.workers import InProcessEnvs

EVAL_SEED_OFFSET = 42  # evaluation environments are seeded with the training seed + 42, as the authors'
EVAL_RANK_SEED_STRIDE = 10_000  # under DDP, process r evaluates with seed + 42 + r * stride


@dataclass
class Episode:
    """One evaluation episode: return, length in agent steps, success (tasks that report it) and frames."""

    reward: float
    length: int
    success: bool | None = None
    frames: list[np.ndarray] = field(default_factory=list)


def _record(episode: Episode, reward: float, info: dict, last: bool, frame: np.ndarray | None,
            stop_on_success: bool) -> bool:
    """Add one agent step to ``episode``; returns whether the episode is over."""
    episode.reward += float(reward)
    episode.length += 1
    if frame is not None:
        episode.frames.append(frame.copy())
    if "success" in info:
        episode.success = bool(episode.success or info["success"])
        return last or (episode.success and stop_on_success)
    return last


def run_episode(env: dm_env.Environment, act: Callable[[np.ndarray], np.ndarray], record: bool = False,
                stop_on_success: bool = True) -> Episode:
    """Play one episode. Tasks whose ``env.info`` reports ``success`` end at the first successful step."""
    time_step = env.reset()
    episode = Episode(reward=0.0, length=0)
    if record:
        episode.frames.append(env.frame.copy())
    done = False
    while not done:
        time_step = env.step(act(time_step.observation))
        done = _record(episode, time_step.reward, env.info, time_step.last(), env.frame if record else None,
                       stop_on_success)
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


def run_lockstep(envs, act: Callable[[np.ndarray], np.ndarray], num_episodes: int, starts: EpisodeStarts,
                 record_first: bool = False, stop_on_success: bool = True,
                 on_episode: Callable[[Episode], None] | None = None) -> list[Episode]:
    """Play episodes ``0 .. num_episodes - 1`` on ``envs`` in lockstep; returns them in that order.

    ``envs`` is an ``EnvWorkers`` (its worker processes step in parallel), an ``InProcessEnvs`` or a list of
    environments. ``act`` maps a ``(B, *obs_shape)`` batch of observations (one per running environment) to
    ``(B, *action_shape)`` actions. An environment that finishes takes the next episode; ``record_first`` keeps
    episode 0's frames; ``on_episode`` is called with every finished episode (progress bars, metrics).
    """
    pool = envs if hasattr(envs, "step_async") else InProcessEnvs(list(envs))
    if len(pool) == 0:
        raise ValueError("run_lockstep needs at least one environment.")
    episodes: list[Episode | None] = [None] * num_episodes
    playing: dict[int, tuple[int, Episode, np.ndarray]] = {}  # env -> (episode index, episode, its observation)
    started = [False] * len(pool)

    def start(env_index: int, episode_index: int) -> None:
        state, first_observation = starts[episode_index]
        pool.set_reset_state(env_index, state, from_first_reset=episode_index == 0)
        result = pool.reset([env_index])
        if not started[env_index] and not np.array_equal(result.observation[0], first_observation):
            # Composer environments draw more on their very first reset: when the reference had been reset before
            # (training-time evaluation reuses it), its episode 0 is a later reset, and this first reset was only
            # the warm-up. Restore again.
            pool.set_reset_state(env_index, state)
            result = pool.reset([env_index])
        started[env_index] = True
        if not np.array_equal(result.observation[0], first_observation):
            raise RuntimeError(f"episode {episode_index} did not start as the reference environment's reset "
                               f"{episode_index} did: this environment family does not restore its whole reset "
                               f"state; fix its reset_state/load_reset_state (see "
                               f"lightning_pieg.envs.get_reset_state).")
        episode = Episode(reward=0.0, length=0)
        if record_first and episode_index == 0:
            episode.frames.append(result.frame[0].copy())
        playing[env_index] = (episode_index, episode, result.observation[0].copy())

    next_episode = min(len(pool), num_episodes)
    for env_index in range(next_episode):
        start(env_index, env_index)
    while playing:
        running = sorted(playing)
        actions = act(np.stack([playing[index][2] for index in running]))
        result = pool.step(np.asarray(actions), indices=running)
        for row, env_index in enumerate(running):
            episode_index, episode, _ = playing[env_index]
            record = record_first and episode_index == 0
            done = _record(episode, result.reward[row], result.info[row], bool(result.last[row]),
                           result.frame[row] if record else None, stop_on_success)
            if not done:
                playing[env_index] = (episode_index, episode, result.observation[row].copy())
                continue
            del playing[env_index]
            episodes[episode_index] = episode
            if on_episode is not None:
                on_episode(episode)
            if next_episode < num_episodes:
                start(env_index, next_episode)
                next_episode += 1
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
