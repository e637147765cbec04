"""Checkpoints and their sidecars: written atomically, found for ``resume=last``, read without running code.

A checkpoint folder holds, per saved frame ``N``::

    frame_<N>.ckpt         Lightning's checkpoint (weights, optimiser and loop state, collector and RNG state)
    frame_<N>.json         the sidecar: frame, MLflow run id, final or not, the resolved training config
    frame_<N>.replay.npz   the replay (only with save_replay, only for periodic checkpoints)
    frame_<N>.rank<r>.pt   under DDP, process r's collector and RNG state (r >= 1; rank 0's is in the .ckpt),
    frame_<N>.rank<r>.replay.npz  and its replay (with save_replay)
    .lock                  held by the run that writes here (``RunLock``; under DDP, ``.lock.rank<r>`` too)

Every read goes through ``read_checkpoint``, which loads with ``weights_only=True`` explicitly, so neither a
crafted file nor ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` can make it unpickle arbitrary objects. Every write goes
through ``atomic_write``: a temporary file in the same folder, ``fsync``, rename, so a crash or a full disk never
leaves a partial checkpoint under a real name and never detours through ``$TMPDIR``.
"""
from __future__ import annotations

import fcntl
import json
import os
import pickle
import shutil
import socket
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, IO

import torch
from lightning_fabric.plugins import CheckpointIO

from lightning_pieg.console import UserError

SIDECAR = ".json"
REPLAY = ".replay.npz"
TMP = ".tmp"
LOCK = ".lock"
PATTERN = "frame_*.ckpt"
MIN_CHECKPOINTS_OF_ROOM = 2
# Sidecar config keys a resumed run must share with its checkpoint: they fix the networks' and the replay's shapes,
# or what is being learned. Anything else (frame budget, evaluation, logging) may change on resume.
MUST_MATCH = ("task", "method", "encoder.name", "frame_stack", "action_repeat", "env.image_size", "feature_dim",
              "hidden_dim", "encoder.arch", "encoder.layer", "encoder.bn", "encoder.head_dim", "nstep", "discount")


class CheckpointError(UserError):
    """A checkpoint that is missing, corrupt, hostile or does not fit the request; the message names the file."""


def checkpoint_path(directory: Path, frame: int) -> Path:
    return Path(directory) / f"frame_{frame:09d}.ckpt"


def sidecar_path(checkpoint: Path) -> Path:
    return Path(checkpoint).with_suffix(SIDECAR)


def replay_path(checkpoint: Path, rank: int = 0) -> Path:
    """Process ``rank``'s replay beside ``checkpoint``."""
    return Path(checkpoint).with_suffix(REPLAY if rank == 0 else f".rank{rank}{REPLAY}")


def rank_state_path(checkpoint: Path, rank: int) -> Path:
    """Process ``rank``'s (>= 1) collector and RNG state beside ``checkpoint``."""
    return Path(checkpoint).with_suffix(f".rank{rank}.pt")


def write_rank_state(checkpoint: Path, rank: int, state: dict) -> Path:
    return atomic_write(rank_state_path(checkpoint, rank), lambda handle: torch.save(state, handle))


def read_rank_state(checkpoint: Path, rank: int) -> dict:
    """Process ``rank``'s state, read without running code; CheckpointError names the missing file."""
    path = rank_state_path(checkpoint, rank)
    if not path.is_file():
        raise CheckpointError(f"{path.name} is missing beside {Path(checkpoint).name}: process {rank}'s state of "
                              f"that DDP run; resume from another checkpoint of the folder.")
    return read_checkpoint(path)


