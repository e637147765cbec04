"""Shared fixtures: tiny, seeded configurations that run on one CPU in seconds."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import lightning_pieg  # noqa: F401  (torch before dm_control)

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")

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
