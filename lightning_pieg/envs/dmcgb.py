"""DMControl Generalization Benchmark (DMC-GB) modes: ``color_easy``, ``color_hard``, ``video_easy``, ``video_hard``.

The data (upstream's ``src/env/data``) lives in a configured directory: the ``dmcgb_dir`` option of
``lightning_pieg.envs.make`` or the ``DMCGB_DIR`` environment variable. Layout::

    color_easy.pt  color_hard.pt  video_easy/video0.mp4 ... video9.mp4  video_hard/video0.mp4 ... video99.mp4

Colour modes change the physics model in place (no XML reload): the builtin skybox and floor textures are re-baked
by MuJoCo's own texture builder with the new colours, copied into ``model.tex_data`` and uploaded to the physics'
render context; the body colour is the ``self`` material's ``mat_rgba``. Nothing else in the model is touched, so
the edits a task makes in ``initialize_episode`` (finger's target and damping) stay as the task made them.
"""
from __future__ import annotations

import os
import pickle
import threading
import xml.etree.ElementTree as ElementTree
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import av
import dm_env
import mujoco
import numpy as np
import torch
import torch.nn.functional as F
from numpy._core.multiarray import _reconstruct  # numpy's array-unpickling helper, named in the colour files

from lightning_pieg.envs.options import data_path
from lightning_pieg.envs.wrappers import Mode, Wrapper

DIR_OPTION = "dmcgb_dir"
DIR_ENV_VAR = "DMCGB_DIR"
FETCH_COMMAND = "python -m lightning_pieg.dmcgb_data fetch --dir {path}"

COLOR_FILES = {"color_easy": "color_easy.pt", "color_hard": "color_hard.pt"}
NUM_COLOR_SETS = 100
COLOR_KEYS = ("grid_rgb1", "grid_rgb2", "self_rgb", "skybox_rgb")
VIDEO_COUNTS = {"video_easy": 10, "video_hard": 100}

GREEN_SCREEN_RGB = (0.2, 0.8, 0.2)
# Keying thresholds: hue in degrees, saturation and value on a 0-255 scale (upper bounds are the scale's maximum).
KEY_HUE_RANGE = (100.0, 185.0)
KEY_MIN_SATURATION = 80.0
KEY_MIN_VALUE = 70.0

# Resized video frames are kept process-wide (least recently used first out) so that repeated episodes on the same
# video, or several environments in one process, decode each file once.
VIDEO_CACHE_BYTES = 512 * 2**20
RESIZE_CHUNK_FRAMES = 64

SKYBOX_TEXTURE, FLOOR_TEXTURE, BODY_MATERIAL = "skybox", "grid", "self"


# --------------------------------------------------------------------------------------------------- data location
def data_dir(options: dict) -> Path:
    """The DMC-GB data directory from the ``dmcgb_dir`` option, else ``$DMCGB_DIR``; a clear error if neither exists."""
    configured = options.get(DIR_OPTION) or os.environ.get(DIR_ENV_VAR) or "<dir>"
    return data_path(options, DIR_OPTION, DIR_ENV_VAR, missing=(
        f"The DMC-GB modes need the benchmark's data directory, and none is configured. Pass "
        f"{DIR_OPTION}=<dir> to lightning_pieg.envs.make (config field eval.{DIR_OPTION}) or set the environment "
        f"variable {DIR_ENV_VAR}=<dir>. Get the files with: {FETCH_COMMAND.format(path='<dir>')}"),
        fix=f"Get the DMC-GB files with: {FETCH_COMMAND.format(path=Path(configured).expanduser())}")


def missing_file_error(path: Path, directory: Path) -> FileNotFoundError:
    return FileNotFoundError(
        f"DMC-GB file {str(path)!r} is missing. The benchmark's file list is fixed, so no mode runs on a subset. "
        f"Get the files with: {FETCH_COMMAND.format(path=directory)}"
    )


def video_paths(directory: Path, mode: str) -> list[Path]:
    """The fixed file list of a video mode: ``<mode>/video0.mp4`` ... ``video<N-1>.mp4``."""
    return [directory / mode / f"video{index}.mp4" for index in range(VIDEO_COUNTS[mode])]


# ------------------------------------------------------------------------------------------------------ colour data
def _numpy_allow_list() -> list:
    """Exactly what the colour files need: numpy arrays and their dtypes (pickled by numpy 1 or numpy 2)."""
    allowed: list = [np.ndarray, np.dtype, type(np.dtype(np.float64)), type(np.dtype(np.float32)), _reconstruct]
    # Upstream's files were written with numpy 1, which names the helper by its old module path.
    allowed.append((_reconstruct, "numpy.core.multiarray._reconstruct"))
    return allowed


