"""The learning check (scripts/learning_check.py): its pipeline in --quick mode, the report read back from MLflow,
and the training frames/s it reports."""
from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import load_script

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "learning_check.py"


def learning_check():
    return load_script("learning_check")


def test_quick_learning_check_trains_seeds_side_by_side_and_reports_them_again(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--seeds", "1", "2", "--jobs", "2",
                             "--out", str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with open(tmp_path / "learning_check_drqv2.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(int(r["seed"]), int(r["frame"])) for r in rows] == [(s, f) for s in (1, 2) for f in (0, 1000, 2000)]
    assert {r["runs_side_by_side"] for r in rows} == {"2"}
    assert (tmp_path / "seed_1.log").is_file() and (tmp_path / "seed_2.log").is_file()
    assert all(0 <= float(r["eval_return"]) <= 1000 for r in rows)
    assert {r["status"] for r in rows} == {"FINISHED"}
    assert (tmp_path / "learning_check_drqv2.png").stat().st_size > 10_000
    line = next(line for line in result.stdout.splitlines() if line.startswith("seed 1: 0:"))

    (tmp_path / "learning_check_drqv2.csv").unlink()
    again = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--seeds", "1", "2", "--report",
                            "--out", str(tmp_path)],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert line in again.stdout  # the same returns, frames/s and wall time, read back from the MLflow runs
    assert (tmp_path / "learning_check_drqv2.csv").is_file()

    missing = subprocess.run([sys.executable, str(SCRIPT), "--report", "--agent", "pieg", "--out", str(tmp_path)],
                             capture_output=True, text=True, timeout=300)
    assert missing.returncode != 0 and "no pieg runs at batch 64" in missing.stderr


def test_training_fps_is_the_median_episode_rate_after_the_seed_phase():
    training_fps = learning_check().training_fps
    # (frame, ms): seed episodes at 100 frames/s, then 20 frames/s, one episode slowed by an evaluation
    ends = [(1000, 10_000), (2000, 20_000), (3000, 70_000), (4000, 120_000), (5000, 470_000), (6000, 520_000)]
    assert training_fps(ends, seed_frames=2000) == pytest.approx(20.0)
    assert training_fps(ends, seed_frames=0) == pytest.approx(20.0)
    assert training_fps(ends[:2], seed_frames=0) == pytest.approx(100.0)
    assert training_fps(ends[:2], seed_frames=2000) != training_fps(ends[:2], seed_frames=2000)  # nan: none yet


def test_side_by_side_creates_the_experiment_before_any_seed_starts(tmp_path):
    # Two children that both find no experiment both create it; the second then fails on the unique name.
    import argparse

    import mlflow
    script = learning_check()
    args = argparse.Namespace(out=tmp_path, jobs=2, seeds=[])  # no seed: only the set-up runs
    script.train_side_by_side(args)
    client = mlflow.MlflowClient(script.tracking_uri(tmp_path))
    assert client.get_experiment_by_name(script.EXPERIMENT) is not None
    script.train_side_by_side(args)  # and again over an existing experiment
