"""Drawer World on Meta-World 3: ``drawer_close`` from a top-down camera, with unseen table textures as modes.

Drawer World (a 2020 fork of Meta-World v1 on mujoco-py) is rebuilt here on Meta-World 3's ``drawer-close-v3``:

- Scene: the table top's material (``table_wood``) carries a uniform 2-D texture repeated 1x1, compiled into the model
  from an ``MjSpec``. Modes: ``train`` (builtin checker rgb1 (.1, .2, .3), rgb2 (.2, .3, .4), 300x300, edge marks
  (.2, .3, .4)); ``wood`` and ``metal`` (``assets/textures/wood.png`` and ``metal.png`` shipped with the installed
  ``metaworld``, the files Meta-World's own scene uses); ``blanket`` (Drawer World's ``blanket.png``, which has no
  stated licence, so it is read from a path the user supplies: option ``blanket_path`` or environment variable
  ``DRAWERWORLD_BLANKET``); ``blanket_generated`` (a crimson weave generated here; it is not Drawer World's blanket,
  so never put its results beside the paper's blanket column).
- Camera: a free camera looking straight down (azimuth 180, elevation -90, distance 0.96, look-at (0, 0.6, 0)).
- Episodes: 200 environment steps (100 agent steps at action repeat 2), each with a new task variation (drawer
  position) drawn from ``MT1('drawer-close-v3', seed).train_tasks``; the episode ends on the time limit only, with
  discount 1 (bootstrap). Reward: Meta-World 3's default (v2 reward function, in [0, 10] per environment step).
- Success: Meta-World 3's ``info['success']``: the handle within ``TARGET_RADIUS + 0.015`` = 0.065 m of its closed
  position, measured in 3-D (``SUCCESS_RADIUS``). Drawer World's v1 criterion was different: ``|y| <= 0.06`` m, the
  distance along the drawer's axis only. Success rates are therefore close to, not the same measure as, the paper's
  Table 2.
- ``env.info`` holds the last environment step's ``success`` (bool) and ``state`` (Meta-World's 39-d observation),
  which the scripted policy and evaluation read. Sites (the green goal marker) are drawn, as Meta-World draws them.

Meta-World 3.0.0 cannot even build its environments on MuJoCo 3.17, where ``mjNEQDATA`` is 12: ``reset_mocap_welds``
writes 11 values into each 12-wide ``eq_data`` row. ``patch_metaworld`` installs a fix only when the original fails on
the installed MuJoCo (probed on a one-weld model); the fix writes the same 11 values into the leading columns.
Each environment owns one renderer in its own GL context, made current before every render and before it is freed,
so several environments in one process do not corrupt each other's frames.
"""
from __future__ import annotations

import atexit
import functools
import os
import types
import weakref
from pathlib import Path
from typing import Any, Callable

import dm_env
import numpy as np
from dm_env import specs

from lightning_pieg.envs.options import data_path
from lightning_pieg.envs.wrappers import pixel_env

TASKS = ("drawer_close",)
MODES = ("train", "wood", "metal", "blanket", "blanket_generated")
OPTIONS = frozenset({"blanket_path"})
REQUIRES = {"metaworld": "pip install -e '.[drawerworld]'"}  # package -> how to install it

ENV_NAME = "drawer-close-v3"
EPISODE_STEPS = 200  # environment steps
SUCCESS_RADIUS = 0.065  # Meta-World 3: SawyerXYZEnv.TARGET_RADIUS (0.05) + 0.015, in 3-D; Drawer World v1: |y| <= 0.06
BLANKET_ENV_VAR = "DRAWERWORLD_BLANKET"
CAMERA = {"azimuth": 180.0, "elevation": -90.0, "distance": 0.96, "lookat": (0.0, 0.6, 0.0)}
TABLE_MATERIAL = "table_wood"
MIN_FRAMEBUFFER = 512  # offscreen buffer side: room for montage-sized renders beside the 84x84 observations

