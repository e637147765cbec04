"""Shared fixtures: tiny, seeded configurations that run on one CPU in seconds."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
import torch

import lightning_pieg  # noqa: F401  (torch before dm_control)

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def load_script(name: str, module_name: str | None = None) -> ModuleType:
    """``scripts/<name>.py`` imported as a module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(module_name or name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

# A PIE-G run small enough for CI: random frozen weights, narrow heads, short cartpole episodes (50 agent steps).
TINY = [
    "task=cartpole_balance", "encoder.weights=none", "encoder.head_dim=32", "hidden_dim=32", "feature_dim=16",
    "batch_size=4", "num_seed_frames=40", "num_expl_steps=10", "env.time_limit=1", "num_eval_episodes=0",
    "save_video=false", "trainer.log_every_n_updates=1",
]


@pytest.fixture
def compose(tmp_path: Path):
    """``compose(*overrides)`` -> the resolved config, with checkpoints and MLflow kept in ``tmp_path``."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    def _compose(*overrides: str):
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return hydra_compose("config", overrides=[
                *TINY, f"checkpoint_dir={tmp_path / 'checkpoints'}",
                f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", *overrides])

    return _compose


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread: two OpenMP threads on two busy cores make tiny forward passes several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """Synthetic DMC-GB data (colour files, ten 3-frame video_easy videos), as the DMC-GB tests write it."""
    from test_dmcgb import make_data_dir

    return make_data_dir(tmp_path_factory.mktemp("dmcgb"), video_modes=("video_easy",))


class OutputProcess:
    """``command`` in a subprocess whose output a thread reads, so that every wait times out instead of hanging."""

    def __init__(self, command: list[str], cwd: Path):
        import os
        import queue
        import subprocess
        import threading

        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd,
                                        env={**os.environ, "MUJOCO_GL": "egl", "OMP_NUM_THREADS": "1"})
        self.lines: list[str] = []
        self._queue: queue.Queue = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def _read(self) -> None:
        for line in self.process.stdout:
            self._queue.put(line)

    def _drain(self) -> None:
        while not self._queue.empty():
            self.lines.append(self._queue.get())

    def wait_for(self, text: str, timeout: float) -> None:
        """Read output until a line contains ``text``; fail (the process killed) after ``timeout`` seconds."""
        import queue
        import time

        deadline = time.monotonic() + timeout
        while not (self.lines and text in self.lines[-1]):
            try:
                self.lines.append(self._queue.get(timeout=max(deadline - time.monotonic(), 0.01)))
            except queue.Empty:
                self.process.kill()
                pytest.fail(f"no line with {text!r} within {timeout} s:\n{''.join(self.lines)}")

    def finish(self, timeout: float) -> int:
        """Wait for the exit (the process killed after ``timeout`` seconds); returns its exit status."""
        import subprocess

        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            pytest.fail(f"still running after {timeout} s:\n{''.join(self.lines)}")
        self._reader.join(timeout=10)
        self._drain()
        return self.process.returncode


class TrainingProcess(OutputProcess):
    """``python -m lightning_pieg.train`` (the ``TINY`` config plus ``overrides``, everything kept in ``folder``)."""

    def __init__(self, folder: Path, *overrides: str):
        import sys

        super().__init__([sys.executable, "-m", "lightning_pieg.train", *TINY, f"checkpoint_dir={folder / 'checkpoints'}",
                          f"mlflow.tracking_uri=sqlite:///{folder / 'mlflow.db'}", f"hydra.run.dir={folder / 'out'}",
                          *overrides], cwd=folder)
