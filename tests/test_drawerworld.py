"""drawer_close: Meta-World 3 on this MuJoCo, Drawer World's scene, the scripted policy, and renderers side by side."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

import lightning_pieg  # noqa: F401  (torch before dm_control)
from lightning_pieg import envs
from lightning_pieg.envs import drawerworld
from lightning_pieg.envs.wrappers import ActionRepeat, ActionScale
from lightning_pieg.rollouts import Episode, EpisodeMetrics, run_episode


def success_rate(episodes: list[Episode]) -> float:
    """The torchmetrics aggregation that training and ``evaluate`` log as ``eval/<mode>/success_rate``."""
    metrics = EpisodeMetrics()
    for episode in episodes:
        metrics.update(episode)
    return metrics.compute()["success_rate"]


@pytest.fixture
def original_reset_mocap_welds():
    """Meta-World's own ``reset_mocap_welds``, whether or not the patch is installed."""
    from metaworld.sawyer_xyz_env import SawyerMocapBase

    current = SawyerMocapBase.reset_mocap_welds
    return getattr(current, "__wrapped__", current)


def test_patch_is_needed_on_this_mujoco(monkeypatch, original_reset_mocap_welds):
    from metaworld.envs.sawyer_drawer_close_v3 import SawyerDrawerCloseEnvV3
    from metaworld.sawyer_xyz_env import SawyerMocapBase

    assert drawerworld.reset_mocap_welds_fails(original_reset_mocap_welds)
    monkeypatch.setattr(SawyerMocapBase, "reset_mocap_welds", original_reset_mocap_welds)
    with pytest.raises(ValueError, match="broadcast"):
        SawyerDrawerCloseEnvV3()


def test_patch_is_sufficient(monkeypatch, original_reset_mocap_welds):
    import mujoco
    from metaworld.envs.sawyer_drawer_close_v3 import SawyerDrawerCloseEnvV3
    from metaworld.sawyer_xyz_env import SawyerMocapBase

    monkeypatch.setattr(SawyerMocapBase, "reset_mocap_welds", original_reset_mocap_welds)
    assert drawerworld.patch_metaworld() is True
    assert drawerworld.patch_metaworld() is True  # idempotent: wraps the original once
    assert SawyerMocapBase.reset_mocap_welds.__wrapped__ is original_reset_mocap_welds
    env = SawyerDrawerCloseEnvV3()
    env.set_task(drawerworld.train_tasks(0)[0])
    state, _ = env.reset()
    state, reward, *_ = env.step(np.zeros(4))
    assert state.shape == (39,) and np.isfinite(state).all() and np.isfinite(reward)
    weld = int(np.flatnonzero(env.model.eq_type == mujoco.mjtEq.mjEQ_WELD)[0])
    np.testing.assert_array_equal(env.model.eq_data[weld, :11], drawerworld.METAWORLD_WELD_DATA)
    env.close()


def test_patch_applies_only_when_the_original_fails(monkeypatch):
    from metaworld.sawyer_xyz_env import SawyerMocapBase

    def working(self):  # as a Meta-World that writes whole rows would
        self.model.eq_data[:] = 0.0

    monkeypatch.setattr(SawyerMocapBase, "reset_mocap_welds", working)
    assert drawerworld.patch_metaworld() is False
    assert SawyerMocapBase.reset_mocap_welds is working


def test_scripted_policy_closes_the_drawer_through_the_wrappers():
    from metaworld.policies.sawyer_drawer_close_v3_policy import SawyerDrawerCloseV3Policy

    env = envs.make("drawer_close", "train", seed=0)
    policy = SawyerDrawerCloseV3Policy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the policy warns that its gains exceed the action bounds; they are clipped
        episodes = [run_episode(env, lambda _: policy.get_action(env.info["state"])) for _ in range(5)]
    env.close()
    successes = [episode.success for episode in episodes]
    assert len(successes) == 5 and sum(successes) >= 4, successes
    assert success_rate(episodes) >= 0.8  # the metric evaluation logs as eval/<mode>/success_rate


