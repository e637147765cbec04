"""scripts/bundle_offline.py: the offline bundle for GPU nodes that have torch and nothing else (docs/offline_gpu.md).

The fast tests below need neither the network nor pip's index: the package plan, the platform tags, the size
limit, the wheel trimming (a synthetic wheel, installed by pip from a folder), the archive formats and install.sh.

The full test builds the real bundle (about 3 minutes on two cores, nearly all of it xz) and installs it into a
CLEAN virtual environment that has only torch. It runs when LP_BUNDLE_TEST is set: LP_BUNDLE_TEST=1 builds the
bundle, LP_BUNDLE_TEST=/path/to/pieg-offline.tar.xz tests one already built.
"""
from __future__ import annotations

import base64
import hashlib
import csv
import importlib.metadata as metadata
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import bundle_offline as bo  # noqa: E402

NODE_PACKAGES = ("torch", "torchvision", "torchaudio", "numpy", "triton", "nvidia-cudnn-cu13", "nvidia-nccl-cu13",
                 "cuda-toolkit", "mlflow")


def names(packages) -> set[str]:
    return {bo.canonical(p.name) for p in packages}


# ---------------------------------------------------------------------------------------------------- the plan

@pytest.mark.parametrize("extras", [(), tuple(bo.EXTRAS)])
def test_the_plan_never_bundles_what_the_node_has(extras):
    packages = bo.plan(extras)
    assert not names(packages) & {bo.canonical(n) for n in NODE_PACKAGES}
    assert all(not bo.EXCLUDED.match(n) for n in names(packages))
    for name in NODE_PACKAGES:
        assert bo.EXCLUDED.match(bo.canonical(name)), name


def test_the_plan_pins_the_tested_simulator_and_holds_the_training_stack():
    packages = {bo.canonical(p.name): p for p in bo.plan()}
    assert packages["mujoco"].version == "3.17.0" and packages["mujoco"].install == "pin"
    assert packages["dm-control"].version == "1.0.50" and packages["dm-control"].install == "pin"
    for needed in ("hydra-core", "omegaconf", "antlr4-python3-runtime", "pytorch-lightning", "lightning-utilities",
                   "torchmetrics", "pyyaml", "packaging", "tqdm", "fsspec", "typing-extensions", "dm-env", "absl-py",
                   "lxml", "pyopengl", "scipy", "av"):
        assert needed in packages, needed
    assert packages["antlr4-python3-runtime"].sdist_only  # 4.9.3 has no wheel on PyPI
    for pruned in ("labmaze", "protobuf", "requests", "matplotlib", "mlflow"):
        assert pruned not in packages, pruned


def test_extras_and_exclusions():
    assert "matplotlib" in names(bo.plan(("matplotlib",)))
    assert "pytest" in names(bo.plan(("test",)))
    assert "av" not in names(bo.plan(exclude=("av",)))
    dm = {bo.canonical(p.name): p for p in bo.plan(("dog",))}["dm-control"]
    assert bo.DOG_ASSETS not in dm.prune and "dm_control/locomotion/" in dm.prune
    with pytest.raises(SystemExit, match="unknown extra"):
        bo.plan(("mlflow",))
    with pytest.raises(SystemExit, match="not a bundled package"):
        bo.plan(exclude=("torch",))
    scipy = {bo.canonical(p.name): p for p in bo.plan(pins=("scipy==1.16.3",))}["scipy"]
    assert scipy.version == "1.16.3"
    with pytest.raises(SystemExit, match="not in the bundle"):
        bo.plan(pins=("torch==2.0.0",))


def test_platform_tags_reach_down_to_older_glibc_wheels():
    tags = bo.platform_tags("manylinux_2_28_x86_64")
    assert tags[0] == "manylinux_2_28_x86_64"
    assert {"manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64"} <= set(tags)
    old = bo.platform_tags("manylinux2014_x86_64")
    assert "manylinux_2_17_x86_64" in old and "manylinux_2_28_x86_64" not in old
    assert bo.platform_tags("linux_aarch64") == ["linux_aarch64"]


