"""Data-parallel training with Lightning's DDP on CPU (gloo): two processes train one agent.

Every job runs ``tests/ddp_job.py`` in its own session with a deadline, so a hung collective kills the job's
whole process group and fails the test instead of hanging CI.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY

JOB = Path(__file__).resolve().parent / "ddp_job.py"
DDP = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp"]
FRAMES = 600          # cartpole_balance with env.time_limit=1: 50 agent steps, 100 frames an episode per process
CHECKPOINT_EVERY = 200


class Job:
    """``ddp_job.py`` in a new session; ``stop()`` kills the session (every DDP process of the job)."""

    def __init__(self, folder: Path, *overrides: str, env: dict | None = None):
        folder.mkdir(parents=True, exist_ok=True)
        self.log = open(folder / f"job_{time.monotonic_ns()}.log", "w+")
        self.process = subprocess.Popen(
            [sys.executable, str(JOB), str(folder), *overrides], stdout=self.log, stderr=subprocess.STDOUT,
            cwd=folder, start_new_session=True,
            env={**os.environ, "MUJOCO_GL": "egl", "OMP_NUM_THREADS": "1", **(env or {})})

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=30)

    def wait_for(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"no {text!r} within {timeout} s:\n{self.output()[-6000:]}")
            time.sleep(0.5)

    def finish(self, timeout: float) -> int:
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            pytest.fail(f"the job did not end within {timeout} s:\n{self.output()[-6000:]}")
        time.sleep(1)  # the killed session's stragglers
        return self.process.returncode


def ranks(folder: Path) -> list[dict]:
    return [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(2)]


def mlflow_runs(folder: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("lightning_pieg")
    return client, client.search_runs([experiment.experiment_id])


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
    """One finished 2-process PIE-G job, evaluated on train and color_hard (per-observation BatchNorm)."""
    folder = tmp_path_factory.mktemp("ddp")
    overrides = [*DDP, f"num_train_frames={FRAMES}", f"checkpoint_every_frames={CHECKPOINT_EVERY}",
                 "num_eval_episodes=2", "eval.modes=[train,color_hard]", f"eval.dmcgb_dir={data_dir}",
                 "diag.feature_shift=false"]
    job = Job(folder, *overrides)
    assert job.finish(timeout=420) == 0, job.output()[-6000:]
    return folder, overrides, job.output()


def test_two_processes_train_one_agent(trained):
    folder, _, _ = trained
    first, second = ranks(folder)
    assert (first["rank"], second["rank"], first["world_size"]) == (0, 1, 2)
    # every process ran the same updates: 300 agent steps each, updates every 2 from step 20 (seed 40 frames / 2)
    assert first["updates"] == second["updates"] == 70
    assert first["end_frame"] == second["end_frame"] == FRAMES  # the budget counts both processes' frames
    for name, value in first["end"]["trainable"].items():
        assert torch.equal(value, second["end"]["trainable"][name]), name  # bitwise, after every update
        assert not torch.equal(value, first["start"]["trainable"][name]), name  # and they did learn
    trunk = [name for name in first["end"]["frozen"] if name.startswith("encoder.")]
    assert trunk
    for name in trunk:
        assert torch.equal(first["end"]["frozen"][name], first["start"]["frozen"][name]), name
        assert torch.equal(second["end"]["frozen"][name], first["start"]["frozen"][name]), name
    # BatchNorm policy: each process keeps the running statistics of its own observations (adaptive)
    statistics = [name for name in first["end"]["buffers"] if name.endswith("running_mean")]
    assert statistics
    for name in statistics:
        assert not torch.equal(first["end"]["buffers"][name], first["start"]["buffers"][name]), name
        assert not torch.equal(first["end"]["buffers"][name], second["end"]["buffers"][name]), name
    # the processes collected different episodes (their environments and noise are seeded by rank)
    assert first["replay"][0]["frames"].shape == second["replay"][0]["frames"].shape
    assert not np.array_equal(first["replay"][0]["frames"], second["replay"][0]["frames"])
    assert not np.array_equal(first["replay"][0]["actions"], second["replay"][0]["actions"])


def test_one_mlflow_run_and_one_set_of_checkpoints(trained):
    folder, _, output = trained
    client, runs = mlflow_runs(folder)
    assert [run.info.status for run in runs] == ["FINISHED"]
    run_id = runs[0].info.run_id
    metrics = runs[0].data.metrics
    assert "train/critic_loss" in metrics and "eval/train/episode_reward" in metrics
    assert "eval/color_hard/episode_reward" in metrics
    episode_frames = [m.step for m in client.get_metric_history(run_id, "train/episode_reward")]
    assert episode_frames == [200, 400, 600]  # global frames: one episode of each process per 200
    assert [m.step for m in client.get_metric_history(run_id, "eval/train/episode_reward")] == [0, FRAMES]
    assert output.count("eval train at frame 0") == 1  # progress printed once, by rank 0
    names = sorted(path.name for path in (folder / "checkpoints").iterdir() if not path.name.startswith("."))
    assert names == ["frame_000000200.ckpt", "frame_000000200.json", "frame_000000200.rank1.pt",
                     "frame_000000400.ckpt", "frame_000000400.json", "frame_000000400.rank1.pt",
                     "frame_000000600.ckpt", "frame_000000600.json"]
    sidecar = (folder / "checkpoints" / "frame_000000400.json").read_text()
    assert '"world_size": 2' in sidecar and run_id in sidecar


def test_evaluation_split_across_processes_equals_one_process(trained, compose):
    """2 processes x 1 episode (each with its own evaluation seed) give the mean of those 2 episodes played in one
    process with the final weights. Each process's environment played the frame-0 evaluation's episode first, so
    one process plays two episodes per seed and keeps the second (the cartpole's dynamics draw no random numbers:
    the first episode's actions do not change where the second starts)."""
    from lightning_pieg import pipeline
    from lightning_pieg.policy import load_module, mean_action_policy, one_at_a_time
    from lightning_pieg.rollouts import run_episode

    folder, overrides, _ = trained
    cfg = compose(*overrides)
    module = load_module(folder / "checkpoints" / f"frame_{FRAMES:09d}.ckpt")
    act = one_at_a_time(mean_action_policy(module, per_observation_bn=True))
    returns = []
    for rank in range(2):
        env = pipeline.make_eval_env(cfg, "color_hard", rank)
        run_episode(env, act)
        returns.append(run_episode(env, act).reward)
        env.close()
    client, runs = mlflow_runs(folder)
    logged = client.get_metric_history(runs[0].info.run_id, "eval/color_hard/episode_reward")
    assert [m.step for m in logged] == [0, FRAMES]
    assert returns[0] != returns[1]
    assert logged[-1].value == pytest.approx(np.mean(returns), rel=1e-6)


def test_killed_job_resumes_on_both_processes_in_the_same_run(tmp_path):
    overrides = [*DDP, f"num_train_frames={FRAMES}", f"checkpoint_every_frames={CHECKPOINT_EVERY}",
                 "diag.feature_shift=false"]
    job = Job(tmp_path, *overrides)
    job.wait_for("checkpoint: ", timeout=300)
    job.stop()  # SIGKILL to every process of the job, right after its first checkpoint
    saved = sorted((tmp_path / "checkpoints").glob("frame_*.ckpt"))[0]
    frame = int(saved.stem.split("_")[1])

    one = subprocess.run([sys.executable, str(JOB), str(tmp_path), f"num_train_frames={FRAMES}", "resume=last",
                          "trainer.accelerator=cpu", "trainer.devices=1"],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "MUJOCO_GL": "egl"})
    assert one.returncode == 2, one.stdout[-3000:] + one.stderr[-3000:]
    assert "written by 2 DDP process(es), this run has 1" in one.stdout and "trainer.devices" in one.stdout

    resumed = Job(tmp_path, *overrides, "resume=last")
    assert resumed.finish(timeout=360) == 0, resumed.output()[-6000:]
    first, second = ranks(tmp_path)
    assert first["start_frame"] == second["start_frame"] == frame
    assert first["end_frame"] == second["end_frame"] == FRAMES
    assert first["updates"] == second["updates"]
    for name, value in first["end"]["trainable"].items():
        assert torch.equal(value, second["end"]["trainable"][name]), name
    _, runs = mlflow_runs(tmp_path)
    assert [run.info.status for run in runs] == ["FINISHED"]


