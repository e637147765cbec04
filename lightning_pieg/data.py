"""The data stream: an IterableDataset that runs the collector and yields replay samples when an update is due."""
from __future__ import annotations

import time
from typing import Callable, Iterator

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, IterableDataset

from lightning_pieg.collector import Collector
from lightning_pieg.replay import StreamReplay

Batch = tuple[torch.Tensor, ...]  # obs, action, reward, discount, next_obs, agent step


def to_checkpoint(value):
    """numpy arrays -> tensors, recursively: Lightning loads checkpoints with ``weights_only=True``."""
    if isinstance(value, np.ndarray):
        return {"__ndarray__": torch.from_numpy(value.copy())}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {k: to_checkpoint(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_checkpoint(v) for v in value)
    return value


def from_checkpoint(value):
    if isinstance(value, dict):
        if set(value) == {"__ndarray__"}:
            return value["__ndarray__"].numpy()
        return {k: from_checkpoint(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(from_checkpoint(v) for v in value)
    return value


def count_updates(first_update_step: int, total_steps: int, update_every_steps: int, from_step: int = 0) -> int:
    """Updates a stream runs from agent step ``from_step`` on: one at every multiple of ``update_every_steps`` in
    ``[first_update_step, total_steps)``."""
    start = max(first_update_step, from_step)
    if start >= total_steps:
        return 0
    first = -(-start // update_every_steps) * update_every_steps
    return max(0, -(-(total_steps - first) // update_every_steps))


class ReplayStream(IterableDataset):
    """Interleaves collection and updates exactly as DrQ-v2's loop: at each vector step (one agent step of every
    environment, global steps ``s .. s + N - 1``) choose the actions, sample a batch for every step ``t`` of them with
    an update due (``t >= first_update_step`` and ``t % update_every_steps == 0``), send the actions to the
    environments, yield the batches while the environments step, then record the step. Iteration ends when the
    run's agent-step budget is spent, so a run stops at its frame budget (the first multiple of ``N`` agent steps at
    or beyond it).

    Under DDP every process runs its own stream. The update schedule uses only counters that are equal on every
    process (this process's agent steps; the processes step in lockstep), never episode ends, replay sizes or wall
    time, so every process runs the same updates; and a stop request (a signal that may reach one process only)
    is agreed on by all of them (``agree``, a collective) at each episode start.

    The learner must not prefetch: consume it with ``training_step(self, dataloader_iter)``.
    """

    def __init__(self, collector: Collector, batch_size: int, update_every_steps: int, first_update_step: int,
                 total_steps: int):
        super().__init__()
        self.collector, self.batch_size = collector, batch_size
        self.update_every_steps, self.first_update_step, self.total_steps = (
            update_every_steps, first_update_step, total_steps)
        self.stop_requested: str | None = None  # set (to the signal's name) to end at the next episode start
        self.updates_left_this_step = 0  # a checkpoint waits until the vector step's updates are all done
        self.sample_seconds = 0.0
        self.agree: Callable[[bool], bool] = bool  # under DDP: True on every process if it is True on any

    def update_due(self, step: int) -> bool:
        return self.first_update_step <= step < self.total_steps and step % self.update_every_steps == 0

    def __iter__(self) -> Iterator[Batch]:
        collector = self.collector
        while collector.stats.step < self.total_steps:
            if collector.pending_action is None:  # a resumed stream starts after its last update, actions chosen
                collector.prepare()
                if collector.at_fresh_episode and self.agree(bool(self.stop_requested)):
                    self.stop_requested = self.stop_requested or "another process's stop"
                    return  # a resumable point: the checkpoint callback writes it at the end of training
                start = collector.stats.step
                due = [step for step in range(start, start + collector.num_envs) if self.update_due(step)]
                # Sampled before the environments step (the replay is the same until advance()), so that sampling
                # does not compete with the workers for the CPU. The update's exploration-noise schedule reads the
                # run-wide step (equal on every process).
                started = time.perf_counter()
                batches = [(*collector.replay.sample(self.batch_size), torch.tensor(step * collector.world_size))
                           for step in due]
                self.sample_seconds += time.perf_counter() - started
                collector.launch()
                for left, batch in zip(range(len(batches) - 1, -1, -1), batches):
                    self.updates_left_this_step = left
                    yield batch
            collector.advance()


StreamBuilder = Callable[[int, int, int], ReplayStream]
"""``build(global_rank, local_rank, world_size) -> ReplayStream``: this process's environments, replay, collector."""


class ReplayDataModule(pl.LightningDataModule):
    """Builds this process's stream in ``setup``, where Lightning knows the process's rank; its state (collector
    counters, env reset state, RNGs) goes into every checkpoint. Under DDP the Lightning checkpoint (written by
    rank 0) holds rank 0's state; every other process writes and reads its own file beside it
    (``FrameCheckpoint`` and ``rank_state``)."""

    def __init__(self, build: StreamBuilder, seed_steps: int, rank_state: Callable[[int], dict] | None = None):
        super().__init__()
        self.build, self.seed_steps, self.rank_state = build, seed_steps, rank_state
        self.stream: ReplayStream | None = None
        self.replay_restored = False

    def setup(self, stage: str) -> None:
        if self.stream is None:
            trainer = self.trainer
            self.stream = self.build(trainer.global_rank, trainer.local_rank, trainer.world_size)
            if trainer.world_size > 1:
                self.stream.agree = lambda flag: trainer.strategy.reduce_boolean_decision(flag, all=False)

    @property
    def collector(self) -> Collector:
        return self.stream.collector

    @property
    def replay(self) -> StreamReplay:
        return self.stream.collector.replay

    def train_dataloader(self) -> DataLoader:
        # batch_size=None: the stream yields whole batches; workers=0: the collector must share the learner's policy.
        # A private generator: creating the iterator draws a seed, which must not shift the global RNG that a
        # resumed run has just restored.
        return DataLoader(self.stream, batch_size=None, num_workers=0, generator=torch.Generator())

    def state_dict(self) -> dict:
        if not self.collector.at_fresh_episode:
            return {"resumable": False}  # e.g. the final weights-only checkpoint, saved mid-episode
        state = {"resumable": True, "collector": self.collector.state_dict(),
                 "first_update_step": self.stream.first_update_step, "torch_rng": torch.get_rng_state(),
                 "replay_rngs": [stream.rng.bit_generator.state for stream in self.replay.streams]}
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        return to_checkpoint(state)

    def load_state_dict(self, state: dict) -> None:
        if not state.get("resumable", False):
            raise ValueError("this checkpoint holds weights for acting and evaluation only and cannot resume "
                             "training; resume from one of the periodic checkpoints instead")
        rank = self.trainer.global_rank
        if rank > 0:  # the Lightning checkpoint holds rank 0's state; this process's is in its own file
            state = self.rank_state(rank)
        state = from_checkpoint(state)
        self.collector.load_state_dict(state["collector"], replay_restored=self.replay_restored)
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        if self.replay_restored:
            self.stream.first_update_step = state["first_update_step"]
            rngs = state.get("replay_rngs") or [state["replay_rng"]]  # one stream before collector.num_envs
            for stream, rng in zip(self.replay.streams, rngs):
                stream.rng.bit_generator.state = rng
        else:
            # An empty replay is refilled before learning resumes, with as many steps as a fresh run's seed phase.
            self.stream.first_update_step = self.collector.stats.step + self.seed_steps
