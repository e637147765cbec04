"""DMC-GB modes: colour draws and in-place colours, green-screen keying, video schedule, data errors, safe loading."""
from __future__ import annotations

import colorsys
import pickle
import re
import shutil
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import lightning_pieg  # noqa: F401  (torch before dm_control; see lightning_pieg/__init__.py)
import av
import numpy as np
import pytest
import torch

from lightning_pieg import dmcgb_data, envs
from lightning_pieg.envs import dmcgb

SHARED_DMCGB = Path(__file__).resolve().parents[2] / "shared" / "dmcgb"
ZERO_ACTION = {"walker_walk": np.zeros(6), "finger_spin": np.zeros(2), "finger_turn_easy": np.zeros(2)}


# ---------------------------------------------------------------------------------------------- synthetic data
def synthetic_color_sets() -> list[dict[str, np.ndarray]]:
    """100 colour sets whose index can be read back from the body colour (red = index / 100)."""
    sets = []
    for index in range(dmcgb.NUM_COLOR_SETS):
        grid = np.array([0.9, 0.1, 0.5 * index / 100])
        sets.append({"grid_rgb1": grid, "grid_rgb2": grid + 0.1, "self_rgb": np.array([index / 100, 0.9, 0.1]),
                     "skybox_rgb": np.array([0.9, 0.9, 0.2])})
    return sets


def write_video(path: Path, colors: list[tuple[int, int, int]], side: int = 32) -> None:
    """A tiny mp4 with one solid-colour frame per entry of ``colors``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width = stream.height = side
        stream.pix_fmt = "yuv420p"
        stream.options = {"qscale": "1"}
        for color in colors:
            frame = av.VideoFrame.from_ndarray(np.full((side, side, 3), color, np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


FRAMES_PER_VIDEO = 3


def video_color(video: int, frame: int) -> tuple[int, int, int]:
    """Distinct colours for (video, frame), far from the green-screen range."""
    return 20 + 22 * video, 30 + 70 * frame, 120


def make_data_dir(root: Path, video_modes=("video_easy",), distinct: bool = True) -> Path:
    """A DMC-GB layout: synthetic colour files and videos (distinct per video, or one copied everywhere)."""
    root.mkdir(parents=True, exist_ok=True)
    for name in dmcgb.COLOR_FILES.values():
        torch.save(synthetic_color_sets(), root / name)
    template = root / "template.mp4"
    write_video(template, [video_color(0, f) for f in range(FRAMES_PER_VIDEO)])
    for mode in video_modes:
        for index, path in enumerate(dmcgb.video_paths(root, mode)):
            if distinct:
                write_video(path, [video_color(index, f) for f in range(FRAMES_PER_VIDEO)])
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(template, path)
    template.unlink()
    return root


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_data_dir(tmp_path_factory.mktemp("dmcgb"))


@pytest.fixture
def shared_dmcgb() -> Path:
    if not SHARED_DMCGB.is_dir():
        pytest.skip(f"{SHARED_DMCGB} (upstream's DMC-GB files) is not available")
    return SHARED_DMCGB


# ------------------------------------------------------------------------------------------------------ colours
def body_color_index(env) -> int:
    return int(round(float(env.physics.named.model.mat_rgba["self", 0]) * 100))


def test_color_draws_follow_random_state_and_same_seed_repeats(data_dir):
    seed = 7
    env = envs.make("walker_walk", "color_easy", seed=seed, dmcgb_dir=str(data_dir))
    twin = envs.make("walker_walk", "color_easy", seed=seed, dmcgb_dir=str(data_dir))
    expected = np.random.RandomState(seed).randint(100, size=5).tolist()
    drawn = []
    for episode in range(5):
        observation = env.reset().observation
        drawn.append(body_color_index(env))
        if episode == 0:
            np.testing.assert_array_equal(observation, twin.reset().observation)
    assert drawn == expected
    other = envs.make("walker_walk", "color_easy", seed=seed + 1, dmcgb_dir=str(data_dir))
    other.reset()
    assert body_color_index(other) == np.random.RandomState(seed + 1).randint(100)


def test_reset_state_replays_the_colour_draw(data_dir):
    env = envs.make("walker_walk", "color_hard", seed=3, dmcgb_dir=str(data_dir))
    env.reset()
    saved = envs.get_reset_state(env)
    first = env.reset().observation
    env.reset()
    envs.set_reset_state(env, saved)
    np.testing.assert_array_equal(env.reset().observation, first)


def segment(physics) -> dict[str, np.ndarray]:
    """Pixel masks of the sky, the floor and the robot body (geoms with material ``self``) in camera 0."""
    ids = physics.render(84, 84, camera_id=0, segmentation=True)[..., 0]
    model = physics.model
    self_material = model.name2id("self", "material")
    body_geoms = np.flatnonzero(model.geom_matid == self_material)
    return {"sky": ids == -1, "floor": ids == model.name2id("floor", "geom"), "body": np.isin(ids, body_geoms)}


def test_colors_change_sky_floor_and_body_only(data_dir):
    train = envs.make("walker_walk", "train", seed=0)
    colored = envs.make("walker_walk", "color_hard", seed=0, dmcgb_dir=str(data_dir))
    train_frame = train.reset().observation[-3:].astype(int)
    colored_frame = colored.reset().observation[-3:].astype(int)
    changed = np.abs(train_frame - colored_frame).sum(axis=0) > 30
    for region, mask in segment(train.physics).items():
        assert mask.sum() > 20, region
        assert changed[mask].mean() > 0.9, f"{region} pixels did not change colour"
    others = np.arange(train.physics.model.nmat) != train.physics.model.name2id("self", "material")
    np.testing.assert_array_equal(colored.physics.model.mat_rgba[others], train.physics.model.mat_rgba[others])


def xml_reload_rendering(task: str, domain: str, seed: int, color_set: dict, state: np.ndarray) -> np.ndarray:
    """What the benchmark renders: the domain's XML reloaded with the colour attributes edited."""
    from dm_control import suite
    from dm_control.suite import common

    def edited(asset: str, edit) -> bytes:
        root = ElementTree.fromstring(common.ASSETS[asset])
        edit(root)
        return ElementTree.tostring(root)

    def text(rgb) -> str:
        return " ".join(str(float(v)) for v in rgb)

    def edit_materials(root):
        grid = root.find("asset/texture")
        grid.set("rgb1", text(color_set["grid_rgb1"]))
        grid.set("rgb2", text(color_set["grid_rgb2"]))
        body = next(material for material in root.iter("material") if material.get("name") == "self")
        body.set("rgba", text(color_set["self_rgb"]) + " 1")

    assets = dict(common.ASSETS)
    assets["./common/materials.xml"] = edited("./common/materials.xml", edit_materials)
    assets["./common/skybox.xml"] = edited(
        "./common/skybox.xml", lambda root: root.find("asset/texture").set("rgb1", text(color_set["skybox_rgb"])))
    reference = suite.load(domain, task, task_kwargs={"random": seed})
    reference.physics.reload_from_xml_string(common.read_model(f"{domain}.xml").decode(), assets)
    with reference.physics.reset_context():
        reference.physics.set_state(state)
    return reference.physics.render(84, 84, camera_id=0)


