"""Run evaluation episodes with a plain ``act(observation) -> action`` function and summarise them."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import dm_env
import numpy as np


@dataclass
class Episode:
    """One evaluation episode: return, length in agent steps, success (tasks that report it) and frames."""

    reward: float
    length: int
    success: bool | None = None
    frames: list[np.ndarray] = field(default_factory=list)


def run_episode(env: dm_env.Environment, act: Callable[[np.ndarray], np.ndarray], record: bool = False,
                stop_on_success: bool = True) -> Episode:
    """Play one episode. Tasks whose ``env.info`` reports ``success`` end at the first successful step."""
    time_step = env.reset()
    episode = Episode(reward=0.0, length=0)
    if record:
        episode.frames.append(env.frame.copy())
    while not time_step.last():
        time_step = env.step(act(time_step.observation))
        episode.reward += time_step.reward
        episode.length += 1
        if record:
            episode.frames.append(env.frame.copy())
        if "success" in env.info:
            episode.success = bool(episode.success or env.info["success"])
            if episode.success and stop_on_success:
                break
    return episode


def summarise(episodes: list[Episode]) -> dict[str, float]:
    rewards = np.array([e.reward for e in episodes], dtype=np.float64)
    summary = {"episode_reward": float(rewards.mean()), "episode_reward_std": float(rewards.std()),
               "episode_length": float(np.mean([e.length for e in episodes]))}
    successes = [e.success for e in episodes if e.success is not None]
    if successes:
        summary["success_rate"] = float(np.mean(successes))
    return summary
