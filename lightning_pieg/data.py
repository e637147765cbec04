"""The data stream: an IterableDataset that runs the collector and yields replay samples when an update is due."""
from __future__ import annotations

import time
from typing import Iterator

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


class ReplayStream(IterableDataset):
    """Interleaves collection and updates exactly as DrQ-v2's loop: at each vector step (one agent step of every
    environment, global steps ``s .. s + N - 1``) choose the actions, send them to the environments, yield a batch
    for every step ``t`` of them with an update due (``t >= first_update_step`` and ``t % update_every_steps == 0``)
    while the environments step, then record the step. Iteration ends when the run's agent-step budget is spent,
    so a run stops at its frame budget (the first multiple of ``N`` agent steps at or beyond it).

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

    def update_due(self, step: int) -> bool:
        return self.first_update_step <= step < self.total_steps and step % self.update_every_steps == 0

    def num_updates(self, from_step: int = 0) -> int:
        return sum(1 for step in range(from_step, self.total_steps) if self.update_due(step))

    def __iter__(self) -> Iterator[Batch]:
        collector = self.collector
        while collector.stats.step < self.total_steps:
            if collector.pending_action is None:  # a resumed stream starts after its last update, actions chosen
                collector.prepare()
                if self.stop_requested and collector.at_fresh_episode:
                    return  # a resumable point: the checkpoint callback writes it at the end of training
                collector.launch()
                start = collector.stats.step
                due = [step for step in range(start, start + collector.num_envs) if self.update_due(step)]
                for left, step in zip(range(len(due) - 1, -1, -1), due):
                    self.updates_left_this_step = left
                    started = time.perf_counter()
                    batch = (*collector.replay.sample(self.batch_size), torch.tensor(step))
                    self.sample_seconds += time.perf_counter() - started
                    yield batch
            collector.advance()


class ReplayDataModule(pl.LightningDataModule):
    """Owns the stream; its state (collector counters, env reset state, RNGs) goes into every checkpoint."""

    def __init__(self, stream: ReplayStream, seed_steps: int):
        super().__init__()
        self.stream, self.seed_steps = stream, seed_steps
        self.replay_restored = False

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
