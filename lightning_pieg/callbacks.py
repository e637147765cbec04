"""Lightning callbacks: training metrics and progress, periodic (generalization) evaluation with videos,
frame-based checkpoints, the divergence guard and the graceful stop on SIGINT/SIGTERM."""
from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import dm_env
import pytorch_lightning as pl
import torch

from lightning_pieg.checkpoints import (atomic_write, checkpoint_path, clean_leftovers, replay_path, write_rank_state,
                                       write_sidecar)
from lightning_pieg.console import UserError
from lightning_pieg.data import ReplayDataModule
from lightning_pieg.policy import mean_action_policy, one_at_a_time
from lightning_pieg.rollouts import EpisodeMetrics, EpisodeStarts, episodes_per_process, run_episode, run_lockstep
from lightning_pieg.tracking import log_artifact
from lightning_pieg.video import write_video
from lightning_pieg.workers import EnvWorkers


class DivergenceError(UserError):
    """Training produced non-finite numbers; the message names the update, the frame and the likely cause."""


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


class Every:
    """Marks every ``interval`` units (frames, updates): ``due(now)`` once a mark is reached, ``done(now)`` after
    acting on it. ``interval`` 0 is never due."""

    def __init__(self, interval: int):
        self.interval = interval
        self.next = interval

    def start(self, now: int) -> None:
        """The next mark after ``now`` (a fresh run at 0, or a resumed one)."""
        self.done(now)

    def due(self, now: int) -> bool:
        return self.interval > 0 and now >= self.next

    def done(self, now: int) -> None:
        if self.interval > 0:
            self.next = (now // self.interval + 1) * self.interval


class TrainingProgress(pl.Callback):
    """Logs ``train/*`` (losses every ``log_every_updates`` updates, every finished episode) and prints a line
    with frame, episode reward, frames/s and the time left at every episode end.

    ``train/fps`` is DrQ-v2's: frames per second since the previous episode end, but with the time that
    ``paused()`` reports (evaluation) left out, so it measures collection and updates alone. The eta uses the
    overall rate, evaluation included."""

    def __init__(self, total_frames: int, log_every_updates: int = 50, print_fn: Callable[[str], None] = print,
                 paused: Callable[[], float] = lambda: 0.0):
        self.total_frames, self.print, self.paused = total_frames, print_fn, paused
        self._log = Every(log_every_updates)
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
        if self._log.due(self._updates):
            self._log.done(self._updates)
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


class PeriodicEvaluation(pl.Callback):
    """Every ``every_frames`` (and at the start and the end of training), ``num_episodes`` episodes with the mean
    action in each of ``targets`` (the evaluation modes, each with its BatchNorm statistics: ``train`` uses the
    running ones, as the authors' training loop); logs ``eval/<mode>/*`` and uploads each mode's first episode as
    an mp4. Returns, lengths and successes are aggregated with torchmetrics: under DDP each process plays its share
    of the episodes on environments that ``make_env(mode, rank)`` builds with seeds of their own.

    With ``make_workers(mode, rank, count)`` (``EnvWorkers``, started for each evaluation) the episodes run in
    lockstep on ``count`` worker processes, ``num_workers`` at most, with one batched act per step; each episode
    starts where the mode's own environment would start it when playing them one after another (``run_lockstep``)."""

    def __init__(self, targets: list[EvalEnv], num_episodes: int, every_frames: int, video_dir: Path | None,
                 print_fn: Callable[[str], None] = print,
                 make_env: Callable[[str, int], dm_env.Environment] | None = None, stop_on_success: bool = True,
                 make_workers: Callable[[str, int, int], EnvWorkers] | None = None, num_workers: int = 0):
        self.targets = list(targets)
        self.num_episodes, self.make_env, self.stop_on_success = num_episodes, make_env, stop_on_success
        self.make_workers, self.num_workers = make_workers, num_workers
        self.video_dir, self.print = video_dir, print_fn
        self._marks = Every(every_frames)
        self._last_frame: int | None = None
        self.seconds = 0.0  # wall time spent evaluating (left out of the training frames/s)

    def setup(self, trainer, pl_module, stage: str) -> None:
        if trainer.global_rank > 0 and self.make_env is not None:
            # every process built rank 0's environments: the same seeds would replay the same episodes everywhere
            for target in self.targets:
                target.env.close()
                target.env = self.make_env(target.mode, trainer.global_rank)

    def evaluate(self, trainer, pl_module) -> None:
        frame = _stream(trainer).collector.frame
        if self.num_episodes <= 0 or self._last_frame == frame:
            return
        started = time.perf_counter()
        episodes_here = episodes_per_process(self.num_episodes, trainer.world_size)
        for target in self.targets:  # the same order on every process: compute() is a collective under DDP
            policy = mean_action_policy(pl_module, target.per_observation_bn)
            record = self.video_dir is not None and trainer.is_global_zero
            metrics = EpisodeMetrics(pl_module.device)
            if self.make_workers is not None and self.num_workers > 0:
                count = min(self.num_workers, episodes_here)
                with self.make_workers(target.mode, trainer.global_rank, count) as workers:
                    episodes = run_lockstep(workers, policy, episodes_here, EpisodeStarts(target.env),
                                            record_first=record, stop_on_success=self.stop_on_success)
            else:
                episodes = [run_episode(target.env, one_at_a_time(policy), record=record and i == 0,
                                        stop_on_success=self.stop_on_success) for i in range(episodes_here)]
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
        self._marks.done(frame)
        self.seconds += time.perf_counter() - started

    def on_train_start(self, trainer, pl_module) -> None:
        collector = _stream(trainer).collector
        self._marks.start(collector.frame)
        if collector.stats.step == 0:
            self.evaluate(trainer, pl_module)
        else:  # resumed: the next evaluation is at the next multiple of every_frames
            self._last_frame = collector.frame

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if updated(outputs) and self._marks.due(_stream(trainer).collector.frame):
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if not _stream(trainer).stream.stop_requested:  # an interrupted run ends at once, unevaluated
            self.evaluate(trainer, pl_module)


def non_finite_parameter(module: torch.nn.Module) -> str | None:
    """The name of the first parameter holding a NaN or an infinity, or None."""
    for name, parameter in module.named_parameters():
        if not torch.isfinite(parameter).all():
            return name
    return None


class DivergenceGuard(pl.Callback):
    """Stops the run at the first update whose losses are not finite, before any checkpoint holds them.

    Put it before ``FrameCheckpoint`` in the callback list: callbacks run in order, and a checkpoint written in
    the same batch end must not hold the diverged weights (``FrameCheckpoint`` also checks every parameter)."""

    def __init__(self, hint: str):
        self.hint, self.updates = hint, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not updated(outputs):
            return
        self.updates += 1
        bad = sorted(key for key, value in pl_module.last_metrics.items() if not math.isfinite(value))
        if bad:
            frame = _stream(trainer).collector.frame
            raise DivergenceError(f"training diverged at update {self.updates:,} (frame {frame:,}): {', '.join(bad)} "
                                  f"not finite. Likely cause: {self.hint}. No checkpoint holds the diverged "
                                  f"weights; the earlier ones are intact.")


class FrameCheckpoint(pl.Callback):
    """Writes a checkpoint at the first fresh episode after every ``every_frames`` frames, and at the end of
    training (weights only; resumable instead when the run was interrupted); keeps the last ``keep`` (0: all)
    and uploads the final one. Beside each ``frame_<N>.ckpt``: its sidecar ``frame_<N>.json`` (frame, MLflow run
    id, config, number of processes) and, with ``save_replay``, ``frame_<N>.replay.npz`` (see ``checkpoints.py``).

    Under DDP every process decides to save at the same batch (the frame, the episode start and the updates are
    equal everywhere): each writes its own state and replay, Lightning writes the checkpoint on rank 0 and waits
    for all, then rank 0 writes the sidecar, which is what marks the checkpoint complete."""

    def __init__(self, directory: Path, every_frames: int, keep: int, save_replay: bool, config: dict,
                 print_fn: Callable[[str], None] = print):
        self.directory, self.keep, self.save_replay = Path(directory), keep, save_replay
        self.config, self.print = config, print_fn
        self._marks = Every(every_frames)
        self._after_stop = False  # the checkpoint being written is the resumable one after a stop

    def on_train_start(self, trainer, pl_module) -> None:
        self._marks.start(_stream(trainer).collector.frame)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if self._after_stop:
            # written after Lightning closed the epoch: record it as still running (as a periodic checkpoint does),
            # or the resumed run would find its one epoch done and end at once
            checkpoint["epoch"] = 0
            loop = checkpoint["loops"]["fit_loop"]
            for progress in loop["epoch_progress"].values():
                progress["processed"] = progress["completed"] = 0
            loop["epoch_loop.batch_progress"]["is_last_batch"] = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        datamodule = _stream(trainer)
        collector = datamodule.collector
        if (updated(outputs) and self._marks.due(collector.frame) and collector.at_fresh_episode
                and datamodule.stream.updates_left_this_step == 0):
            self.save(trainer)
            self._marks.done(collector.frame)

    def save(self, trainer: pl.Trainer, final: bool = False) -> Path:
        datamodule = _stream(trainer)
        frame = datamodule.collector.frame
        bad = non_finite_parameter(trainer.lightning_module)
        if bad is not None:
            raise DivergenceError(f"parameter {bad} is not finite at frame {frame:,}: the checkpoint was not written; "
                                  f"the earlier ones are intact.")
        self.directory.mkdir(parents=True, exist_ok=True)
        path = checkpoint_path(self.directory, frame)
        rank = trainer.global_rank
        if not final:  # the final state (mid-episode, budget spent) is for acting, not resuming
            if self.save_replay:
                atomic_write(replay_path(path, rank), datamodule.replay.write)
            if rank > 0:
                write_rank_state(path, rank, datamodule.state_dict())
        trainer.save_checkpoint(path, weights_only=final)  # rank 0 writes; every process waits for it
        if trainer.is_global_zero:
            write_sidecar(path, {"frame": frame, "mlflow_run_id": getattr(trainer.logger, "run_id", None),
                                 "final": final, "replay": self.save_replay and not final,
                                 "world_size": trainer.world_size, "config": self.config})
            self._prune()
            self.print(f"checkpoint: {path}")
        return path

    def _prune(self) -> None:
        checkpoints = sorted(self.directory.glob("frame_*.ckpt"))
        for old in checkpoints[:-self.keep] if self.keep > 0 else []:
            old.unlink(missing_ok=True)
        clean_leftovers(self.directory)  # the pruned checkpoints' sidecars and replays

    def on_train_end(self, trainer, pl_module) -> None:
        stream = _stream(trainer)
        if stream.stream.stop_requested:
            if stream.collector.at_fresh_episode and stream.collector.stats.step > 0:
                self._after_stop = True
                self.save(trainer)
            else:
                self.print("no resumable checkpoint written: the run stopped before its first step")
            return
        path = self.save(trainer, final=True)
        if not trainer.is_global_zero:
            return
        log_artifact(trainer.logger, path, "checkpoints")
        log_artifact(trainer.logger, path.with_suffix(".json"), "checkpoints")


class GracefulStop(pl.Callback):
    """SIGINT/SIGTERM: finish the current episode, then end the run with a resumable checkpoint (the stream ends
    at the next episode start, ``FrameCheckpoint.on_train_end`` writes it). A second signal stops at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, print_fn: Callable[[str], None] = print):
        self.print = print_fn
        self._previous: dict[int, object] = {}
        self._stream = None

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self._stream.stop_requested:
            self.print(f"{name} again: stopping now, without a checkpoint")
            raise KeyboardInterrupt
        self._stream.stop_requested = name
        self.print(f"{name}: finishing this episode, then writing a resumable checkpoint and stopping "
                   f"({name} again stops at once, without one)")

    def on_train_start(self, trainer, pl_module) -> None:
        import threading

        if threading.current_thread() is not threading.main_thread():
            return
        self._stream = _stream(trainer).stream
        for signum in self.SIGNALS:  # replaces Lightning's SIGTERM notifier for the run, restored at the end
            self._previous[signum] = signal.signal(signum, self._handle)

    def on_train_end(self, trainer, pl_module) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def on_exception(self, trainer, pl_module, exception) -> None:
        self.on_train_end(trainer, pl_module)
