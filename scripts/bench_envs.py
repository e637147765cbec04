"""Print environment throughput of reach_duplo and drawer_close per mode: the median over repeats of timed stretches.

An agent step is one action through the full pixel stack (action repeat 2, one 84x84 render, frame stack 3); an
environment step is one control step of the simulator (agent steps x action repeat).

    python scripts/bench_envs.py [--steps 50] [--repeats 3] [--image-size 84] [--blanket-path /path/to/blanket.png]
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


def agent_steps_per_second(env, steps: int, rng: np.random.Generator) -> float:
    """Agent steps per second over ``steps`` random actions (resets, when an episode ends, are counted in)."""
    spec = env.action_spec()
    actions = rng.uniform(spec.minimum, spec.maximum, (steps, *spec.shape)).astype(np.float32)
    start = time.perf_counter()
    for action in actions:
        if env.step(action).last():
            env.reset()
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50, help="agent steps per timed stretch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=84)
    parser.add_argument("--action-repeat", type=int, default=2)
    parser.add_argument("--blanket-path", default=os.environ.get(drawerworld.BLANKET_ENV_VAR))
    args = parser.parse_args()

    blanket = ["blanket"] if args.blanket_path else []
    runs = [("reach_duplo", mode) for mode in ("train", "deformed", "deformed_thin")]
    runs += [("drawer_close", mode) for mode in ("train", "wood", "metal", *blanket, "blanket_generated")]
    options = {"image_size": args.image_size, "action_repeat": args.action_repeat}
    if args.blanket_path:
        options["blanket_path"] = args.blanket_path

    rng = np.random.default_rng(0)
    print(f"{'task':<14}{'mode':<19}{'build s':>8}{'agent steps/s':>15}{'env steps/s':>13}{'vs train':>10}")
    baseline: dict[str, float] = {}  # each task's train mode, measured in this process
    for task, mode in runs:
        start = time.perf_counter()
        env = envs.make(task, mode, seed=0, **options)
        env.reset()
        build = time.perf_counter() - start
        rates = [agent_steps_per_second(env, args.steps, rng) for _ in range(args.repeats)]
        env.close()
        rate = statistics.median(rates)
        baseline.setdefault(task, rate)
        print(f"{task:<14}{mode:<19}{build:>8.2f}{rate:>15.1f}{rate * args.action_repeat:>13.1f}"
              f"{rate / baseline[task]:>10.2f}", flush=True)
    print(f"({args.image_size}x{args.image_size} pixels, action repeat {args.action_repeat}, median of "
          f"{args.repeats} x {args.steps} agent steps; MUJOCO_GL={os.environ.get('MUJOCO_GL')})")


if __name__ == "__main__":
    main()
