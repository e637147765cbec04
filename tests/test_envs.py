"""Environment layer: pixel observations, wrappers' arithmetic, the factory's errors, reset state, import order."""
from __future__ import annotations

import subprocess
import sys

import dm_env
import numpy as np
import pytest
from dm_env import specs

from lightning_pieg import envs
from lightning_pieg.envs.wrappers import ActionRepeat, ActionScale, FrameStack


def test_suite_env_gives_uint8_frame_stacks_and_unit_actions():
    env = envs.make("cartpole_balance", seed=0, time_limit=0.2)
    time_step = env.reset()
    assert time_step.observation.shape == (9, 84, 84) and time_step.observation.dtype == np.uint8
    assert time_step.reward == 0.0 and time_step.discount == 1.0
    spec = env.action_spec()
    assert spec.minimum.min() == -1.0 and spec.maximum.max() == 1.0
    # the reset frame fills the stack; after a step the newest frame is last
    assert np.array_equal(time_step.observation[:3], time_step.observation[6:])
    steps = 0
    while not time_step.last():
        time_step = env.step(np.ones(1))
        steps += 1
    assert steps == 10  # 0.2 s / 0.01 s control steps / action repeat 2
    assert np.array_equal(env.frame, time_step.observation[6:])


def test_unknown_task_and_mode_name_the_valid_ones():
    with pytest.raises(ValueError, match="Unknown task 'walker_fly'.*walker_walk"):
        envs.make("walker_fly")
    with pytest.raises(ValueError, match="Unknown mode 'underwater'.*train"):
        envs.make("walker_walk", mode="underwater")


class CountingEnv(dm_env.Environment):
    """Reward i at the i-th step, discount 0.5 at step 3, episode of 5 steps; observations are the step index."""

    def __init__(self):
        self.t, self.actions = 0, []

    def reset(self):
        self.t = 0
        return dm_env.restart(np.zeros((3, 2, 2), np.uint8))

    def step(self, action):
        self.t += 1
        self.actions.append(np.asarray(action))
        obs = np.full((3, 2, 2), self.t, np.uint8)
        discount = 0.5 if self.t == 3 else 1.0
        if self.t == 5:
            return dm_env.truncation(float(self.t), obs)
        return dm_env.transition(float(self.t), obs, discount)

    def observation_spec(self):
        return specs.BoundedArray((3, 2, 2), np.uint8, 0, 255)

    def action_spec(self):
        return specs.BoundedArray((2,), np.float64, np.array([0.0, -2.0]), np.array([10.0, 2.0]))


def test_action_repeat_sums_rewards_multiplies_discounts_and_stops_at_the_end():
    env = ActionRepeat(CountingEnv(), 2)
    assert env.reset().reward == 0.0
    first = env.step(np.zeros(2))
    assert first.reward == 1 + 2 and first.discount == 1.0
    second = env.step(np.zeros(2))  # steps 3 (discount 0.5) and 4: reward 3 + 0.5 * 4
    assert second.reward == 3 + 0.5 * 4 and second.discount == 0.5
    last = env.step(np.zeros(2))  # only step 5 is left
    assert last.last() and last.reward == 5


def test_action_scale_maps_unit_box_onto_bounds():
    inner = CountingEnv()
    env = ActionScale(inner)
    env.reset()
    env.step(np.array([-1.0, 1.0]))
    env.step(np.array([0.0, 0.5]))
    env.step(np.array([3.0, -3.0]))  # clipped
    assert np.allclose(inner.actions, [[0.0, 2.0], [5.0, 1.0], [10.0, -2.0]])


def test_frame_stack_order():
    env = FrameStack(CountingEnv(), 3)
    obs = env.reset().observation
    assert obs.shape == (9, 2, 2) and obs.max() == 0
    env.step(np.zeros(2))
    obs = env.step(np.zeros(2)).observation
    assert obs[::3, 0, 0].tolist() == [0, 1, 2]


def test_reset_state_reproduces_the_episode_start():
    env = envs.make("walker_walk", seed=3, time_limit=0.1)
    env.reset()
    state = envs.get_reset_state(env)
    first = env.reset().observation
    env.reset()  # a different initial pose
    envs.set_reset_state(env, state)
    again = env.reset().observation
    assert np.array_equal(first, again)


def test_importing_torchvision_after_rendering_does_not_crash():
    """dm_control's EGL context, then torchvision.models (which imports triton): the package's import order
    must keep this from killing the process with SIGSEGV."""
    code = ("import lightning_pieg.envs as envs; env = envs.make('cartpole_balance', time_limit=0.1); env.reset(); "
            "import torchvision.models, torch._dynamo; print('ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("ok")


def test_asking_the_renderer_after_building_an_env_leaves_no_egl_errors_at_exit():
    """Training prints the OpenGL renderer after its evaluation environments have rendered: asking must not make
    the interpreter's exit free their contexts on a terminated EGL display (tracebacks after every run)."""
    code = ("import lightning_pieg.envs as envs; from lightning_pieg.envs.rendering import renderer_string; "
            "env = envs.make('cartpole_balance', time_limit=0.1); env.reset(); print(renderer_string())")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() and not result.stdout.startswith("unknown"), result.stdout
    assert "Exception ignored" not in result.stderr and "EGLError" not in result.stderr, result.stderr[-2000:]


def test_a_missing_gl_backend_is_a_clear_error():
    """OSMesa is not installed on these machines: asking for it must name what to install, not crash obscurely."""
    code = ("import lightning_pieg.envs as envs\n"
            "try:\n    envs.make('cartpole_balance', time_limit=0.1)\n"
            "except envs.rendering.RenderingError as error:\n    print('RenderingError:', error)\n")
    env = {**__import__("os").environ, "MUJOCO_GL": "osmesa", "PYOPENGL_PLATFORM": "osmesa"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    if "RenderingError" not in result.stdout:
        pytest.skip(f"OSMesa is available here, nothing to check ({result.stdout[-200:]} {result.stderr[-300:]})")
    assert "apt-get install libosmesa6" in result.stdout and "MUJOCO_GL=egl" in result.stdout
