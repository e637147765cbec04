"""Distracting Control Suite as DMC-GB evaluates it: mode ``distracting_cs``.

Three distractions, each updated every second control step (once per agent step at action repeat 2):

- camera: the camera random-walks on a sphere around its target (position, zoom and roll);
- colour: every material's RGB random-walks within +-intensity of its original colour;
- background: frames of a DAVIS 2017 video, walked forwards and backwards, replace the skybox texture.

Options of ``lightning_pieg.envs.make``: ``distracting_intensity`` (one of ``INTENSITIES``, default 0.1),
``distracting_background`` (default True; False runs camera and colour only), ``davis_dir`` (or ``$DAVIS_DIR``):
the DAVIS folder or its ``JPEGImages/480p`` folder. Unlike the original code, every distraction draws from a
generator seeded by the environment seed. ``reported_name`` gives the name results should carry.
"""
from __future__ import annotations

from pathlib import Path

import dm_env
import numpy as np
from PIL import Image

from lightning_pieg.envs.dmcgb import upload_textures
from lightning_pieg.envs.options import data_path
from lightning_pieg.envs.wrappers import Mode, Wrapper

MODE = "distracting_cs"
INTENSITY_OPTION = "distracting_intensity"
BACKGROUND_OPTION = "distracting_background"
DIR_OPTION = "davis_dir"
DIR_ENV_VAR = "DAVIS_DIR"
DAVIS_FRAMES_SUBDIR = Path("JPEGImages") / "480p"
DAVIS_DOWNLOAD = "DAVIS-2017-trainval-480p.zip from https://davischallenge.org/davis2017/code.html"

INTENSITIES = (0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5)
DEFAULT_INTENSITY = 0.1
# How many of the DAVIS training videos each intensity uses; None: all of them.
NUM_VIDEOS = {0.025: 2, 0.05: 2, 0.1: 4, 0.15: 6, 0.2: 8, 0.3: None, 0.4: None, 0.5: None}
UPDATE_EVERY_CONTROL_STEPS = 2

# Domains with distraction settings; the floor's opacity under the background video differs by domain.
GROUND_ALPHA = {"ball_in_cup": 0.3, "cartpole": 0.3, "cheetah": 1.0, "finger": 0.3, "reacher": 0.0, "walker": 1.0}

# Camera motion, per unit of intensity.
CAMERA_ANGLE_DELTA = np.pi / 2
CAMERA_VEL_STD = 0.1
CAMERA_MAX_VEL = 0.4
CAMERA_ROLL_STD = np.pi / 300
CAMERA_MAX_ROLL_VEL = np.pi / 50
CAMERA_MAX_ZOOM_IN = 0.5
CAMERA_MAX_ZOOM_OUT = 1.5
CAMERA_REFERENCE_RADIUS = 4.0  # most suite cameras sit this far out; closer ones move proportionally slower
# Colour drift, per unit of intensity.
COLOR_STEP_STD = 0.03

SKYBOX_TEXTURE, FLOOR_MATERIAL = "skybox", "grid"
MJ_CAMERA_FIXED, MJ_CAMERA_TRACKCOM = 0, 2  # mjtCamLight values of model.cam_mode

DAVIS17_TRAINING_VIDEOS = (
    "bear", "bmx-bumps", "boat", "boxing-fisheye", "breakdance-flare", "bus", "car-turn", "cat-girl", "classic-car",
    "color-run", "crossing", "dance-jump", "dancing", "disc-jockey", "dog-agility", "dog-gooses", "dogs-scale",
    "drift-turn", "drone", "elephant", "flamingo", "hike", "hockey", "horsejump-low", "kid-football", "kite-walk",
    "koala", "lady-running", "lindy-hop", "longboard", "lucia", "mallard-fly", "mallard-water", "miami-surf",
    "motocross-bumps", "motorbike", "night-race", "paragliding", "planes-water", "rallye", "rhino", "rollerblade",
    "schoolgirls", "scooter-board", "scooter-gray", "sheep", "skate-park", "snowboard", "soccerball", "stroller",
    "stunt", "surf", "swing", "tennis", "tractor-sand", "train", "tuk-tuk", "upside-down", "varanus-cage", "walking",
)


