"""scripts/bench_envs.py: the collector table's rows and its CPU time per agent step."""
from __future__ import annotations

import os
import subprocess
import sys
import time

from conftest import SCRIPTS, load_script


def test_cpu_seconds_reads_a_child_process_cpu_time_from_proc():
    bench = load_script("bench_envs")
    # /proc rounds user and system time down to clock ticks each: the thresholds keep a few ticks' margin
    busy = subprocess.Popen([sys.executable, "-c", "import time\nend = time.process_time() + 0.7\n"
                             "while time.process_time() < end: pass\ntime.sleep(30)"])
    try:
        before = bench._cpu_seconds([busy.pid])
        deadline = time.monotonic() + 20
        while bench._cpu_seconds([busy.pid]) < 0.65 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # past its 0.7 s of CPU: now asleep, its CPU time stays put
        spent = bench._cpu_seconds([busy.pid])
        time.sleep(0.3)
        assert before < 0.65 and 0.67 <= spent < 1.5, (before, spent)
        assert bench._cpu_seconds([busy.pid]) - spent < 0.03
    finally:
        busy.kill()
        busy.wait()


def test_collector_table_gives_a_row_per_render_thread_setting_with_its_cpu_time():
    env = {**os.environ, "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")}
    env.pop("LP_NUM_THREADS", None)
    result = subprocess.run(
        [sys.executable, str(SCRIPTS / "bench_envs.py"), "--task", "cartpole_balance", "--workers", "1",
         "--render-threads", "0", "1", "--steps", "4", "--repeats", "1", "--only", "collector"],
        capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines() if line.startswith("| ")]
    assert [row[0].strip() for row in rows[1:]] == [
        "in process (LP_NUM_THREADS unset: one per core)", "1 worker (LP_NUM_THREADS 0)",
        "1 worker (LP_NUM_THREADS 1)"]
    for row in rows[1:]:
        rate, cpu_ms = float(row[2]), float(row[5])
        assert rate > 0 and cpu_ms > 0, row