@pytest.mark.parametrize("task, domain, name",
                         [("walker_walk", "walker", "walk"), ("cup_catch", "ball_in_cup", "catch")])
def test_in_place_colors_match_xml_reload(shared_dmcgb, task, domain, name):
    seed = 11
    env = envs.make(task, "color_hard", seed=seed, dmcgb_dir=str(shared_dmcgb))
    env.reset()
    color_set = dmcgb.load_color_sets(shared_dmcgb / "color_hard.pt")[np.random.RandomState(seed).randint(100)]
    expected = xml_reload_rendering(name, domain, seed, color_set, env.physics.get_state())
    np.testing.assert_array_equal(env.physics.render(84, 84, camera_id=0), expected)


@pytest.mark.parametrize("task", ["finger_spin", "finger_turn_easy"])
def test_finger_task_edits_survive_colors(data_dir, task):
    train = envs.make(task, "train", seed=5)
    colored = envs.make(task, "color_easy", seed=5, dmcgb_dir=str(data_dir))
    from dm_control import suite

    pristine = suite.load("finger", task.split("_", 1)[1], task_kwargs={"random": 5}).physics.model
    fields = ("site_pos", "site_size", "site_rgba", "dof_damping")
    for _ in range(2):
        train.reset()
        colored.reset()
        for field in fields:
            np.testing.assert_array_equal(getattr(colored.physics.model, field), getattr(train.physics.model, field))
    edited = [field for field in fields
              if not np.array_equal(getattr(colored.physics.model, field), getattr(pristine, field))]
    assert edited, "the task made no model edits, so this test would show nothing"