# ---------------------------------------------------------------------------------------------------------- options
def intensity_of(options: dict) -> float:
    """The ``distracting_intensity`` option, checked against the intensities the benchmark defines."""
    intensity = float(options.get(INTENSITY_OPTION, DEFAULT_INTENSITY))
    if intensity not in INTENSITIES:
        raise ValueError(f"{INTENSITY_OPTION}={intensity} is not one of the benchmark's intensities "
                         f"{', '.join(str(value) for value in INTENSITIES)}.")
    return intensity


def background_enabled(options: dict) -> bool:
    enabled = options.get(BACKGROUND_OPTION, True)
    if not isinstance(enabled, bool):
        raise ValueError(f"{BACKGROUND_OPTION} must be true or false, got {enabled!r}.")
    return enabled


def reported_name(mode: str, options: dict) -> str:
    """The name a mode's results carry: ``distracting_cs_<intensity>``, plus ``_no_background`` without videos.

    Other modes keep their name.
    """
    if mode != MODE:
        return mode
    name = f"{MODE}_{intensity_of(options):g}"
    return name if background_enabled(options) else f"{name}_no_background"


def davis_frames_dir(options: dict) -> Path:
    """The DAVIS ``JPEGImages/480p`` folder from ``davis_dir`` or ``$DAVIS_DIR`` (the DAVIS root works too)."""
    path = data_path(options, DIR_OPTION, DIR_ENV_VAR, missing=(
        f"{MODE} shows DAVIS videos on the sky and needs the DAVIS 2017 frames (JPEGImages/480p), and none are "
        f"configured. Pass {DIR_OPTION}=<DAVIS dir> to lightning_pieg.envs.make (config field eval.{DIR_OPTION}) or "
        f"set {DIR_ENV_VAR}=<DAVIS dir> (get {DAVIS_DOWNLOAD}), or run without the background with "
        f"{BACKGROUND_OPTION}=False (results are then named {MODE}_<intensity>_no_background)."),
        fix=f"Point it at the DAVIS 2017 folder or its JPEGImages/480p folder ({DAVIS_DOWNLOAD}).")
    return path / DAVIS_FRAMES_SUBDIR if (path / DAVIS_FRAMES_SUBDIR).is_dir() else path


def background_videos(frames_dir: Path, intensity: float) -> list[list[Path]]:
    """The frame files (sorted) of the DAVIS training videos this intensity uses."""
    names = DAVIS17_TRAINING_VIDEOS[:NUM_VIDEOS[intensity]]
    videos, missing = [], []
    for name in names:
        frames = sorted((frames_dir / name).glob("*.jpg"))
        if frames:
            videos.append(frames)
        else:
            missing.append(str(frames_dir / name))
    if missing:
        raise FileNotFoundError(f"{MODE} at intensity {intensity} uses {len(names)} DAVIS videos; these folders are "
                                f"missing or hold no .jpg frames: {', '.join(missing)}. Use the full "
                                f"{DAVIS_DOWNLOAD}.")
    return videos


# ------------------------------------------------------------------------------------------------- camera geometry
def cartesian_to_spherical(xyz: np.ndarray) -> np.ndarray:
    """(radius, azimuth around z, polar angle from +z)."""
    radius = np.linalg.norm(xyz)
    return np.array([radius, np.arctan2(xyz[1], xyz[0]), np.arctan2(np.linalg.norm(xyz[:2]), xyz[2])])


def spherical_to_cartesian(radius: float, azimuth: float, polar: float) -> np.ndarray:
    return radius * np.array([np.sin(polar) * np.cos(azimuth), np.sin(polar) * np.sin(azimuth), np.cos(polar)])


