#!/usr/bin/env python
"""Pack what an offline GPU node lacks into one file of at most 64 MiB (docs/offline_gpu.md).

The node is assumed to have Python with torch (CUDA), torchvision and numpy, and nothing of this project's other
stack: no MuJoCo, dm_control, Hydra/OmegaConf, Lightning, PyAV, no package index. On a connected machine:

    python scripts/bundle_offline.py --python 3.11 --out pieg-offline.tar.xz

downloads, for that Python and platform, the wheels of exactly the packages listed in ``CORE`` (plus ``--extras``),
never torch/torchvision/numpy/nvidia-*/triton/cuda-*, trims the two big ones (mujoco's experimental viewer, and
dm_control's locomotion/soccer/dog assets that ``dm_control.suite`` never loads), adds this project's source tree
and an ``install.sh`` that installs it all offline with ``pip install --no-index --no-deps``, prints every wheel's
size, and exits 1 if the bundle is larger than the limit.

Why .tar.xz by default: the wheels are zip files already deflated, so a .tar.gz or .zip bundle is the sum of the
wheels (91 MiB: PyAV and scipy are 34 MB each); the .tar.xz stores the wheels uncompressed and compresses each with xz,
which roughly halves MuJoCo's, scipy's and PyAV's shared libraries. ``python -m tarfile -e`` unpacks it anywhere.
"""
from __future__ import annotations

import argparse
import ast
import base64
import csv
import email.parser
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MIB = 2 ** 20
DEFAULT_LIMIT_MIB = 64
TOP = "pieg-offline"  # the folder the bundle unpacks into
SLIM = "slim"         # local version label of a trimmed wheel: mujoco==3.17.0+slim

# On the node already; never bundled (a copy would be hundreds of MB, and a second torch would shadow the node's).
EXCLUDED = re.compile(r"^(torch|torchvision|torchaudio|numpy|triton|pytorch-triton.*|nvidia-.*|cuda-.*|mlflow.*)$")


@dataclass(frozen=True)
class Pkg:
    """One wheel in the bundle.

    ``install``: ``pin`` installs exactly this version (replacing whatever the node has); ``keep`` installs it only
    if the node lacks the package or has a version outside what the bundled packages declare for it.
    ``prune``: path prefixes removed from the wheel, which then gets the local version ``+slim``.
    ``sdist_only``: PyPI has no wheel of this release; it is pure Python, so a wheel is built here with ``pip wheel``.
    """
    name: str
    version: str
    install: str
    why: str
    prune: tuple[str, ...] = ()
    sdist_only: bool = False


# Versions: the stack this project is tested with (setup.py pins mujoco and dm_control exactly).
DOG_ASSETS = "dm_control/suite/dog_assets/"
CORE: tuple[Pkg, ...] = (
    Pkg("mujoco", "3.17.0", "pin", "physics and rendering",
        prune=("mujoco/experimental/",)),  # MuJoCo Studio, dear_imgui, implot: 15 of the wheel's 26 MB, never imported
    Pkg("dm_control", "1.0.50", "pin", "the DeepMind Control suite and the manipulation tasks",
        prune=("dm_control/locomotion/",      # CMU humanoid, soccer, mazes (needs labmaze): 39 MB
               DOG_ASSETS,                     # only suite.load('dog', ...) reads them: 10 MB (--extras dog)
               "dm_control/mujoco/testing/", "dm_control/mjcf/test_assets/", "dm_control/blender/")),
    Pkg("absl-py", "2.5.1", "keep", "dm_control, mujoco"),
    Pkg("dm-env", "1.6", "pin", "the environment API"),
    Pkg("dm-tree", "0.1.10", "pin", "dm-env, dm_control.composer"),
    Pkg("attrs", "26.1.0", "keep", "dm-tree"),
    Pkg("wrapt", "2.5.2", "keep", "dm-tree"),
    Pkg("glfw", "2.11.0", "keep", "mujoco, dm_control (only for MUJOCO_GL=glfw; small)"),
    Pkg("PyOpenGL", "3.1.10", "keep", "EGL/OSMesa rendering"),
    Pkg("lxml", "6.1.3", "keep", "dm_control.mjcf and the suite's model edits"),
    Pkg("scipy", "1.17.1", "keep", "from dm_control import suite (quadruped imports scipy.ndimage)"),
    Pkg("av", "18.1.0", "keep", "lightning_pieg.envs.dmcgb and video.py import it (DMC-GB videos, eval videos)"),
    Pkg("hydra-core", "1.3.8", "pin", "the training and evaluation entry points"),
    Pkg("omegaconf", "2.3.1", "pin", "configs"),
    Pkg("antlr4-python3-runtime", "4.9.3", "pin", "omegaconf, hydra (==4.9.*)", sdist_only=True),
    Pkg("PyYAML", "6.0.4", "keep", "omegaconf, pytorch-lightning"),
    Pkg("pytorch-lightning", "2.6.6", "pin", "the trainer (ships lightning_fabric too)"),
    Pkg("lightning-utilities", "0.15.3", "pin", "pytorch-lightning, torchmetrics"),
    Pkg("torchmetrics", "1.9.0", "pin", "pytorch-lightning, lightning_pieg.rollouts"),
    Pkg("packaging", "26.4", "keep", "hydra, pytorch-lightning"),
    Pkg("tqdm", "4.70.1", "keep", "pytorch-lightning, lightning_pieg.generalization"),
    Pkg("fsspec", "2026.9.0", "keep", "pytorch-lightning (a torch dependency: usually there)"),
    Pkg("typing_extensions", "4.16.0", "keep", "mujoco, lightning (a torch dependency: usually there)"),
)

