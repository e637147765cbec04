"""scripts/reproduce.py end to end on CPU. A tiny Table 1 (cartpole_swingup, PIE-G and DrQ-v2, seeds 1 and 2,
200 frames, random weights, 2 evaluation episodes per mode on synthetic DMC-GB data) goes plan -> run, killed
after the first run's first checkpoint -> run again (resumes that run, trains the others) -> run again (starts
nothing) -> aggregate (tables beside the paper's figures, plots, a summary MLflow run). The full Table 1's dry run
lists its 90 runs and their cost within a minute."""
from __future__ import annotations

import contextlib
import csv
import io
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
from conftest import TINY, OutputProcess, load_script

from lightning_pieg import checkpoints, experiments, reproduce, stats
from lightning_pieg.console import UserError

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "reproduce.py"
FRAMES = 200  # 50-step episodes of 100 frames, a checkpoint every 100: killed after the first, resumed from it
TRAIN = [o for o in TINY if not o.startswith(("task=", "encoder.weights="))] + [  # --weights none instead
    "num_eval_episodes=1", "eval_every_frames=1000", "checkpoint_every_frames=100", "keep_checkpoints=5",
    "collector.num_envs=0", "trainer.log_every_n_updates=10"]
RUN_TIMEOUT_S = 420
KILL_TIMEOUT_S = 240


def tiny_args(root: Path, data_dir: Path) -> list[str]:
    return ["table1", "--tasks", "cartpole_swingup", "--methods", "pieg", "drqv2", "--seeds", "1", "2",
            "--frames", str(FRAMES), "--weights", "none", "--allow-missing", "--episodes", "2",
            "--modes", "train", "video_easy", "--dmcgb-dir", str(data_dir), "--root", str(root / "out"),
            "--eval-override", "env.time_limit=1", "--eval-override", "num_envs=1",
            "--", f"mlflow.tracking_uri={uri_of(root)}", *TRAIN]


def uri_of(root: Path) -> str:
    return f"sqlite:///{root / 'mlflow.db'}"


def script_main():
    return load_script("reproduce", "reproduce_script").main


class Command(OutputProcess):
    """``scripts/reproduce.py`` in a subprocess whose output a thread reads, so that every wait times out."""

    def __init__(self, cwd: Path, *args: str):
        super().__init__([sys.executable, str(SCRIPT), *args], cwd)


def runs_by_name(uri: str) -> dict[str, list]:
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("reproduce_table1")
    out: dict[str, list] = {}
    for run in client.search_runs([experiment.experiment_id], "tags.reproduce = 'run'"):
        out.setdefault(run.info.run_name, []).append(run)
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, data_dir):
    """The tiny Table 1: planned, run and killed after the first checkpoint, then run again to the end."""
    root = tmp_path_factory.mktemp("reproduce")
    args = tiny_args(root, data_dir)
    planned = io.StringIO()
    with contextlib.redirect_stdout(planned):
        script_main()(["plan", *args])

    first = Command(root, "run", *args)  # a node lost mid-run: the command and its training run killed outright
    first.wait_for("training run (pid", KILL_TIMEOUT_S)
    child = int(first.lines[-1].split("(pid ")[1].split(")")[0])
    first.wait_for("pieg_cartpole_swingup_s1/frame_000000100.ckpt", KILL_TIMEOUT_S)
    first.process.kill()
    os.kill(child, signal.SIGKILL)
    killed_status = first.finish(KILL_TIMEOUT_S)
    folder = root / "out" / "table1" / "pieg_cartpole_swingup_s1"
    after_kill = {path.name: checkpoints.read_sidecar(path)["final"] for path in sorted(folder.glob("frame_*.ckpt"))}
    [killed] = runs_by_name(uri_of(root))["pieg_cartpole_swingup_s1"]

    second = Command(root, "run", *args)
    status = second.finish(RUN_TIMEOUT_S)
    assert status == 0, second.output
    return {"root": root, "args": args, "plan": planned.getvalue(), "first": first, "killed_status": killed_status,
            "after_kill": after_kill, "killed": killed, "second": second}


def test_plan_lists_every_run_with_its_cost_and_what_is_missing(tiny):
    plan = tiny["plan"]
    for name in ("pieg_cartpole_swingup_s1", "drqv2_cartpole_swingup_s1", "pieg_cartpole_swingup_s2",
                 "drqv2_cartpole_swingup_s2"):
        assert f"| {name} | {FRAMES} | 4 |" in plan
    assert "4 runs (PIE-G, DrQ-v2; 1 task(s); seeds 1, 2)" in plan
    assert re.search(r"\*\*[0-9.,]+ CPU-hours\*\* on this machine", plan)
    assert re.search(r"\*\*[0-9.,]+ GPU-hours\*\* on one H200", plan)
    assert "MISSING: ImageNet weights" in plan and "overlay images" in plan
    assert plan.count("| train |") == 4  # nothing run yet: every run is to be trained