# ------------------------------------------------------------------------------------------------------ writing
def free_bytes(path: Path) -> int:
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Write ``path`` through ``path.tmp`` in the same folder, fsynced, then renamed. A failure removes the
    temporary file, leaves whatever ``path`` was intact and raises one CheckpointError naming the free space."""
    path = Path(path)
    tmp = path.with_name(path.name + TMP)
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"could not write {path} ({error.strerror or error}); {free_bytes(path.parent) / 2**20:,.0f} "
                              f"MiB free there. Free space, or set checkpoint_dir=<a folder with room> (or lower "
                              f"keep_checkpoints); the earlier checkpoints are intact.") from None
    return path


def write_sidecar(checkpoint: Path, meta: dict) -> Path:
    text = json.dumps(meta, indent=1).encode()
    return atomic_write(sidecar_path(checkpoint), lambda handle: handle.write(text))


class SafeCheckpointIO(CheckpointIO):
    """Lightning's checkpoint I/O through ``atomic_write`` and ``read_checkpoint`` (resume included).

    ``preloaded``: a checkpoint already read (safely, up front, by ``plan_resume``), handed to Lightning's resume
    without reading the file a second time."""

    def __init__(self, preloaded: dict[str, dict[str, Any]] | None = None):
        self.preloaded = dict(preloaded or {})

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any = None) -> None:
        atomic_write(Path(path), lambda handle: torch.save(checkpoint, handle))

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        if str(path) in self.preloaded:
            return self.preloaded.pop(str(path))
        return read_checkpoint(path, map_location=map_location)

    def remove_checkpoint(self, path) -> None:
        Path(path).unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------------ reading
def check_checkpoint(path: str | Path) -> Path:
    """Fail fast (before any expensive work) on a missing or corrupt checkpoint file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        with zipfile.ZipFile(path) as archive:
            broken = archive.testzip()
    except (zipfile.BadZipFile, OSError) as error:
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt or not a PyTorch checkpoint ({error}); "
                              f"use an earlier checkpoint from the same folder") from None
    if broken is not None:
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt (member {broken!r} fails its CRC check); "
                              f"use an earlier checkpoint from the same folder")
    return path


def read_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """The checkpoint's contents, loaded with ``weights_only=True``: tensors and plain data only, no code."""
    path = check_checkpoint(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        lines = [line.strip() for line in str(error).splitlines() if "GLOBAL" in line or "Unsupported" in line]
        reason = (lines[0] if lines else "objects other than tensors")[:300]  # not torch's advice to load anyway
        raise CheckpointError(f"refusing to load {str(path)!r}: it holds Python objects that loading would have "
                              f"to execute ({reason}). lightning_pieg checkpoints hold only tensors and plain data; "
                              f"do not use this file.") from None
    except (RuntimeError, EOFError, ValueError) as error:
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be read ({str(error).splitlines()[0][:200]}); use "
                              f"an earlier checkpoint from the same folder") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{str(path)!r} holds a {type(state).__name__}, not a lightning_pieg checkpoint")
    return state


def read_sidecar(checkpoint: Path) -> dict:
    """The sidecar of ``checkpoint``; CheckpointError if it is missing or unreadable."""
    path = sidecar_path(checkpoint)
    if not path.is_file():
        raise CheckpointError(f"{str(checkpoint)!r} has no {path.name} beside it; it holds the training config "
                              f"(task, seed, environment options). Copy it from the checkpoint's folder.")
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{str(path)!r} is unreadable ({error}); use an earlier checkpoint") from None
    if not isinstance(meta, dict) or "task" not in meta.get("config", {}):
        raise CheckpointError(f"{str(path)!r} holds no training config; use the file training wrote beside "
                              f"{Path(checkpoint).name}.")
    return meta


def sidecars(directory: Path, warn: Callable[[str], None] = print) -> list[tuple[Path, dict]]:
    """(checkpoint, sidecar) of every checkpoint in ``directory`` that has both, oldest first; an unreadable
    sidecar is skipped with a warning, so one damaged old file does not block the newer ones."""
    found = []
    for checkpoint in sorted(Path(directory).glob(PATTERN)):
        try:
            found.append((checkpoint, read_sidecar(checkpoint)))
        except CheckpointError as error:
            warn(f"skipping {checkpoint.name}: {error}")
    return found