def load_color_sets(path: str | os.PathLike) -> list[dict[str, np.ndarray]]:
    """Read a DMC-GB colour file without executing code: ``torch.load(weights_only=True)`` with a numpy allow-list.

    Returns the list of colour sets, each a dict with ``grid_rgb1``, ``grid_rgb2``, ``self_rgb``, ``skybox_rgb``.
    """
    path = Path(path)
    try:
        with torch.serialization.safe_globals(_numpy_allow_list()):
            color_sets = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise pickle.UnpicklingError(
            f"Refusing to load {str(path)!r}: it holds objects outside the allow-list for DMC-GB colour files "
            f"(lists of dicts of numpy float arrays), so unpickling it could run arbitrary code. Replace the file "
            f"with upstream's: {FETCH_COMMAND.format(path=path.parent)}\nDetails: {error}"
        ) from None
    _check_color_sets(color_sets, path)
    return color_sets


def _check_color_sets(color_sets: Any, path: Path) -> None:
    if not isinstance(color_sets, list) or len(color_sets) < NUM_COLOR_SETS:
        found = f"a list of {len(color_sets)}" if isinstance(color_sets, list) else type(color_sets).__name__
        raise ValueError(f"{str(path)!r} should hold a list of {NUM_COLOR_SETS} colour sets; it holds {found}.")
    for index, color_set in enumerate(color_sets):
        if not isinstance(color_set, dict) or not set(COLOR_KEYS) <= set(color_set):
            raise ValueError(f"Colour set {index} in {str(path)!r} should be a dict with keys {COLOR_KEYS}.")
        for key in COLOR_KEYS:
            if np.shape(color_set[key]) != (3,):
                raise ValueError(f"Colour set {index} in {str(path)!r}: {key} should be 3 numbers, "
                                 f"got shape {np.shape(color_set[key])}.")


# ------------------------------------------------------------------------------------------- in-place model colours
def _format_rgb(rgb) -> str:
    # The same text the benchmark writes into its XML, so MuJoCo parses exactly the same numbers.
    return " ".join(str(float(value)) for value in rgb)


def _suite_texture_elements() -> dict[str, ElementTree.Element]:
    """The suite's own definitions of the skybox and floor textures (dm_control/suite/common/*.xml)."""
    from dm_control.suite import common

    elements = {}
    for asset in ("./common/skybox.xml", "./common/materials.xml"):
        for element in ElementTree.fromstring(common.ASSETS[asset]).iter("texture"):
            elements[element.get("name")] = element
    return elements


def bake_textures(physics, colors: dict[str, dict[str, Any]]) -> None:
    """Re-bake builtin textures with new colour attributes and upload them, e.g. ``{"skybox": {"rgb1": (r, g, b)}}``.

    MuJoCo's compiler builds the textures from the suite's texture definitions with the given attributes replaced,
    which is what reloading the edited XML would produce, byte for byte; only those textures change in the model.
    """
    definitions = _suite_texture_elements()
    elements = []
    for name, attributes in colors.items():
        element = ElementTree.fromstring(ElementTree.tostring(definitions[name]))
        for attribute, rgb in attributes.items():
            element.set(attribute, _format_rgb(rgb))
        elements.append(ElementTree.tostring(element, encoding="unicode"))
    baked = mujoco.MjModel.from_xml_string(f"<mujoco><asset>{''.join(elements)}</asset></mujoco>")

    model = physics.model
    uploads = []
    for baked_id, name in enumerate(colors):
        texture_id = model.name2id(name, "texture")
        shape = (model.tex_width[texture_id], model.tex_height[texture_id], model.tex_nchannel[texture_id])
        baked_shape = (baked.tex_width[baked_id], baked.tex_height[baked_id], baked.tex_nchannel[baked_id])
        if shape != baked_shape:
            raise RuntimeError(f"Texture {name!r} is {shape} in the model but {baked_shape} when re-baked from the "
                               "suite's XML; this model does not use the suite's common textures.")
        size = int(np.prod(shape))
        source = baked.tex_data[baked.tex_adr[baked_id]:baked.tex_adr[baked_id] + size]
        model.tex_data[model.tex_adr[texture_id]:model.tex_adr[texture_id] + size] = source
        uploads.append(texture_id)
    upload_textures(physics, uploads)


def upload_textures(physics, texture_ids: list[int]) -> None:
    """Send edited ``tex_data`` to the GPU copy that rendering uses (on the render context's own thread)."""
    contexts = physics.contexts  # created on first use, so the upload always has a context to go to
    with contexts.gl.make_current() as gl:
        for texture_id in texture_ids:
            gl.call(mujoco.mjr_uploadTexture, physics.model.ptr, contexts.mujoco.ptr, int(texture_id))


