"""Nothing run, nothing lost, nothing mixed up: hostile checkpoints, divergence, run locks, concurrent stores, full
disks, interruptions, and every bad value a one-line error with exit status 2."""
from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from hydra import compose as hydra_compose
from hydra import initialize_config_dir

import lightning_pieg
from lightning_pieg import checkpoints
from lightning_pieg.callbacks import DivergenceError
from lightning_pieg.checkpoints import CheckpointError, RunLock
from lightning_pieg.console import UserError
from lightning_pieg.config import CONF_DIR, split_overrides
from lightning_pieg.evaluate import evaluate
from lightning_pieg.policy import load_module
from lightning_pieg.train import train

from conftest import TINY, TrainingProcess

pytestmark = pytest.mark.usefixtures("one_thread")
FRAMES = 200
SUBPROCESS_TIMEOUT_S = 240


def train_config(root: Path, *overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose("config", overrides=[
            *TINY, f"checkpoint_dir={root / 'checkpoints'}", f"mlflow.tracking_uri=sqlite:///{root / 'mlflow.db'}",
            f"num_train_frames={FRAMES}", "checkpoint_every_frames=100", *overrides])


def eval_config(*overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose("evaluate", overrides=list(overrides))


def cli(*args: str, cwd: Path, timeout: float = SUBPROCESS_TIMEOUT_S) -> subprocess.CompletedProcess:
    env = {**os.environ, "MUJOCO_GL": "egl", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env=env)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny finished PIE-G run: (root, periodic checkpoint at frame 100, final checkpoint, run id, store)."""
    root = tmp_path_factory.mktemp("trained")
    cfg = train_config(root, "save_replay=true")
    run_id = train(cfg, output_dir=root / "out")
    folder = root / "checkpoints"
    return root, folder / "frame_000000100.ckpt", folder / f"frame_{FRAMES:09d}.ckpt", run_id, cfg.mlflow.tracking_uri


# ---------------------------------------------------------------------------------------------- hostile files
class RunsACommand:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def hostile_copy(checkpoint: Path, folder: Path, marker: Path) -> Path:
    """A copy of a real checkpoint (and its sidecar) with one extra entry whose unpickling runs a command."""
    folder.mkdir(parents=True, exist_ok=True)
    state = torch.load(checkpoint, weights_only=True)
    state["extra"] = RunsACommand(marker)
    target = folder / checkpoint.name
    torch.save(state, target)
    shutil.copy(checkpoint.with_suffix(".json"), target.with_suffix(".json"))
    return target


def test_a_checkpoint_that_would_run_a_command_is_refused_everywhere(trained, tmp_path):
    root, periodic, final, run_id, uri = trained
    marker = tmp_path / "the_command_ran"
    hostile = hostile_copy(final, tmp_path / "hostile", marker)
    with pytest.raises(CheckpointError, match="refusing to load"):
        lightning_pieg.load_policy(hostile)
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_module(hostile)
    with pytest.raises(CheckpointError, match="refusing to load"):
        evaluate(eval_config(f"checkpoint={hostile}", "episodes=1", "video=false"), output_dir=tmp_path / "e1")
    # the same file as an MLflow run's final checkpoint artifact
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("lightning_pieg").experiment_id
    evil_run = client.create_run(experiment).info.run_id
    client.log_artifact(evil_run, str(hostile), "checkpoints")
    client.log_artifact(evil_run, str(hostile.with_suffix(".json")), "checkpoints")
    with pytest.raises(CheckpointError, match="refusing to load"):
        evaluate(eval_config(f"checkpoint={evil_run}", f"mlflow.tracking_uri={uri}", "episodes=1", "video=false"),
                 output_dir=tmp_path / "e2")
    # resume= (a periodic checkpoint, so that the request itself is valid)
    hostile_periodic = hostile_copy(periodic, tmp_path / "hostile_periodic" / "checkpoints", marker)
    with pytest.raises(UserError, match="refusing to load"):
        train(train_config(tmp_path / "hostile_periodic", f"resume={hostile_periodic}", "num_train_frames=300"),
              output_dir=tmp_path / "t")
    assert not marker.exists()
    # and the environment variable that makes torch load everything does not change that
    result = subprocess.run([sys.executable, "-c", f"import lightning_pieg; lightning_pieg.load_policy({str(hostile)!r})"],
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"})
    assert result.returncode != 0 and "refusing to load" in result.stderr
    assert not marker.exists()


def test_load_policy_names_the_observation_it_takes(trained):
    act = lightning_pieg.load_policy(trained[2])
    with pytest.raises(ValueError, match=r"shape \(9, 84, 84\).*\(3, 84, 84\)"):
        act(np.zeros((3, 84, 84), np.uint8))


# ------------------------------------------------------------------------------------------------ divergence
def test_divergence_stops_the_run_and_keeps_the_last_finite_checkpoint(trained, tmp_path):
    root, periodic, final, run_id, uri = trained
    work = tmp_path / "run"
    shutil.copytree(root / "checkpoints", work / "checkpoints")
    shutil.copy(root / "mlflow.db", work / "mlflow.db")
    before = sorted(p.name for p in (work / "checkpoints").glob("*.ckpt"))
    resume = work / "checkpoints" / periodic.name
    with pytest.raises(DivergenceError, match=r"diverged at update [1-3] \(frame 1\d\d\).*not finite.*lr=1000000.0"):
        train(train_config(work, f"resume={resume}", "lr=1e6", "num_train_frames=400", "keep_checkpoints=1"),
              output_dir=tmp_path / "out")
    assert sorted(p.name for p in (work / "checkpoints").glob("*.ckpt")) == before  # nothing written or pruned
    module = load_module(resume)
    assert all(torch.isfinite(p).all() for p in module.parameters())


# -------------------------------------------------------------------------------------------- runs that mix
def test_a_second_run_on_a_locked_folder_refuses_and_a_dead_owner_is_taken_over(tmp_path):
    folder = tmp_path / "checkpoints"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from lightning_pieg.checkpoints import RunLock; "
                               f"lock = RunLock({str(folder)!r}).acquire(); print('locked', flush=True); "
                               "time.sleep(600)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(CheckpointError, match=rf"in use by pid {holder.pid}"):
            train(train_config(tmp_path), output_dir=tmp_path / "out")
    finally:
        holder.kill()
        holder.wait(timeout=30)
    lock = RunLock(folder).acquire()  # the kernel dropped the dead process's lock; its note is what remains
    assert lock.stale_owner is not None and f"pid {holder.pid}" in lock.stale_owner
    lock.release()


def test_resume_with_another_task_or_network_size_is_refused(trained, tmp_path):
    root, periodic, *_ = trained
    with pytest.raises(UserError, match="task='cartpole_balance'.*task='cartpole_swingup'"):
        train(train_config(tmp_path, f"resume={periodic}", "task=cartpole_swingup"))
    with pytest.raises(UserError, match="hidden_dim=32.*hidden_dim=64"):
        train(train_config(tmp_path, f"resume={periodic}", "hidden_dim=64"))


def test_resume_last_on_a_finished_run_does_nothing(trained, capsys):
    root, *_ = trained
    assert train(train_config(root, "resume=last")) is None
    assert "is finished" in capsys.readouterr().out


def test_resume_skips_a_damaged_old_sidecar_and_logs_changes_once(trained, tmp_path):
    root, periodic, final, run_id, uri = trained
    work = tmp_path / "run"
    shutil.copytree(root / "checkpoints", work / "checkpoints")
    shutil.copy(root / "mlflow.db", work / "mlflow.db")
    folder = work / "checkpoints"
    final_copy = folder / final.name
    final_copy.unlink()
    final_copy.with_suffix(".json").unlink()
    shutil.copy(folder / periodic.name, folder / "frame_000000050.ckpt")
    (folder / "frame_000000050.json").write_text("{ not json")  # an older, damaged sidecar
    (folder / "frame_000000150.ckpt.tmp").write_bytes(b"partial")  # what an interrupted save left
    store = f"sqlite:///{work / 'mlflow.db'}"
    resumed = train(train_config(work, "resume=last", "num_train_frames=300", f"mlflow.tracking_uri={store}"),
                    output_dir=tmp_path / "out")
    assert resumed == run_id
    assert not (folder / "frame_000000150.ckpt.tmp").exists()
    client = mlflow.MlflowClient(tracking_uri=store)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["num_train_frames"] == str(FRAMES)
    assert run.data.params["resumed_at_100.num_train_frames"] == "300"
    steps = [m.step for m in client.get_metric_history(run_id, "train/episode_reward")]
    assert steps == sorted(set(steps))  # one clean curve: no step logged twice, none going backwards


def test_truncated_replay_is_a_clear_error(trained, tmp_path):
    root, periodic, *_ = trained
    work = tmp_path / "run"
    shutil.copytree(root / "checkpoints", work / "checkpoints")
    replay = work / "checkpoints" / periodic.with_suffix(".replay.npz").name
    replay.write_bytes(replay.read_bytes()[: replay.stat().st_size // 2])
    with pytest.raises(UserError, match="replay file .* corrupt"):
        train(train_config(work, f"resume={work / 'checkpoints' / periodic.name}", "save_replay=true"))


# --------------------------------------------------------------------------------------------- the store
def test_two_runs_started_together_on_a_fresh_store_both_finish(tmp_path):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = ["lightning_pieg.train", *TINY, "num_train_frames=60", f"mlflow.tracking_uri={store}"]
    env = {**os.environ, "MUJOCO_GL": "egl", "OMP_NUM_THREADS": "1"}
    runs = [subprocess.Popen([sys.executable, "-m", *common, f"seed={seed}",
                              f"checkpoint_dir={tmp_path / f'c{seed}'}", f"hydra.run.dir={tmp_path / f'o{seed}'}"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
            for seed in (1, 2)]
    outputs = []
    for process in runs:
        try:
            outputs.append(process.communicate(timeout=SUBPROCESS_TIMEOUT_S)[0])
        finally:
            process.kill()
    assert [process.returncode for process in runs] == [0, 0], outputs
    client = mlflow.MlflowClient(tracking_uri=store)
    finished = client.search_runs([client.get_experiment_by_name("lightning_pieg").experiment_id])
    assert sorted(run.info.status for run in finished) == ["FINISHED", "FINISHED"]


# ------------------------------------------------------------------------------------------------ full disks
def test_a_full_disk_leaves_no_partial_file_and_the_earlier_checkpoints_load(tmp_path, monkeypatch):
    real_save = torch.save

    def save_until_full(obj, handle, *args, **kwargs):
        if "frame_000000200" in getattr(handle, "name", ""):
            handle.write(b"x" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, handle, *args, **kwargs)

    monkeypatch.setattr(checkpoints.torch, "save", save_until_full)
    with pytest.raises(CheckpointError) as failure:
        train(train_config(tmp_path, "num_train_frames=300"), output_dir=tmp_path / "out")
    message = str(failure.value)
    assert "\n" not in message and "frame_000000200.ckpt" in message and "MiB free" in message
    folder = tmp_path / "checkpoints"
    assert not list(folder.glob("*.tmp")) and not (folder / "frame_000000200.ckpt").exists()
    monkeypatch.undo()
    act = lightning_pieg.load_policy(folder / "frame_000000100.ckpt")
    assert act(np.zeros((9, 84, 84), np.uint8)).shape == (1,)


def test_a_checkpoint_folder_without_room_fails_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoints, "free_bytes", lambda path: 10 * 2**20)
    with pytest.raises(CheckpointError, match=r"10 MiB free.*room for 2"):
        train(train_config(tmp_path))


# -------------------------------------------------------------------------------------------- interruptions
def test_sigterm_writes_a_resumable_checkpoint_and_marks_the_run_killed(tmp_path):
    """... and resuming from it trains on to the frame budget in the same MLflow run."""
    run = TrainingProcess(tmp_path, "num_train_frames=100000", "num_seed_frames=40")
    run.wait_for("frame       100/", SUBPROCESS_TIMEOUT_S)  # the first training episode has ended
    run.process.send_signal(signal.SIGTERM)
    assert run.finish(SUBPROCESS_TIMEOUT_S) == 143, "".join(run.lines)
    saved = sorted((tmp_path / "checkpoints").glob("*.ckpt"))
    assert len(saved) == 1
    meta = checkpoints.read_sidecar(saved[0])
    assert not meta["final"] and meta["frame"] % 100 == 0 and meta["frame"] >= 200  # the next episode start
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.get_run(meta["mlflow_run_id"]).info.status == "KILLED"

    budget = meta["frame"] + 200
    resumed = TrainingProcess(tmp_path, f"num_train_frames={budget}", "num_seed_frames=40", "resume=last")
    assert resumed.finish(SUBPROCESS_TIMEOUT_S) == 0, "".join(resumed.lines)
    final = sorted((tmp_path / "checkpoints").glob("*.ckpt"))[-1]
    assert checkpoints.read_sidecar(final)["final"] and checkpoints.read_sidecar(final)["frame"] == budget
    assert client.get_run(meta["mlflow_run_id"]).info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(meta["mlflow_run_id"], "train/episode_reward")]
    assert steps[-1] == budget and meta["frame"] + 100 in steps


# ---------------------------------------------------------------------------------------------- bad values
BAD_VALUES = [
    ("frames=abc", "frames='abc'"),
    ("seed=abc", "seed='abc'"),
    ("lr=-1", "lr=-1"),
    ("lr=abc", "lr='abc'"),
    ("critic_target_tau=5", "critic_target_tau=5"),
    ("stddev_clip=-1", "stddev_clip=-1"),
    ("augment.overlay_alpha=2", "augment.overlay_alpha=2"),
    ("encoder.head_dim=0", "encoder.head_dim=0"),
    ("trainer.accelerator=gpu", "trainer.accelerator=gpu"),
    ("env.image_size=16", "env.image_size=16"),
    ("env.time_limit=-1", "env.time_limit=-1"),
    ("augment.shift_pad=-3", "augment.shift_pad=-3"),
    ("save_replay=maybe", "save_replay='maybe'"),
    ("num_seed_frames=5000", "num_seed_frames=5,000"),
    ("+env.frame_stak=3", "'frame_stak' is not an option"),
    ("stddev_schedule='linear(1,0.1,0)'", "stddev_schedule="),
    ("eval.modes=[train,nope]", "nope"),
    ("agent=nope", "agent"),
    ("overrides_split", "close the quote"),
    ("overlay_empty", "holds no"),
    ("overlay_corrupt", "cannot read overlay image"),
    ("colour_file", "color_hard"),
    ("resume_other_task", "task='cartpole_balance'"),
    ("resume_other_agent", "method='pieg'"),  # agent=drqv2 is method=drqv2
    ("resume_missing", "does not exist"),
]


@pytest.mark.parametrize("bad, named", BAD_VALUES, ids=[bad for bad, _ in BAD_VALUES])
def test_a_bad_value_is_one_line_exit_status_2_in_seconds(bad, named, trained, tmp_path, data_dir):
    args = [f"checkpoint_dir={tmp_path / 'checkpoints'}", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'db'}",
            "num_train_frames=1000"]
    if bad == "overrides_split":
        args.append("batch_size=8 seed='1")  # how `mlflow run -P overrides=...` passes an unclosed quote
    elif bad.startswith("overlay_"):
        folder = tmp_path / "places"
        folder.mkdir()
        if bad == "overlay_corrupt":
            (folder / "a.jpg").write_bytes(b"not an image")
        args.append(f"augment.overlay={folder}")
    elif bad == "colour_file":
        hostile = tmp_path / "dmcgb"
        shutil.copytree(data_dir, hostile)
        torch.save({"x": RunsACommand(tmp_path / "ran")}, hostile / "color_hard.pt")
        args += ["num_eval_episodes=1", "eval.modes=[train,color_hard]", f"eval.dmcgb_dir={hostile}"]
    elif bad.startswith("resume_"):
        args.append(f"resume={trained[1] if bad != 'resume_missing' else tmp_path / 'nothing.ckpt'}")
        args += {"resume_other_task": ["task=cartpole_swingup"], "resume_other_agent": ["agent=drqv2"]}.get(bad, [])
    else:
        args.append(bad)
    started = time.monotonic()
    result = cli("lightning_pieg.train", *TINY, *args, cwd=tmp_path, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output
    errors = [line for line in result.stdout.splitlines() if line.startswith("[lightning_pieg] error:")]
    assert len(errors) == 1 and named in errors[0], output
    assert time.monotonic() - started < 90
    assert not (tmp_path / "ran").exists()


def test_overrides_keep_a_bracketed_list_with_spaces_in_one_piece():
    assert split_overrides(["eval.modes=[train, video_hard]", "seed=2"]) == ["eval.modes=[train, video_hard]",
                                                                           "seed=2"]
    assert split_overrides(["eval.modes=[train, video_hard] batch_size=8"]) == ["eval.modes=[train, video_hard]",
                                                                               "batch_size=8"]
