"""DeepMind Control Suite tasks from pixels: the training scene and the hook that generalization modes plug into."""
from __future__ import annotations

import dm_env

from lightning_pieg.envs import distracting, dmcgb
from lightning_pieg.envs.rendering import check_render
from lightning_pieg.envs.wrappers import Mode, pixel_env

# Task name -> (domain, task). Names follow DrQ-v2's configs; cup_catch is ball_in_cup's catch.
TASKS: dict[str, tuple[str, str]] = {
    "acrobot_swingup": ("acrobot", "swingup"),
    "cartpole_balance": ("cartpole", "balance"),
    "cartpole_balance_sparse": ("cartpole", "balance_sparse"),
    "cartpole_swingup": ("cartpole", "swingup"),
    "cartpole_swingup_sparse": ("cartpole", "swingup_sparse"),
    "cheetah_run": ("cheetah", "run"),
    "cup_catch": ("ball_in_cup", "catch"),
    "finger_spin": ("finger", "spin"),
    "finger_turn_easy": ("finger", "turn_easy"),
    "finger_turn_hard": ("finger", "turn_hard"),
    "hopper_hop": ("hopper", "hop"),
    "hopper_stand": ("hopper", "stand"),
    "pendulum_swingup": ("pendulum", "swingup"),
    "quadruped_run": ("quadruped", "run"),
    "quadruped_walk": ("quadruped", "walk"),
    "reacher_easy": ("reacher", "easy"),
    "reacher_hard": ("reacher", "hard"),
    "walker_run": ("walker", "run"),
    "walker_stand": ("walker", "stand"),
    "walker_walk": ("walker", "walk"),
}

# Quadruped is small in camera 0; DrQ-v2 and PIE-G use its zoomed camera.
CAMERAS = {"quadruped": 2}

MODES: dict[str, Mode] = {"train": Mode(), **dmcgb.MODES, **distracting.MODES}
OPTIONS = frozenset({dmcgb.DIR_OPTION, distracting.DIR_OPTION, distracting.INTENSITY_OPTION, distracting.BACKGROUND_OPTION})


def make(
    task: str,
    mode: str = "train",
    seed: int = 0,
    frame_stack: int = 3,
    action_repeat: int = 2,
    image_size: int = 84,
    **options,
) -> dm_env.Environment:
    """A suite task from pixels: uint8 ``(3 * frame_stack, image_size, image_size)`` observations, actions in [-1, 1]."""
    from dm_control import suite  # imported here so that MUJOCO_GL is set first (see lightning_pieg.envs)

    domain, name = TASKS[task]
    scene_mode = MODES[mode]
    task_kwargs = {"random": seed}
    if options.get("time_limit") is not None:  # seconds of simulated time; shorter episodes for tests and smoke runs
        task_kwargs["time_limit"] = float(options["time_limit"])
    env = suite.load(domain, name, task_kwargs=task_kwargs, environment_kwargs={"flat_observation": True})
    check_render(env.physics)
    camera_id = CAMERAS.get(domain, 0)
    physics = env.physics
    return pixel_env(env, lambda height, width: physics.render(height, width, camera_id=camera_id),
                     action_repeat=action_repeat, image_size=image_size, frame_stack=frame_stack, mode=scene_mode,
                     seed=seed, options=options)