def apply_color_set(physics, color_set: dict[str, np.ndarray]) -> None:
    """Sky (rgb1), floor checker (rgb1, rgb2) and the ``self`` material, as the benchmark's XML edit sets them."""
    bake_textures(physics, {
        SKYBOX_TEXTURE: {"rgb1": color_set["skybox_rgb"]},
        FLOOR_TEXTURE: {"rgb1": color_set["grid_rgb1"], "rgb2": color_set["grid_rgb2"]},
    })
    physics.named.model.mat_rgba[BODY_MATERIAL] = [*np.asarray(color_set["self_rgb"], dtype=np.float64), 1.0]


class RandomColors(Wrapper):
    """Applies one of the benchmark's colour sets at every reset, drawn by ``RandomState(seed).randint``."""

    def __init__(self, env: dm_env.Environment, color_sets: list[dict[str, np.ndarray]], seed: int):
        super().__init__(env)
        self._color_sets = color_sets
        self._random = np.random.RandomState(seed)
        self.color_index: int | None = None

    def reset(self) -> dm_env.TimeStep:
        self.color_index = int(self._random.randint(len(self._color_sets)))
        apply_color_set(self._env.physics, self._color_sets[self.color_index])
        return self._env.reset()

    def reset_state(self):
        return self._random.get_state()

    def load_reset_state(self, state) -> None:
        self._random.set_state(state)


def green_screen_scene(env: dm_env.Environment, floor: bool) -> dm_env.Environment:
    """Makes the sky (and the floor, with ``floor``) uniformly green, marks included, once for the env's lifetime."""
    green = {"rgb1": GREEN_SCREEN_RGB, "rgb2": GREEN_SCREEN_RGB, "markrgb": GREEN_SCREEN_RGB}
    colors = {SKYBOX_TEXTURE: green}
    if floor:
        colors[FLOOR_TEXTURE] = green
    bake_textures(env.physics, colors)
    return env


# ---------------------------------------------------------------------------------------------------------- keying
def green_screen_mask(frame: np.ndarray) -> np.ndarray:
    """Which pixels of a ``(3, H, W)`` uint8 frame are green screen: 100 <= hue <= 185 degrees, s >= 80, v >= 70.

    Computed in float64 with the same arithmetic as ``colorsys.rgb_to_hsv``, so thresholds decide identically.
    """
    r, g, b = frame.astype(np.float64) / 255.0
    maxc = np.maximum(np.maximum(r, g), b)
    minc = np.minimum(np.minimum(r, g), b)
    span = maxc - minc
    chromatic = span > 0
    safe_span = np.where(chromatic, span, 1.0)
    rc, gc, bc = (maxc - r) / safe_span, (maxc - g) / safe_span, (maxc - b) / safe_span
    hue = np.where(r == maxc, bc - gc, np.where(g == maxc, 2.0 + rc - bc, 4.0 + gc - rc))
    hue = np.mod(hue / 6.0, 1.0) * 360.0
    saturation = np.where(chromatic, span / np.where(maxc > 0, maxc, 1.0), 0.0) * 255.0
    value = maxc * 255.0
    return (chromatic & (hue >= KEY_HUE_RANGE[0]) & (hue <= KEY_HUE_RANGE[1])
            & (saturation >= KEY_MIN_SATURATION) & (value >= KEY_MIN_VALUE))


def green_screen(frame: np.ndarray, background: np.ndarray) -> np.ndarray:
    """``frame`` with its green-screen pixels replaced by ``background`` (both ``(3, H, W)`` uint8)."""
    return np.where(green_screen_mask(frame)[None], background, frame)