EXTRAS: dict[str, tuple[Pkg, ...]] = {
    "dog": (),  # keeps dm_control's dog assets (suite.load('dog', ...)); no extra wheel
    "pillow": (Pkg("pillow", "13.0.0", "keep", "torchvision and lightning_pieg.envs.distracting (torchvision "
                                                "needs it, so a node with torchvision has it)"),),
    "matplotlib": (Pkg("matplotlib", "3.11.2", "keep", "figures (scripts/, lightning_pieg.stats)"),
                   Pkg("contourpy", "1.3.3", "keep", "matplotlib"),
                   Pkg("cycler", "0.12.1", "keep", "matplotlib"),
                   Pkg("fonttools", "4.68.0", "keep", "matplotlib"),
                   Pkg("kiwisolver", "1.5.1", "keep", "matplotlib"),
                   Pkg("pyparsing", "3.3.3", "keep", "matplotlib"),
                   Pkg("python-dateutil", "2.9.0.post0", "keep", "matplotlib"),
                   Pkg("six", "1.17.0", "keep", "python-dateutil")),
    "test": (Pkg("pytest", "9.2.0", "keep", "python -m pytest tests/test_cuda.py on the node"),
             Pkg("pluggy", "1.7.0", "keep", "pytest"),
             Pkg("iniconfig", "2.3.1", "keep", "pytest"),
             Pkg("pygments", "2.21.0", "keep", "pytest")),
}

# Declared by dm_control/mujoco/pytorch-lightning but not needed here, so not bundled (install.sh uses --no-deps).
NOT_BUNDLED = {
    "labmaze": "dm_control.locomotion mazes only (locomotion is trimmed away)",
    "protobuf": "dm_control.locomotion.mocap only",
    "requests": "dm_control.locomotion.mocap (CMU data download) only",
    "setuptools": "declared by dm_control, never imported by it",
    "pyparsing": "dm_control.autowrap (a build tool) only; bundled with --extras matplotlib",
    "etils": "mujoco's tests only",
    "websockets": "mujoco.experimental (trimmed) only",
    "aiohttp": "fsspec[http], for http:// checkpoint paths only",
    "mlflow": "tracking: ~100 MB with its dependencies; the package's MLflow logger is not available offline",
    "rliable": "lightning_pieg.stats (seed statistics, figures) only; pulls pandas, arch, seaborn",
    "pandas": "rliable only",
    "metaworld": "the drawer_close task only",
}

# The project's files that the node needs: package, Hydra configs (conf/ lives beside the package, not inside it,
# so a plain wheel of the project cannot train: CONF_DIR is <package>/../conf), scripts and tests.
SOURCE_DIRS = ("lightning_pieg", "conf", "scripts", "tests")
SOURCE_FILES = ("setup.py", "README.md", "MLproject", "python_env.yaml", "pytest.ini")


# ---------------------------------------------------------------------------------------------------- the plan

def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def names_of(packages) -> set[str]:
    return {canonical(p.name) for p in packages}