def newest_resumable(directory: Path, warn: Callable[[str], None] = print) -> tuple[Path, dict] | None:
    resumable = [(path, meta) for path, meta in sidecars(directory, warn) if not meta.get("final")]
    return resumable[-1] if resumable else None


def finished_run(directory: Path, warn: Callable[[str], None] = print) -> tuple[Path, dict] | None:
    """The final checkpoint, if it is the newest one: the run in ``directory`` has spent its frame budget."""
    found = sidecars(directory, warn)
    return found[-1] if found and found[-1][1].get("final") else None


@dataclass
class Resume:
    """A checked ``resume=`` request: the checkpoint, its sidecar, and the settings the new request changes."""

    path: Path
    meta: dict
    changes: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict, repr=False)  # the checkpoint, read with weights_only

    @property
    def frame(self) -> int:
        return int(self.meta.get("frame", 0))


class RunFinished(Exception):
    """``resume=last`` where the run has already spent its frame budget."""


def plan_resume(request: str | None, directory: Path, config: dict, warn: Callable[[str], None] = print
                ) -> Resume | None:
    """``resume=last`` is the newest resumable checkpoint in ``directory`` (``RunFinished`` if the newest one is
    the final checkpoint); a path is taken as given. The checkpoint's recorded config must match ``config`` where
    shapes or the task are concerned (``compare_configs``)."""
    if request in (None, "", "none"):
        return None
    if request == "last":
        finished = finished_run(directory, warn)
        if finished is not None:
            raise RunFinished(f"the run in {directory} is finished: {finished[0].name} is its final checkpoint "
                              f"(frame {finished[1].get('frame', '?'):,}); nothing to resume. Evaluate it with "
                              f"python -m lightning_pieg.evaluate checkpoint={finished[0]}")
        found = newest_resumable(directory, warn)
        if found is None:
            raise CheckpointError(f"resume=last: no resumable checkpoint in {directory}; pass resume=<path>.")
        path = found[0]
    else:
        path = Path(request)
    try:
        check_checkpoint(path)
    except CheckpointError as error:
        raise CheckpointError(f"resume={request!r}: {error}") from None
    meta = read_sidecar(path) if sidecar_path(path).is_file() else {}
    if meta.get("final"):
        raise CheckpointError(f"resume={request!r}: {path.name} is a final, weights-only checkpoint; resume from a "
                              f"periodic one (resume=last picks the newest).")
    changes = compare_configs(meta.get("config", {}), config, path)
    saved_world, world = int(meta.get("world_size", 1)), int(config.get("world_size", 1))
    if saved_world != world:
        raise CheckpointError(f"resume={request!r}: {path.name} was written by {saved_world} DDP process(es), this run "
                              f"has {world}; each process resumes its own environments and replay, so resume with "
                              f"{saved_world} (trainer.devices x trainer.num_nodes = {saved_world}).")
    missing = [rank_state_path(path, rank).name for rank in range(1, world)
               if not rank_state_path(path, rank).is_file()]
    if missing:
        raise CheckpointError(f"resume={request!r}: {', '.join(missing)} missing beside {path.name}; resume from "
                              f"another checkpoint of {path.parent}.")
    return Resume(path, meta, changes, read_checkpoint(path))  # read now: a hostile file stops the run here


