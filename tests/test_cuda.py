"""The learner on a CUDA device: updates, acting, and a checkpoint trained there that acts the same on the CPU.

Skipped where torch sees no CUDA device (CI); run ``python -m pytest tests/test_cuda.py`` on a GPU machine.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from lightning_pieg.module import PIEGModule
from lightning_pieg.policy import load_module
from test_encoders import OBS, RandomBatches, bn_buffers

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def small_module(agent: str) -> PIEGModule:
    pl.seed_everything(0, verbose=False)
    return PIEGModule(OBS, 2, agent=agent, feature_dim=8, hidden_dim=16, num_expl_steps=0,
                      encoder={"layer": 2, "bn": "adaptive", "head_dim": 16})


class Devices(pl.Callback):
    """Where the parameters and the losses lived during the updates (Lightning moves the module back afterwards)."""

    def __init__(self):
        self.seen: set[str] = set()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if outputs:
            self.seen |= {p.device.type for p in pl_module.parameters()} | {outputs["critic_loss"].device.type}


def fit_on_gpu(module: PIEGModule, updates: int, tmp_path, devices: Devices | None = None) -> pl.Trainer:
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="gpu", devices=1, default_root_dir=tmp_path,
                         callbacks=[devices] if devices else None)
    trainer.fit(module, DataLoader(RandomBatches(updates), batch_size=None))
    return trainer


@pytest.mark.parametrize("agent", ["pieg", "drqv2"])
def test_updates_on_the_gpu_train_what_they_should(agent, tmp_path):
    module = small_module(agent)
    actor_before = copy.deepcopy(module.actor.state_dict())
    if agent == "pieg":
        trunk_before = {k: v.clone() for k, v in module.encoder.trunk.named_parameters()}
        stats_before = bn_buffers(module)
    devices = Devices()
    fit_on_gpu(module, updates=4, tmp_path=tmp_path, devices=devices)
    assert devices.seen == {"cuda"}
    assert all(np.isfinite(v) for v in module.last_metrics.values())
    assert any(not torch.equal(v, module.actor.state_dict()[k].cpu()) for k, v in actor_before.items())
    if agent == "pieg":
        for name, param in module.encoder.trunk.named_parameters():
            assert torch.equal(param.cpu(), trunk_before[name]), name  # the trunk stays frozen on the GPU too
        stats_after = bn_buffers(module)
        assert all(not torch.equal(stats_after[k].cpu(), v) for k, v in stats_before.items())  # BN keeps adapting


def test_a_checkpoint_trained_on_the_gpu_acts_the_same_on_the_cpu(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # TF32 convolutions would differ by ~1e-3
    module = small_module("pieg")
    trainer = fit_on_gpu(module, updates=3, tmp_path=tmp_path)
    path = tmp_path / "gpu.ckpt"
    trainer.save_checkpoint(path)
    observations = torch.randint(0, 256, (4, *OBS), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)

    on_gpu = load_module(path, device="cuda")
    on_cpu = load_module(path, device="cpu")
    for obs in observations.numpy():
        gpu_action = on_gpu.act(obs, step=0, explore=False)
        assert isinstance(gpu_action, np.ndarray) and gpu_action.shape == (2,)
        np.testing.assert_allclose(gpu_action, on_cpu.act(obs, step=0, explore=False), atol=1e-4)
    batch_gpu = on_gpu.act_batch(observations.cuda(), per_observation_bn=True).cpu()
    batch_cpu = on_cpu.act_batch(observations, per_observation_bn=True)
    torch.testing.assert_close(batch_gpu, batch_cpu, atol=1e-4, rtol=1e-4)
