"""Steps a training environment with the current policy and writes every step to the replay."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import dm_env
import numpy as np

from lightning_pieg.envs import get_reset_state, restore_reset_state
from lightning_pieg.replay import Replay

Policy = Callable[[np.ndarray, int, bool], np.ndarray]
"""``act(observation, agent_step, explore) -> action``: the only thing the collector knows of the agent."""


@dataclass
class EpisodeStats:
    """Running counters of the training episodes."""

    step: int = 0              # agent steps taken in the whole run
    episode: int = 0           # completed episodes
    episode_step: int = 0      # agent steps into the current episode
    episode_reward: float = 0.0
    finished: list[tuple[int, int, float, int]] = field(default_factory=list)  # (episode, frame, reward, length)


class Collector:
    """Acts in ``env`` with ``policy`` (exploration on) and records each step in ``replay``.

    One agent step is split in two so that the learner can update between choosing an action and executing it,
    as DrQ-v2's loop does: ``prepare()`` resets a finished episode and chooses the action, ``advance()`` executes it.
    """

    def __init__(self, env: dm_env.Environment, replay: Replay, policy: Policy, action_repeat: int):
        self.env, self.replay, self.policy, self.action_repeat = env, replay, policy, action_repeat
        self.stats = EpisodeStats()
        self.time_step: dm_env.TimeStep | None = None
        self.pending_action: np.ndarray | None = None
        self._reset_state = None  # env random state just before the latest reset (for exact resumption)

    @property
    def frame(self) -> int:
        return self.stats.step * self.action_repeat

    def _reset(self, record: bool = True) -> None:
        self._reset_state = get_reset_state(self.env)
        self.time_step = self.env.reset()
        self.stats.episode_step, self.stats.episode_reward = 0, 0.0
        if record:
            self.replay.add_first(self.env.frame)

    def prepare(self) -> np.ndarray:
        """Reset if the episode is over, then choose (and remember) the action for the current step."""
        if self.time_step is None or self.time_step.last():
            self._reset()
        self.pending_action = np.asarray(self.policy(self.time_step.observation, self.stats.step, True),
                                         dtype=np.float32)
        if not np.isfinite(self.pending_action).all():
            raise FloatingPointError(f"the policy chose a non-finite action {self.pending_action} at agent step "
                                     f"{self.stats.step:,} (frame {self.frame:,})")
        return self.pending_action

    def advance(self) -> None:
        """Execute the prepared action and record the step."""
        action, self.pending_action = self.pending_action, None
        self.time_step = self.env.step(action)
        self.replay.add(action, self.time_step.reward, self.time_step.discount, self.env.frame)
        self.stats.step += 1
        self.stats.episode_step += 1
        self.stats.episode_reward += self.time_step.reward
        if self.time_step.last():
            self.stats.episode += 1
            self.stats.finished.append((self.stats.episode, self.frame, self.stats.episode_reward,
                                        self.stats.episode_step))

    def pop_finished(self) -> list[tuple[int, int, float, int]]:
        """Episodes finished since the last call: ``(episode number, frame, reward, length in agent steps)``."""
        finished, self.stats.finished = self.stats.finished, []
        return finished

    # --- checkpointing ------------------------------------------------------------------------------------------
    @property
    def at_fresh_episode(self) -> bool:
        """True right after a reset: the only moment the env's state is its reset random state alone."""
        return self.time_step is not None and self.stats.episode_step == 0

    def state_dict(self) -> dict:
        if not self.at_fresh_episode:
            raise RuntimeError("collector state can only be saved right after an episode reset")
        return {"step": self.stats.step, "episode": self.stats.episode, "pending_action": self.pending_action,
                "reset_state": self._reset_state}

    def load_state_dict(self, state: dict, replay_restored: bool) -> None:
        """Replay the saved reset, so the env is where it was; the reset frame is recorded unless the replay has it."""
        self.stats = EpisodeStats(step=state["step"], episode=state["episode"])
        restore_reset_state(self.env, state["reset_state"], later_reset_on_fresh_env=self.stats.episode > 0)
        self._reset(record=not replay_restored)
        self.pending_action = state["pending_action"]