# What Meta-World 3's reset_mocap_welds writes into each weld row: anchor (3), relative pose (3 + 4), torque scale.
METAWORLD_WELD_DATA = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 5.0)

_PROBE_XML = """
<mujoco>
  <worldbody>
    <body name="mocap" mocap="true"/>
    <body name="hand"><freejoint/><geom size="0.01"/></body>
  </worldbody>
  <equality><weld body1="mocap" body2="hand"/></equality>
</mujoco>
"""


# --------------------------------------------------------------------------------------------------------------------
# Meta-World on current MuJoCo


def reset_mocap_welds_fails(reset_mocap_welds: Callable) -> bool:
    """Whether ``reset_mocap_welds`` raises on a one-weld model compiled by the installed MuJoCo."""
    import mujoco

    probe = types.SimpleNamespace(model=mujoco.MjModel.from_xml_string(_PROBE_XML))
    try:
        reset_mocap_welds(probe)
    except ValueError:
        return True
    return False


def _patched(original: Callable) -> Callable:
    import mujoco

    values = np.asarray(METAWORLD_WELD_DATA)

    @functools.wraps(original)  # keeps the original as ``__wrapped__``: how tests undo the patch
    def reset_mocap_welds(self) -> None:
        """Meta-World's weld reset, writing its values into the leading columns of a wider ``eq_data`` row."""
        model = self.model
        if model.nmocap == 0 or model.eq_data is None:
            return
        if model.eq_data.shape[1] < len(values):
            raise RuntimeError(
                f"MuJoCo's eq_data rows have {model.eq_data.shape[1]} columns, fewer than the {len(values)} that "
                "Meta-World writes; install the MuJoCo version that metaworld pins."
            )
        for row in range(model.neq):
            if model.eq_type[row] == mujoco.mjtEq.mjEQ_WELD:
                # Columns past Meta-World's 11 are fields newer MuJoCo added; they keep their compiled values.
                model.eq_data[row, : len(values)] = values

    reset_mocap_welds.lightning_pieg_patch = True
    return reset_mocap_welds


def patch_metaworld() -> bool:
    """Fix Meta-World's ``reset_mocap_welds`` for this MuJoCo if, and only if, the original fails here.

    Returns whether the patch is installed. Idempotent; the original stays reachable as ``__wrapped__``.
    """
    from metaworld.sawyer_xyz_env import SawyerMocapBase

    current = SawyerMocapBase.reset_mocap_welds
    if getattr(current, "lightning_pieg_patch", False):
        return True
    if not reset_mocap_welds_fails(current):
        return False
    SawyerMocapBase.reset_mocap_welds = _patched(current)
    return True


@functools.lru_cache(maxsize=8)
def train_tasks(seed: int) -> tuple:
    """``MT1('drawer-close-v3', seed).train_tasks``: 50 drawer positions (building them costs ~1 s, so cached)."""
    import metaworld

    patch_metaworld()
    return tuple(metaworld.MT1(ENV_NAME, seed=seed).train_tasks)


# --------------------------------------------------------------------------------------------------------------------
# Table textures


