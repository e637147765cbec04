"""Steps ``N`` training environments with the current policy and writes each one's steps to its replay stream.

One agent step of the ``N`` environments is split in three so that the learner can update while they step, without
changing DrQ-v2's algorithm: ``prepare()`` resets finished episodes and chooses the ``N`` actions (one batched
forward), ``launch()`` sends them to the environments, ``advance()`` waits for the results and records them. The
updates due at that step run between ``launch()`` and ``advance()``: they read the replay as it was before the
step, exactly as in DrQ-v2's sequential loop, while worker processes render.

Counters are global: ``stats.step`` counts agent steps over all environments (``N`` per vector step), so the frame
budget, the seed frames, the exploration schedule and the update schedule count every environment's steps.
Environment ``i``'s steps in a vector step that starts at global step ``s`` are numbered ``s + i``.

Under DDP (``world_size`` processes, each with its own collector) ``stats.step`` counts this process's agent steps;
they are the same on every process, as the processes step in lockstep. ``frame`` counts the frames of all
processes together (``world_size`` times this process's), and exploration sees the global step
``local step * world_size + rank``, so the frame budget and the exploration schedule mean what they mean on one
device.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from lightning_pieg.replay import StreamReplay

BatchExplorer = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""``explore(observations (N, *obs_shape), agent_steps (N,)) -> actions (N, action_dim)``: the only thing the
collector knows of the agent."""

ENV_SEED_STRIDE = 1000  # training environment i is seeded with seed + i * 1000 (environment 0: the run's seed)


def env_seeds(seed: int, num_envs: int) -> list[int]:
    return [seed + index * ENV_SEED_STRIDE for index in range(num_envs)]


@dataclass
class EpisodeStats:
    """Running counters of the training episodes (all environments run their fixed-length episodes in lockstep)."""

    step: int = 0              # agent steps taken in the whole run, over all environments
    episode: int = 0           # completed episodes, over all environments
    episode_step: int = 0      # agent steps into the current episodes
    episode_rewards: np.ndarray | None = None
    finished: list[tuple[int, int, float, int]] = field(default_factory=list)  # (episode, frame, reward, length)


