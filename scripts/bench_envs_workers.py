"""Environment throughput in process and in worker processes (``lightning_pieg.workers.EnvWorkers``): random actions,
no learner. Each agent step steps all N workers at once and waits for all of them (a synchronous batched step).

Figures are medians over ``--repeats`` timed stretches of ``--steps`` agent steps (resets when an episode ends are
counted in); env frames/s counts simulator control steps of all envs together (agent steps x N x action repeat).
The in-process baseline is measured in the same run; the ratio is against it. Worker start-up time is not timed.

    python scripts/bench_envs_workers.py [--task walker_walk] [--workers 1 2 4] [--steps 200] [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import lightning_pieg  # noqa: F401  (torch before dm_control's EGL renderer: see lightning_pieg/__init__.py)
import numpy as np

from lightning_pieg import envs
from lightning_pieg.workers import EnvWorkers

WARMUP_STEPS = 5


def in_process_rate(env, steps: int, rng: np.random.Generator) -> float:
    """Agent steps per second of one in-process env."""
    shape = env.action_spec().shape
    actions = rng.uniform(-1.0, 1.0, (steps, *shape)).astype(np.float32)
    start = time.perf_counter()
    for action in actions:
        if env.step(action).last():
            env.reset()
    return steps / (time.perf_counter() - start)


def workers_rate(workers: EnvWorkers, steps: int, rng: np.random.Generator) -> float:
    """Agent steps per second of all workers together (N per batched step)."""
    shape = workers.action_spec().shape
    actions = rng.uniform(-1.0, 1.0, (steps, len(workers), *shape)).astype(np.float32)
    start = time.perf_counter()
    for batch_actions in actions:
        batch = workers.step(batch_actions)
        if batch.last.any():
            workers.reset(np.flatnonzero(batch.last))
    return steps * len(workers) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="walker_walk")
    parser.add_argument("--mode", default="train")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--steps", type=int, default=200, help="agent steps per timed stretch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=84)
    parser.add_argument("--action-repeat", type=int, default=2)
    args = parser.parse_args()
    options = {"image_size": args.image_size, "action_repeat": args.action_repeat}
    rng = np.random.default_rng(0)

    rows = []  # (label, start-up s, agent steps/s)
    start = time.perf_counter()
    env = envs.make(args.task, args.mode, seed=0, **options)
    env.reset()
    build = time.perf_counter() - start
    in_process_rate(env, WARMUP_STEPS, rng)
    rows.append(("in process", build,
                 statistics.median(in_process_rate(env, args.steps, rng) for _ in range(args.repeats))))
    env.close()
    for num in args.workers:
        start = time.perf_counter()
        with EnvWorkers(args.task, args.mode, seeds=range(num), options=options) as workers:
            workers.reset()
            build = time.perf_counter() - start
            workers_rate(workers, WARMUP_STEPS, rng)
            rate = statistics.median(workers_rate(workers, args.steps, rng) for _ in range(args.repeats))
        rows.append((f"{num} worker{'s' if num > 1 else ''}", build, rate))

    baseline = rows[0][2]
    print(f"\n{args.task} ({args.mode}), {args.image_size}x{args.image_size}, action repeat {args.action_repeat}, "
          f"median of {args.repeats} x {args.steps} agent steps; MUJOCO_GL={os.environ.get('MUJOCO_GL')}, "
          f"LP_NUM_THREADS={os.environ.get('LP_NUM_THREADS', 'unset')} in process (workers: "
          f"{os.environ.get('LP_NUM_THREADS', '1')}), {os.cpu_count()} CPUs\n")
    print("| envs | start-up s | agent steps/s | env frames/s | vs in process |")
    print("|---|---:|---:|---:|---:|")
    for label, build, rate in rows:
        print(f"| {label} | {build:.1f} | {rate:.1f} | {rate * args.action_repeat:.1f} | {rate / baseline:.2f} |")


if __name__ == "__main__":
    main()