def test_idle_arm_does_not_succeed():
    """The success signal is not trivially on: doing nothing for a short episode never closes the drawer."""
    env = ActionScale(ActionRepeat(drawerworld.DrawerWorld("train", seed=0, time_limit=0.5), 2))
    episodes = [run_episode(env, lambda _: np.zeros(4, np.float32)) for _ in range(2)]
    assert [episode.success for episode in episodes] == [False, False]
    env.close()


def test_episodes_and_task_variations():
    base = drawerworld.DrawerWorld("train", seed=1)
    env = ActionScale(ActionRepeat(base, 2))
    drawer_positions = []
    for _ in range(3):
        time_step = env.reset()
        drawer_positions.append(base.metaworld_env.model.body("drawer").pos.copy())
        assert base.info["success"] is False and base.info["state"].shape == (39,)
        steps = 0
        while not time_step.last():
            time_step = env.step(np.zeros(4, np.float32))
            steps += 1
        assert steps == 100 and time_step.discount == 1.0  # 200 environment steps, a time limit: bootstrap
    assert len({tuple(position) for position in drawer_positions}) == 3
    assert drawerworld.DrawerWorld("train", seed=1, time_limit=0.25)._episode_steps == 20
    # The documented success radius is the one Meta-World 3 applies (handle to target, 3-D).
    assert base.metaworld_env.TARGET_RADIUS + 0.015 == pytest.approx(drawerworld.SUCCESS_RADIUS)
    env.close()


def frames(env, steps: int) -> list[np.ndarray]:
    return [env.reset().observation] + [env.step(np.full(4, 0.5, np.float32)).observation for _ in range(steps)]


def test_two_environments_render_what_one_renders_alone():
    alone = envs.make("drawer_close", "train", seed=2)
    expected = frames(alone, 4)
    alone.close()

    first = envs.make("drawer_close", "train", seed=2)
    second = envs.make("drawer_close", "metal", seed=7)
    got = [first.reset().observation]
    second.reset()
    for _ in range(2):
        second.step(np.zeros(4, np.float32))
        got.append(first.step(np.full(4, 0.5, np.float32)).observation)
    # Closed while the first env's GL context is current: freeing it must leave the first's textures and buffers.
    second.close()
    got += [first.step(np.full(4, 0.5, np.float32)).observation for _ in range(2)]
    first.close()
    for index, (want, have) in enumerate(zip(expected, got)):
        np.testing.assert_array_equal(have, want, err_msg=f"frame {index}")


def test_table_textures_differ_and_blanket_needs_a_file(monkeypatch, tmp_path):
    import matplotlib.image

    monkeypatch.delenv(drawerworld.BLANKET_ENV_VAR, raising=False)
    with pytest.raises(ValueError, match="blanket_path"):
        envs.make("drawer_close", "blanket")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        envs.make("drawer_close", "blanket", blanket_path=tmp_path / "missing.png")

    blanket = tmp_path / "blanket.png"
    matplotlib.image.imsave(blanket, 255 - drawerworld.blanket_pixels())  # any image file will do
    images = {}
    for mode in drawerworld.MODES:
        env = envs.make("drawer_close", mode, seed=0, blanket_path=blanket)
        images[mode] = env.reset().observation[-3:].astype(int)
        env.close()
    for index, mode in enumerate(drawerworld.MODES):
        for other in drawerworld.MODES[index + 1:]:
            assert np.mean(np.abs(images[mode] - images[other]).sum(axis=0) > 30) > 0.2, (mode, other)


def test_success_rate():
    episodes = [Episode(reward=0.0, length=1, success=s) for s in (True, False, True, True)]
    assert success_rate(episodes) == 0.75


def test_reset_state_reproduces_the_episode_start():
    from lightning_pieg import envs as factory

    env = factory.make("drawer_close", seed=4)
    try:
        env.reset()
        state = factory.get_reset_state(env)
        first, first_state = env.reset().observation, env.info["state"].copy()
        env.reset()
        other_state = env.info["state"].copy()
        factory.set_reset_state(env, state)
        again = env.reset().observation
        assert not np.array_equal(first_state, other_state)  # a new drawer position each reset...
        assert np.array_equal(first, again) and np.array_equal(first_state, env.info["state"])  # ...replayed
    finally:
        env.close()
