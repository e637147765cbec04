"""Environment throughput of every generalization mode against ``train``, measured in the same process, and the cost
of the two things the DMC-GB modes add: green-screen keying (once per agent step) and applying a colour set (once
per reset), as a percentage of a ``train`` agent step (the colour change also spread over a 1000-control-step
episode, the paper's).

An agent step is one action through the full pixel stack (action repeat 2, one render, frame stack 3); env steps/s
counts control steps (agent steps x action repeat). Every mode plays the same actions from the same seeded
states, so all do the same physics. The modes of a task are timed round-robin (train, mode 1, ...,
train, mode 1, ...) and each figure is the median over ``--repeats`` stretches, so a load that changes during the run
(other jobs on the machine) hits every mode alike. A mode whose data is missing is skipped and named.

    python scripts/bench_modes.py --domains walker cheetah --dmcgb-dir /data/dmcgb [--davis-dir /data/DAVIS]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import lightning_pieg  # noqa: F401  (torch before dm_control's EGL renderer: see lightning_pieg/__init__.py)
import numpy as np

from lightning_pieg import envs
from lightning_pieg.envs import dmcgb
from lightning_pieg.envs.distracting import reported_name

DOMAIN_TASKS = {"walker": "walker_walk", "cheetah": "cheetah_run", "cartpole": "cartpole_swingup",
                "finger": "finger_spin", "ball_in_cup": "cup_catch"}
MODES = ("train", "color_easy", "color_hard", "video_easy", "video_hard", "distracting_cs")


def random_actions(env, steps: int, random: np.random.Generator) -> np.ndarray:
    spec = env.action_spec()
    return random.uniform(spec.minimum, spec.maximum, (steps, *spec.shape)).astype(spec.dtype)


def timed_steps(env, actions: np.ndarray) -> float:
    """Seconds per agent step over ``actions`` (a reset, when an episode ends, is counted in)."""
    start = time.perf_counter()
    for action in actions:
        if env.step(action).last():
            env.reset()
    return (time.perf_counter() - start) / len(actions)


def timed_reset(env) -> float:
    start = time.perf_counter()
    env.reset()
    return time.perf_counter() - start


def median_seconds(call, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_task(task: str, args, options: dict, random: np.random.Generator) -> dict:
    """Per mode: median seconds per agent step and per reset; plus the keying and colour costs on this task."""
    built, skipped = {}, {}
    for mode in MODES:
        try:
            built[mode] = envs.make(task, mode, seed=0, **options)
        except (FileNotFoundError, ValueError) as error:
            skipped[mode] = str(error)
    try:
        warm_up = random_actions(built["train"], 3, random)  # first renders, video decode, caches
        for env in built.values():
            env.reset()
            timed_steps(env, warm_up)
        step_times = {mode: [] for mode in built}
        reset_times = {mode: [] for mode in built}
        for _ in range(args.repeats):
            # every mode replays the same actions from the same seeded state: the same physics, only the looks differ
            actions = random_actions(built["train"], args.steps, random)
            for mode, env in built.items():
                step_times[mode].append(timed_steps(env, actions))
                reset_times[mode].append(timed_reset(env))
        reference = built["train"].physics.get_state()
        same = [mode for mode, env in built.items() if not np.array_equal(env.physics.get_state(), reference)]
        result = {"diverged": same, "step": {mode: statistics.median(t) for mode, t in step_times.items()},
                  "reset": {mode: statistics.median(t) for mode, t in reset_times.items()}, "skipped": skipped}

        keyed = next((built[mode] for mode in ("video_hard", "video_easy") if mode in built), None)
        if keyed is not None:  # the keying alone, on this task's green-screen frame and a real video frame
            keyed.reset()
            frame = keyed.physics.render(options["image_size"], options["image_size"], camera_id=0)
            frame = np.ascontiguousarray(frame.transpose(2, 0, 1))
            video = next(layer for layer in _layers(keyed) if isinstance(layer, dmcgb.VideoBackground))
            background = video._frames[0]
            result["key"] = median_seconds(lambda: dmcgb.green_screen(frame, background), args.micro_repeats)
            result["key_fraction"] = float(dmcgb.green_screen_mask(frame).mean())
        colored = next((built[mode] for mode in ("color_hard", "color_easy") if mode in built), None)
        if colored is not None:  # the colour change alone: re-bake sky and floor, upload, set the body colour
            sets = dmcgb.load_color_sets(os.path.join(dmcgb.data_dir(options), dmcgb.COLOR_FILES["color_hard"]))
            indices = iter(random.integers(len(sets), size=args.micro_repeats))
            result["color"] = median_seconds(lambda: dmcgb.apply_color_set(colored.physics, sets[next(indices)]),
                                             args.micro_repeats)
        return result
    finally:
        for env in built.values():
            env.close()


def _layers(env) -> list:
    from lightning_pieg.envs.wrappers import Wrapper

    layers = [env]
    while isinstance(layers[-1], Wrapper):
        layers.append(layers[-1]._env)
    return layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--domains", nargs="+", default=["walker"], choices=list(DOMAIN_TASKS))
    parser.add_argument("--steps", type=int, default=50, help="agent steps per timed stretch")
    parser.add_argument("--repeats", type=int, default=5, help="stretches per mode (median)")
    parser.add_argument("--micro-repeats", type=int, default=50, help="repeats of the keying / colour timings")
    parser.add_argument("--image-size", type=int, default=84)
    parser.add_argument("--action-repeat", type=int, default=2)
    parser.add_argument("--dmcgb-dir", default=os.environ.get("DMCGB_DIR"))
    parser.add_argument("--davis-dir", default=os.environ.get("DAVIS_DIR"))
    args = parser.parse_args()

    options = {"image_size": args.image_size, "action_repeat": args.action_repeat}
    if args.dmcgb_dir:
        options["dmcgb_dir"] = args.dmcgb_dir
    if args.davis_dir:
        options["davis_dir"] = args.davis_dir
    else:
        options["distracting_background"] = False
    random = np.random.default_rng(0)
    components = []
    print(f"{'task':<18}{'mode':<36}{'agent steps/s':>14}{'env steps/s':>12}{'vs train':>9}{'reset ms':>10}")
    for domain in args.domains:
        task = DOMAIN_TASKS[domain]
        result = bench_task(task, args, options, random)
        base = result["step"]["train"]
        for mode, seconds in result["step"].items():
            print(f"{task:<18}{reported_name(mode, options):<36}{1 / seconds:>14.1f}"
                  f"{args.action_repeat / seconds:>12.1f}{base / seconds:>9.2f}{1000 * result['reset'][mode]:>10.1f}",
                  flush=True)
        if result["diverged"]:
            print(f"{task:<18}note: {', '.join(result['diverged'])} ended in another physical state than train")
        for mode, reason in result["skipped"].items():
            print(f"{task:<18}{mode:<36}  skipped: {reason.split('. ')[0]}")
        components.append((task, base, result))
    print()
    episode = 1000 // args.action_repeat  # agent steps of the paper's 1000-control-step episodes
    print(f"{'task':<18}{'train step ms':>14}{'keying ms/step':>16}{'% of step':>10}{'keyed px':>9}"
          f"{'colours ms/reset':>18}{'% of step':>10}{f'% per step ({episode}/episode)':>26}")
    for task, base, result in components:
        key = (f"{1000 * result['key']:>16.3f}{100 * result['key'] / base:>9.1f}%{result['key_fraction']:>9.2f}"
               if "key" in result else f"{'n/a':>16}{'':>10}{'':>9}")
        color = (f"{1000 * result['color']:>18.3f}{100 * result['color'] / base:>9.1f}%"
                 f"{100 * result['color'] / base / episode:>25.2f}%"
                 if "color" in result else f"{'n/a':>18}{'':>10}{'':>26}")
        print(f"{task:<18}{1000 * base:>14.2f}{key}{color}")
    print(f"({args.image_size}x{args.image_size} pixels, action repeat {args.action_repeat}, median of "
          f"{args.repeats} x {args.steps} agent steps per mode, round-robin; keying and colours: median of "
          f"{args.micro_repeats}; MUJOCO_GL={os.environ.get('MUJOCO_GL')}. Timings share the machine with whatever else runs on it.)")


if __name__ == "__main__":
    main()