def rotation_x(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


def rotation_y(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def rotation_z(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def axis_angle_rotation(axis: np.ndarray, cos_angle: float, sin_angle: float) -> np.ndarray:
    """Rodrigues' rotation about ``axis`` (used as given) by the angle with this cosine and sine."""
    cross = np.array([[0.0, -axis[2], axis[1]], [axis[2], 0.0, -axis[0]], [-axis[1], axis[0], 0.0]])
    return cos_angle * np.eye(3) + sin_angle * cross + (1.0 - cos_angle) * np.outer(axis, axis)


def look_at_without_roll(target: np.ndarray, position: np.ndarray) -> np.ndarray:
    """Camera orientation (a MuJoCo camera looks down its -z) that centres ``target``, horizon kept level."""
    direction = (target - position) / np.linalg.norm(target - position)
    yaw = np.arctan2(direction[0], direction[1])
    pitch = np.arctan2(direction[2], np.linalg.norm(direction[:2])) + np.pi / 2
    return rotation_z(-yaw) @ rotation_y(0.0) @ rotation_x(pitch)


def look_at_shortest_arc(target: np.ndarray, position: np.ndarray) -> np.ndarray:
    """Camera orientation that centres ``target`` by the shortest rotation from looking straight down.

    Unlike the level version it stays smooth when the camera passes overhead (reacher's top-down view).
    """
    direction = (target - position) / np.linalg.norm(target - position)
    down = np.array([0.0, 0.0, -1.0])
    axis = np.cross(down, direction)
    sin_angle = np.linalg.norm(axis)
    axis = axis / (sin_angle + 1e-4)  # the original's guard against a zero axis; kept so motion matches
    return axis_angle_rotation(axis, float(np.dot(direction, down)), sin_angle)


def look_at_point(physics, camera_id: int) -> np.ndarray:
    """The point the camera looks at, as far in front of it as the agent's root body is."""
    position = physics.data.cam_xpos[camera_id].copy()
    distance = np.linalg.norm(position - physics.data.subtree_com[1])
    orientation = physics.data.cam_xmat[camera_id].reshape(3, 3)
    return orientation @ np.array([0.0, 0.0, -distance]) + position


# ---------------------------------------------------------------------------------------------------- distractions
class CameraMotion:
    """Random walk of the camera on a sphere (within angle, zoom and roll limits) around what it looks at."""

    def __init__(self, camera_id: int, intensity: float, level_horizon: bool):
        self.camera_id = camera_id
        self.angle_delta = CAMERA_ANGLE_DELTA * intensity
        self.vel_std, self.max_vel = CAMERA_VEL_STD * intensity, CAMERA_MAX_VEL * intensity
        self.roll_std, self.max_roll_vel = CAMERA_ROLL_STD * intensity, CAMERA_MAX_ROLL_VEL * intensity
        self.max_zoom_in, self.max_zoom_out = CAMERA_MAX_ZOOM_IN * intensity, CAMERA_MAX_ZOOM_OUT * intensity
        self.level_horizon = level_horizon

    def reset(self, physics, random: np.random.Generator) -> None:
        camera_mode = int(physics.model.cam_mode[self.camera_id])
        if camera_mode not in (MJ_CAMERA_FIXED, MJ_CAMERA_TRACKCOM):
            raise ValueError(f"Camera motion supports fixed and trackcom cameras; camera {self.camera_id} has "
                             f"MuJoCo mode {camera_mode}.")
        self.tracks_agent = camera_mode == MJ_CAMERA_TRACKCOM
        self.initial_target = look_at_point(physics, self.camera_id)
        start = physics.data.cam_xpos[self.camera_id].copy()
        if self.tracks_agent:
            start -= physics.data.subtree_com[1]
        radius, azimuth, polar = cartesian_to_spherical(start)
        self.vel_scale = radius / CAMERA_REFERENCE_RADIUS
        delta = self.angle_delta
        low = np.array([max(radius * (1 - self.max_zoom_in), 0.0), azimuth - delta, polar - delta])
        high = np.array([radius * (1 + self.max_zoom_out), azimuth + delta, polar + delta])
        if self.level_horizon:  # stay in the upper front quadrant: above the floor, on the camera's side
            low[1], high[1] = max(low[1], -np.pi), min(high[1], 0.0)
            low[2], high[2] = max(low[2], 0.0), min(high[2], np.pi / 2)
        self.low, self.high = low, high
        self.spherical = np.array([random.uniform(low[0], high[0]), random.uniform(low[1], high[1]),
                                   random.uniform(low[2], high[2])])
        self.roll = random.uniform(-self.angle_delta, self.angle_delta)
        velocity = random.standard_normal(3)
        self.velocity = velocity / np.linalg.norm(velocity) * random.uniform(0.0, self.max_vel)
        self.roll_vel = random.uniform(-self.max_roll_vel, self.max_roll_vel)

    def advance(self, random: np.random.Generator) -> None:
        self.velocity = self.velocity + random.standard_normal(3) * self.vel_std * self.vel_scale
        self.roll_vel += random.standard_normal() * self.roll_std
        speed, max_speed = np.linalg.norm(self.velocity), self.max_vel * self.vel_scale
        if speed > max_speed:
            self.velocity = self.velocity * (max_speed / speed)
        self.roll_vel = float(np.clip(self.roll_vel, -self.max_roll_vel, self.max_roll_vel))
        position = spherical_to_cartesian(*self.spherical)
        moved = np.clip(cartesian_to_spherical(position + self.velocity), self.low, self.high)
        self.velocity = spherical_to_cartesian(*moved) - position  # what clipping left of the move
        self.spherical = moved
        roll = float(np.clip(self.roll + self.roll_vel, -self.angle_delta, self.angle_delta))
        self.roll_vel, self.roll = roll - self.roll, roll

    def apply(self, physics) -> None:
        position = spherical_to_cartesian(*self.spherical)
        if self.tracks_agent:
            target = look_at_point(physics, self.camera_id)
            position = position + physics.data.subtree_com[1]
        else:
            target = self.initial_target
        look_at = look_at_without_roll if self.level_horizon else look_at_shortest_arc
        orientation = look_at(target, position) @ rotation_z(self.roll)
        # Render-time pose only: the next physics step recomputes the camera from the model.
        physics.data.cam_xpos[self.camera_id] = position
        physics.data.cam_xmat[self.camera_id] = orientation.reshape(-1)


class ColorDrift:
    """Random walk of every material's RGB within +-intensity (clipped to [0, 1]) of its original colour."""

    def __init__(self, physics, intensity: float):
        original = physics.model.mat_rgba[:, :3].astype(np.float64)
        self.low = np.clip(original - intensity, 0.0, 1.0)
        self.high = np.clip(original + intensity, 0.0, 1.0)
        self.step_std = COLOR_STEP_STD * intensity

    def reset(self, physics, random: np.random.Generator) -> None:
        self.rgb = self.low + random.uniform(size=self.low.shape) * (self.high - self.low)

    def advance(self, random: np.random.Generator) -> None:
        self.rgb = np.clip(self.rgb + random.standard_normal(self.rgb.shape) * self.step_std, self.low, self.high)

    def apply(self, physics) -> None:
        physics.model.mat_rgba[:, :3] = self.rgb


class VideoSky:
    """DAVIS frames on the skybox (one image for all six faces), walked forwards and backwards from a random frame."""

    def __init__(self, physics, videos: list[list[Path]], ground_alpha: float):
        self.videos = videos
        self.ground_alpha = ground_alpha
        self.texture_id = physics.model.name2id(SKYBOX_TEXTURE, "texture")
        self.side = int(physics.model.tex_width[self.texture_id])
        self.frames: list[Path] = []
        self.textures: dict[int, np.ndarray] = {}
        self.index = self.direction = 0
        self.shown: int | None = None

    def reset(self, physics, random: np.random.Generator) -> None:
        physics.named.model.mat_rgba[FLOOR_MATERIAL, 3] = self.ground_alpha
        # A cube texture whose height equals its width is one image repeated on every face.
        physics.model.tex_height[self.texture_id] = self.side
        self.frames = self.videos[int(random.integers(len(self.videos)))]
        self.textures = {}  # resized frames of this episode's video, made when first shown
        self.index = int(random.integers(len(self.frames)))
        self.direction = int(random.choice([-1, 1]))
        self.shown = None

    def advance(self, random: np.random.Generator) -> None:
        self.index += self.direction
        if self.index <= 0:
            self.index, self.direction = 0, abs(self.direction)
        if self.index >= len(self.frames):
            self.index, self.direction = len(self.frames) - 1, -abs(self.direction)

    def _texture(self, index: int) -> np.ndarray:
        if index not in self.textures:
            with Image.open(self.frames[index]) as image:
                resized = image.convert("RGB").resize((self.side, self.side), Image.Resampling.BICUBIC)
            self.textures[index] = np.asarray(resized).reshape(-1)
        return self.textures[index]

    def apply(self, physics) -> None:
        if self.index == self.shown:
            return
        texture = self._texture(self.index)
        start = physics.model.tex_adr[self.texture_id]
        physics.model.tex_data[start:start + texture.size] = texture
        upload_textures(physics, [self.texture_id])
        self.shown = self.index


class Distractions(Wrapper):
    """Resets the distractions after each env reset and advances them once per two control steps since then.

    Background, camera and colour each draw from their own generator spawned from the environment seed, so
    switching the background off leaves the camera and colour sequences unchanged.
    """

    def __init__(self, env: dm_env.Environment, background: VideoSky | None, camera: CameraMotion,
                 color: ColorDrift, seed: int):
        super().__init__(env)
        randoms = [np.random.default_rng(child) for child in np.random.SeedSequence(seed).spawn(3)]
        self._distractions = [(d, random) for d, random in zip((background, camera, color), randoms) if d is not None]
        self._randoms = randoms
        self._control_timestep = env.control_timestep()
        self._updates = 0

    def _apply(self) -> None:
        for distraction, _ in self._distractions:
            distraction.apply(self._env.physics)

    def reset(self) -> dm_env.TimeStep:
        time_step = self._env.reset()
        for distraction, random in self._distractions:
            distraction.reset(self._env.physics, random)
            if isinstance(distraction, CameraMotion):  # the original moves the camera once at reset as well
                distraction.advance(random)
        self._updates = 0
        self._apply()
        return time_step

    def step(self, action: np.ndarray) -> dm_env.TimeStep:
        time_step = self._env.step(action)
        control_steps = int(round(self._env.physics.time() / self._control_timestep))
        updates = control_steps // UPDATE_EVERY_CONTROL_STEPS
        for _ in range(updates - self._updates):
            for distraction, random in self._distractions:
                distraction.advance(random)
        self._updates = updates
        self._apply()
        return time_step

    def reset_state(self) -> list[dict]:
        return [random.bit_generator.state for random in self._randoms]

    def load_reset_state(self, state: list[dict]) -> None:
        for random, random_state in zip(self._randoms, state):
            random.bit_generator.state = random_state


def _domain_of(env: dm_env.Environment) -> str:
    # Suite tasks live in dm_control.suite.<domain>.
    return type(env.task).__module__.rsplit(".", 1)[-1]


def distracting_scene(env: dm_env.Environment, seed: int, options: dict) -> dm_env.Environment:
    """The ``distracting_cs`` scene transform: background (unless switched off), camera and colour distractions."""
    from lightning_pieg.envs.suite import CAMERAS  # the suite imports this module for its MODES

    intensity = intensity_of(options)
    domain = _domain_of(env)
    if domain not in GROUND_ALPHA:
        raise ValueError(f"{MODE} is defined for the domains {', '.join(sorted(GROUND_ALPHA))}; got {domain!r}.")
    physics = env.physics
    background = None
    if background_enabled(options):
        background = VideoSky(physics, background_videos(davis_frames_dir(options), intensity), GROUND_ALPHA[domain])
    camera = CameraMotion(CAMERAS.get(domain, 0), intensity, level_horizon=domain != "reacher")
    return Distractions(env, background, camera, ColorDrift(physics, intensity), seed)


MODES: dict[str, Mode] = {MODE: Mode(scene=distracting_scene)}
