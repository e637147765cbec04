"""Environment throughput, random actions, no learner: the collector's environments, then every evaluation mode.

1. ``--task`` (walker_walk) in this process and in 1, 2, 4 worker processes (``lightning_pieg.workers.EnvWorkers``;
   each agent step steps all N at once and waits for all of them). Env frames/s counts the simulator control steps
   of all environments together; the ratio is against the in-process environment measured in the same run.
2. Each mode of the suite (DMC-GB's with ``--dmcgb-dir``), reach_duplo and drawer_close, in process, against its
   task's train mode.

An agent step is one action through the full pixel stack (action repeat 2, one 84x84 render, frame stack 3). Figures
are medians over ``--repeats`` timed stretches of ``--steps`` agent steps (resets when an episode ends included).

    python scripts/bench_envs.py [--workers 1 2 4] [--render-threads 0 1] [--steps 200] [--repeats 3] \\
        [--dmcgb-dir /data/dmcgb]

The collector table also gives each configuration's CPU time per agent step (all threads of the process, or of the
workers): what the environments take from the learner when they step beside its update.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import lightning_pieg  # noqa: F401  (torch before dm_control's EGL renderer: see lightning_pieg/__init__.py)
import numpy as np

from lightning_pieg import envs
from lightning_pieg.envs import drawerworld
from lightning_pieg.workers import WORKER_RENDER_THREADS, EnvWorkers

WARMUP_STEPS = 5


def agent_steps_per_second(env, steps: int, rng: np.random.Generator) -> float:
    """Agent steps per second over ``steps`` random actions (resets, when an episode ends, are counted in)."""
    return _timed_steps(env, steps, rng)[0]


def _timed_steps(env, steps: int, rng: np.random.Generator) -> tuple[float, float]:
    """(agent steps per second, CPU seconds of this process's threads per agent step)."""
    spec = env.action_spec()
    actions = rng.uniform(spec.minimum, spec.maximum, (steps, *spec.shape)).astype(np.float32)
    start, cpu = time.perf_counter(), time.process_time()
    for action in actions:
        if env.step(action).last():
            env.reset()
    return steps / (time.perf_counter() - start), (time.process_time() - cpu) / steps


def _cpu_seconds(pids: list[int]) -> float:
    """CPU time (user + system, all threads) the processes ``pids`` have used so far (Linux ``/proc``)."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime: the 14th and 15th fields of the whole line
    return total / os.sysconf("SC_CLK_TCK")


def workers_rate(workers: EnvWorkers, steps: int, rng: np.random.Generator) -> tuple[float, float]:
    """(agent steps per second of all workers together (N per batched step), the workers' CPU seconds per agent
    step)."""
    shape = workers.action_spec().shape
    actions = rng.uniform(-1.0, 1.0, (steps, len(workers), *shape)).astype(np.float32)
    pids = [process.pid for process in workers.processes]
    start, cpu = time.perf_counter(), _cpu_seconds(pids)
    for batch_actions in actions:
        batch = workers.step(batch_actions)
        if batch.last.any():
            workers.reset(np.flatnonzero(batch.last))
    return steps * len(workers) / (time.perf_counter() - start), (_cpu_seconds(pids) - cpu) / (steps * len(workers))


def _medians(timings: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.median(t[0] for t in timings), statistics.median(t[1] for t in timings)


def collector_table(args, options: dict, rng: np.random.Generator) -> None:
    rows = []  # (label, start-up s, agent steps/s, CPU s per agent step)
    start = time.perf_counter()
    env = envs.make(args.task, "train", seed=0, **options)
    env.reset()
    build = time.perf_counter() - start
    agent_steps_per_second(env, WARMUP_STEPS, rng)
    in_process = os.environ.get("LP_NUM_THREADS", "unset: one per core")
    rows.append((f"in process (LP_NUM_THREADS {in_process})", build,
                 *_medians([_timed_steps(env, args.steps, rng) for _ in range(args.repeats)])))
    env.close()
    user_choice = os.environ.get("LP_NUM_THREADS")
    for render_threads in args.render_threads or [user_choice or WORKER_RENDER_THREADS]:
        os.environ["LP_NUM_THREADS"] = render_threads  # the spawned workers inherit it
        try:
            for num in args.workers:
                start = time.perf_counter()
                with EnvWorkers(args.task, "train", seeds=range(num), options=options) as workers:
                    workers.reset()
                    build = time.perf_counter() - start
                    workers_rate(workers, WARMUP_STEPS, rng)
                    timings = [workers_rate(workers, args.steps, rng) for _ in range(args.repeats)]
                rows.append((f"{num} worker{'s' if num > 1 else ''} (LP_NUM_THREADS {render_threads})", build,
                             *_medians(timings)))
        finally:
            if user_choice is None:
                os.environ.pop("LP_NUM_THREADS")
            else:
                os.environ["LP_NUM_THREADS"] = user_choice
    baseline = rows[0][2]
    print(f"\n{args.task}, {args.image_size}x{args.image_size}, action repeat {args.action_repeat}, median of "
          f"{args.repeats} x {args.steps} agent steps; MUJOCO_GL={os.environ.get('MUJOCO_GL')}, {os.cpu_count()} "
          f"CPUs; LP_NUM_THREADS: Mesa llvmpipe's rasterizer threads (0: in the rendering thread)\n")
    print("| envs | start-up s | agent steps/s | env frames/s | vs in process | CPU ms per agent step |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, build, rate, cpu in rows:
        print(f"| {label} | {build:.1f} | {rate:.1f} | {rate * args.action_repeat:.1f} | {rate / baseline:.2f} | "
              f"{cpu * 1e3:.1f} |", flush=True)


def modes_table(args, options: dict, rng: np.random.Generator) -> None:
    suite_modes = ["train", "color_easy", "color_hard", "video_easy", "video_hard"] if args.dmcgb_dir else ["train"]
    blanket = ["blanket"] if args.blanket_path else []
    runs = [(args.task, mode) for mode in suite_modes]
    runs += [("reach_duplo", mode) for mode in ("train", "deformed", "deformed_thin")]
    runs += [("drawer_close", mode) for mode in ("train", "wood", "metal", *blanket, "blanket_generated")]
    print("\n| task | mode | build s | agent steps/s | env steps/s | vs train |\n|---|---|---:|---:|---:|---:|")
    baseline: dict[str, float] = {}  # each task's train mode, measured in this process
    for task, mode in runs:
        extra = {"dmcgb_dir": args.dmcgb_dir} if mode.startswith(("color", "video")) else {}
        extra.update({"blanket_path": args.blanket_path} if mode == "blanket" else {})
        start = time.perf_counter()
        env = envs.make(task, mode, seed=0, **options, **extra)
        env.reset()
        build = time.perf_counter() - start
        rate = statistics.median(agent_steps_per_second(env, args.steps, rng) for _ in range(args.repeats))
        env.close()
        baseline.setdefault(task, rate)
        print(f"| {task} | {mode} | {build:.2f} | {rate:.1f} | {rate * args.action_repeat:.1f} | "
              f"{rate / baseline[task]:.2f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="walker_walk")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--render-threads", nargs="+", default=None,
                        help="LP_NUM_THREADS values for the workers, each a set of rows (default: yours, else "
                             f"the workers' {WORKER_RENDER_THREADS})")
    parser.add_argument("--steps", type=int, default=200, help="agent steps per timed stretch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=84)
    parser.add_argument("--action-repeat", type=int, default=2)
    parser.add_argument("--dmcgb-dir", default=os.environ.get("DMCGB_DIR"))
    parser.add_argument("--blanket-path", default=os.environ.get(drawerworld.BLANKET_ENV_VAR))
    parser.add_argument("--only", choices=("collector", "modes"), default=None)
    args = parser.parse_args()
    options = {"image_size": args.image_size, "action_repeat": args.action_repeat}
    rng = np.random.default_rng(0)
    if args.only != "modes":
        collector_table(args, options, rng)
    if args.only != "collector":
        modes_table(args, options, rng)


if __name__ == "__main__":
    main()
