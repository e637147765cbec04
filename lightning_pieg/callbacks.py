"""Lightning callbacks: training metrics and progress, periodic (generalization) evaluation with videos,
frame-based checkpoints."""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import dm_env
import numpy as np
import pytorch_lightning as pl
import torch

from lightning_pieg.data import ReplayDataModule
from lightning_pieg.evaluation import EpisodeMetrics, episodes_per_process, run_episode
from lightning_pieg.tracking import log_artifact
from lightning_pieg.video import write_video


def log_metrics(trainer: pl.Trainer, metrics: dict[str, float], frame: int) -> None:
    """Log on every logger with the frame count as the step, so runs line up in the MLflow UI."""
    if trainer.is_global_zero:
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=frame)


def updated(outputs) -> bool:
    """False for the batch-end call Lightning makes after the stream ran out (no update happened)."""
    return bool(outputs)


def _stream(trainer: pl.Trainer) -> ReplayDataModule:
    return trainer.datamodule


class TrainingProgress(pl.Callback):
    """Logs ``train/*`` (losses every ``log_every_updates`` updates, every finished episode) and prints a line
    with frame, episode reward, frames/s and the time left at every episode end.

    ``train/fps`` is DrQ-v2's: frames per second since the previous episode end, but with the time that
    ``paused()`` reports (evaluation) left out, so it measures collection and updates alone. The eta uses the
    overall rate, evaluation included."""

    def __init__(self, total_frames: int, log_every_updates: int = 50, print_fn: Callable[[str], None] = print,
                 paused: Callable[[], float] = lambda: 0.0):
        self.total_frames, self.log_every_updates, self.print, self.paused = total_frames, log_every_updates, \
            print_fn, paused
        self._updates = 0
        self._start: tuple[float, int] | None = None     # wall time and frame when training started
        self._window: tuple[float, int] | None = None    # the same at the last episode end, evaluation excluded

    def on_train_start(self, trainer, pl_module) -> None:
        frame = _stream(trainer).collector.frame
        self._start = (time.perf_counter(), frame)
        self._window = (time.perf_counter() - self.paused(), frame)

    def _fps(self, frame: int) -> float:
        start, start_frame = self._window
        return (frame - start_frame) / max(time.perf_counter() - self.paused() - start, 1e-9)

    def _overall_fps(self, frame: int) -> float:
        start, start_frame = self._start
        return (frame - start_frame) / max(time.perf_counter() - start, 1e-9)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not updated(outputs):
            return
        frame = _stream(trainer).collector.frame
        self._updates += 1
        if self._updates % self.log_every_updates == 0:
            log_metrics(trainer, {**pl_module.last_metrics, "train/fps": self._fps(frame)}, frame)
        self._log_episodes(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self._log_episodes(trainer)

    def _log_episodes(self, trainer) -> None:
        collector = _stream(trainer).collector
        frame = collector.frame
        finished = collector.pop_finished()
        if not finished:
            return
        fps, overall = self._fps(frame), self._overall_fps(frame)
        self._window = (time.perf_counter() - self.paused(), frame)
        for episode, episode_frame, reward, length in finished:
            log_metrics(trainer, {"train/episode_reward": reward, "train/episode_length": length * collector.action_repeat,
                                  "train/episode": episode, "train/fps": fps}, episode_frame)
            eta = (self.total_frames - frame) / max(overall, 1e-9)
            self.print(f"frame {episode_frame:>9,}/{self.total_frames:,} | episode {episode:>5} | "
                       f"episode_reward {reward:8.1f} | {fps:6.1f} frames/s | eta {eta / 60:6.1f} min")


@dataclass
class EvalEnv:
    """One mode of the training-time evaluation: its environment and which BatchNorm statistics act in it."""

    mode: str                       # as ``envs.make`` knows it
    env: dm_env.Environment
    per_observation_bn: bool = False
    name: str | None = None         # in metric and video names (``distracting_cs_0.1``); default: ``mode``

    @property
    def reported(self) -> str:
        return self.name or self.mode


def _actor(pl_module, step: int, per_observation_bn: bool) -> Callable[[np.ndarray], np.ndarray]:
    """The mean action for one observation, with running or per-observation BatchNorm statistics."""
    if not per_observation_bn:
        return lambda obs: pl_module.act(obs, step, explore=False)

    def act(obs: np.ndarray) -> np.ndarray:
        batch = torch.as_tensor(obs[None], device=pl_module.device)
        return pl_module.act_batch(batch, per_observation_bn=True)[0].cpu().numpy()

    return act


class Evaluate(pl.Callback):
    """Every ``every_frames`` (and at the start and the end of training), ``num_episodes`` episodes with the mean
    action in each evaluation mode; logs ``eval/<mode>/*`` and uploads each mode's first episode as an mp4.

    ``env`` is one environment (evaluated as ``mode``) or a list of ``EvalEnv``: the generalization modes, each with
    its BatchNorm statistics (``train`` uses the running ones, as the authors' training loop). Returns, lengths and
    successes are aggregated with torchmetrics, so under DDP each process plays its share of the episodes on
    environments that ``make_env(mode, rank)`` builds with seeds of their own, and the logged numbers cover them all.
    """

    def __init__(self, env: dm_env.Environment | list[EvalEnv], num_episodes: int, every_frames: int,
                 video_dir: Path | None, mode: str = "train", print_fn: Callable[[str], None] = print,
                 make_env: Callable[[str, int], dm_env.Environment] | None = None):
        self.targets = [EvalEnv(mode, env)] if isinstance(env, dm_env.Environment) else list(env)
        self.num_episodes, self.every_frames, self.make_env = num_episodes, every_frames, make_env
        self.video_dir, self.print = video_dir, print_fn
        self._last_frame: int | None = None
        self.seconds = 0.0  # wall time spent evaluating (left out of the training frames/s)

    def setup(self, trainer, pl_module, stage: str) -> None:
        if trainer.global_rank > 0 and self.make_env is not None:
            # every process built rank 0's environments: the same seeds would replay the same episodes everywhere
            for target in self.targets:
                target.env.close()
                target.env = self.make_env(target.mode, trainer.global_rank)

    def evaluate(self, trainer, pl_module) -> None:
        collector = _stream(trainer).collector
        frame, step = collector.frame, collector.stats.step
        if self.num_episodes <= 0 or self._last_frame == frame:
            return
        started = time.perf_counter()
        episodes_here = episodes_per_process(self.num_episodes, trainer.world_size)
        for target in self.targets:  # the same order on every process: compute() is a collective under DDP
            act = _actor(pl_module, step, target.per_observation_bn)
            record = self.video_dir is not None and trainer.is_global_zero
            metrics = EpisodeMetrics(pl_module.device)
            episodes = [run_episode(target.env, act, record=record and i == 0) for i in range(episodes_here)]
            for episode in episodes:
                metrics.update(episode)
            summary = metrics.compute()
            name = target.reported
            log_metrics(trainer, {f"eval/{name}/{k}": v for k, v in summary.items()}, frame)
            success = f", success_rate {summary['success_rate']:.2f}" if "success_rate" in summary else ""
            self.print(f"eval {name} at frame {frame:,}: episode_reward {summary['episode_reward']:.1f} "
                       f"± {summary['episode_reward_std']:.1f} over {metrics.count()} episodes{success}")
            if record:
                self.video_dir.mkdir(parents=True, exist_ok=True)
                path = write_video(self.video_dir / f"eval_{name}_{frame:09d}.mp4", episodes[0].frames)
                log_artifact(trainer.logger, path, "videos")
        self._last_frame = frame
        self.seconds += time.perf_counter() - started

    def on_train_start(self, trainer, pl_module) -> None:
        collector = _stream(trainer).collector
        if collector.stats.step == 0:
            self.evaluate(trainer, pl_module)
        else:  # resumed: the next evaluation is at the next multiple of every_frames
            self._last_frame = collector.frame

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not updated(outputs):
            return
        frame = _stream(trainer).collector.frame
        last = self._last_frame if self._last_frame is not None else -1
        if self.every_frames > 0 and frame // self.every_frames > max(last, 0) // self.every_frames:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self.evaluate(trainer, pl_module)


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


class FrameCheckpoint(pl.Callback):
    """Writes a checkpoint (atomically: temporary file, then rename) at the first fresh episode after every
    ``every_frames`` frames, and at the end of training; keeps the last ``keep`` locally and uploads the final one.

    Beside each ``frame_<N>.ckpt``: ``frame_<N>.json`` (frame, MLflow run id, config) and, with
    ``save_replay``, ``frame_<N>.replay.npz``.
    """

    def __init__(self, directory: Path, every_frames: int, keep: int, save_replay: bool, config: dict,
                 print_fn: Callable[[str], None] = print):
        self.directory, self.every_frames, self.keep, self.save_replay = directory, every_frames, keep, save_replay
        self.config, self.print = config, print_fn
        self._next_frame: int | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        frame = _stream(trainer).collector.frame
        self._next_frame = (frame // self.every_frames + 1) * self.every_frames if self.every_frames > 0 else None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        collector = _stream(trainer).collector
        if not updated(outputs):
            return
        if self._next_frame is not None and collector.frame >= self._next_frame and collector.at_fresh_episode:
            self.save(trainer)
            self._next_frame = (collector.frame // self.every_frames + 1) * self.every_frames

    def save(self, trainer: pl.Trainer, final: bool = False) -> Path:
        datamodule = _stream(trainer)
        frame = datamodule.collector.frame
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"frame_{frame:09d}.ckpt"
        if not final:  # the final state (mid-episode, budget spent) is for acting and evaluation, not for resuming
            if self.save_replay:
                datamodule.replay.save(path.with_suffix(".replay.npz"))
        _atomic(path, lambda tmp: trainer.save_checkpoint(tmp, weights_only=final))
        if trainer.is_global_zero:
            meta = {"frame": frame, "mlflow_run_id": getattr(trainer.logger, "run_id", None), "final": final,
                    "replay": self.save_replay and not final, "config": self.config}
            _atomic(path.with_suffix(".json"), lambda tmp: tmp.write_text(json.dumps(meta, indent=1)))
            self._prune()
            self.print(f"checkpoint: {path}")
        return path

    def _prune(self) -> None:
        checkpoints = sorted(self.directory.glob("frame_*.ckpt"))
        for old in checkpoints[:-self.keep] if self.keep > 0 else []:
            for sibling in (old, old.with_suffix(".json"), old.with_suffix(".replay.npz")):
                sibling.unlink(missing_ok=True)

    def on_train_end(self, trainer, pl_module) -> None:
        path = self.save(trainer, final=True)
        log_artifact(trainer.logger, path, "checkpoints")
        log_artifact(trainer.logger, path.with_suffix(".json"), "checkpoints")
