"""reach_duplo: the Jaco task from pixels and its deformed-shape modes (visual-only arm, rescaled brick)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

import lightning_pieg  # noqa: F401  (torch before dm_control)
from lightning_pieg import envs
from lightning_pieg.envs import manipulation
from lightning_pieg.envs.wrappers import ActionRepeat, ActionScale

CONFIG = Path(__file__).resolve().parent.parent / "conf" / "task" / "reach_duplo.yaml"


def joint_positions(env) -> np.ndarray:
    """The arm's six and the hand's three joint angles."""
    physics, task = env.physics, env.task
    return np.concatenate([physics.bind(task.arm.joints).qpos, physics.bind(task.hand.joints).qpos])


@pytest.mark.parametrize("mode", ["deformed", "deformed_thin"])
def test_deformation_changes_pixels_not_arm_dynamics(mode):
    train = envs.make("reach_duplo", "train", seed=3)
    deformed = envs.make("reach_duplo", mode, seed=3)
    actions = np.random.default_rng(0).uniform(-1, 1, (8, *train.action_spec().shape)).astype(np.float32)
    first = (train.reset(), deformed.reset())
    for action in actions:
        last = (train.step(action), deformed.step(action))
    # Bit-identical: the scaled copies add no mass and no contacts, and the hidden originals keep their physics.
    np.testing.assert_array_equal(joint_positions(train), joint_positions(deformed))
    for pair in (first, last):
        changed = np.mean(pair[0].observation != pair[1].observation)
        assert changed > 0.02, f"{mode} changed only {changed:.1%} of the pixels"
    train.close()
    deformed.close()


def test_pixels_match_the_vision_task_camera_observable():
    """Rendering once per agent step gives the frames dm_control's ``reach_duplo_vision`` observes."""
    from dm_control import composer
    from dm_control.manipulation import reach

    reference = composer.Environment(reach.reach_duplo_vision(), time_limit=10.0, random_state=4)
    ours = envs.make("reach_duplo", "train", seed=4)
    expected = [reference.reset().observation["front_close"]]
    for _ in range(2):  # one agent step at action repeat 2; 0 is the middle of the symmetric action bounds
        time_step = reference.step(np.zeros(9))
    expected.append(time_step.observation["front_close"])
    got = [ours.reset().observation, ours.step(np.zeros(9, np.float32)).observation]
    for want, have in zip(expected, got):
        np.testing.assert_array_equal(have[-3:].transpose(1, 2, 0), np.squeeze(want, axis=0))
    reference.close()
    ours.close()


def test_every_drawn_arm_and_hand_mesh_is_a_scaled_copy():
    env = manipulation.build("deformed", seed=0)  # the env owns its Physics: keep it alive
    physics = env.physics
    model = physics.model
    mesh_names = [model.id2name(i, "mesh") for i in range(model.nmesh)]
    drawn, hidden = [], []
    for geom in range(model.ngeom):
        name = model.id2name(geom, "geom") or ""
        if not name.startswith("jaco_arm/"):
            continue
        if model.geom_type[geom] == 7:  # mjGEOM_MESH
            mesh = mesh_names[model.geom_dataid[geom]]
            (drawn if model.geom_group[geom] < 3 else hidden).append((name, mesh))
    assert drawn and len(drawn) == len(hidden)
    assert all(mesh.endswith("_visual") for _, mesh in drawn), [g for g in drawn if not g[1].endswith("_visual")]
    # The fingers take their mesh from childclass defaults; all six finger links must be deformed too.
    fingers = [name for name, _ in drawn if "finger" in name]
    assert len(fingers) == 6, fingers
    # The copies carry neither mass nor contacts.
    copies = [physics.model.name2id(name, "geom") for name, _ in drawn]
    assert not model.geom_contype[copies].any() and not model.geom_conaffinity[copies].any()


def test_thickness_scales_short_axes_only():
    """The upper arm's mesh (long along y in its file) is 1.5x wider in x and z and as long in y."""
    extents = {}
    for mode in ("train", "deformed"):
        env = manipulation.build(mode, seed=0)
        model = env.physics.model
        name = "jaco_arm/arm_visual" if mode == "deformed" else "jaco_arm/arm"
        mesh = model.name2id(name, "mesh")
        start, count = model.mesh_vertadr[mesh], model.mesh_vertnum[mesh]
        vertices = model.mesh_vert[start:start + count]
        extents[mode] = np.sort(vertices.max(axis=0) - vertices.min(axis=0))  # principal frame: sort by size
    ratio = extents["deformed"] / extents["train"]
    np.testing.assert_allclose(ratio, [1.5, 1.5, 1.0], rtol=0.02)