# ------------------------------------------------------------------------------------------------------- keying
def reference_mask(pixels: np.ndarray) -> np.ndarray:
    keyed = []
    for r, g, b in pixels:
        h, s, v = colorsys.rgb_to_hsv(r / 255.0, g / 255.0, b / 255.0)
        keyed.append(100 <= h * 360 <= 185 and s * 255 >= 80 and v * 255 >= 70)
    return np.array(keyed)


def test_green_screen_mask_on_known_and_random_colors():
    known = {
        (0, 255, 0): True,  # h 120
        (51, 204, 51): True,  # the green screen itself
        (0, 255, 200): True,  # h 167
        (0, 60, 0): False,  # too dark: v 60
        (180, 200, 180): False,  # too grey: s 25
        (255, 0, 0): False,  # h 0
        (0, 200, 255): False,  # h 193
        (128, 255, 0): False,  # h 90
        (0, 0, 0): False,
        (255, 255, 255): False,
    }
    pixels = np.array(list(known), dtype=np.uint8)
    frame = pixels.T.reshape(3, 1, -1)
    assert dmcgb.green_screen_mask(frame)[0].tolist() == list(known.values())
    random = np.random.default_rng(0).integers(0, 256, size=(3, 64, 64), dtype=np.uint8)
    expected = reference_mask(random.reshape(3, -1).T).reshape(64, 64)
    assert expected.any() and not expected.all()
    np.testing.assert_array_equal(dmcgb.green_screen_mask(random), expected)


def test_green_screen_replaces_only_keyed_pixels():
    frame = np.zeros((3, 4, 4), np.uint8)
    frame[:, :2] = np.array([51, 204, 51], np.uint8)[:, None, None]
    background = np.full((3, 4, 4), 77, np.uint8)
    keyed = dmcgb.green_screen(frame, background)
    np.testing.assert_array_equal(keyed[:, :2], 77)
    np.testing.assert_array_equal(keyed[:, 2:], 0)


# ------------------------------------------------------------------------------------------------------- videos
def sky_color(observation: np.ndarray) -> np.ndarray:
    return np.median(observation[-3:, :8, :8].reshape(3, -1), axis=1)


def test_video_schedule_and_frame_index(data_dir):
    env = envs.make("walker_walk", "video_easy", seed=0, dmcgb_dir=str(data_dir))
    num_videos = dmcgb.VIDEO_COUNTS["video_easy"]
    for episode in range(num_videos + 1):
        video = (episode + 1) % num_videos
        observations = [env.reset().observation]
        observations += [env.step(ZERO_ACTION["walker_walk"]).observation for _ in range(4)]
        for step, observation in enumerate(observations):
            expected = video_color(video, step % FRAMES_PER_VIDEO)
            np.testing.assert_allclose(sky_color(observation), expected, atol=6,
                                       err_msg=f"episode {episode}, agent step {step}")


def test_video_easy_keeps_floor_video_hard_replaces_it(tmp_path):
    directory = make_data_dir(tmp_path / "dmcgb", video_modes=("video_easy", "video_hard"), distinct=False)
    expected = np.array(video_color(0, 0))
    floors = {}
    for mode in ("video_easy", "video_hard"):
        env = envs.make("walker_walk", mode, seed=0, dmcgb_dir=str(directory))
        observation = env.reset().observation[-3:]
        floor = segment(env.physics)["floor"]
        floors[mode] = np.abs(observation[:, floor].astype(int) - expected[:, None]).max(axis=0) <= 6
        assert np.abs(sky_color(observation) - expected).max() <= 6, f"{mode} does not show the video on the sky"
    assert floors["video_hard"].mean() > 0.9
    assert floors["video_easy"].mean() < 0.1


def test_missing_video_names_file_and_fetch_command(tmp_path):
    directory = make_data_dir(tmp_path / "dmcgb", distinct=False)
    (directory / "video_easy" / "video3.mp4").unlink()
    with pytest.raises(FileNotFoundError, match=r"video_easy/video3\.mp4.*dmcgb_data fetch"):
        envs.make("walker_walk", "video_easy", seed=0, dmcgb_dir=str(directory))