def test_list_prints_the_plan_without_downloading(capsys):
    assert bo.main(["--list", "--python", "3.11"]) == 0
    out = capsys.readouterr().out
    assert "mujoco==3.17.0" in out and "not bundled: torch" in out


def test_python_must_be_major_minor():
    with pytest.raises(SystemExit):
        bo.main(["--python", "3.11.7", "--list"])


# ---------------------------------------------------------------------------------------------------- the size limit

def test_the_size_check_fails_on_an_over_size_folder(tmp_path, capsys):
    big = tmp_path / "big"
    big.mkdir()
    for i in range(3):  # sparse files: 66 MiB apparent, nothing on disk
        with open(big / f"part{i}.whl", "wb") as f:
            f.truncate(22 * bo.MIB)
    assert not bo.check_size(big)
    assert "TOO BIG" in capsys.readouterr().out
    small = tmp_path / "small.tar.xz"
    small.write_bytes(b"x" * 1000)
    assert bo.check_size(small)
    assert bo.check_size(big, limit=70 * bo.MIB)


# ---------------------------------------------------------------------------------------------------- wheels

def record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def make_wheel(folder: Path, compression=zipfile.ZIP_DEFLATED) -> Path:
    """A tiny valid wheel: package ``toypkg`` with a big ``assets/`` folder to trim."""
    files = {
        "toypkg/__init__.py": b"VALUE = 42\n",
        "toypkg/assets/mesh.stl": b"\0" * 5000,
        "toypkg/assets/more/texture.png": b"\1" * 3000,
        "toypkg-1.2.dist-info/METADATA": b"Metadata-Version: 2.1\nName: toypkg\nVersion: 1.2\n"
                                         b"Requires-Dist: numpy>=1.20\nRequires-Dist: attrs>=18 ; extra == 'x'\n",
        "toypkg-1.2.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                      b"Tag: py3-none-any\n",
    }
    wheel = folder / "toypkg-1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", compression) as z:
        rows = []
        for name, data in files.items():
            z.writestr(name, data)
            rows.append((name, record_hash(data), str(len(data))))
        rows.append(("toypkg-1.2.dist-info/RECORD", "", ""))
        text = io.StringIO()
        csv.writer(text, lineterminator="\n").writerows(rows)
        z.writestr("toypkg-1.2.dist-info/RECORD", text.getvalue())
    return wheel