def test_a_process_out_of_step_fails_the_job_quickly(tmp_path):
    """Process 1 stalls in its third update: process 0 waits in the next all-reduce until ``ddp_timeout_s``, and
    the job ends with an error instead of hanging."""
    started = time.monotonic()
    job = Job(tmp_path, *DDP, f"num_train_frames={FRAMES}", "trainer.ddp_timeout_s=15", "diag.feature_shift=false",
              env={"DDP_JOB_STALL_RANK": "1"})
    status = job.finish(timeout=240)
    assert status != 0
    assert time.monotonic() - started < 240
    assert not (tmp_path / "rank0.pt").exists()


@pytest.mark.parametrize("overrides, message", [
    (["trainer.accelerator=cpu", f"trainer.devices={(os.cpu_count() or 1) + 1}"], "CPU processes on"),
    (["trainer.strategy=ddp_spawn"], "trainer.strategy='ddp_spawn'"),
    (["trainer.num_nodes=0"], "trainer.num_nodes=0"),
])
def test_requests_that_cannot_work_fail_in_seconds(tmp_path, overrides, message):
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "lightning_pieg.train", *TINY, *overrides,
                           f"checkpoint_dir={tmp_path / 'c'}", f"hydra.run.dir={tmp_path / 'out'}"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**os.environ, "MUJOCO_GL": "egl"})
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert message in done.stdout
    assert len(done.stdout.strip().splitlines()[-1]) < 400  # one line
    assert time.monotonic() - started < 60