def plan(extras: tuple[str, ...] = (), exclude: tuple[str, ...] = (), pins: tuple[str, ...] = ()) -> list[Pkg]:
    """The packages to bundle: ``CORE`` plus the named extras, less ``exclude``, with ``pins`` (``name==version``)
    replacing the table's versions; never one of ``EXCLUDED``."""
    unknown = [e for e in extras if e not in EXTRAS]
    if unknown:
        raise SystemExit(f"unknown extra(s) {', '.join(unknown)}; choose from {', '.join(EXTRAS)}")
    drop = {canonical(e) for e in exclude}
    known = {canonical(p.name) for p in CORE} | {canonical(p.name) for e in EXTRAS.values() for p in e}
    stray = sorted(drop - known)
    if stray:
        raise SystemExit(f"--exclude {', '.join(stray)}: not a bundled package")
    packages = [p for p in CORE if canonical(p.name) not in drop]
    if "dog" in extras:
        packages = [replace(p, prune=tuple(x for x in p.prune if x != DOG_ASSETS)) for p in packages]
    for extra in extras:
        for p in EXTRAS[extra]:
            if canonical(p.name) not in drop and all(canonical(p.name) != canonical(q.name) for q in packages):
                packages.append(p)
    versions = {}
    for pin in pins:
        name, sep, version = pin.partition("==")
        if not sep or not version:
            raise SystemExit(f"--pin {pin}: write name==version")
        versions[canonical(name)] = version
    stray = sorted(set(versions) - names_of(packages))
    if stray:
        raise SystemExit(f"--pin {', '.join(stray)}: not in the bundle")
    packages = [replace(p, version=versions.get(canonical(p.name), p.version)) for p in packages]
    bad = [p.name for p in packages if EXCLUDED.match(canonical(p.name))]
    assert not bad, f"the node's own packages must not be bundled: {bad}"
    return packages


def platform_tags(platform: str) -> list[str]:
    """``--platform`` values for pip: pip takes ``manylinux_2_28_x86_64`` literally (a wheel tagged only
    ``manylinux2014``/``manylinux_2_17`` would not match), so list every older glibc too, as an installer would."""
    m = re.fullmatch(r"manylinux_2_(\d+)_(\w+)", platform)
    legacy = {"manylinux2014": 17, "manylinux2010": 12, "manylinux1": 5}
    if m is None:
        m2 = re.fullmatch(r"(manylinux2014|manylinux2010|manylinux1)_(\w+)", platform)
        if m2 is None:
            return [platform]
        glibc, arch = legacy[m2.group(1)], m2.group(2)
    else:
        glibc, arch = int(m.group(1)), m.group(2)
    tags = [f"manylinux_2_{n}_{arch}" for n in range(glibc, 4, -1)]
    tags += [f"{name}_{arch}" for name, n in legacy.items() if n <= glibc]
    return tags


# ---------------------------------------------------------------------------------------------------- wheels

def wheel_parts(filename: str) -> tuple[str, str, str]:
    """``(distribution, version, tags)`` of a wheel file name (``tags`` keeps any build tag)."""
    stem = filename[:-len(".whl")]
    dist, version, tags = stem.split("-", 2)
    return dist, version, tags


def pip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
                          capture_output=True, text=True)