def test_a_killed_run_is_resumed_in_its_mlflow_run_not_restarted(tiny):
    first, second = tiny["first"], tiny["second"]
    assert tiny["killed_status"] == -signal.SIGKILL, first.output
    # killed outright after its first checkpoint: that one is left, resumable; its MLflow run still says RUNNING
    newest = max(tiny["after_kill"])
    assert "frame_000000100.ckpt" in tiny["after_kill"] and not any(tiny["after_kill"].values())
    assert tiny["killed"].info.status == "RUNNING"
    assert "[1/4] table1 pieg_cartpole_swingup_s1: resuming from its checkpoints" in second.output
    assert f"resuming from {tiny['root'] / 'out' / 'table1' / 'pieg_cartpole_swingup_s1' / newest} at frame " \
           f"{int(newest[6:15])}" in second.output
    assert "table1: 0 already done, 3 trained, 1 resumed, 4 evaluated, 0 failed" in second.output
    runs = runs_by_name(uri_of(tiny["root"]))
    assert sorted(runs) == ["drqv2_cartpole_swingup_s1", "drqv2_cartpole_swingup_s2", "pieg_cartpole_swingup_s1",
                            "pieg_cartpole_swingup_s2"]
    assert all(len(found) == 1 for found in runs.values())  # one MLflow run per run: nothing restarted
    [resumed] = runs["pieg_cartpole_swingup_s1"]
    assert resumed.info.run_id == tiny["killed"].info.run_id and resumed.info.status == "FINISHED"
    client = mlflow.MlflowClient(tracking_uri=uri_of(tiny["root"]))
    episodes = [m.step for m in client.get_metric_history(resumed.info.run_id, "train/episode_reward")]
    assert sorted(episodes) == [100, 200]  # one curve: each episode logged once
    tags = resumed.data.tags
    assert {k: tags[k] for k in ("experiment", "method", "task", "seed", "variant", "reproduce")} == {
        "experiment": "table1", "method": "pieg", "task": "cartpole_swingup", "seed": "1", "variant": "default",
        "reproduce": "run"}
    assert tags["reproduce.evaluated"] == "train,video_easy" and tags["reproduce.eval_episodes"] == "2"
    assert "ImageNet weights" in tags["reproduce.missing"]
    assert {"final/train/episode_reward", "final/video_easy/episode_reward"} <= set(resumed.data.metrics)


def test_running_again_starts_nothing(tiny, monkeypatch, capsys):
    def never(*args, **kwargs):
        raise AssertionError("a finished run was started again")

    monkeypatch.setattr(reproduce.Stopper, "train", never)
    monkeypatch.setattr(reproduce, "evaluate", never)
    before = {name: [r.info.run_id for r in found] for name, found in runs_by_name(uri_of(tiny["root"])).items()}
    script_main()(["run", *tiny["args"]])
    out = capsys.readouterr().out
    assert out.count(": done (MLflow run") == 4
    assert "table1: 4 already done, 0 trained, 0 resumed, 0 evaluated, 0 failed" in out
    after = {name: [r.info.run_id for r in found] for name, found in runs_by_name(uri_of(tiny["root"])).items()}
    assert after == before


