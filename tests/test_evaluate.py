"""Generalization evaluation: the evaluate command on a tiny trained checkpoint, lockstep batching, per-observation
BatchNorm, early errors, torchmetrics aggregation, and the generalization callback during training."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import av
import mlflow
import numpy as np
import pytest
import torch
from hydra import compose as hydra_compose
from hydra import initialize_config_dir

import lightning_pieg  # noqa: F401  (torch before dm_control)
from conftest import CONF_DIR, TINY
from lightning_pieg import envs
from lightning_pieg import generalization
from lightning_pieg.evaluate import EvaluateError, evaluate
from lightning_pieg.rollouts import Episode, EpisodeMetrics, EpisodeStarts, run_episode, run_lockstep
from lightning_pieg.module import PIEGModule
from lightning_pieg.policy import CheckpointError
from lightning_pieg.train import ConfigError, train
from lightning_pieg.workers import EnvWorkers
from test_dmcgb import make_data_dir

def numpy_summary(episodes: list[Episode]) -> dict[str, float]:
    """The expected aggregation, computed directly with numpy."""
    rewards = np.array([e.reward for e in episodes], dtype=np.float64)
    summary = {"episode_reward": float(rewards.mean()), "episode_reward_std": float(rewards.std()),
               "episode_length": float(np.mean([e.length for e in episodes]))}
    successes = [e.success for e in episodes if e.success is not None]
    if successes:
        summary["success_rate"] = float(np.mean(successes))
    return summary


FRAMES = 100  # the tiny checkpoint's frame (its final checkpoint)
SHORT = 0.5   # seconds per evaluation episode: 25 agent steps


pytestmark = pytest.mark.usefixtures("one_thread")


def train_config(root: Path, *overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose("config", overrides=[
            *TINY, f"checkpoint_dir={root / 'checkpoints'}", f"mlflow.tracking_uri=sqlite:///{root / 'mlflow.db'}",
            f"num_train_frames={FRAMES}", *overrides])


def eval_config(*overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose("evaluate", overrides=list(overrides))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny trained PIE-G checkpoint on cartpole_balance: (root, checkpoint path, MLflow run id, tracking URI)."""
    root = tmp_path_factory.mktemp("trained")
    cfg = train_config(root)
    run_id = train(cfg, output_dir=root / "out")
    checkpoint = root / "checkpoints" / f"frame_{FRAMES:09d}.ckpt"
    assert checkpoint.is_file()
    return root, checkpoint, run_id, cfg.mlflow.tracking_uri


def tiny_module(action_dim: int) -> PIEGModule:
    torch.manual_seed(0)
    return PIEGModule((9, 84, 84), action_dim, hidden_dim=32, feature_dim=16, encoder={"head_dim": 32}).eval()


def batch_act(module: PIEGModule, per_observation_bn: bool = True):
    return lambda obs: module.act_batch(torch.as_tensor(obs), per_observation_bn=per_observation_bn).numpy()