def download(pkg: Pkg, python: str, platforms: list[str], dest: Path) -> Path:
    """The wheel of ``pkg`` for the node, into ``dest``; a pure-Python sdist-only release is built into a wheel."""
    work = Path(tempfile.mkdtemp(dir=dest))
    spec = f"{pkg.name}=={pkg.version}"
    args = ["download", "--no-deps", "--only-binary=:all:", "--python-version", python, "--implementation", "cp",
            *[a for t in platforms for a in ("--platform", t)], "-d", str(work), spec]
    done = pip(*args)
    if done.returncode != 0 and pkg.sdist_only:
        done = pip("wheel", "--no-deps", "-w", str(work), spec)
    found = sorted(work.glob("*.whl"))
    if done.returncode != 0 or len(found) != 1:
        hint = ""
        if pkg.name == "mujoco" and not any(t.startswith("manylinux_2_2") for t in platforms):
            hint = ("\n  mujoco 3.17 ships manylinux_2_27+ wheels only: pass --platform manylinux_2_28_x86_64 "
                    "(the node needs glibc >= 2.28; torch's own wheels need it too)")
        tail = "\n  ".join((done.stderr or done.stdout).strip().splitlines()[-4:])
        raise SystemExit(f"could not get a wheel of {spec} for Python {python} on {platforms[0]} (or older):\n"
                         f"  {tail}{hint}\n  another release may have one: --pin {pkg.name}==<version>")
    wheel = found[0]
    if pkg.sdist_only and not wheel.name.endswith("-none-any.whl"):
        raise SystemExit(f"{wheel.name}: built from an sdist but not pure Python; it would not run on the node")
    target = dest / wheel.name
    wheel.replace(target)
    shutil.rmtree(work)
    return target


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def rewrite_wheel(wheel: Path, dest: Path, prune: tuple[str, ...] = (), stored: bool = False) -> Path:
    """A copy of ``wheel`` in ``dest``, without the files under ``prune`` (then versioned ``X+slim``, with its RECORD
    rewritten), and with every file stored uncompressed if ``stored`` (for an outer xz, which compresses better)."""
    dist, version, tags = wheel_parts(wheel.name)
    new_version = f"{version}+{SLIM}" if prune else version
    compression = zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED
    out = dest / f"{dist}-{new_version}-{tags}.whl"
    with zipfile.ZipFile(wheel) as zin:
        infos = zin.infolist()
        dist_info = next(i.filename.split("/")[0] for i in infos
                         if re.fullmatch(r"[^/]+\.dist-info/WHEEL", i.filename))
        new_dist_info = dist_info.replace(f"-{version}.dist-info", f"-{new_version}.dist-info")
        kept = [i for i in infos if not any(i.filename.startswith(p) for p in prune)]
        removed = len(infos) - len(kept)
        if prune and removed == 0:
            raise SystemExit(f"{wheel.name}: nothing under {prune}; the trim list is out of date")
        rows = []
        with zipfile.ZipFile(out, "w", compression) as zout:
            for info in kept:
                if info.filename == f"{dist_info}/RECORD" or info.is_dir():
                    continue
                data = zin.read(info)
                name = info.filename
                if name.startswith(dist_info + "/"):
                    name = new_dist_info + name[len(dist_info):]
                    if prune and name == f"{new_dist_info}/METADATA":
                        data = re.sub(rb"^Version: .*$", f"Version: {new_version}".encode(), data, count=1,
                                      flags=re.M)
                target = zipfile.ZipInfo(name, date_time=info.date_time)
                target.external_attr = info.external_attr
                target.compress_type = compression
                zout.writestr(target, data)
                rows.append((name, _record_hash(data), str(len(data))))
            if prune:
                note = ("Trimmed by lightning_pieg's scripts/bundle_offline.py for an offline node; removed:\n"
                        + "".join(f"  {p}\n" for p in prune)).encode()
                zout.writestr(f"{new_dist_info}/TRIMMED", note, compress_type=compression)
                rows.append((f"{new_dist_info}/TRIMMED", _record_hash(note), str(len(note))))
            rows.append((f"{new_dist_info}/RECORD", "", ""))
            text = io.StringIO()
            csv.writer(text, lineterminator="\n").writerows(rows)
            zout.writestr(f"{new_dist_info}/RECORD", text.getvalue(), compress_type=compression)
    return out


def wheel_requirements(wheel: Path, python: str) -> list:
    """The ``Requires-Dist`` lines of a wheel that apply on the node (no extras, its Python version)."""
    from packaging.requirements import Requirement

    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n))
        message = email.parser.Parser().parsestr(z.read(meta).decode("utf-8", "replace"))
    env = {"python_version": python, "python_full_version": f"{python}.0", "extra": "",
           "platform_system": "Linux", "sys_platform": "linux"}
    found = []
    for line in message.get_all("Requires-Dist") or []:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate(env):
            found.append(req)
    return found