def test_aggregate_puts_the_papers_figures_beside_ours_with_plots_in_a_summary_run(tiny, capsys):
    script_main()(["aggregate", *tiny["args"]])
    capsys.readouterr()
    folder = tiny["root"] / "out" / "table1" / "results"
    markdown = (folder / "summary.md").read_text()
    assert "Missing when these runs were trained: ImageNet weights" in markdown
    assert "614 ± 60" in markdown and "267 ± 41" in markdown  # Table 1, video_easy, cartpole_swingup
    runs = runs_by_name(uri_of(tiny["root"]))
    with (folder / "per_task.csv").open() as handle:
        rows = {(r["method"], r["setting"]): r for r in csv.DictReader(handle)}
    for method, name, paper in (("PIE-G", "pieg", 614), ("DrQ-v2", "drqv2", 267)):
        ours = [runs[f"{name}_cartpole_swingup_s{seed}"][0].data.metrics["final/video_easy/episode_reward"]
                for seed in (1, 2)]
        row = rows[method, "video_easy"]
        assert row["seeds"] == "2" and float(row["paper_mean"]) == paper
        assert float(row["mean"]) == pytest.approx(np.mean(ours))
        assert float(row["std"]) == pytest.approx(np.std(ours))
        assert float(row["difference"]) == pytest.approx(np.mean(ours) - paper)
        assert float(row["iqm_low"]) <= float(row["iqm"]) <= float(row["iqm_high"])
        assert f"| video_easy | cartpole_swingup | 2 | {np.mean(ours):.0f} ± {np.std(ours):.0f} |" in markdown
        assert f"{np.mean(ours) - paper:+.0f} |" in markdown
        assert rows[method, "train"]["paper_mean"] == ""  # the paper has no train column
    with (folder / "aggregate.csv").open() as handle:
        aggregates = list(csv.DictReader(handle))
    assert {r["metric"] for r in aggregates} == {"IQM", "Mean", "Median", "Optimality gap",
                                                 "Probability of improvement"}
    assert any(r["method"] == "PIE-G > DrQ-v2" and r["mode"] == "video_easy" for r in aggregates)
    figures = ["curves_cartpole_swingup.png", "paper_pie_g.png", "paper_drq_v2.png", "aggregate_video_easy.png",
               "profile_video_easy.png"]
    for name in figures:
        assert (folder / name).stat().st_size > 1000
    client = mlflow.MlflowClient(tracking_uri=uri_of(tiny["root"]))
    experiment = client.get_experiment_by_name("reproduce_table1")
    [summary] = client.search_runs([experiment.experiment_id], "tags.reproduce = 'summary'")
    assert summary.data.tags["experiment"] == "table1" and summary.info.status == "FINISHED"
    assert {"summary.md", "per_task.csv", "aggregate.csv", *figures} <= {a.path for a in
                                                                         client.list_artifacts(summary.info.run_id)}


