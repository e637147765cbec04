"""The learning check's pipeline (scripts/learning_check.py --quick): training, evaluation, CSV, figure."""
from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "learning_check.py"


def test_quick_learning_check_writes_curves(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with open(tmp_path / "learning_check_drqv2.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["frame"]) for r in rows] == [0, 1000, 2000]
    assert all(0 <= float(r["eval_return"]) <= 1000 for r in rows)
    assert (tmp_path / "learning_check_drqv2.png").stat().st_size > 10_000
    assert "seed 1: 0:" in result.stdout
