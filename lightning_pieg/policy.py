"""The bridge from a trained module to the environment side: plain ``act`` functions, and loading a trained agent
from a checkpoint for people who only want to act with it."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from lightning_pieg.checkpoints import CheckpointError, read_checkpoint
from lightning_pieg.module import PIEGModule

BatchPolicy = Callable[[np.ndarray], np.ndarray]
"""``(B, *obs_shape)`` uint8 observations -> ``(B, action_dim)`` mean actions."""


def mean_action_policy(module: PIEGModule, per_observation_bn: bool = False) -> BatchPolicy:
    """Deterministic (mean) actions for a batch of observations in one encoder pass, with the encoder's running
    BatchNorm statistics or (``per_observation_bn``) each observation's own."""
    def act(observations: np.ndarray) -> np.ndarray:
        batch = torch.as_tensor(observations, device=module.device)
        return module.act_batch(batch, per_observation_bn=per_observation_bn).cpu().numpy()

    return act


def one_at_a_time(policy: BatchPolicy) -> Callable[[np.ndarray], np.ndarray]:
    """``act(observation) -> action`` for one observation, from a batched policy."""
    return lambda observation: policy(np.asarray(observation)[None])[0]


def load_module(checkpoint: str | Path, device: str = "cpu") -> PIEGModule:
    """The trained module, rebuilt from the checkpoint's hyperparameters: its method's encoder (``encoder.name``;
    a checkpoint from before methods names it by ``agent``, see ``legacy``) and sizes. A frozen trunk comes from
    the checkpoint, so no weights are downloaded."""
    state = read_checkpoint(checkpoint, map_location=device)
    if "hyper_parameters" not in state or "state_dict" not in state:
        raise CheckpointError(f"{str(checkpoint)!r} is not a lightning_pieg training checkpoint")
    try:
        module = PIEGModule(**state["hyper_parameters"])
        module.load_state_dict(state["state_dict"])
    except (TypeError, RuntimeError, ValueError) as error:
        raise CheckpointError(f"{str(checkpoint)!r} does not fit this version's networks "
                              f"({str(error).splitlines()[0][:200]})") from None
    return module.to(device).eval()


def load_policy(checkpoint: str | Path, device: str = "cpu") -> Callable[[np.ndarray], np.ndarray]:
    """``act(observation) -> action``: the deterministic (mean) action for one uint8 observation of the shape the
    network was trained on (``(9, 84, 84)`` by default), with the encoder's running BatchNorm statistics."""
    module = load_module(checkpoint, device)
    expected = tuple(module.hparams.obs_shape)
    act_one = one_at_a_time(mean_action_policy(module))

    def act(observation: np.ndarray) -> np.ndarray:
        observation = np.asarray(observation)
        if observation.shape != expected or observation.dtype != np.uint8:
            raise ValueError(f"this policy takes uint8 observations of shape {expected} ({expected[0] // 3} stacked "
                             f"RGB frames, channels first); got {observation.dtype} {observation.shape}.")
        return act_one(observation)

    act.module = module  # for those who want the networks
    return act
