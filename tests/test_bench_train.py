"""scripts/bench_train.py end to end on a tiny run: a row per configuration, its ratio and each repeat's figure."""
from __future__ import annotations

import os
import subprocess
import sys

from conftest import SCRIPTS


def test_bench_train_prints_a_row_per_collector_with_each_repeat():
    env = {**os.environ, "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")}
    result = subprocess.run(
        [sys.executable, str(SCRIPTS / "bench_train.py"), "--task", "cartpole_balance", "--agents", "drqv2",
         "--batch", "8", "--envs", "0", "1", "--frames", "120", "--seed-frames", "40", "--repeats", "2",
         "--threads", "1"], capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in result.stdout.splitlines()
            if line.startswith("| drqv2")]
    assert [row[2] for row in rows] == ["in process", "1 worker"]
    for row in rows:
        fps, shares, each = float(row[4]), [float(cell.rstrip("%")) for cell in row[6:11]], row[11].split(" / ")
        assert fps > 0 and len(each) == 2 and all(float(value) > 0 for value in each)
        assert sorted([fps, *map(float, each)])[1] == fps  # the median of two lies between them
        assert all(0 <= share <= 100 for share in shares[:4]) and shares[3] > 0  # the update took time
    assert rows[0][5] == "1.00"
