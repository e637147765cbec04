"""The collector with environment workers: one overlapped worker equals the in-process environment, several
workers are reproducible, keep their streams apart, resume exactly, and a dead worker stops the run."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from hydra import compose as hydra_compose
from hydra import initialize_config_dir

from conftest import TINY, TrainingProcess
from lightning_pieg.collector import env_seeds
from lightning_pieg.config import CONF_DIR
from lightning_pieg.replay import BYTES_FIELDS, StreamReplay
from lightning_pieg.train import train

pytestmark = pytest.mark.usefixtures("one_thread")
TIMEOUT_S = 240


class Record(pl.Callback):
    """(frame, critic loss, actor loss) after every update, and the replay's arrays at the end."""

    def __init__(self):
        self.losses: list[tuple[int, float, float]] = []
        self.replay: list[dict[str, np.ndarray]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if outputs:
            metrics = pl_module.last_metrics
            self.losses.append((trainer.datamodule.collector.frame, metrics["train/critic_loss"],
                                metrics["train/actor_loss"]))

    def on_train_end(self, trainer, pl_module):
        self.replay = [stream.arrays() for stream in trainer.datamodule.replay.streams]


def run(root: Path, *overrides: str) -> Record:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = hydra_compose("config", overrides=[
            *TINY, f"checkpoint_dir={root / 'checkpoints'}", f"mlflow.tracking_uri=sqlite:///{root / 'mlflow.db'}",
            *overrides])
    record = Record()
    train(cfg, extra_callbacks=[record], output_dir=root / "out")
    return record


def same_replay(first: list[dict], second: list[dict]) -> bool:
    return len(first) == len(second) and all(
        a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a if k.endswith(BYTES_FIELDS))
        for a, b in zip(first, second))


def test_one_overlapped_worker_equals_the_in_process_environment(tmp_path):
    in_process = run(tmp_path / "a", "num_train_frames=240", "collector.num_envs=0")
    worker = run(tmp_path / "b", "num_train_frames=240", "collector.num_envs=1")
    assert len(in_process.losses) == 50 and worker.losses == in_process.losses
    assert same_replay(worker.replay, in_process.replay)


def test_two_workers_are_reproducible_and_distinct(tmp_path):
    first = run(tmp_path / "a", "num_train_frames=240", "collector.num_envs=2")
    second = run(tmp_path / "b", "num_train_frames=240", "collector.num_envs=2")
    assert first.losses == second.losses and same_replay(first.replay, second.replay)
    assert len(first.losses) == 50  # one update every 2 agent steps over both environments
    frames = [stream["frames"] for stream in first.replay]
    assert len(frames) == 2 and not np.array_equal(frames[0], frames[1])  # seeds 1 and 1001


def test_environment_seeds_keep_the_single_environment_seed_first():
    assert env_seeds(7, 1) == [7] and env_seeds(7, 3) == [7, 1007, 2007]


def test_no_window_crosses_an_environment_or_an_episode():
    replay = StreamReplay(2, 200, (3, 1, 1), 1, frame_stack=3, nstep=3, discount=0.9, seed=0)
    # frame value = 100 * stream + 10 * episode + step: every sample must keep one stream and one episode
    for stream in range(2):
        for episode in range(3):
            value = 100 * stream + 10 * episode
            replay[stream].add_first(np.full((3, 1, 1), value, np.uint8))
            for step in range(1, 7):
                replay[stream].add(np.array([step], np.float32), 1.0, 1.0, np.full((3, 1, 1), value + step, np.uint8))
    obs, action, reward, discount, next_obs = replay.sample(256)
    values = torch.cat([obs[:, ::3, 0, 0], next_obs[:, ::3, 0, 0]], dim=1).numpy().astype(int)
    assert (values // 10 == values[:, :1] // 10).all()  # one stream and one episode per sample
    assert {int(v) // 100 for v in values[:, 0]} == {0, 1}  # both streams are sampled
    assert np.allclose(next_obs[:, -3, 0, 0].numpy() - obs[:, -3, 0, 0].numpy(), 3)  # n-step windows


def test_two_workers_resume_exactly(tmp_path):
    common = ("num_train_frames=400", "checkpoint_every_frames=200", "save_replay=true", "keep_checkpoints=5",
              "collector.num_envs=2")
    full = run(tmp_path, *common)
    checkpoint = tmp_path / "checkpoints" / "frame_000000200.ckpt"
    assert checkpoint.is_file()
    resumed = run(tmp_path / "r", *common, f"resume={checkpoint}",
                  f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}")
    after = [loss for loss in full.losses if loss[0] > 200]
    assert len(resumed.losses) == len(after) >= 10 and resumed.losses == after


def children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as handle:
        return [int(child) for child in handle.read().split()]


def test_a_killed_worker_ends_the_run_with_a_clear_message(tmp_path):
    run = TrainingProcess(tmp_path, "num_train_frames=100000", "collector.num_envs=2")
    run.wait_for("frame       200/", TIMEOUT_S)
    workers = [pid for pid in children(run.process.pid)
               if "spawn_main" in Path(f"/proc/{pid}/cmdline").read_text()]
    assert len(workers) >= 2, run.lines
    os.kill(workers[-1], signal.SIGKILL)
    killed = time.monotonic()
    assert run.finish(TIMEOUT_S) == 1, "".join(run.lines)
    assert time.monotonic() - killed < 30
    errors = [line for line in run.lines if line.startswith("[lightning_pieg] error:")]
    assert len(errors) == 1 and "env worker" in errors[0] and "cartpole_balance" in errors[0] and "died" in errors[0]
    assert "Traceback" not in "".join(run.lines)