def test_brick_is_rescaled_per_axis():
    sizes, positions = {}, {}
    for mode in ("train", "deformed_thin"):
        env = manipulation.build(mode, seed=0)
        physics = env.physics
        sizes[mode] = physics.named.model.geom_size["duplo2x4/wall_z1"].copy()
        positions[mode] = physics.named.model.geom_pos["duplo2x4/wall_z1"].copy()
    scale = np.array(manipulation.DEFAULT_SCALES["deformed_thin"][1])
    np.testing.assert_allclose(sizes["deformed_thin"], sizes["train"] * scale)
    np.testing.assert_allclose(positions["deformed_thin"], positions["train"] * scale)


def test_defaults_match_the_task_config():
    env = yaml.safe_load(CONFIG.read_text())["env"]
    for mode, (arm, brick) in manipulation.DEFAULT_SCALES.items():
        assert env[f"{mode}_arm_scale"] == arm
        assert tuple(env[f"{mode}_brick_scale"]) == brick
    assert manipulation.deformation("deformed", env) == manipulation.deformation("deformed", {})


def test_episode_is_125_agent_steps_of_pixels():
    env = envs.make("reach_duplo", "train", seed=0)
    time_step = env.reset()
    assert time_step.observation.shape == (9, 84, 84) and time_step.observation.dtype == np.uint8
    spec = env.action_spec()
    assert spec.shape == (9,) and spec.minimum == -1 and spec.maximum == 1
    env.close()
    # The same stack below the renderer: 10 s of 0.04 s control steps at action repeat 2, ending on the time limit.
    env = ActionScale(ActionRepeat(manipulation.build("train", seed=0), 2))
    env.reset()
    steps, time_step = 0, None
    while time_step is None or not time_step.last():
        time_step = env.step(np.zeros(9, np.float32))
        steps += 1
    assert steps == 125 and time_step.discount == 1.0


def test_bad_options_name_the_option():
    with pytest.raises(ValueError, match="deformed_arm_scale"):
        manipulation.deformation("deformed", {"deformed_arm_scale": -1})
    with pytest.raises(ValueError, match="deformed_thin_brick_scale"):
        manipulation.deformation("deformed_thin", {"deformed_thin_brick_scale": [1, 2]})
    with pytest.raises(ValueError, match="Valid modes"):
        envs.make("reach_duplo", "bent")


@pytest.mark.parametrize("earlier_resets", [0, 2])
def test_lockstep_evaluation_replays_the_sequential_episodes(earlier_resets):
    """Composer envs draw more on their first reset than later: fresh lockstep workers must still start each
    episode where one environment run back to back does (and a resumed collector likewise), also when that
    environment has played episodes before (training-time evaluation keeps one per mode)."""
    from lightning_pieg.rollouts import EpisodeStarts, run_episode, run_lockstep

    make = lambda: envs.make("reach_duplo", "train", seed=5, time_limit=0.2)  # noqa: E731  (3 agent steps)
    act = lambda observations: np.zeros((len(observations), 9), np.float32)  # noqa: E731
    sequential_env, reference = make(), make()
    for _ in range(earlier_resets):
        sequential_env.reset()
        reference.reset()
    sequential = [run_episode(sequential_env, lambda obs: np.zeros(9, np.float32), record=True) for _ in range(3)]
    workers = [make(), make()]
    lockstep = run_lockstep(workers, act, 3, EpisodeStarts(reference), record_first=True)
    assert [e.length for e in lockstep] == [e.length for e in sequential] == [3, 3, 3]
    for want, have in zip(sequential[0].frames, lockstep[0].frames):
        np.testing.assert_array_equal(want, have)


def test_resumed_collector_restarts_the_same_episode():
    from lightning_pieg.collector import Collector
    from lightning_pieg.replay import StreamReplay
    from lightning_pieg.workers import InProcessEnvs

    def collector():
        env = InProcessEnvs([envs.make("reach_duplo", "train", seed=6, time_limit=0.2)])
        replay = StreamReplay(1, 100, (3, 84, 84), 9, frame_stack=3, nstep=1, discount=0.99)
        return Collector(env, replay, lambda obs, steps: np.full((len(obs), 9), 0.3, np.float32), action_repeat=2)

    original = collector()
    while original.stats.episode < 2 or not original.at_fresh_episode:
        original.prepare()
        if original.at_fresh_episode and original.stats.episode == 2:
            break
        original.advance()
    state = original.state_dict()
    resumed = collector()
    resumed.load_state_dict(state, replay_restored=True)
    np.testing.assert_array_equal(resumed.observation, original.observation)