def test_a_trimmed_wheel_is_versioned_slim_with_a_consistent_record_and_installs(tmp_path):
    wheel = make_wheel(tmp_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    slim = bo.rewrite_wheel(wheel, out_dir, prune=("toypkg/assets/",), stored=True)
    assert slim.name == "toypkg-1.2+slim-py3-none-any.whl"
    with zipfile.ZipFile(slim) as z:
        listed = z.namelist()
        assert not [n for n in listed if n.startswith("toypkg/assets/")]
        assert all(i.compress_type == zipfile.ZIP_STORED for i in z.infolist())
        assert b"Version: 1.2+slim" in z.read("toypkg-1.2+slim.dist-info/METADATA")
        assert b"toypkg/assets/" in z.read("toypkg-1.2+slim.dist-info/TRIMMED")
        rows = list(csv.reader(io.StringIO(z.read("toypkg-1.2+slim.dist-info/RECORD").decode())))
        assert {r[0] for r in rows} == set(listed)
        for name, digest, size in rows:
            if digest:
                assert digest == record_hash(z.read(name)) and int(size) == len(z.read(name))
    with pytest.raises(SystemExit, match="out of date"):
        bo.rewrite_wheel(wheel, out_dir, prune=("toypkg/gone/",))
    # pip takes it, offline, from a folder (as install.sh does)
    target = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--quiet",
                           "--disable-pip-version-check", "--target", str(target), "--find-links", str(out_dir),
                           "toypkg==1.2+slim"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (target / "toypkg" / "__init__.py").read_text() == "VALUE = 42\n"
    assert not (target / "toypkg" / "assets").exists()


def test_requirement_lines_pin_or_keep_within_what_the_bundle_declares(tmp_path):
    wheel = make_wheel(tmp_path)
    packages = [bo.Pkg("toypkg", "1.2", "pin", "test")]
    lines, needs, tested = bo.requirement_lines(packages, {"toypkg": wheel}, "3.11", ROOT)
    assert lines == ["toypkg==1.2"]
    assert needs["numpy"] == ">=1.20"  # the wheel's numpy floor: check.py fails on an older numpy
    assert "==" in tested["torch"]  # setup.py's tested torch: check.py only notes a different one
    keep = [bo.Pkg("toypkg", "1.2", "keep", "test")]
    assert bo.requirement_lines(keep, {"toypkg": wheel}, "3.11", ROOT)[0] == ["toypkg"]
    assert not [r for r in bo.wheel_requirements(wheel, "3.11") if r.name == "attrs"]  # an extra's: not needed


def test_the_project_source_holds_the_package_and_its_hydra_configs():
    files = {str(p) for p in bo.source_files(ROOT)}
    assert "lightning_pieg/train.py" in files and "conf/config.yaml" in files and "setup.py" in files
    assert "scripts/bundle_offline.py" in files
    assert not [f for f in files if f.endswith((".pyc", ".png")) or f.startswith((".venv", "mlruns"))]


# ---------------------------------------------------------------------------------------------------- the archive

@pytest.mark.parametrize("suffix", [".tar.xz", ".tar.gz", ".zip"])
def test_archives_unpack_whole_and_account_every_member(tmp_path, suffix):
    members = [bo.Member(f"{bo.TOP}/wheels/a.whl", os.urandom(3000)),
               bo.Member(f"{bo.TOP}/install.sh", b"#!/bin/sh\necho hi\n", mode=0o755),
               bo.Member(f"{bo.TOP}/src/conf/config.yaml", b"a: 1\n" * 200)]
    out = tmp_path / f"bundle{suffix}"
    bo.write_archive(out, members, preset=1, jobs=2)
    if suffix == ".zip":
        with zipfile.ZipFile(out) as z:
            assert z.read(f"{bo.TOP}/install.sh") == members[1].data
        return
    assert sum(m.packed for m in members) < out.stat().st_size  # + the end-of-archive stream
    with tarfile.open(out) as tar:  # one stream per member, concatenated: read as one archive
        assert tar.getnames() == [m.arcname for m in members]
        assert tar.extractfile(f"{bo.TOP}/wheels/a.whl").read() == members[0].data
        assert tar.getmember(f"{bo.TOP}/install.sh").mode == 0o755
    if shutil.which("tar") and (suffix == ".tar.gz" or shutil.which("xz")):
        listed = subprocess.run(["tar", "-tf", str(out)], capture_output=True, text=True, check=True).stdout
        assert listed.split() == [m.arcname for m in members]


def test_install_sh_is_valid_sh_and_offline():
    script = bo.INSTALL_SH.replace("@PYTHON@", "3.11")
    assert subprocess.run(["sh", "-n"], input=script, text=True).returncode == 0
    assert "--no-index --no-deps" in script and "WANT=3.11" in script
    compile(bo.CHECK_PY, "check.py", "exec")


# ---------------------------------------------------------------------------------------------------- the real thing

def torch_only_folder(dest: Path) -> Path:
    """A folder of symlinks to torch, torchvision, numpy and their own dependencies (pillow, nvidia-*, triton,
    sympy, ...) and nothing else, taken from the environment running the tests.

    Why: a venv made with --system-site-packages would see everything installed here (hydra, mujoco, mlflow...),
    and `pip install torch` into a fresh venv needs the network and gigabytes. A plain venv plus a .pth file naming
    this folder sees exactly what an offline GPU node has: the folder's *.dist-info entries make pip and
    importlib.metadata treat those packages as installed, and nothing else leaks in.
    """
    from packaging.requirements import Requirement

    dest.mkdir(parents=True)
    seen: dict[str, tuple[metadata.Distribution, set[str]]] = {}

    def walk(name: str, extras: frozenset[str] = frozenset()) -> None:
        key = bo.canonical(name)
        dist = metadata.distribution(name)
        if key in seen and extras <= seen[key][1]:
            return
        seen.setdefault(key, (dist, set()))[1].update(extras)
        for line in dist.requires or []:
            req = Requirement(line)
            envs = [{"extra": e} for e in ["", *sorted(seen[key][1])]]
            if req.marker is None or any(req.marker.evaluate(env) for env in envs):
                walk(req.name, frozenset(req.extras))

    for root in ("torch", "torchvision", "numpy"):
        walk(root)
    for dist, _ in seen.values():
        for file in dist.files or []:
            top = file.parts[0]
            if top == ".." or top.endswith(".pth") or top == "__pycache__":  # scripts in bin/, nested .pth files
                continue
            link = dest / top
            if not link.exists():
                link.symlink_to(dist.locate_file(top))
    return dest


def clean_venv(where: Path) -> Path:
    """A plain venv (no system site-packages) that imports torch only through ``torch_only_folder``."""
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(where / "venv")], check=True)
    python = where / "venv" / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / "torch-only.pth").write_text(f"{torch_only_folder(where / 'torch-only')}\n")
    return python