# ---------------------------------------------------------------------------------------------------------- videos
def resize_frames(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``(T, h, w, 3)`` uint8 -> ``(T, 3, *size)``: bilinear, align_corners=False, on [0, 1] floats, truncated back."""
    scaled = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255.0  # channels-last view: no copy to transpose
    resized = F.interpolate(scaled, size=size, mode="bilinear", align_corners=False)
    return (resized * 255.0).to(torch.uint8).contiguous().numpy()


def read_video(path: str | os.PathLike, size: tuple[int, int]) -> np.ndarray:
    """Decode a video with PyAV in one pass, keeping only its frames resized to ``size``: ``(T, 3, H, W)`` uint8."""
    path = Path(path)
    resized, pending = [], []
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for frame in container.decode(stream):
                pending.append(frame.to_ndarray(format="rgb24"))
                if len(pending) == RESIZE_CHUNK_FRAMES:
                    resized.append(resize_frames(np.stack(pending), size))
                    pending = []
    except (av.error.FFmpegError, IndexError) as error:
        raise ValueError(f"Cannot decode video {str(path)!r}: {error}. Re-fetch it with: "
                         f"{FETCH_COMMAND.format(path=path.parent.parent)}") from error
    if pending:
        resized.append(resize_frames(np.stack(pending), size))
    if not resized:
        raise ValueError(f"Video {str(path)!r} has no frames. Re-fetch it with: "
                         f"{FETCH_COMMAND.format(path=path.parent.parent)}")
    return np.concatenate(resized)


_video_cache: OrderedDict[tuple[str, tuple[int, int]], np.ndarray] = OrderedDict()
_video_cache_lock = threading.Lock()


def cached_video(path: Path, size: tuple[int, int]) -> np.ndarray:
    """``read_video`` through the process-wide cache of resized frames."""
    key = (str(path.resolve()), size)
    with _video_cache_lock:
        if key in _video_cache:
            _video_cache.move_to_end(key)
            return _video_cache[key]
    frames = read_video(path, size)
    with _video_cache_lock:
        _video_cache[key] = frames
        while sum(video.nbytes for video in _video_cache.values()) > VIDEO_CACHE_BYTES and len(_video_cache) > 1:
            _video_cache.popitem(last=False)
    return frames


class VideoBackground(Wrapper):
    """Keys the green screen of each frame against a video: episode k plays video (k + 1) mod N from frame 0.

    The frame index advances once per agent step (videos loop when shorter than the episode). The schedule is
    fixed, so the next episode's video is decoded and resized in a background thread while this one runs.
    """

    def __init__(self, env: dm_env.Environment, paths: list[Path]):
        super().__init__(env)
        self._paths = paths
        self._size = tuple(int(n) for n in env.observation_spec().shape[1:])
        self.video_index = 0  # the benchmark advances before loading, so the first episode plays video 1
        self.frame_index = 0
        self._frames: np.ndarray | None = None
        self._prefetcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="video-prefetch")
        self._prefetched: tuple[int, Future] | None = None
        self._prefetch(1 % len(paths))

    def _prefetch(self, index: int) -> None:
        self._prefetched = (index, self._prefetcher.submit(cached_video, self._paths[index], self._size))

    def _load(self, index: int) -> np.ndarray:
        if self._prefetched is not None and self._prefetched[0] == index:
            return self._prefetched[1].result()
        return cached_video(self._paths[index], self._size)

    def _keyed(self, time_step: dm_env.TimeStep) -> dm_env.TimeStep:
        background = self._frames[self.frame_index % len(self._frames)]
        return time_step._replace(observation=green_screen(time_step.observation, background))

    def reset(self) -> dm_env.TimeStep:
        self.video_index = (self.video_index + 1) % len(self._paths)
        self._frames = self._load(self.video_index)
        self._prefetch((self.video_index + 1) % len(self._paths))
        self.frame_index = 0
        return self._keyed(self._env.reset())

    def step(self, action: np.ndarray) -> dm_env.TimeStep:
        self.frame_index += 1
        return self._keyed(self._env.step(action))

    def reset_state(self) -> int:
        return self.video_index

    def load_reset_state(self, state: int) -> None:
        self.video_index = int(state)

    def close(self) -> None:
        self._prefetcher.shutdown(wait=True, cancel_futures=True)
        super().close()


# ----------------------------------------------------------------------------------------------------------- modes
def _color_scene(mode: str):
    def scene(env: dm_env.Environment, seed: int, options: dict) -> dm_env.Environment:
        directory = data_dir(options)
        path = directory / COLOR_FILES[mode]
        if not path.is_file():
            raise missing_file_error(path, directory)
        return RandomColors(env, load_color_sets(path), seed)

    return scene


def _video_frames(mode: str):
    def frames(env: dm_env.Environment, seed: int, options: dict) -> dm_env.Environment:
        directory = data_dir(options)
        paths = video_paths(directory, mode)
        for path in paths:
            if not path.is_file():
                raise missing_file_error(path, directory)
        return VideoBackground(env, paths)

    return frames


MODES: dict[str, Mode] = {
    "color_easy": Mode(scene=_color_scene("color_easy")),
    "color_hard": Mode(scene=_color_scene("color_hard")),
    "video_easy": Mode(scene=lambda env, seed, options: green_screen_scene(env, floor=False),
                       frames=_video_frames("video_easy")),
    "video_hard": Mode(scene=lambda env, seed, options: green_screen_scene(env, floor=True),
                       frames=_video_frames("video_hard")),
}