def test_missing_upstream_video_easy_files_are_an_error(shared_dmcgb):
    with pytest.raises(FileNotFoundError, match=r"video_easy/video3\.mp4"):
        envs.make("walker_walk", "video_easy", seed=0, dmcgb_dir=str(shared_dmcgb))


def test_missing_data_directory_errors(tmp_path, monkeypatch):
    monkeypatch.delenv(dmcgb.DIR_ENV_VAR, raising=False)
    with pytest.raises(FileNotFoundError, match=r"dmcgb_dir.*DMCGB_DIR.*dmcgb_data fetch"):
        envs.make("walker_walk", "color_easy", seed=0)
    missing = tmp_path / "nowhere"
    monkeypatch.setenv(dmcgb.DIR_ENV_VAR, str(missing))
    where = re.escape(str(missing))
    with pytest.raises(FileNotFoundError, match=rf"{where}.*DMCGB_DIR.*fetch --dir {where}"):
        envs.make("walker_walk", "video_hard", seed=0)
    (missing).mkdir()
    with pytest.raises(FileNotFoundError, match=r"color_hard\.pt"):
        envs.make("walker_walk", "color_hard", seed=0)


# ------------------------------------------------------------------------------------------------- safe loading
class RunsCode:
    """Unpickling this object calls open(marker, 'w'): a harmless stand-in for arbitrary code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.mark.parametrize("writer", ["torch_zip", "plain_pickle"])
def test_malicious_color_pickle_is_refused(tmp_path, writer):
    marker = tmp_path / "code_ran"
    payload = synthetic_color_sets()
    payload[0]["self_rgb"] = RunsCode(marker)
    path = tmp_path / "color_easy.pt"
    if writer == "torch_zip":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(pickle.UnpicklingError, match="Refusing to load"):
        dmcgb.load_color_sets(path)
    with pytest.raises(pickle.UnpicklingError):
        envs.make("walker_walk", "color_easy", seed=0, dmcgb_dir=str(tmp_path))
    assert not marker.exists()


def test_upstream_color_files_load_safely(shared_dmcgb):
    for name in dmcgb.COLOR_FILES.values():
        color_sets = dmcgb.load_color_sets(shared_dmcgb / name)
        assert len(color_sets) == 100
        np.testing.assert_allclose(color_sets[0]["grid_rgb2"], color_sets[0]["grid_rgb1"] + 0.1)


# ---------------------------------------------------------------------------------------------- data command
def test_verify_reports_complete_missing_and_broken_data(tmp_path, capsys):
    directory = make_data_dir(tmp_path / "dmcgb", video_modes=("video_easy", "video_hard"), distinct=False)
    report = dmcgb_data.verify(directory)
    assert report.ok, report.problems
    assert "video_hard: 100/100 videos decode, 3-3 frames each" in report.checked

    (directory / "video_hard" / "video42.mp4").unlink()
    (directory / "video_easy" / "video1.mp4").write_bytes(b"not a video")
    (directory / "color_hard.pt").write_bytes(b"version https://git-lfs.github.com/spec/v1\noid sha256:0\n")
    report = dmcgb_data.verify(directory)
    problems = "\n".join(report.problems)
    assert len(report.problems) == 3
    assert "missing" in problems and "video42.mp4" in problems
    assert "video_easy/video1.mp4 does not decode" in problems
    assert "color_hard.pt is a Git LFS pointer" in problems

    assert dmcgb_data.main(["verify", "--dir", str(directory)]) == 1
    assert "dmcgb_data fetch --dir" in capsys.readouterr().err


def test_fetch_downloads_what_is_missing_then_verifies(tmp_path):
    upstream = make_data_dir(tmp_path / "upstream", video_modes=("video_easy", "video_hard"), distinct=False)
    target = tmp_path / "target"
    target.mkdir()
    shutil.copy(upstream / "color_easy.pt", target / "color_easy.pt")
    requested = []

    def download(url: str, destination: Path) -> None:
        requested.append(url)
        name = url.split("/src/env/data/", 1)[1]
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(upstream / name, destination)

    report = dmcgb_data.fetch(target, ref="abc123", download=download, log=lambda line: None)
    assert report.ok, report.problems
    assert len(requested) == len(dmcgb_data.expected_files()) - 1
    assert requested[0] == ("https://raw.githubusercontent.com/nicklashansen/dmcontrol-generalization-benchmark/"
                            "abc123/src/env/data/color_hard.pt")
    assert sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file()) == sorted(
        dmcgb_data.expected_files())
