"""Data-parallel training on Lightning's DDP strategy: one agent, one collector and replay per process.

Lightning launches the processes (``trainer.devices=N`` on one machine; ``torchrun`` or SLURM's ``srun`` across
nodes) and owns the process group. What this module adds is the agent's side of it:

* ``ActorCriticDDP``: Lightning's ``DDPStrategy`` with one DDP reducer per optimiser. The critic step (encoder and
  critic) and the actor step are separate backward passes over disjoint parameters, so each gets its own wrapper
  (``PIEGModule.replicate``) and all-reduces exactly its own gradients, in full, before its optimiser steps. One
  wrapper around the whole module would need ``find_unused_parameters=True`` and all-reduce every parameter (zeros
  included: PIE-G's 250 MB head) in both passes.
* BatchNorm policy: no buffer broadcast in the forward (``forward_sync_buffers=False``; DDP syncs them once, at
  construction, when they are still equal). PIE-G's frozen trunk keeps per-process running statistics of the
  observations that process trains on (``encoder.bn=adaptive``); the checkpoint holds rank 0's. SyncBatchNorm is
  never used: its collectives inside the per-process acting would deadlock.
* Seeds: process ``r`` seeds everything (torch, numpy, Python; exploration noise, replay sampling, overlay images)
  with ``seed + RANK_SEED_STRIDE * r`` and its environments with ``env_seeds(seed + RANK_SEED_STRIDE * r, N)``;
  rank 0 keeps the single-process seeds. Evaluation uses ``rollouts.evaluation_seed(seed, r)``.
"""
from __future__ import annotations

import os
from datetime import timedelta

import torch
from pytorch_lightning.strategies import DDPStrategy

RANK_SEED_STRIDE = 1_000_000  # above the environments' stride (1000 per environment), so no two seeds collide


def rank_seed(seed: int, rank: int) -> int:
    """The seed of process ``rank``'s RNGs and training environments (rank 0: ``seed``)."""
    return seed + RANK_SEED_STRIDE * rank


class ActorCriticDDP(DDPStrategy):
    """Lightning's DDP with a reducer per optimiser (see the module docstring) and per-process BatchNorm
    statistics. Everything else (launchers, process group, barriers, checkpoint saving on rank 0) is Lightning's."""

    def __init__(self, timeout_s: float = 1800.0, **kwargs):
        super().__init__(timeout=timedelta(seconds=timeout_s), forward_sync_buffers=False,
                         find_unused_parameters=False, **kwargs)

    def configure_ddp(self) -> None:
        # the LightningModule itself stays unwrapped: Lightning then calls training_step directly, and its
        # pre/post-backward hooks (which expect one DDP wrapper) do nothing
        self.lightning_module.replicate(self._setup_model)


def world_size(trainer_cfg) -> int:
    """Processes a training config asks for: ``devices x num_nodes`` (``devices=auto``: the visible GPUs, or 1)."""
    devices = trainer_cfg.devices
    if devices == "auto":
        devices = max(torch.cuda.device_count(), 1) if trainer_cfg.accelerator in ("gpu", "cuda", "auto") else 1
    return int(devices) * int(trainer_cfg.get("num_nodes", 1))


def use_render_gpu(local_rank: int) -> int | None:
    """Render this process's environments on its own GPU: ``MUJOCO_EGL_DEVICE_ID`` from the local rank (before
    the first render; MuJoCo maps it through ``CUDA_VISIBLE_DEVICES``). None where rendering is not on a GPU."""
    if os.environ.get("MUJOCO_GL") != "egl" or not torch.cuda.is_available():
        return None
    device = local_rank % torch.cuda.device_count()
    os.environ["MUJOCO_EGL_DEVICE_ID"] = str(device)
    return device
