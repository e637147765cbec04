"""Jaco arm reaching a Duplo brick from pixels (dm_control manipulation ``reach_duplo_vision``), with deformed shapes.

``reach_duplo`` observes only the ``front_close`` camera (84x84), takes 9 actions in [-1, 1] (6 arm joint velocities,
3 fingers), and runs 10 s episodes: 250 control steps of 0.04 s, 125 agent steps at action repeat 2. The reward is the
task's: 1 when the pinch site is within 5 cm of the brick's frame origin, falling off over another 5 cm.

Evaluation modes edit the MJCF of the arm, hand and brick entities before the model is compiled:

- ``train``: the unchanged scene.
- ``deformed`` / ``deformed_thin``: every arm and hand link (meshes and joint rings) is drawn thicker / thinner on its
  two short axes by the factor ``<mode>_arm_scale``, and the brick is rescaled per axis by ``<mode>_brick_scale``
  (x, y, z in the brick's frame). The arm keeps its dynamics exactly: each link is drawn by a scaled copy that has no
  mass and no contacts, and the original geom moves to a geom group the renderer does not draw. The brick changes
  physically (mass, contacts); the reward uses its frame origin, which the rescaling keeps at the brick's base.

The factors' defaults live in ``conf/task/reach_duplo.yaml``; ``DEFAULT_SCALES`` mirrors them for code that builds
the env without Hydra (tests, scripts), and a test keeps the two in step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import dm_env
import numpy as np

from lightning_pieg.envs.rendering import check_render
from lightning_pieg.envs.wrappers import pixel_env

TASKS = ("reach_duplo",)
MODES = ("train", "deformed", "deformed_thin")

CAMERA = "front_close"
TIME_LIMIT = 10.0  # seconds: 250 control steps of 0.04 s

# MuJoCo's default visualisation draws geom groups 0-2 only; the hidden originals go to group 3.
HIDDEN_GEOM_GROUP = 3

# mode -> (arm and hand thickness factor, brick scale x/y/z); mirrors conf/task/reach_duplo.yaml.
DEFAULT_SCALES: dict[str, tuple[float, tuple[float, float, float]]] = {
    "deformed": (1.5, (1.5, 1.0, 1.5)),
    "deformed_thin": (0.6, (0.7, 1.3, 0.7)),
}
OPTIONS = frozenset(f"{mode}_{part}_scale" for mode in DEFAULT_SCALES for part in ("arm", "brick"))

# The link's long axis in each Jaco mesh file's frame (the axis the thickness factor leaves alone). The bounding box
# gives it for all but the hand's collar (``hand_3finger_insert``), which is flat but sits around the hand's long axis.
LONG_AXES = {
    "base": 2,
    "shoulder": 2,
    "arm": 1,
    "forearm": 1,
    "wrist": 2,
    "hand_3finger_main": 2,
    "hand_3finger_insert": 2,
    "finger_proximal": 0,
    "finger_distal": 0,
}


@dataclass(frozen=True)
class Deformation:
    """How a mode deforms the scene: the arm and hand's short-axis factor and the brick's per-axis scale."""

    arm: float = 1.0
    brick: tuple[float, float, float] = (1.0, 1.0, 1.0)


def deformation(mode: str, options: dict[str, Any]) -> Deformation:
    """The deformation of ``mode`` from ``options`` (``<mode>_arm_scale``, ``<mode>_brick_scale``) or the defaults."""
    if mode == "train":
        return Deformation()
    arm_default, brick_default = DEFAULT_SCALES[mode]
    arm = options.get(f"{mode}_arm_scale", arm_default)
    brick = options.get(f"{mode}_brick_scale", brick_default)
    if not (isinstance(arm, (int, float)) and arm > 0):
        raise ValueError(f"Option {mode}_arm_scale must be a positive number, got {arm!r}.")
    if isinstance(brick, Sequence) and not isinstance(brick, str):
        brick = tuple(float(value) for value in brick)
    if not (isinstance(brick, tuple) and len(brick) == 3 and all(value > 0 for value in brick)):
        raise ValueError(f"Option {mode}_brick_scale must be three positive numbers (x, y, z), got {brick!r}.")
    return Deformation(float(arm), brick)


# --------------------------------------------------------------------------------------------------------------------
# MJCF editing


def resolved(element, attribute: str):
    """``element``'s attribute as the compiler sees it: its own value, else its class's, else the enclosing defaults.

    The class is the element's ``class``, else the ``childclass`` of its nearest enclosing body, else the root default.
    """
    value = getattr(element, attribute)
    if value is not None:
        return value
    dclass = element.dclass
    body = element.parent
    while dclass is None and body is not None and body.tag == "body":
        dclass = body.childclass
        body = body.parent
    if dclass is None:
        dclass = element.root.default
    while dclass is not None and dclass.tag == "default":
        value = getattr(getattr(dclass, element.tag), attribute)
        if value is not None:
            return value
        dclass = dclass.parent
    return None


def stl_vertices(contents: bytes) -> np.ndarray:
    """The (n, 3) vertices of a binary STL file."""
    count = int(np.frombuffer(contents, np.uint32, count=1, offset=80)[0])
    if len(contents) != 84 + 50 * count:
        raise ValueError("Only binary STL meshes can be deformed; this one looks like ASCII STL.")
    triangle = np.dtype([("normal", "<f4", 3), ("vertices", "<f4", (3, 3)), ("attribute", "<u2")])
    return np.frombuffer(contents, triangle, count=count, offset=84)["vertices"].reshape(-1, 3).astype(np.float64)


def _rotation(quat) -> np.ndarray:
    w, x, y, z = np.asarray(quat, np.float64) / np.linalg.norm(quat)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
    ])


def _quat(element) -> np.ndarray:
    quat = resolved(element, "quat")
    if any(resolved(element, name) is not None for name in ("axisangle", "euler", "xyaxes", "zaxis")):
        raise ValueError(f"Cannot deform {element.tag} {element.name!r}: only 'quat' orientations are supported.")
    return np.array([1.0, 0.0, 0.0, 0.0]) if quat is None else np.asarray(quat, np.float64)


def thicken(model, factor: float) -> None:
    """Draw every mesh and cylinder geom of ``model`` ``factor`` times thicker on its short axes; dynamics unchanged.

    Each geom gets a massless, contact-free copy that is drawn, and the original moves to a group that is not drawn.
    Mesh copies scale the mesh's two short axes about the centre of its bounding box, so the link keeps its centreline;
    cylinders (the joint rings) scale uniformly so that they keep wrapping the scaled links.
    """
    scaled_meshes: dict[str, Any] = {}
    for geom in list(model.find_all("geom", exclude_attachments=True)):
        kind = resolved(geom, "type") or "sphere"
        if kind not in ("mesh", "cylinder"):
            continue
        copy = dict(
            name=f"{geom.name}_visual" if geom.name else None,
            type=kind,
            material=resolved(geom, "material"),
            rgba=resolved(geom, "rgba"),
            quat=_quat(geom),
            contype=0,
            conaffinity=0,
            mass=0,
            group=resolved(geom, "group") or 0,
        )
        position = np.zeros(3) if resolved(geom, "pos") is None else np.asarray(resolved(geom, "pos"), np.float64)
        if kind == "cylinder":
            copy.update(size=np.asarray(resolved(geom, "size"), np.float64) * factor, pos=position)
        else:
            mesh = resolved(geom, "mesh")
            if mesh.name not in scaled_meshes:
                scaled_meshes[mesh.name] = _scaled_mesh(model, mesh, factor)
            scaled, shift = scaled_meshes[mesh.name]
            copy.update(mesh=scaled, pos=position + _rotation(copy["quat"]) @ shift)
        geom.parent.add("geom", **{key: value for key, value in copy.items() if value is not None})
        geom.group = HIDDEN_GEOM_GROUP


def _scaled_mesh(model, mesh, factor: float):
    """A copy of ``mesh`` scaled by ``factor`` on its short axes, and the shift that keeps its bounding box centred."""
    vertices = stl_vertices(mesh.file.contents)
    base_scale = np.ones(3) if mesh.scale is None else np.asarray(mesh.scale, np.float64)
    vertices = vertices * base_scale
    low, high = vertices.min(axis=0), vertices.max(axis=0)
    long_axis = LONG_AXES.get(mesh.name, int(np.argmax(high - low)))
    scale = np.full(3, factor)
    scale[long_axis] = 1.0
    centre = (low + high) / 2
    shift = (1.0 - scale) * centre  # the geom frame moves so that the scaled box has the original's centre
    shift[long_axis] = 0.0
    scaled = model.asset.add("mesh", name=f"{mesh.name}_visual", file=mesh.file, scale=base_scale * scale)
    return scaled, shift


def rescale(model, scale: Sequence[float]) -> None:
    """Rescale a rigid prop per axis of its frame: geom and site positions and sizes (boxes, cylinders, capsules)."""
    scale = np.asarray(scale, np.float64)
    elements = list(model.find_all("geom", exclude_attachments=True))
    for element in elements + list(model.find_all("site", exclude_attachments=True)):
        kind = resolved(element, "type") or "sphere"
        position = resolved(element, "pos")
        if position is not None:
            element.pos = np.asarray(position, np.float64) * scale
        size = resolved(element, "size")
        if size is None:
            continue
        # The scale along each of the element's own axes (exact for axis-aligned orientations, as in the Duplo brick).
        local = np.linalg.norm(scale[:, None] * _rotation(_quat(element)), axis=0)
        size = np.asarray(size, np.float64).copy()
        if kind == "box":
            size = size * local
        elif kind in ("cylinder", "capsule"):
            size[0] *= np.sqrt(local[0] * local[1])
            if len(size) > 1:
                size[1] *= local[2]
        elif kind == "sphere":
            size[0] *= np.cbrt(np.prod(local))
        else:
            raise ValueError(f"Cannot rescale {element.tag} {element.name!r} of type {kind!r}.")
        # Explicit sizes override the brick's class defaults, including the stud radius Duplo re-draws per episode
        # (a constant at the task's variation 0).
        element.size = size


# --------------------------------------------------------------------------------------------------------------------
# Environment


def build(mode: str = "train", seed: int = 0, time_limit: float | None = None, **options):
    """The dm_control composer environment of ``reach_duplo`` in ``mode``, all observables disabled (pixels come from
    ``physics.render``, once per agent step); ``time_limit`` in seconds (None: 10)."""
    from dm_control import composer  # imported here so that MUJOCO_GL is set first (see lightning_pieg.envs)
    from dm_control.entities.props import Duplo
    from dm_control.manipulation import reach

    shape = deformation(mode, options)
    task = reach.reach_duplo_vision()
    # Rendering the camera observable at every control step would render twice per agent step for nothing.
    for observable in task.observables.values():
        observable.enabled = False
    if shape.arm != 1.0:
        thicken(task.arm.mjcf_model, shape.arm)
        thicken(task.hand.mjcf_model, shape.arm)
    if shape.brick != (1.0, 1.0, 1.0):
        (brick,) = [entity for entity in task.root_entity.iter_entities() if isinstance(entity, Duplo)]
        rescale(brick.mjcf_model, shape.brick)
    # The brick's stud size is the only MJCF the task changes per episode, and it is constant (variation 0): compiling
    # once keeps one Physics (and one rendering context) for the env's lifetime.
    return composer.Environment(
        task,
        time_limit=TIME_LIMIT if time_limit is None else float(time_limit),
        random_state=seed,
        recompile_mjcf_every_episode=False,
        strip_singleton_obs_buffer_dim=True,
    )


def make(
    task: str = "reach_duplo",
    mode: str = "train",
    seed: int = 0,
    frame_stack: int = 3,
    action_repeat: int = 2,
    image_size: int = 84,
    **options,
) -> dm_env.Environment:
    """``reach_duplo`` from the ``front_close`` camera: uint8 ``(3 * frame_stack, image_size, image_size)``
    observations, actions in [-1, 1]. ``options``: ``<mode>_arm_scale``, ``<mode>_brick_scale``, ``time_limit``
    (seconds per episode; None: 10)."""
    base = build(mode, seed, **options)
    check_render(base.physics)
    # ``base.physics`` is looked up per frame: composer replaces its Physics when it compiles the model at reset.
    return pixel_env(base, lambda height, width: base.physics.render(height, width, camera_id=CAMERA),
                     action_repeat=action_repeat, image_size=image_size, frame_stack=frame_stack)
