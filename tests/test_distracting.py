"""Distracting Control Suite mode: seeding, update rate, each distraction's effect, options and errors."""
from __future__ import annotations

from pathlib import Path

import lightning_pieg  # noqa: F401  (torch before dm_control; see lightning_pieg/__init__.py)
import numpy as np
import pytest
from PIL import Image

from lightning_pieg import envs
from lightning_pieg.envs import distracting

TASK = "walker_walk"
ZERO_ACTION = np.zeros(6)
FRAMES_PER_VIDEO = 4


def video_frame_color(video: int, frame: int) -> tuple[int, int, int]:
    return 40 + 50 * video, 60 + 40 * frame, 200


def write_davis(root: Path, videos: int) -> Path:
    """A DAVIS-layout folder: ``JPEGImages/480p/<training video>/0000N.jpg`` with solid-colour frames."""
    frames_dir = root / "JPEGImages" / "480p"
    for video, name in enumerate(distracting.DAVIS17_TRAINING_VIDEOS[:videos]):
        (frames_dir / name).mkdir(parents=True)
        for frame in range(FRAMES_PER_VIDEO):
            image = np.full((48, 64, 3), video_frame_color(video, frame), np.uint8)
            Image.fromarray(image).save(frames_dir / name / f"{frame:05d}.jpg", quality=95)
    return root


@pytest.fixture(scope="module")
def davis_dir(tmp_path_factory) -> Path:
    return write_davis(tmp_path_factory.mktemp("davis"), distracting.NUM_VIDEOS[distracting.DEFAULT_INTENSITY])


def rollout(env, steps: int) -> np.ndarray:
    observations = [env.reset().observation]
    observations += [env.step(ZERO_ACTION).observation for _ in range(steps)]
    return np.stack(observations)


def test_same_seed_same_frames_other_seed_other_frames(davis_dir):
    first = rollout(envs.make(TASK, "distracting_cs", seed=1, davis_dir=str(davis_dir)), 4)
    again = rollout(envs.make(TASK, "distracting_cs", seed=1, davis_dir=str(davis_dir)), 4)
    other = rollout(envs.make(TASK, "distracting_cs", seed=2, davis_dir=str(davis_dir)), 4)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first[0], other[0])


def test_reset_state_replays_the_episode_start(davis_dir):
    env = envs.make(TASK, "distracting_cs", seed=4, davis_dir=str(davis_dir))
    rollout(env, 2)
    saved = envs.get_reset_state(env)
    expected = rollout(env, 2)
    rollout(env, 1)
    envs.set_reset_state(env, saved)
    np.testing.assert_array_equal(rollout(env, 2), expected)


def test_each_distraction_changes_the_scene(davis_dir):
    intensity = distracting.DEFAULT_INTENSITY
    train = envs.make(TASK, "train", seed=3)
    env = envs.make(TASK, "distracting_cs", seed=3, davis_dir=str(davis_dir), distracting_intensity=intensity)
    train.reset()
    observation = env.reset().observation
    physics, reference = env.physics, train.physics
    # Camera: moved away from where the model puts it.
    assert np.linalg.norm(physics.data.cam_xpos[0] - reference.data.cam_xpos[0]) > 1e-3
    # Colour: every material moved, by at most the intensity.
    drift = np.abs(physics.model.mat_rgba[:, :3] - reference.model.mat_rgba[:, :3])
    assert drift.max() <= intensity + 1e-6
    assert (drift.max(axis=1) > 0).all()
    # Background: the sky shows one of the DAVIS frames (JPEG and rendering change colours a little).
    sky = np.median(observation[-3:, :6, :6].reshape(3, -1), axis=1)
    palette = np.array([video_frame_color(v, f) for v in range(4) for f in range(FRAMES_PER_VIDEO)])
    assert np.abs(palette - sky).max(axis=1).min() <= 8, f"sky {sky} shows no DAVIS frame"
    # The ground is opaque for walker, as in the original settings.
    assert physics.named.model.mat_rgba["grid", 3] == distracting.GROUND_ALPHA["walker"]


def test_updates_every_second_control_step(davis_dir):
    def colors_after_steps(action_repeat: int, steps: int) -> list[np.ndarray]:
        env = envs.make(TASK, "distracting_cs", seed=0, action_repeat=action_repeat, davis_dir=str(davis_dir))
        env.reset()
        colors = [env.physics.model.mat_rgba.copy()]
        for _ in range(steps):
            env.step(ZERO_ACTION)
            colors.append(env.physics.model.mat_rgba.copy())
        return colors

    single = colors_after_steps(action_repeat=1, steps=4)
    assert [not np.array_equal(a, b) for a, b in zip(single, single[1:])] == [False, True, False, True]
    double = colors_after_steps(action_repeat=2, steps=3)
    assert all(not np.array_equal(a, b) for a, b in zip(double, double[1:]))


def test_background_off_needs_no_data_and_keeps_the_sky(monkeypatch):
    monkeypatch.delenv(distracting.DIR_ENV_VAR, raising=False)
    with pytest.raises(FileNotFoundError, match=r"davis_dir.*DAVIS_DIR.*distracting_background=False"):
        envs.make(TASK, "distracting_cs", seed=0)
    env = envs.make(TASK, "distracting_cs", seed=0, distracting_background=False)
    train = envs.make(TASK, "train", seed=0)
    env.reset()
    train.reset()
    np.testing.assert_array_equal(env.physics.model.tex_data, train.physics.model.tex_data)
    np.testing.assert_array_equal(env.physics.model.tex_height, train.physics.model.tex_height)
    assert not np.array_equal(env.physics.data.cam_xpos, train.physics.data.cam_xpos)


def test_background_off_keeps_camera_and_colour_sequences(davis_dir):
    with_background = envs.make(TASK, "distracting_cs", seed=6, davis_dir=str(davis_dir))
    without = envs.make(TASK, "distracting_cs", seed=6, distracting_background=False)
    for env in (with_background, without):
        env.reset()
        env.step(ZERO_ACTION)
    np.testing.assert_array_equal(with_background.physics.data.cam_xpos, without.physics.data.cam_xpos)
    np.testing.assert_array_equal(with_background.physics.model.mat_rgba[:, :3], without.physics.model.mat_rgba[:, :3])


def test_missing_davis_videos_are_named(tmp_path):
    root = write_davis(tmp_path / "davis", videos=2)
    with pytest.raises(FileNotFoundError, match=r"boat.*boxing-fisheye"):
        envs.make(TASK, "distracting_cs", seed=0, davis_dir=str(root))
    # The 480p folder itself works as well, and intensity 0.025 needs only two videos.
    envs.make(TASK, "distracting_cs", seed=0, davis_dir=str(root / "JPEGImages" / "480p"), distracting_intensity=0.025)


def test_intensity_is_checked_and_reported():
    with pytest.raises(ValueError, match=r"distracting_intensity=0.12 .*0.025, 0.05, 0.1"):
        envs.make(TASK, "distracting_cs", seed=0, distracting_intensity=0.12, distracting_background=False)
    assert distracting.reported_name("distracting_cs", {}) == "distracting_cs_0.1"
    assert distracting.reported_name("distracting_cs", {"distracting_intensity": 0.025}) == "distracting_cs_0.025"
    assert (distracting.reported_name("distracting_cs", {"distracting_intensity": 0.3, "distracting_background": False})
            == "distracting_cs_0.3_no_background")
    assert distracting.reported_name("video_hard", {"distracting_intensity": 0.3}) == "video_hard"