def project_requirements(root: Path) -> list:
    """``install_requires`` of the project's setup.py (read, not run)."""
    from packaging.requirements import Requirement

    tree = ast.parse((root / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "install_requires":
            return [Requirement(r) for r in ast.literal_eval(node.value)]
    return []


NODE_OWN = ("torch", "torchvision", "numpy", "pillow")


def requirement_lines(packages: list[Pkg], wheels: dict[str, Path], python: str, root: Path
                      ) -> tuple[list[str], dict[str, str], dict[str, str]]:
    """requirements.txt for install.sh; what the bundled wheels require of the node's own packages (torch, numpy:
    a hard need); and what the project's setup.py pins them to (the tested stack: only a warning on the node)."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    def combine(requirements) -> dict[str, SpecifierSet]:
        found: dict[str, SpecifierSet] = {}
        for req in requirements:
            key = canonical(req.name)
            found[key] = found.get(key, SpecifierSet()) & req.specifier
        return found

    needed = combine(r for w in wheels.values() for r in wheel_requirements(w, python))
    tested = combine(project_requirements(root))
    lines = []
    for p in packages:
        version = wheel_parts(wheels[p.name].name)[1]
        key = canonical(p.name)
        spec = needed.get(key, SpecifierSet()) & tested.get(key, SpecifierSet())
        if not spec.contains(Version(version), prereleases=True):
            raise SystemExit(f"bundled {p.name} {version} does not satisfy what the bundle declares: {spec}")
        lines.append(f"{p.name}=={version}" if p.install == "pin" else f"{p.name}{spec}")
    return (lines, {n: str(needed.get(n, "")) for n in NODE_OWN},
            {n: str(tested[n]) for n in NODE_OWN if n in tested})


# ---------------------------------------------------------------------------------------------------- the source

def source_files(root: Path) -> list[Path]:
    """The project's files to ship (as in the working tree, uncommitted changes included)."""
    try:
        listed = subprocess.run(["git", "-C", str(root), "ls-files", "-co", "--exclude-standard"],
                                capture_output=True, text=True, check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        listed = [str(p.relative_to(root)) for d in SOURCE_DIRS for p in (root / d).rglob("*")]
        listed += list(SOURCE_FILES)
    keep = []
    for name in sorted(set(listed)):
        path = root / name
        top = name.split("/")[0]
        if not path.is_file() or "__pycache__" in name or name.endswith(".pyc"):
            continue
        if top in SOURCE_DIRS or name in SOURCE_FILES:
            keep.append(Path(name))
    return keep


def git_describe(root: Path) -> str:
    try:
        return subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# ---------------------------------------------------------------------------------------------------- install.sh

INSTALL_SH = r"""#!/bin/sh
# Installs this bundle offline into the Python that runs it (or into a new venv that sees the node's torch).
#   sh install.sh                       # into `python3`'s environment (PYTHON=/path/to/python to choose)
#   sh install.sh --venv ~/pieg-venv    # python3 -m venv --system-site-packages ~/pieg-venv, then into it
#   sh install.sh --no-check            # skip the import/render check at the end
# Nothing is downloaded: pip runs with --no-index --no-deps on the wheels beside this file.
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
PYTHON=${PYTHON:-python3}
VENV=""
CHECK=1
while [ $# -gt 0 ]; do
  case "$1" in
    --venv) VENV=$2; shift 2 ;;
    --python) PYTHON=$2; shift 2 ;;
    --no-check) CHECK=0; shift ;;
    -h|--help) sed -n '2,6p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [ -n "$VENV" ]; then
  "$PYTHON" -m venv --system-site-packages "$VENV"
  PYTHON="$VENV/bin/python"
fi
WANT=@PYTHON@
HAVE=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if [ "$HAVE" != "$WANT" ]; then
  echo "install.sh: this bundle holds wheels for Python $WANT, but $PYTHON is Python $HAVE;" >&2
  echo "  rebuild it on a connected machine with: python scripts/bundle_offline.py --python $HAVE" >&2
  exit 1
fi
"$PYTHON" -c 'import torch, torchvision, numpy' 2>/dev/null || \
  echo "install.sh: warning: $PYTHON cannot import torch, torchvision and numpy; the bundle does not hold them" >&2
export PIP_NO_INPUT=1 PIP_DISABLE_PIP_VERSION_CHECK=1
"$PYTHON" -m pip install --no-index --no-deps --find-links "$HERE/wheels" -r "$HERE/requirements.txt"
# The project, editable from src/: its Hydra configs (src/conf) sit beside the package, where it looks for them.
if ! "$PYTHON" -m pip install --no-index --no-deps --no-build-isolation -e "$HERE/src" >"$HERE/editable.log" 2>&1
then
  SITE=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  echo "$HERE/src" > "$SITE/lightning_pieg_offline.pth"
  echo "install.sh: pip could not install src/ editable (see editable.log; it needs setuptools >= 64 and wheel);"
  echo "  added $SITE/lightning_pieg_offline.pth instead: use python -m lightning_pieg.train (no pieg-train command)"
fi
if [ "$CHECK" = 1 ]; then
  MUJOCO_GL=${MUJOCO_GL:-egl} "$PYTHON" "$HERE/check.py"
fi
echo "install.sh: done; set MUJOCO_GL=egl before training (docs/offline_gpu.md in src/)"
"""

CHECK_PY = r'''"""After install.sh: what imports, whether the node's torch/numpy suit the bundle, and who renders."""
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")
if os.environ["MUJOCO_GL"] == "egl":
    os.environ.setdefault("PYOPENGL_PLATFORM", "egl")
HERE = Path(__file__).resolve().parent
manifest = json.loads((HERE / "manifest.json").read_text())
problems = []

import lightning_pieg  # noqa: E402  (torch and torchvision first: importing triton after EGL crashes)
import torch  # noqa: E402
import numpy  # noqa: E402
from importlib.metadata import version  # noqa: E402
from packaging.specifiers import SpecifierSet  # noqa: E402
from packaging.version import Version  # noqa: E402

for name, spec in manifest["needs_from_node"].items():
    try:
        have = version(name)
    except Exception:
        problems.append(f"{name} is not installed (the bundle needs {name}{spec})")
        continue
    if spec and not SpecifierSet(spec).contains(Version(have.split("+")[0]), prereleases=True):
        problems.append(f"{name} {have} is outside what the bundled packages declare: {spec}")
for name, spec in manifest.get("tested_with", {}).items():
    try:
        have = version(name)
    except Exception:
        continue
    if not SpecifierSet(spec).contains(Version(have), prereleases=True):
        print(f"check.py: note: {name} {have}; the project is tested with {name}{spec} (setup.py)")
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA available: {torch.cuda.is_available()}), "
      f"numpy {numpy.__version__}")

import hydra, omegaconf, pytorch_lightning, torchmetrics  # noqa: E401,E402,F401
import lightning_pieg.envs, lightning_pieg.module  # noqa: E401,E402,F401

try:
    import mujoco
    from dm_control import suite
    env = suite.load("cartpole", "balance")
    env.reset()
    frame = env.physics.render(84, 84)
    from OpenGL import GL
    renderer = GL.glGetString(GL.GL_RENDERER)
    print(f"rendered {frame.shape} with MUJOCO_GL={os.environ['MUJOCO_GL']}: "
          f"{renderer.decode() if renderer else 'unknown renderer'} (mujoco {mujoco.__version__})")
    if renderer and b"llvmpipe" in renderer:
        print("  note: llvmpipe is Mesa's software renderer: the GPU is not rendering (see docs/offline_gpu.md)")
except Exception as error:  # a missing libEGL, no GPU EGL device, ...
    problems.append(f"rendering failed with MUJOCO_GL={os.environ['MUJOCO_GL']}: {type(error).__name__}: {error}")
for line in problems:
    print("check.py: problem: " + line, file=sys.stderr)
sys.exit(1 if problems else 0)
'''


# ---------------------------------------------------------------------------------------------------- the archive

@dataclass
class Member:
    arcname: str
    data: bytes | None = None
    path: Path | None = None
    mode: int = 0o644
    packed: int = 0  # bytes it takes in the archive (compressed), once written


def _compress_wheel(member: Member, codec: str, preset: int) -> bytes:
    """The tar entry of one member (header, data, padding) as its own compressed stream."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        _add(tar, member)
        data = raw.getvalue()
    entry = data[:len(data) - _tail_len(data)]  # drop the end-of-archive blocks: one archive ends them once
    if codec == "xz":
        return lzma.compress(entry, format=lzma.FORMAT_XZ, preset=preset)
    return gzip.compress(entry, compresslevel=9, mtime=0)


def _tail_len(data: bytes) -> int:
    """Length of the zero blocks tarfile appends on close (two 512-byte blocks, padded to its record size)."""
    n = 0
    while n < len(data) and data[len(data) - n - 512:len(data) - n] == b"\0" * 512:
        n += 512
    return n


def _add(tar: tarfile.TarFile, member: Member):
    data = member.data if member.data is not None else member.path.read_bytes()
    info = tarfile.TarInfo(member.arcname)
    info.size, info.mode, info.mtime = len(data), member.mode, int(time.time())
    tar.addfile(info, io.BytesIO(data))


def write_archive(out: Path, members: list[Member], preset: int = 9, jobs: int = 1) -> None:
    """``out`` (.tar.xz, .tar.gz or .zip) holding ``members`` under ``TOP/``; sets each member's ``packed``."""
    name = out.name
    if name.endswith(".zip"):
        with zipfile.ZipFile(out, "w") as z:
            for m in members:
                data = m.data if m.data is not None else m.path.read_bytes()
                info = zipfile.ZipInfo(m.arcname, date_time=time.localtime()[:6])
                info.external_attr = (0o100000 | m.mode) << 16
                # wheels are zip files, already deflated: store them, deflate the text
                info.compress_type = zipfile.ZIP_STORED if m.arcname.endswith(".whl") else zipfile.ZIP_DEFLATED
                z.writestr(info, data)
                m.packed = z.getinfo(m.arcname).compress_size
        return
    codec = "xz" if name.endswith((".tar.xz", ".txz")) else "gz" if name.endswith((".tar.gz", ".tgz")) else None
    if codec is None:
        raise SystemExit(f"--out {out}: use a name ending in .tar.xz, .tar.gz or .zip")
    # Members of one tar, each compressed as its own stream (in parallel with --jobs), then the end-of-archive.
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:  # lzma and zlib release the GIL
        blobs = list(pool.map(lambda m: _compress_wheel(m, codec, preset), members))
    with open(out, "wb") as f:
        for m, blob in zip(members, blobs):
            f.write(blob)
            m.packed = len(blob)
        end = b"\0" * 1024
        f.write(lzma.compress(end, format=lzma.FORMAT_XZ) if codec == "xz" else gzip.compress(end, mtime=0))


def tree_size(path: Path) -> int:
    """Bytes of a file, or of every file under a folder (apparent sizes: what a copy transfers)."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def check_size(path: Path, limit: int = DEFAULT_LIMIT_MIB * MIB) -> bool:
    """Print the size of ``path`` against ``limit``; True if it fits."""
    size = tree_size(path)
    fits = size <= limit
    print(f"{path}: {size / MIB:.2f} MiB ({size} bytes); limit {limit / MIB:.0f} MiB: "
          f"{'fits' if fits else 'TOO BIG by %.2f MiB' % ((size - limit) / MIB)}")
    return fits


# ---------------------------------------------------------------------------------------------------- main

def build(args) -> int:
    started = time.time()
    out = Path(args.out).resolve()
    stored = out.name.endswith((".tar.xz", ".txz"))
    packages = plan(tuple(args.extras), tuple(args.exclude), tuple(args.pin))
    platforms = platform_tags(args.platform)
    work = Path(tempfile.mkdtemp(prefix="pieg-bundle-"))
    try:
        raw_dir, wheel_dir = work / "downloaded", work / "wheels"
        raw_dir.mkdir()
        wheel_dir.mkdir()
        print(f"downloading {len(packages)} wheels for Python {args.python} on {args.platform} ...", flush=True)
        downloaded = {p.name: download(p, args.python, platforms, raw_dir) for p in packages}
        t_download = time.time() - started
        wheels = {p.name: rewrite_wheel(downloaded[p.name], wheel_dir, p.prune, stored)
                  if (p.prune or stored) else downloaded[p.name] for p in packages}
        lines, needs, tested = requirement_lines(packages, wheels, args.python, ROOT)

        sources = source_files(ROOT)
        dirty = git_describe(ROOT)
        manifest = {
            "python": args.python, "platform": args.platform, "platform_tags": platforms,
            "project": f"lightning_pieg from {ROOT} ({dirty})", "built": time.strftime("%Y-%m-%d %H:%M:%S"),
            "needs_from_node": needs, "tested_with": tested,
            "not_bundled": {**{n: "on the node" for n in ("torch", "torchvision", "numpy", "nvidia-*, triton, "
                                                          "cuda-*")}, **NOT_BUNDLED},
            "wheels": [{"name": p.name, "file": wheels[p.name].name, "install": p.install, "why": p.why,
                        "downloaded_bytes": downloaded[p.name].stat().st_size, "trimmed": list(p.prune)}
                       for p in packages],
        }
        members = [Member(f"{TOP}/wheels/{wheels[p.name].name}", path=wheels[p.name]) for p in packages]
        members += [Member(f"{TOP}/src/{s}", path=ROOT / s) for s in sources]
        members += [
            Member(f"{TOP}/install.sh", INSTALL_SH.replace("@PYTHON@", args.python).encode(), mode=0o755),
            Member(f"{TOP}/check.py", CHECK_PY.encode()),
            Member(f"{TOP}/requirements.txt", ("\n".join(lines) + "\n").encode()),
            Member(f"{TOP}/manifest.json", (json.dumps(manifest, indent=1) + "\n").encode()),
        ]
        print(f"packing {len(members)} files into {out.name} ...", flush=True)
        t_pack = time.time()
        write_archive(out, members, preset=args.xz_preset, jobs=args.jobs)
        t_pack = time.time() - t_pack
        wheel_bytes = {p.name: downloaded[p.name].stat().st_size for p in packages}
    finally:
        shutil.rmtree(work, ignore_errors=True)

    by_name = {m.arcname: m for m in members}
    rows = sorted(((wheel_bytes[p.name], by_name[f"{TOP}/wheels/{wheels[p.name].name}"].packed,
                    wheels[p.name].name, p) for p in packages), key=lambda r: -r[1])
    print(f"\n{'in bundle':>10} {'wheel':>9}  file (MiB; in bundle: its compressed share; wheel: as downloaded)")
    for got, packed, name, p in rows:
        note = "  [trimmed]" if p.prune else ""
        print(f"{packed / MIB:8.2f} M {got / MIB:7.2f} M  {name}{note}")
    src_bytes = sum(by_name[f"{TOP}/src/{s}"].packed for s in sources)
    print(f"{src_bytes / MIB:8.2f} M {'':9}  src/: lightning_pieg, conf, scripts, tests "
          f"({len(sources)} files, {dirty})")
    print(f"\nbuilt in {time.time() - started:.0f} s (download {t_download:.0f} s, pack {t_pack:.0f} s)")
    fits = check_size(out, int(args.limit_mib * MIB))
    if not fits:
        print("the bundle does not fit: drop an optional package (--exclude av: no DMC-GB videos, no eval videos),"
              " fewer --extras, or use .tar.xz", file=sys.stderr)
        return 1
    unpack = "zipfile" if out.name.endswith(".zip") else "tarfile"
    print(f"on the node: python3 -m {unpack} -e {out.name} . && sh {TOP}/install.sh   (docs/offline_gpu.md)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--python", default=f"{sys.version_info[0]}.{sys.version_info[1]}",
                        help="the node's Python, major.minor (python -c 'import sys; print(sys.version)' there); "
                             "default: this Python's")
    parser.add_argument("--platform", default="manylinux_2_28_x86_64",
                        help="the node's newest manylinux tag (default manylinux_2_28_x86_64: glibc >= 2.28, as "
                             "torch's and mujoco 3.17's wheels need); older tags are accepted too")
    parser.add_argument("--out", default="pieg-offline.tar.xz", help=".tar.xz (default), .tar.gz or .zip")
    parser.add_argument("--extras", default=[], type=lambda s: [x for x in s.split(",") if x],
                        help=f"comma-separated optional parts: {', '.join(EXTRAS)}")
    parser.add_argument("--exclude", default=[], type=lambda s: [x for x in s.split(",") if x],
                        help="comma-separated bundled packages to leave out (e.g. av)")
    parser.add_argument("--pin", default=[], type=lambda s: [x for x in s.split(",") if x],
                        help="comma-separated name==version replacing a bundled version (e.g. for another Python)")
    parser.add_argument("--limit-mib", type=float, default=DEFAULT_LIMIT_MIB, help="fail above this size (64)")
    parser.add_argument("--xz-preset", type=int, default=9, choices=range(10), help="xz level (9)")
    parser.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1),
                        help="wheels compressed at once (each xz -9 job takes ~700 MB of memory)")
    parser.add_argument("--list", action="store_true", help="print the plan (no download) and exit")
    args = parser.parse_args(argv)
    if not re.fullmatch(r"3\.\d{1,2}", args.python):
        parser.error(f"--python {args.python}: give major.minor, e.g. 3.11")
    if args.list:
        for p in plan(tuple(args.extras), tuple(args.exclude), tuple(args.pin)):
            trim = f"  trims {', '.join(p.prune)}" if p.prune else ""
            print(f"{p.name}=={p.version}  [{p.install}] {p.why}{trim}")
        print("not bundled: torch, torchvision, numpy, nvidia-*, triton, cuda-* (on the node); "
              + "; ".join(f"{k} ({v})" for k, v in NOT_BUNDLED.items()))
        return 0
    return build(args)


if __name__ == "__main__":
    sys.exit(main())