# --------------------------------------------------------------------------------------------------- comparing
def _get(config: dict, dotted: str) -> Any:
    value: Any = config
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _flat(config: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def compare_configs(saved: dict, requested: dict, checkpoint: Path) -> dict[str, tuple[Any, Any]]:
    """Raise CheckpointError if a ``MUST_MATCH`` key differs; return the other changes as ``{key: (old, new)}``.
    A config saved before methods existed (``agent=``) is compared in today's layout (``legacy.upgrade_config``)."""
    from lightning_pieg.legacy import upgrade_config

    saved = upgrade_config(saved)
    for key in MUST_MATCH:
        old, new = _get(saved, key), _get(requested, key)
        if old is not None and old != new:
            raise CheckpointError(f"resume={checkpoint}: the checkpoint was trained with {key}={old!r}, this run asks "
                                  f"for {key}={new!r}; resume with {key}={old!r}, or start a new run (another "
                                  f"checkpoint_dir or seed).")
    def environments(config: dict) -> int:  # collector.num_envs=0 (and checkpoints before it) is one environment
        return max(int(_get(config, "collector.num_envs") or 0), 1)

    if saved and environments(saved) != environments(requested):
        raise CheckpointError(f"resume={checkpoint}: the checkpoint's collector ran {environments(saved)} "
                              f"environment(s), this run asks for {environments(requested)}; resume with "
                              f"collector.num_envs={_get(saved, 'collector.num_envs') or 0}.")
    ignored = ("resume", "frames", "world_size")
    old_flat, new_flat = _flat(saved), _flat(requested)
    return {key: (old_flat.get(key), value) for key, value in new_flat.items()
            if key not in ignored and key in old_flat and old_flat[key] != value}


# ------------------------------------------------------------------------------------------------- the folder
def check_directory(directory: Path, checkpoint_bytes: int) -> None:
    """The folder exists or can be made, is writable and has room for ``MIN_CHECKPOINTS_OF_ROOM`` checkpoints."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write_probe_{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as error:
        raise CheckpointError(f"checkpoint_dir={str(directory)!r} is not writable ({error.strerror or error}); "
                              f"set checkpoint_dir=<a writable folder>.") from None
    needed, free = MIN_CHECKPOINTS_OF_ROOM * checkpoint_bytes, free_bytes(directory)
    if free < needed:
        raise CheckpointError(f"checkpoint_dir={str(directory)!r} has {free / 2**20:,.0f} MiB free; this agent's "
                              f"checkpoints need about {checkpoint_bytes / 2**20:,.0f} MiB each and the run needs room "
                              f"for {MIN_CHECKPOINTS_OF_ROOM}. Free space or set checkpoint_dir=<a folder with room>.")


def clean_leftovers(directory: Path) -> list[Path]:
    """Remove what an interrupted save left: temporary files, and sidecars or replays whose checkpoint is gone."""
    directory = Path(directory)
    removed = [path for path in directory.glob(f"*{TMP}*") if path.is_file()]
    for path in directory.glob("frame_*"):
        stem = path.name.split(".")[0]
        if not path.name.endswith(".ckpt") and not (directory / f"{stem}.ckpt").is_file():
            removed.append(path)  # a sidecar, replay or process state whose checkpoint is gone
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


def checkpoint_bytes(module: torch.nn.Module, replay_bytes: int = 0) -> int:
    """About the size of a full checkpoint: every parameter and buffer, plus two Adam moments per trained
    parameter, plus the replay when it is saved beside it."""
    tensors = sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])
    moments = sum(2 * p.numel() * 4 for p in module.parameters() if p.requires_grad)
    return tensors + moments + replay_bytes


class RunLock:
    """One run per checkpoint folder: an exclusive ``flock`` on ``<folder>/.lock``, which holds the owner's pid.

    The kernel releases the lock when its process dies, so a stale lock file of a dead run is simply taken over.
    Under DDP every process holds its own (``.lock.rank<r>``), so a second job fails on every process at once.
    """

    def __init__(self, directory: Path, rank: int = 0):
        self.path = Path(directory) / (LOCK if rank == 0 else f"{LOCK}.rank{rank}")
        self._handle: IO[str] | None = None
        self.stale_owner: str | None = None  # what a dead run's lock file said, when this run took it over

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "another process"
            handle.close()
            raise CheckpointError(f"checkpoint_dir={str(self.path.parent)!r} is in use by {owner}; wait for that run "
                                  f"to end, or give this one its own folder (checkpoint_dir=... or another seed)."
                                  ) from None
        handle.seek(0)
        self.stale_owner = handle.read().strip() or None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
        handle.flush()
        self._handle = handle
        return self

    def release(self) -> None:
        if self._handle is not None:
            self._handle.seek(0)
            self._handle.truncate()
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()