# ------------------------------------------------------------------------------------------------ the command
def test_cli_logs_into_the_training_run_and_writes_table_and_videos(trained, data_dir, tmp_path):
    root, checkpoint, run_id, uri = trained
    out = tmp_path / "eval"
    result = subprocess.run(
        [sys.executable, "-m", "lightning_pieg.evaluate", f"checkpoint={checkpoint}", "eval.modes=[train,video_easy]",
         "episodes=3", "num_envs=2", f"env.time_limit={SHORT}", f"eval.dmcgb_dir={data_dir}", f"hydra.run.dir={out}"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "| video_easy | 3 |" in result.stdout and "| mode | episodes | mean | std | success rate |" in result.stdout
    assert "video_easy: 100%" in result.stderr  # the progress bar

    with (out / "results.csv").open() as handle:
        rows = {row["mode"]: row for row in csv.DictReader(handle)}
    assert set(rows) == {"train", "video_easy"}
    assert rows["train"]["episodes"] == "3" and rows["train"]["env_seed"] == "43"  # training seed 1 + 42
    assert rows["train"]["bn"] == "per_observation" and rows["train"]["success_rate"] == ""
    assert float(rows["train"]["mean_length"]) == 25  # the requested length, not the training's time_limit

    client = mlflow.MlflowClient(tracking_uri=uri)
    assert len(client.search_runs([client.get_experiment_by_name("lightning_pieg").experiment_id])) == 1
    for mode in ("train", "video_easy"):
        history = client.get_metric_history(run_id, f"eval/{mode}/episode_reward")
        assert FRAMES in [m.step for m in history]
        logged = [m.value for m in history if m.step == FRAMES][-1]
        assert logged == pytest.approx(float(rows[mode]["mean"]))
        std = client.get_metric_history(run_id, f"eval/{mode}/episode_reward_std")
        assert std[-1].value == pytest.approx(float(rows[mode]["std"])) and std[-1].step == FRAMES
    folder = f"evaluation/frame_{FRAMES:09d}"
    assert sorted(a.path for a in client.list_artifacts(run_id, folder)) == [
        f"{folder}/{name}" for name in ("results.csv", "results.md", "train.mp4", "video_easy.mp4")]
    with av.open(str(out / "video_easy.mp4")) as container:
        assert sum(1 for _ in container.decode(video=0)) == 26  # the reset frame and 25 steps of episode 0


def test_a_run_id_evaluates_the_runs_final_checkpoint_artifact(trained, tmp_path):
    root, checkpoint, run_id, uri = trained
    result = evaluate(eval_config(f"checkpoint={run_id}", f"mlflow.tracking_uri={uri}", "episodes=2", "num_envs=2",
                                  "env.time_limit=0.2", "video=false"), output_dir=tmp_path)
    assert result["run_id"] == run_id
    assert result["checkpoint"].parent == tmp_path / "checkpoint"  # downloaded, not the local file
    assert result["checkpoint"].read_bytes() == checkpoint.read_bytes()
    assert [row["mode"] for row in result["rows"]] == ["train"] and result["rows"][0]["frame"] == FRAMES
    assert result["videos"] == []


def test_a_checkpoint_without_a_run_gets_a_new_run_in_the_training_store(trained, tmp_path):
    root, checkpoint, run_id, uri = trained
    copy = tmp_path / checkpoint.name
    copy.write_bytes(checkpoint.read_bytes())
    meta = json.loads(checkpoint.with_suffix(".json").read_text())
    copy.with_suffix(".json").write_text(json.dumps({**meta, "mlflow_run_id": None}))
    result = evaluate(eval_config(f"checkpoint={copy}", "episodes=1", "env.time_limit=0.1", "video=false", "seed=5"),
                      output_dir=tmp_path / "out")
    assert result["run_id"] != run_id and result["rows"][0]["env_seed"] == 47
    client = mlflow.MlflowClient(tracking_uri=uri)
    assert "eval/train/episode_reward" in client.get_run(result["run_id"]).data.metrics


def test_requests_that_cannot_work_fail_before_any_work(trained, tmp_path, monkeypatch):
    root, checkpoint, run_id, uri = trained

    def no_work(*args, **kwargs):
        raise AssertionError("work started before the request was checked")

    monkeypatch.setattr(generalization, "load_module", no_work)
    monkeypatch.setattr(envs, "make", no_work)
    with pytest.raises(EvaluateError, match=r"(?i)unknown mode 'not_a_mode' for task cartpole_balance.*video_hard"):
        evaluate(eval_config(f"checkpoint={checkpoint}", "eval.modes=[train,not_a_mode]"), output_dir=tmp_path)
    with pytest.raises(EvaluateError, match="(?i)unknown mode 'not_a_mode'"):  # checked from the run's params
        evaluate(eval_config(f"checkpoint={run_id}", f"mlflow.tracking_uri={uri}", "eval.modes=[not_a_mode]"),
                 output_dir=tmp_path)
    assert not (tmp_path / "checkpoint").exists()  # nothing downloaded
    broken = tmp_path / "frame_000000100.ckpt"
    broken.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(CheckpointError, match="corrupt"):
        evaluate(eval_config(f"checkpoint={broken}"), output_dir=tmp_path)
    with pytest.raises(EvaluateError, match="neither a file nor an MLflow run id"):
        evaluate(eval_config("checkpoint=no/such/file.ckpt"), output_dir=tmp_path)
    with pytest.raises(EvaluateError, match="no such MLflow run"):
        evaluate(eval_config("checkpoint=" + "0" * 32, f"mlflow.tracking_uri={uri}"), output_dir=tmp_path)
    with pytest.raises(EvaluateError, match="episodes=0"):
        evaluate(eval_config(f"checkpoint={checkpoint}", "episodes=0"), output_dir=tmp_path)
    with pytest.raises(EvaluateError, match="distracting_intensity=0.7"):
        evaluate(eval_config(f"checkpoint={checkpoint}", "eval.modes=[distracting_cs]", "eval.distracting_intensity=0.7"),
                 output_dir=tmp_path)
    monkeypatch.undo()
    monkeypatch.setattr(generalization, "load_module", no_work)  # the data check builds environments: allowed
    missing = tmp_path / "no_dmcgb_here"
    with pytest.raises(EvaluateError, match=f"mode video_hard: .*{missing}.*lightning_pieg.dmcgb_data fetch"):
        evaluate(eval_config(f"checkpoint={checkpoint}", "eval.modes=[train,video_hard]", f"eval.dmcgb_dir={missing}"),
                 output_dir=tmp_path)


def test_cli_error_is_one_line_and_exit_status_2(tmp_path):
    result = subprocess.run([sys.executable, "-m", "lightning_pieg.evaluate", f"hydra.run.dir={tmp_path}"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "error: checkpoint is required" in result.stdout and "Traceback" not in result.stderr


# ----------------------------------------------------------------------------------------- lockstep and BatchNorm
@pytest.mark.parametrize("task,mode", [("cartpole_balance", "train"), ("walker_walk", "video_easy"),
                                       ("drawer_close", "train")])
def test_lockstep_batches_give_the_returns_of_one_environment_at_a_time(task, mode, data_dir):
    # drawer_close reports success
    options = {"time_limit": 0.2} if task != "drawer_close" else {"time_limit": 0.125}
    if mode.startswith("video"):
        options["dmcgb_dir"] = str(data_dir)
    reference = envs.make(task, mode, seed=43, **options)
    module = tiny_module(reference.action_spec().shape[0])
    act = batch_act(module)
    sequential_env = envs.make(task, mode, seed=43, **options)
    sequential = [run_episode(sequential_env, lambda obs: act(obs[None])[0], record=i == 0) for i in range(4)]
    workers = [envs.make(task, mode, seed=43, **options) for _ in range(3)]
    finished, starts = [], EpisodeStarts(reference)
    lockstep = run_lockstep(workers, act, 4, starts, record_first=True, on_episode=finished.append)
    with EnvWorkers(task, mode, [43, 43], options=options, timeout=60.0, start_timeout=300.0) as pool:
        in_processes = run_lockstep(pool, act, 4, starts, record_first=True)  # two worker processes
    for env in (reference, sequential_env, *workers):
        env.close()
    rewards = [e.reward for e in sequential]
    assert len(set(rewards)) == 4  # four different episodes, not one replayed
    assert len(finished) == 4 and sorted(e.reward for e in finished) == sorted(e.reward for e in lockstep)
    for played in (lockstep, in_processes):
        # rtol 1e-4, not 1e-5: a batch of 3 and a batch of 1 take different oneDNN kernels, and walker's contacts
        # amplify their last-bit differences to ~1e-5 of the return over 10 steps
        np.testing.assert_allclose([e.reward for e in played], rewards, rtol=1e-4)
        assert [e.length for e in played] == [e.length for e in sequential]
        assert [e.success for e in played] == [e.success for e in sequential]
        np.testing.assert_array_equal(played[0].frames[0], sequential[0].frames[0])
        assert len(played[0].frames) == played[0].length + 1 and not played[1].frames
    assert (sequential[0].success is not None) == (task == "drawer_close")


def test_an_episode_start_that_is_not_reproduced_is_an_error():
    reference = envs.make("cartpole_balance", "train", seed=43, time_limit=0.2)
    other = envs.make("cartpole_swingup", "train", seed=43, time_limit=0.2)  # same layers, other start
    with pytest.raises(RuntimeError, match="episode 0 did not start as the reference environment's reset 0 did"):
        run_lockstep([other], batch_act(tiny_module(1)), 1, EpisodeStarts(reference))
    reference.close()
    other.close()


def test_per_observation_bn_keeps_statistics_per_observation_and_moves_no_buffer():
    module = tiny_module(2).train()  # as during training: the trunk's BatchNorm would update in train mode
    buffers = {name: buffer.clone() for name, buffer in module.encoder.named_buffers()}
    observations = torch.randint(0, 256, (3, 9, 84, 84), dtype=torch.uint8)
    together = module.act_batch(observations, per_observation_bn=True)
    alone = torch.cat([module.act_batch(observations[i:i + 1], per_observation_bn=True) for i in range(3)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(together, module.act_batch(observations, per_observation_bn=False))
    for name, buffer in module.encoder.named_buffers():
        assert torch.equal(buffer, buffers[name]), name
    assert module.training and module.encoder.trunk.training  # act_batch restores the phase
    module.encoder(observations.float())  # control: a training-mode pass does move them
    assert not torch.equal(module.encoder.trunk[1].running_mean, buffers["trunk.1.running_mean"])


def test_torchmetrics_aggregation_equals_numpy():
    random = np.random.default_rng(3)
    episodes = [Episode(float(r), int(n), bool(s)) for r, n, s in
                zip(random.normal(500, 120, 13), random.integers(50, 500, 13), random.random(13) < 0.4)]
    metrics = EpisodeMetrics()
    for episode in episodes[:8]:
        metrics.update(episode)
    other_process = EpisodeMetrics()
    for episode in episodes[8:]:
        other_process.update(episode)
    for mine, theirs in ((metrics.rewards, other_process.rewards), (metrics.lengths, other_process.lengths),
                         (metrics.successes, other_process.successes)):
        mine.merge_state(theirs)  # what the DDP gather in compute() does across processes
    summary = metrics.compute()
    rewards = np.array([e.reward for e in episodes])
    assert summary["episode_reward"] == pytest.approx(rewards.mean(), rel=1e-12)
    assert summary["episode_reward_std"] == pytest.approx(rewards.std(), rel=1e-12)
    assert summary["episode_length"] == pytest.approx(np.mean([e.length for e in episodes]), rel=1e-12)
    assert summary["success_rate"] == pytest.approx(np.mean([e.success for e in episodes]), rel=1e-12)
    assert summary == pytest.approx(numpy_summary(episodes), rel=1e-12) and metrics.count() == 13
    no_success = EpisodeMetrics()
    no_success.update(Episode(1.0, 10))
    assert "success_rate" not in no_success.compute()


# ----------------------------------------------------------------------------------------- during training
def test_training_evaluates_generalization_modes_with_their_batchnorm(tmp_path, data_dir, monkeypatch):
    calls = {"running": 0, "per_observation": 0}
    act, act_batch = PIEGModule.act, PIEGModule.act_batch

    def counting_act(self, observation, step, explore):
        calls["running"] += not explore
        return act(self, observation, step, explore)

    def counting_act_batch(self, observations, per_observation_bn=False):
        calls["per_observation" if per_observation_bn else "running"] += len(observations)
        return act_batch(self, observations, per_observation_bn)

    monkeypatch.setattr(PIEGModule, "act", counting_act)
    monkeypatch.setattr(PIEGModule, "act_batch", counting_act_batch)
    rewards = {}
    for workers in (0, 2):  # one episode after another in this process; two worker processes in lockstep
        calls.update(running=0, per_observation=0)
        root = tmp_path / f"eval_workers_{workers}"
        cfg = train_config(root, f"env.time_limit={SHORT}", "num_eval_episodes=2", "save_video=true",
                           "eval.modes=[train,video_easy]", f"eval.dmcgb_dir={data_dir}", f"eval_workers={workers}")
        run_id = train(cfg, output_dir=root / "out")
        # evaluations at frames 0 and 100, two 25-step episodes per mode each
        assert calls == {"running": 100, "per_observation": 100}
        client = mlflow.MlflowClient(tracking_uri=cfg.mlflow.tracking_uri)
        for mode in ("train", "video_easy"):
            history = client.get_metric_history(run_id, f"eval/{mode}/episode_reward")
            assert [m.step for m in history] == [0, FRAMES]
            assert [m.step for m in client.get_metric_history(run_id, f"eval/{mode}/episode_reward_std")] == [0, FRAMES]
            rewards[workers, mode] = [m.value for m in history]
        assert sorted(a.path for a in client.list_artifacts(run_id, "videos")) == [
            f"videos/eval_{mode}_{frame:09d}.mp4" for mode in ("train", "video_easy") for frame in (0, FRAMES)]
    for mode in ("train", "video_easy"):  # the same episodes (rtol: a batch of 2 takes other kernels than 1)
        np.testing.assert_allclose(rewards[2, mode], rewards[0, mode], rtol=1e-4)


def test_training_rejects_bad_eval_settings_before_any_work(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"(?i)eval.modes.*unknown mode 'nope' for task cartpole_balance"):
        train(train_config(tmp_path, "eval.modes=[train,nope]"))
    with pytest.raises(ConfigError, match="eval.bn='batch'"):
        train(train_config(tmp_path, "eval.bn=batch"))
    with pytest.raises(ConfigError, match=f"eval.modes: video_easy: .*{tmp_path / 'none'}"):
        train(train_config(tmp_path, "num_eval_episodes=1", "eval.modes=[video_easy]",
                           f"eval.dmcgb_dir={tmp_path / 'none'}"))


# ----------------------------------------------------------------------------------- the paper's set of modes
PAPER_MODES = ("train", "color_hard", "video_easy", "video_hard", "distracting_cs")


def test_cli_gives_table_and_metrics_for_every_benchmark_mode(trained, tmp_path_factory, tmp_path):
    """The issue's check 3 on synthetic data: colour files and 3-frame videos for both video modes (all 10 and 100
    files), and a DAVIS-layout folder for distracting_cs; results go to a run of their own store."""
    from lightning_pieg.envs import distracting
    from test_distracting import write_davis

    root, checkpoint, run_id, uri = trained
    data = make_data_dir(tmp_path_factory.mktemp("dmcgb_all"), video_modes=("video_easy", "video_hard"))
    davis = write_davis(tmp_path_factory.mktemp("davis"), distracting.NUM_VIDEOS[distracting.DEFAULT_INTENSITY])
    copy = tmp_path / checkpoint.name  # the same checkpoint without a run: the training run stays untouched
    copy.write_bytes(checkpoint.read_bytes())
    meta = json.loads(checkpoint.with_suffix(".json").read_text())
    copy.with_suffix(".json").write_text(json.dumps({**meta, "mlflow_run_id": None}))
    store, out = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "eval"
    result = subprocess.run(
        [sys.executable, "-m", "lightning_pieg.evaluate", f"checkpoint={copy}", f"eval.modes=[{','.join(PAPER_MODES)}]",
         "episodes=2", "num_envs=2", "env_workers=true", "env.time_limit=0.2", f"eval.dmcgb_dir={data}",
         f"eval.davis_dir={davis}", "video=false", f"mlflow.tracking_uri={store}", f"hydra.run.dir={out}"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout + result.stderr

    names = [mode if mode != "distracting_cs" else "distracting_cs_0.1" for mode in PAPER_MODES]
    table_rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "| 2 |" in line]
    assert [row.split("|")[1].strip() for row in table_rows] == names
    with (out / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["mode"] for row in rows] == names
    assert all(row["episodes"] == "2" and float(row["mean_length"]) == 10 for row in rows)  # 0.2 s: 10 agent steps
    assert (out / "results.md").read_text().count("| 2 |") == len(names)

    client = mlflow.MlflowClient(tracking_uri=store)
    [run] = client.search_runs([client.get_experiment_by_name("lightning_pieg").experiment_id])
    for row in rows:
        for key, column in (("episode_reward", "mean"), ("episode_reward_std", "std")):
            [metric] = client.get_metric_history(run.info.run_id, f"eval/{row['mode']}/{key}")
            assert metric.step == FRAMES and metric.value == pytest.approx(float(row[column]))
    folder = f"evaluation/frame_{FRAMES:09d}"
    assert sorted(a.path for a in client.list_artifacts(run.info.run_id, folder)) == [
        f"{folder}/results.csv", f"{folder}/results.md"]