def offline_env(**extra: str) -> dict[str, str]:
    """No pip configuration (this machine's names local indexes and wheel folders) and EGL rendering."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON", "VIRTUAL_ENV"))}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="1", MUJOCO_GL="egl", **extra)
    return env


ONE_LINER = ("import lightning_pieg, hydra, omegaconf, pytorch_lightning, torchmetrics; from dm_control import suite; "
             "env = suite.load('cartpole','balance'); env.reset(); print(env.physics.render(84,84).shape)")


@pytest.mark.skipif(not os.environ.get("LP_BUNDLE_TEST"),
                    reason="builds the real bundle (~3 min of xz); set LP_BUNDLE_TEST=1 (or =path/to/bundle)")
def test_the_bundle_fits_and_installs_into_a_torch_only_venv(tmp_path):
    given = os.environ["LP_BUNDLE_TEST"]
    if given not in ("1", "true", "yes"):
        bundle = Path(given)
    else:
        bundle = tmp_path / "pieg-offline.tar.xz"
        done = subprocess.run([sys.executable, str(ROOT / "scripts" / "bundle_offline.py"), "--out", str(bundle),
                               "--python", f"{sys.version_info[0]}.{sys.version_info[1]}"],
                              capture_output=True, text=True)
        print(done.stdout[-4000:], done.stderr[-2000:])
        assert done.returncode == 0
    assert bundle.stat().st_size < 64 * bo.MIB
    with tarfile.open(bundle) as tar:
        names = tar.getnames()
        assert not [n for n in names if re.search(r"/wheels/(torch|torchvision|numpy|nvidia_\w+|triton|mlflow\w*)-", n)]
        kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(tmp_path / "unpacked", **kwargs)
    python = clean_venv(tmp_path)
    env = offline_env()
    before = subprocess.run([str(python), "-c", "import torch, torchvision, numpy, PIL\n"
                             "for gone in ('hydra', 'mujoco', 'dm_control', 'pytorch_lightning', 'mlflow', 'yaml'):\n"
                             "    try: __import__(gone)\n    except ImportError: pass\n"
                             "    else: raise SystemExit(gone + ' leaked into the clean venv')"],
                            capture_output=True, text=True, env=env)
    assert before.returncode == 0, before.stdout + before.stderr

    install = subprocess.run(["sh", str(tmp_path / "unpacked" / bo.TOP / "install.sh")], capture_output=True,
                             text=True, env={**env, "PYTHON": str(python)})
    print(install.stdout[-3000:], install.stderr[-3000:])
    assert install.returncode == 0
    assert "rendered (84, 84, 3)" in install.stdout

    run = subprocess.run([str(python), "-c", ONE_LINER], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().endswith("(84, 84, 3)")
    probe = ("import lightning_pieg, lightning_pieg.envs, lightning_pieg.module, lightning_pieg.train\n"
             "from lightning_pieg import envs\n"
             "env = envs.make('cartpole_balance', 'train', 0, time_limit=1); print(env.reset().observation.shape)\n"
             "import importlib.util; print('mlflow', importlib.util.find_spec('mlflow'))")
    run = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "(9, 84, 84)" in run.stdout and "mlflow None" in run.stdout  # training code imports; MLflow is absent
