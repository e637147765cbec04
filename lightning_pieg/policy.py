"""Load a trained agent from a checkpoint for people who only want to act with it."""
from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from lightning_pieg.module import PIEGModule


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated or not one of ours; the message names the file."""


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
                              f"use an earlier checkpoint from the same folder") from error
    if broken is not None:
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt (member {broken!r} fails its CRC check); "
                              f"use an earlier checkpoint from the same folder")
    return path


def load_module(checkpoint: str | Path, device: str = "cpu") -> PIEGModule:
    """The trained module; its frozen trunk comes from the checkpoint, so no weights are downloaded."""
    path = check_checkpoint(checkpoint)
    state = torch.load(path, map_location=device, weights_only=False)
    if "hyper_parameters" not in state or "state_dict" not in state:
        raise CheckpointError(f"{str(path)!r} is not a lightning_pieg training checkpoint")
    module = PIEGModule(**state["hyper_parameters"])
    module.load_state_dict(state["state_dict"])
    return module.to(device).eval()


def load_policy(checkpoint: str | Path, device: str = "cpu") -> Callable[[np.ndarray], np.ndarray]:
    """``act(observation) -> action``: the deterministic (mean) action for one uint8 ``(9, 84, 84)`` observation,
    with the encoder's running BatchNorm statistics."""
    module = load_module(checkpoint, device)

    def act(observation: np.ndarray) -> np.ndarray:
        return module.act(observation, step=0, explore=False)

    act.module = module  # for those who want the networks
    return act