class Collector:
    """Acts in the environments of ``envs`` (``EnvWorkers`` or ``InProcessEnvs``) with ``explore`` and records each
    environment's steps in its stream of ``replay``."""

    def __init__(self, envs, replay: StreamReplay, explore: BatchExplorer, action_repeat: int, rank: int = 0,
                 world_size: int = 1):
        if len(replay) != len(envs):
            raise ValueError(f"{len(envs)} environments but {len(replay)} replay streams")
        self.envs, self.replay, self.explore, self.action_repeat = envs, replay, explore, action_repeat
        self.num_envs = len(envs)
        self.rank, self.world_size = rank, world_size
        self.stats = EpisodeStats()
        self.observation: np.ndarray | None = None  # (N, *obs_shape) of the current step
        self.last: np.ndarray | None = None         # (N,) whether each environment's episode just ended
        self.pending_action: np.ndarray | None = None
        self.in_flight = False
        self._reset_states: list | None = None  # every environment's random state before the latest reset
        self.seconds = {"act": 0.0, "env": 0.0}  # wall time choosing actions, and waiting for the environments

    @property
    def frame(self) -> int:
        """Frames of all processes together (equal on every process)."""
        return self.stats.step * self.action_repeat * self.world_size

    def global_step(self, step):
        """The run-wide agent step of this process's agent step ``step`` (an int or an array)."""
        return step * self.world_size + self.rank

    def _reset(self, record: bool = True) -> None:
        started = time.perf_counter()
        self._reset_states = [self.envs.get_reset_state(index) for index in range(self.num_envs)]
        result = self.envs.reset()
        self.observation, self.last = result.observation, result.last
        self.stats.episode_step, self.stats.episode_rewards = 0, np.zeros(self.num_envs)
        if record:
            for index in range(self.num_envs):
                self.replay[index].add_first(result.frame[index])
        self.seconds["env"] += time.perf_counter() - started

    def prepare(self) -> np.ndarray:
        """Reset if the episodes are over, then choose (and remember) the actions of the current step."""
        if self.observation is None or self.last.all():
            self._reset()
        elif self.last.any():
            raise RuntimeError(f"environments {np.flatnonzero(self.last).tolist()} ended an episode at step "
                               f"{self.stats.episode_step} and the others did not: the collector needs episodes of "
                               f"one fixed length (DMControl, Jaco and Drawer World have them).")
        steps = self.global_step(self.stats.step + np.arange(self.num_envs))
        started = time.perf_counter()
        actions = np.asarray(self.explore(self.observation, steps), dtype=np.float32)
        self.seconds["act"] += time.perf_counter() - started
        if not np.isfinite(actions).all():
            raise FloatingPointError(f"the policy chose a non-finite action {actions.tolist()} at agent step "
                                     f"{self.stats.step:,} (frame {self.frame:,})")
        self.pending_action = actions
        return actions

    def launch(self) -> None:
        """Send the prepared actions to the environments (worker processes step while the learner updates)."""
        self.envs.step_async(self.pending_action)
        self.in_flight = True

    def advance(self) -> None:
        """Execute (or wait for) the prepared actions and record the step."""
        started = time.perf_counter()
        if not self.in_flight:
            self.launch()
        result = self.envs.step_wait()
        self.seconds["env"] += time.perf_counter() - started
        actions, self.pending_action, self.in_flight = self.pending_action, None, False
        for index in range(self.num_envs):
            self.replay[index].add(actions[index], result.reward[index], result.discount[index], result.frame[index])
        self.observation, self.last = result.observation, result.last
        self.stats.step += self.num_envs
        self.stats.episode_step += 1
        self.stats.episode_rewards += result.reward
        for index in np.flatnonzero(self.last):
            self.stats.episode += 1
            self.stats.finished.append((self.stats.episode, self.frame, float(self.stats.episode_rewards[index]),
                                        self.stats.episode_step))

    def pop_finished(self) -> list[tuple[int, int, float, int]]:
        """Episodes finished since the last call: ``(episode number, frame, reward, length in agent steps)``."""
        finished, self.stats.finished = self.stats.finished, []
        return finished

    # --- checkpointing ------------------------------------------------------------------------------------------
    @property
    def at_fresh_episode(self) -> bool:
        """True right after a reset: the only moment the envs' state is their reset random state alone."""
        return self.observation is not None and self.stats.episode_step == 0

    def state_dict(self) -> dict:
        if not self.at_fresh_episode:
            raise RuntimeError("collector state can only be saved right after an episode reset")
        return {"step": self.stats.step, "episode": self.stats.episode, "pending_actions": self.pending_action,
                "reset_states": self._reset_states}

    def load_state_dict(self, state: dict, replay_restored: bool) -> None:
        """Replay the saved resets, so the envs are where they were; the reset frames are recorded unless the replay
        has them. Checkpoints of one in-process environment (before ``collector.num_envs``) load too."""
        reset_states = state.get("reset_states") or [state["reset_state"]]
        actions = state.get("pending_actions", None)
        if actions is None and state.get("pending_action") is not None:
            actions = np.asarray(state["pending_action"])[None]
        if len(reset_states) != self.num_envs:
            raise ValueError(f"the checkpoint's collector ran {len(reset_states)} environments, this run has "
                             f"{self.num_envs}; resume with collector.num_envs={len(reset_states)}")
        self.stats = EpisodeStats(step=state["step"], episode=state["episode"])
        for index, reset_state in enumerate(reset_states):
            self.envs.set_reset_state(index, reset_state, from_first_reset=self.stats.episode == 0)
        self._reset(record=not replay_restored)
        self.pending_action = actions