def test_dry_run_of_table1_lists_its_runs_and_their_cost_within_a_minute(tmp_path):
    started = time.monotonic()
    result = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "table1", "--root", str(tmp_path),
                             "--", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path,
                            env={**os.environ, "MUJOCO_GL": "egl"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert time.monotonic() - started < 60
    lines = [line for line in result.stdout.splitlines() if line.startswith("| ") and "_s" in line]
    assert len(lines) == 90  # 3 methods x 6 tasks x 5 seeds
    assert "| 1 | pieg_cartpole_swingup_s1 | 1,100,000 | 256 |" in result.stdout
    assert "svea_finger_spin_s5" in result.stdout and "pieg_cheetah_run_s3 | 3,100,000" in result.stdout
    cpu = re.search(r"\*\*([0-9.,]+) CPU-hours\*\* on this machine", result.stdout)
    gpu = re.search(r"\*\*([0-9.,]+) GPU-hours\*\* on one H200", result.stdout)
    assert cpu and gpu and float(cpu[1].replace(",", "")) > float(gpu[1].replace(",", "")) > 100


def test_bad_requests_are_one_line_errors(tmp_path, data_dir):
    result = subprocess.run([sys.executable, str(SCRIPT), "plan", "table9"], capture_output=True, text=True,
                            timeout=120, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout.strip().splitlines() == [
        "[lightning_pieg] error: unknown experiment 'table9'; choose from table1, table2, table3, fig4 (or all)."]
    with pytest.raises(UserError, match="repeats 2"):
        experiments.check_seeds([1, 2, 2])
    with pytest.raises(UserError, match="-1 is negative"):
        experiments.check_seeds([-1])
    with pytest.raises(UserError, match="use --seeds"):
        reproduce.split_overrides(["seed=3"])
    with pytest.raises(UserError, match="walker_run is not part of table1"):
        experiments.runs(experiments.experiment("table1"), tmp_path, tasks=["walker_run"])
    # without ImageNet weights and overlay images, run refuses before any work and names the way on
    with pytest.raises(UserError, match="missing ImageNet weights .* overlay images .* --allow-missing"):
        script_main()(["run", "table1", "--tasks", "cartpole_swingup", "--seeds", "1", "--weights", "none",
                       "--modes", "train", "video_easy", "--dmcgb-dir", str(data_dir), "--root", str(tmp_path), "--",
                       f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"])
    assert not (tmp_path / "table1").exists()


def test_a_stop_signal_reaches_the_training_run_once_and_stops_the_command(tmp_path):
    code = ("import signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: sys.exit(143)); "
            f"open({str(tmp_path / 'ready')!r}, 'w').close(); time.sleep(60)")
    child = [sys.executable, "-c", code]

    def signal_when_ready() -> None:
        deadline = time.monotonic() + 30
        while not (tmp_path / "ready").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=signal_when_ready, daemon=True).start()
    started = time.monotonic()
    with reproduce.Stopper() as stopper:
        status = stopper.train(child)
    assert status == 143 and stopper.signal == signal.SIGTERM and time.monotonic() - started < 30


def test_each_run_has_its_own_folder_and_the_bookkeeping_keys_come_last(tmp_path):
    runs = experiments.runs(experiments.experiment("table3"), tmp_path, seeds=(1, 2))
    assert len(runs) == 4 * 3 * 2 and len({r.checkpoint_dir for r in runs}) == len(runs)
    assert runs[0].checkpoint_dir == tmp_path / "table3" / "pieg-layer1_walker_walk_s1"
    assert runs[0].modes == ("video_easy", "train")
    table2 = experiments.runs(experiments.experiment("table2"), tmp_path, seeds=(1,))
    assert table2[0].modes == ("train", "wood", "metal", "blanket_generated")  # no blanket.png given
    assert experiments.runs(experiments.experiment("table2"), tmp_path, seeds=(1,), blanket=True)[0].modes[-1] == \
        "blanket"
    settings = reproduce.Settings(tmp_path, "sqlite:///x.db", reproduce.Inputs(weights="none"),
                                  overrides=("batch_size=8",))
    overrides = reproduce.train_overrides(runs[0], settings)
    assert overrides[:4] == ["method=pieg", "task=walker_walk", "seed=1", "encoder.layer=1"]
    assert overrides.index("batch_size=8") < overrides.index(f"checkpoint_dir={runs[0].checkpoint_dir.resolve()}")
    assert "+mlflow.tags.experiment='table3'" in overrides and "encoder.weights=none" in overrides


def record_runs(uri: str, exp: experiments.Experiment, seeds: tuple[int, ...], score) -> None:
    """Evaluated runs as ``run`` leaves them (tags, ``final/<mode>/*``, a two-point learning curve), without training:
    ``score(run, mode)`` gives each final score."""
    from lightning_pieg import tracking

    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment_id = tracking.ensure_experiment(uri, reproduce.mlflow_experiment(exp.name))
    metric = exp.score
    for run in experiments.runs(exp, Path("unused"), seeds):
        run_id = client.create_run(experiment_id, run_name=run.name, tags=run.tags).info.run_id
        client.log_param(run_id, "num_train_frames", 1000)
        for mode in run.modes:
            client.log_metric(run_id, f"final/{mode}/{metric}", score(run, mode), step=1000)
        client.log_metric(run_id, f"eval/train/{metric}", 0.0, step=0)
        client.log_metric(run_id, f"eval/train/{metric}", score(run, "train"), step=1000)
        client.set_tag(run_id, reproduce.EVALUATED_TAG, ",".join(run.modes))
        client.set_tag(run_id, reproduce.EPISODES_TAG, "100")
        client.set_terminated(run_id, "FINISHED")


def test_aggregate_of_success_rates_and_ablations_from_recorded_runs(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rng = np.random.default_rng(0)
    table2, table3 = experiments.experiment("table2"), experiments.experiment("table3")
    record_runs(uri, table2, (1, 2, 3), lambda run, mode: float(rng.integers(0, 11)) / 10)
    record_runs(uri, table3, (1, 2), lambda run, mode: 100.0 * run.variant.layer + float(rng.integers(0, 50)))
    from lightning_pieg import report

    [data] = report.group_data(table2, report.collect(table2, uri))  # the per-task table only: no plots
    markdown = "\n".join(stats.comparison_table(report.comparisons(table2, data, label)) for label in data.labels)
    assert "| train | drawer_close | 3 |" in markdown
    assert markdown.count(" | 99 | ") == 1 and " | 98 | " in markdown  # PIE-G's and DrQ-v2's 0.99, 0.98 in percent
    generated = [line for line in markdown.splitlines() if line.startswith("| blanket_generated")]
    assert len(generated) == 3 and all(line.endswith("| - | - |") for line in generated)  # never compared

    out = report.aggregate(table3, uri, tmp_path / "t3", reps=200)
    with (tmp_path / "t3" / "per_task.csv").open() as handle:
        rows = {(r["method"], r["setting"], r["task"]): r for r in csv.DictReader(handle)}
    layer1 = rows["PIE-G layer 1", "video_easy", "walker_walk"]
    assert (float(layer1["paper_mean"]), float(layer1["paper_std"])) == (840, 32)  # Table 3, layer 1
    assert rows["PIE-G layer 4", "train", "cheetah_run"]["paper_mean"] == ""
    assert (tmp_path / "t3" / "layers.png").stat().st_size > 1000
    markdown = out["markdown"].read_text()
    assert "P(PIE-G layer 2 > PIE-G layer 1)" in markdown  # the paper's layer is the reference
    assert "Not the paper's setup" not in markdown  # nothing recorded as missing
