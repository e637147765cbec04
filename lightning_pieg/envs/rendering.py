"""Headless OpenGL for MuJoCo: choose a backend before dm_control loads, and fail clearly when none works."""
from __future__ import annotations

import os

BACKEND_HELP = (
    "MuJoCo could not render with MUJOCO_GL={backend!r}: {error}\n"
    "Headless rendering needs an OpenGL backend. Either install EGL (Debian/Ubuntu: "
    "`apt-get install libegl1 libegl-mesa0 libgl1-mesa-dri`, or an NVIDIA driver) and keep MUJOCO_GL=egl, "
    "or install OSMesa (`apt-get install libosmesa6`) and set MUJOCO_GL=osmesa."
)


def select_backend() -> str:
    """Default to EGL unless the user chose a backend; must run before dm_control is imported."""
    os.environ.setdefault("MUJOCO_GL", "egl")
    if os.environ["MUJOCO_GL"] == "egl":
        # PyOpenGL reads this one; keeping the two in step avoids a GLX fallback on machines without a display.
        os.environ.setdefault("PYOPENGL_PLATFORM", "egl")
    return os.environ["MUJOCO_GL"]


class RenderingError(RuntimeError):
    """No OpenGL backend could render a frame."""


def check_render(physics) -> None:
    """Render one tiny frame, turning the backend's obscure failure into a message that names the fix."""
    try:
        physics.render(8, 8, camera_id=0)
    except Exception as error:  # the backends raise many types (ImportError, RuntimeError, OSError, EGL errors)
        raise RenderingError(BACKEND_HELP.format(backend=os.environ.get("MUJOCO_GL"), error=error)) from error


def load_gl() -> None:
    """Import mujoco, which loads the ``MUJOCO_GL`` backend: a missing GL library becomes a clear error."""
    try:
        import mujoco  # noqa: F401
        from dm_control import suite  # noqa: F401
    except Exception as error:  # PyOpenGL fails in many ways (ImportError, AttributeError on a missing library)
        raise RenderingError(BACKEND_HELP.format(backend=os.environ.get("MUJOCO_GL"), error=error)) from error


def renderer_string() -> str:
    """The OpenGL renderer MuJoCo gets here (``NVIDIA H200/PCIe/SSE2``, ``llvmpipe (LLVM ...)``), so a silent fallback
    from a GPU's EGL driver to software rendering is visible."""
    select_backend()
    try:
        from dm_control import mujoco
        from OpenGL import GL

        # dm_control's own context, not mujoco.GLContext: importing mujoco.egl registers an eglTerminate at exit
        # that runs before dm_control frees the contexts of environments built earlier (EGL_BAD_DISPLAY tracebacks)
        physics = mujoco.Physics.from_xml_string("<mujoco/>")
        try:
            with physics.contexts.gl.make_current() as context:
                return context.call(GL.glGetString, GL.GL_RENDERER).decode()
        finally:
            physics.free()
    except Exception as error:  # noqa: BLE001 - whatever the backend raises, the caller only prints it
        return f"unknown ({type(error).__name__}: {error})"
