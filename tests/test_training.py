"""End-to-end training on CPU: frame budget, MLflow record, reproducibility, exact resumption, early errors."""
from __future__ import annotations

import subprocess
import sys

import mlflow
import numpy as np
import pytest
import pytorch_lightning as pl

import lightning_pieg
from lightning_pieg.policy import CheckpointError
from lightning_pieg.train import ConfigError, split_overrides, train


class LossRecorder(pl.Callback):
    """(frame, critic loss, actor loss) after every update."""

    def __init__(self):
        self.losses: list[tuple[int, float, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not outputs:  # Lightning's call after the stream ran out
            return
        metrics = pl_module.last_metrics
        frame = trainer.datamodule.collector.frame
        self.losses.append((frame, metrics["train/critic_loss"], metrics["train/actor_loss"]))


def run(cfg, tmp_path, name="run"):
    recorder = LossRecorder()
    run_id = train(cfg, extra_callbacks=[recorder], output_dir=tmp_path / name)
    return run_id, recorder


def test_tiny_run_stops_at_its_frame_budget_and_leaves_one_finished_mlflow_run(compose, tmp_path):
    cfg = compose("num_train_frames=240", "num_eval_episodes=1", "save_video=true", "checkpoint_every_frames=0")
    run_id, recorder = run(cfg, tmp_path)
    # 120 agent steps; updates at even steps from step 20: 20, 22, ..., 118 -> 50 updates, 2 optimiser steps each
    assert len(recorder.losses) == 50
    assert recorder.losses[0][0] == 40 and recorder.losses[-1][0] == 236
    client = mlflow.MlflowClient(tracking_uri=cfg.mlflow.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(cfg.mlflow.experiment).experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]
    record = runs[0]
    assert record.info.status == "FINISHED"
    assert record.data.params["task"] == "cartpole_balance" and record.data.params["augment.overlay"] == "none"
    assert record.data.params["num_train_frames"] == "240"
    assert {"train/critic_loss", "train/actor_loss", "train/episode_reward", "train/fps",
            "eval/train/episode_reward"} <= set(record.data.metrics)
    steps = [m.step for m in client.get_metric_history(run_id, "eval/train/episode_reward")]
    assert steps == [0, 240]  # evaluations at the start and the end, stepped by frames
    episode_steps = [m.step for m in client.get_metric_history(run_id, "train/episode_reward")]
    assert episode_steps == [100, 200]
    videos = [a.path for a in client.list_artifacts(run_id, "videos")]
    assert videos == ["videos/eval_train_000000000.mp4", "videos/eval_train_000000240.mp4"]
    assert record.data.tags["mujoco"] == "3.17.0" and record.data.tags["renderer"] == "egl"
    # the final checkpoint acts: load_policy gives the module's mean action, within the action bounds
    final = tmp_path / "checkpoints" / "frame_000000240.ckpt"
    act = lightning_pieg.load_policy(final)
    observation = np.random.default_rng(0).integers(0, 256, (9, 84, 84), dtype=np.uint8)
    action = act(observation)
    assert action.shape == (1,) and -1 <= action[0] <= 1
    assert np.allclose(action, act.module.act(observation, step=0, explore=False))


def test_seeded_runs_are_reproducible(compose, tmp_path):
    first = run(compose("num_train_frames=120"), tmp_path, "a")[1].losses
    second = run(compose("num_train_frames=120"), tmp_path, "b")[1].losses
    other_seed = run(compose("num_train_frames=120", "seed=2"), tmp_path, "c")[1].losses
    assert len(first) == 20 and first == second
    assert first != other_seed


@pytest.mark.parametrize("agent", ["pieg", "drqv2"])
def test_resumed_run_continues_with_the_same_losses(compose, tmp_path, agent):
    common = ("num_train_frames=300", "checkpoint_every_frames=100", "save_replay=true", "keep_checkpoints=5",
              f"agent={agent}")
    run_id, full = run(compose(*common), tmp_path, "full")
    checkpoint = tmp_path / "checkpoints" / "frame_000000100.ckpt"
    assert checkpoint.is_file() and checkpoint.with_suffix(".replay.npz").is_file()
    # the interrupted run's later checkpoints never existed: resume from the one at frame 100
    resumed_id, resumed = run(compose(*common, f"resume={checkpoint}"), tmp_path, "resumed")
    after = [loss for loss in full.losses if loss[0] > 100]
    assert len(resumed.losses) == len(after) >= 10
    assert resumed.losses[:10] == after[:10]
    assert resumed_id == run_id  # the resumed run logs into the same MLflow run


def test_resume_without_replay_refills_before_updating(compose, tmp_path):
    run_id, full = run(compose("num_train_frames=300", "checkpoint_every_frames=100"), tmp_path, "full")
    for final in (tmp_path / "checkpoints").glob("frame_000000300.*"):  # as if killed before the end: a finished
        final.unlink()                                                  # run is not resumed (test_reliability)
    _, resumed = run(compose("num_train_frames=300", "checkpoint_every_frames=100", "resume=last"), tmp_path, "r")
    # resume=last picks frame 200, the newest periodic checkpoint; 40 seed frames are collected again
    assert resumed.losses[0][0] == 240


def test_bad_requests_fail_before_any_work(compose, tmp_path):
    with pytest.raises(ConfigError, match="encoder.layer=7"):
        train(compose("encoder.layer=7"))
    with pytest.raises(ConfigError, match="batch_size=0"):
        train(compose("batch_size=0"))
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="corrupt"):
        train(compose(f"resume={broken}"))
    with pytest.raises(ConfigError, match="no resumable checkpoint"):
        train(compose("resume=last"))


def test_cli_rejects_an_unknown_task_in_seconds():
    result = subprocess.run([sys.executable, "-m", "lightning_pieg.train", "task=not_a_task"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "unknown task 'not_a_task'" in result.stdout and "walker_walk" in result.stdout


def test_mlflow_overrides_parameter_is_split_and_may_be_empty():
    # `mlflow run -P overrides="a=1 b='x y'"` arrives as one argument; the default arrives as an empty one
    assert split_overrides(["task=walker_walk", "batch_size=8 encoder.weights=none", ""]) == [
        "task=walker_walk", "batch_size=8", "encoder.weights=none"]
    assert split_overrides(["seed=1"]) == ["seed=1"]


def test_load_policy_rejects_a_corrupt_checkpoint(tmp_path):
    path = tmp_path / "frame_000000100.ckpt"
    path.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(CheckpointError, match="corrupt"):
        lightning_pieg.load_policy(path)


def test_overlay_augmentation_joins_the_critic_loss(compose, tmp_path, monkeypatch):
    from PIL import Image

    import lightning_pieg.overlay as overlay_module

    folder = tmp_path / "places"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (100, 120, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    calls = []
    original = overlay_module.overlay

    def counting_overlay(obs, images, alpha=0.5):
        calls.append((tuple(obs.shape), tuple(images.shape), alpha))
        return original(obs, images, alpha)

    monkeypatch.setattr(overlay_module, "overlay", counting_overlay)
    cfg = compose("num_train_frames=120", f"augment.overlay={folder}")
    run_id, recorder = run(cfg, tmp_path)
    assert len(calls) == len(recorder.losses) == 20  # one overlaid batch per update
    assert calls[0] == ((4, 9, 84, 84), (4, 3, 84, 84), 0.5)
    client = mlflow.MlflowClient(tracking_uri=cfg.mlflow.tracking_uri)
    assert client.get_run(run_id).data.params["augment.overlay"] == str(folder)


def test_overlay_without_a_folder_is_a_clear_error(compose, tmp_path):
    with pytest.raises(FileNotFoundError, match="augment.overlay|missing"):
        train(compose(f"augment.overlay={tmp_path / 'missing'}"))


def test_training_fps_leaves_evaluation_time_out(monkeypatch):
    """train/fps covers the frames since the last episode end over the time spent collecting and updating."""
    from types import SimpleNamespace

    from lightning_pieg import callbacks

    clock = {"now": 100.0}
    monkeypatch.setattr(callbacks.time, "perf_counter", lambda: clock["now"])
    finished: list = []
    collector = SimpleNamespace(frame=0, action_repeat=2, pop_finished=lambda: [finished.pop()] if finished else [])
    logged: list = []
    logger = SimpleNamespace(log_metrics=lambda metrics, step: logged.append((step, metrics)))
    trainer = SimpleNamespace(datamodule=SimpleNamespace(collector=collector), is_global_zero=True, loggers=[logger])
    paused = {"seconds": 0.0}
    lines: list = []
    progress = callbacks.TrainingProgress(10_000, log_every_updates=10**9, print_fn=lines.append,
                                          paused=lambda: paused["seconds"])
    progress.on_train_start(trainer, None)

    def episode_end(frame: int, seconds: float, evaluating: float) -> float:
        clock["now"] += seconds + evaluating
        paused["seconds"] += evaluating
        collector.frame = frame
        finished.append((frame // 1000, frame, 500.0, 500))
        progress.on_train_batch_end(trainer, None, {"critic_loss": 0.0}, None, 0)
        return logged[-1][1]["train/fps"]

    assert episode_end(1000, seconds=50.0, evaluating=0.0) == pytest.approx(20.0)
    assert episode_end(2000, seconds=40.0, evaluating=300.0) == pytest.approx(25.0)  # evaluation left out
    assert episode_end(3000, seconds=100.0, evaluating=0.0) == pytest.approx(10.0)   # a window, not an average
    assert "eta" in lines[-1] and len(lines) == 3


def test_training_without_mlflow_writes_metrics_to_a_csv_file(compose, tmp_path):
    """``mlflow.enabled=false`` (offline nodes): no store is touched, the metrics go to a CSV file."""
    run_id, recorder = run(compose("num_train_frames=120", "mlflow.enabled=false"), tmp_path)
    assert run_id is None and len(recorder.losses) == 20
    assert not (tmp_path / "mlflow.db").exists()
    header = (tmp_path / "run" / "metrics" / "metrics.csv").read_text().splitlines()[0]
    assert "train/critic_loss" in header and "train/episode_reward" in header


def test_bf16_mixed_trains_and_acts_in_fp32(compose, tmp_path):
    """``trainer.precision=bf16-mixed``: the update runs under autocast, the collector still gets fp32 actions."""
    run_id, recorder = run(compose("num_train_frames=120", "trainer.precision=bf16-mixed", "trainer.accelerator=cpu"),
                           tmp_path)
    assert len(recorder.losses) == 20 and all(np.isfinite(loss[1]) for loss in recorder.losses)