def blanket_pixels(size: int = 256) -> np.ndarray:
    """A crimson plain-weave texture, (size, size, 3) uint8, the same every call (``blanket_generated``)."""
    period = 16  # pixels per thread
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    # Warp threads run along y, weft threads along x; in a plain weave each crossing shows warp or weft alternately.
    warp_on_top = ((x // period) + (y // period)) % 2 == 0
    across_warp = np.sin(np.pi * (x % period) / period)  # each thread is bright in its middle, dark at its edges
    across_weft = np.sin(np.pi * (y % period) / period)
    shade = np.where(warp_on_top, across_warp, across_weft) ** 0.6
    fibres = np.random.default_rng(0).normal(0.0, 0.06, (size, size))
    crimson, dark = np.array([0.70, 0.06, 0.18]), np.array([0.25, 0.01, 0.06])
    rgb = dark + (crimson - dark) * np.clip(shade + fibres, 0.0, 1.0)[..., None]
    return np.round(rgb * 255).astype(np.uint8)


def metaworld_texture(name: str) -> Path:
    """The path of a texture image shipped with the installed ``metaworld`` (``assets/textures/<name>.png``)."""
    import metaworld

    path = Path(metaworld.__file__).parent / "assets" / "textures" / f"{name}.png"
    if not path.is_file():
        raise FileNotFoundError(f"The installed metaworld has no {path}; reinstall metaworld==3.0.0.")
    return path


def blanket_file(blanket_path: str | os.PathLike | None = None) -> Path:
    """Drawer World's ``blanket.png`` from ``blanket_path`` or ``$DRAWERWORLD_BLANKET``; a clear error if neither."""
    try:
        return data_path({"blanket_path": blanket_path}, "blanket_path", BLANKET_ENV_VAR, kind="file", missing=(
            "Mode 'blanket' needs Drawer World's blanket.png, which this project does not ship (it has no stated "
            f"licence). Pass its path as option blanket_path (Hydra: env.blanket_path=/path/to/blanket.png) or set "
            f"{BLANKET_ENV_VAR}=/path/to/blanket.png. Mode 'blanket_generated' uses a generated texture instead."),
            fix=f"Fix blanket_path or {BLANKET_ENV_VAR}.")
    except FileNotFoundError as error:
        if blanket_path or os.environ.get(BLANKET_ENV_VAR):
            raise
        raise ValueError(str(error)) from None


def texture_attributes(mode: str, blanket_path: str | os.PathLike | None = None) -> dict[str, Any]:
    """The ``MjsTexture`` attributes of the table top's texture in ``mode``."""
    import mujoco

    if mode == "train":
        return dict(
            builtin=mujoco.mjtBuiltin.mjBUILTIN_CHECKER,
            rgb1=[0.1, 0.2, 0.3],
            rgb2=[0.2, 0.3, 0.4],
            width=300,
            height=300,
            mark=mujoco.mjtMark.mjMARK_EDGE,
            markrgb=[0.2, 0.3, 0.4],
        )
    if mode in ("wood", "metal"):
        return dict(file=str(metaworld_texture(mode)))
    if mode == "blanket":
        return dict(file=str(blanket_file(blanket_path)))
    if mode == "blanket_generated":
        pixels = blanket_pixels()
        return dict(width=pixels.shape[1], height=pixels.shape[0], nchannel=3, data=pixels.tobytes())
    raise ValueError(f"Unknown mode {mode!r} for drawer_close. Valid modes: {', '.join(MODES)}.")


def apply_texture(spec, attributes: dict[str, Any]) -> None:
    """Give the table top's material a uniform 2-D texture with ``attributes``, repeated once per metre."""
    import mujoco

    name = "drawerworld_table"
    attributes = dict(attributes)
    data = attributes.pop("data", None)
    texture = spec.add_texture(name=name, type=mujoco.mjtTexture.mjTEXTURE_2D, **attributes)
    if data is not None:
        texture.data = data  # add_texture takes pixels as a list of ints; the attribute takes bytes, much faster
    material = spec.material(TABLE_MATERIAL)
    if material is None:
        raise RuntimeError(
            f"Meta-World's drawer scene has no material {TABLE_MATERIAL!r}; install metaworld==3.0.0."
        )
    textures = list(material.textures)
    textures[mujoco.mjtTextureRole.mjTEXROLE_RGB] = name
    material.textures = textures
    material.texuniform = True
    material.texrepeat = [1.0, 1.0]


@functools.cache
def _scene_class() -> type:
    """``SawyerDrawerCloseEnvV3`` compiled from an ``MjSpec`` with the mode's table texture (defined on first use, so
    that importing this module does not import Meta-World)."""
    import mujoco
    from metaworld.envs.sawyer_drawer_close_v3 import SawyerDrawerCloseEnvV3

    class TexturedDrawerClose(SawyerDrawerCloseEnvV3):
        def __init__(self, texture: dict[str, Any], framebuffer: int):
            self._texture = texture
            self._framebuffer = framebuffer
            super().__init__()

        def _initialize_simulation(self):
            spec = mujoco.MjSpec.from_file(self.fullpath)
            apply_texture(spec, self._texture)
            spec.visual.global_.offwidth = max(spec.visual.global_.offwidth, self._framebuffer)
            spec.visual.global_.offheight = max(spec.visual.global_.offheight, self._framebuffer)
            model = spec.compile()
            return model, mujoco.MjData(model)

    return TexturedDrawerClose


# --------------------------------------------------------------------------------------------------------------------
# Rendering


_open_renderers: weakref.WeakSet = weakref.WeakSet()


@functools.cache
def _close_at_exit() -> None:
    # Contexts left to the garbage collector at interpreter exit are freed after EGL has shut down, which raises.
    # Registered after mujoco's EGL module is loaded, so that it runs before EGL's own exit handler.
    atexit.register(lambda: [renderer.close() for renderer in list(_open_renderers)])


class TopDownRenderer:
    """Renders a model from Drawer World's top-down camera, in an OpenGL context that belongs to this renderer alone."""

    def __init__(self, model, size: int):
        import mujoco

        self._mujoco = mujoco
        self._model = model
        self._size = size
        self._gl = mujoco.GLContext(size, size)
        self._gl.make_current()
        self._context = mujoco.MjrContext(model, mujoco.mjtFontScale.mjFONTSCALE_150)
        mujoco.mjr_setBuffer(mujoco.mjtFramebuffer.mjFB_OFFSCREEN, self._context)
        self._scene = mujoco.MjvScene(model, maxgeom=1000)
        self._option = mujoco.MjvOption()
        self._camera = mujoco.MjvCamera()
        self._camera.type = mujoco.mjtCamera.mjCAMERA_FREE
        self._camera.azimuth = CAMERA["azimuth"]
        self._camera.elevation = CAMERA["elevation"]
        self._camera.distance = CAMERA["distance"]
        self._camera.lookat[:] = CAMERA["lookat"]
        _open_renderers.add(self)
        _close_at_exit()

    def render(self, data, height: int, width: int) -> np.ndarray:
        """An (height, width, 3) uint8 image of ``data``."""
        mujoco = self._mujoco
        if self._context is None:
            raise RuntimeError("This renderer is closed.")
        if max(height, width) > self._size:
            raise ValueError(f"Cannot render {height}x{width}: the offscreen buffer is {self._size}x{self._size}.")
        self._gl.make_current()
        mujoco.mjv_updateScene(
            self._model, data, self._option, None, self._camera, mujoco.mjtCatBit.mjCAT_ALL, self._scene
        )
        rect = mujoco.MjrRect(0, 0, width, height)
        mujoco.mjr_render(rect, self._scene, self._context)
        image = np.empty((height, width, 3), np.uint8)
        mujoco.mjr_readPixels(image, None, rect, self._context)
        return np.ascontiguousarray(image[::-1])  # OpenGL's rows run bottom-up

    def close(self) -> None:
        if self._context is None:
            return
        # Freeing GL objects while another env's context is current would delete that env's textures and buffers.
        self._gl.make_current()
        self._context.free()
        self._gl.free()
        self._context = None
        _open_renderers.discard(self)


# --------------------------------------------------------------------------------------------------------------------
# Environment


class DrawerWorld(dm_env.Environment):
    """Meta-World 3 ``drawer-close-v3`` as a dm_env with Drawer World's scene; observations are Meta-World's state.

    ``render(height, width)`` draws the top-down camera; ``info`` is the last step's ``success`` and ``state``.
    ``time_limit`` (seconds of simulated time, 0.0125 s per environment step) shortens episodes for smoke runs.
    """

    def __init__(
        self,
        mode: str = "train",
        seed: int = 0,
        time_limit: float | None = None,
        render_size: int = MIN_FRAMEBUFFER,
        blanket_path: str | os.PathLike | None = None,
    ):
        if mode not in MODES:
            raise ValueError(f"Unknown mode {mode!r} for drawer_close. Valid modes: {', '.join(MODES)}.")
        texture = texture_attributes(mode, blanket_path)
        patch_metaworld()
        self._tasks = train_tasks(seed)
        self._env = _scene_class()(texture, render_size)
        if time_limit is None:
            self._episode_steps = EPISODE_STEPS
        elif time_limit > 0:
            self._episode_steps = max(1, round(time_limit / self._env.dt))
        else:
            raise ValueError(f"time_limit={time_limit!r} must be a positive number of seconds, or None for 200 steps.")
        self._env.max_path_length = self._episode_steps
        self._random = np.random.default_rng(seed)
        self._renderer = TopDownRenderer(self._env.model, render_size)
        self._steps = 0
        self._needs_reset = True
        self._info: dict[str, Any] = {}

    @property
    def info(self) -> dict[str, Any]:
        """The last step's ``success`` (bool) and ``state`` (Meta-World's 39-d observation)."""
        return self._info

    def reset_state(self) -> dict:
        """What the next reset draws from (task variation, Meta-World's own generator): for exact resumption."""
        np_random = getattr(self._env, "np_random", None)
        return {"tasks": self._random.bit_generator.state,
                "metaworld": None if np_random is None else np_random.bit_generator.state}

    def load_reset_state(self, state: dict) -> None:
        self._random.bit_generator.state = state["tasks"]
        if state["metaworld"] is not None:
            self._env.np_random.bit_generator.state = state["metaworld"]

    @property
    def metaworld_env(self):
        """The underlying Meta-World environment."""
        return self._env

    def reset(self) -> dm_env.TimeStep:
        self._env.set_task(self._tasks[self._random.integers(len(self._tasks))])
        state, _ = self._env.reset()
        self._steps = 0
        self._needs_reset = False
        self._info = {"success": False, "state": state}
        return dm_env.restart(state)

    def step(self, action: np.ndarray) -> dm_env.TimeStep:
        if self._needs_reset:
            return self.reset()
        state, reward, _, _, info = self._env.step(np.asarray(action, np.float64))
        self._steps += 1
        self._info = {"success": bool(info["success"]), "state": state}
        if self._steps >= self._episode_steps:
            self._needs_reset = True
            return dm_env.truncation(float(reward), state)
        return dm_env.transition(float(reward), state)

    def observation_spec(self) -> specs.Array:
        return specs.Array((39,), np.float64, "state")

    def action_spec(self) -> specs.BoundedArray:
        return specs.BoundedArray((4,), np.float32, -1.0, 1.0, "action")

    def render(self, height: int, width: int) -> np.ndarray:
        """The top-down camera's (height, width, 3) uint8 image of the current state."""
        return self._renderer.render(self._env.data, height, width)

    def close(self) -> None:
        self._renderer.close()
        self._env.close()


def make(
    task: str = "drawer_close",
    mode: str = "train",
    seed: int = 0,
    frame_stack: int = 3,
    action_repeat: int = 2,
    image_size: int = 84,
    blanket_path: str | os.PathLike | None = None,
    time_limit: float | None = None,
    **options,
) -> dm_env.Environment:
    """``drawer_close`` from the top-down camera: uint8 ``(3 * frame_stack, image_size, image_size)`` observations,
    actions in [-1, 1], ``env.info`` with ``success`` and ``state``. ``blanket_path``: Drawer World's blanket.png for
    mode ``blanket``; ``time_limit``: seconds per episode (None: 200 steps)."""
    base = DrawerWorld(mode, seed, time_limit, max(image_size, MIN_FRAMEBUFFER), blanket_path)
    return pixel_env(base, base.render, action_repeat=action_repeat, image_size=image_size, frame_stack=frame_stack)
