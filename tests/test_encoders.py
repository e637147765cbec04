"""The frozen ResNet encoder: shapes, frozen trunk, BatchNorm modes, input normalisation, weights files."""
from __future__ import annotations

import copy

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, IterableDataset
from torchvision import models

from lightning_pieg.encoders import (AdaptiveBatchNorm2d, EncoderConfigError, FrozenResNetEncoder, imagenet_mean_std,
                                     load_weights)
from lightning_pieg.module import PIEGModule

OBS = (9, 84, 84)


@pytest.mark.parametrize("layer, channels, side", [(1, 64, 21), (2, 128, 11), (3, 256, 6), (4, 512, 3)])
def test_output_shapes_per_layer(layer, channels, side):
    torch.manual_seed(0)
    encoder = FrozenResNetEncoder(OBS, layer=layer, head_dim=16)
    fused = encoder.trunk_features(torch.rand(2, *OBS) * 255)
    # newer two frames + their two differences, each a layer-N feature map
    assert fused.shape == (2, 4, channels, side, side)
    assert encoder.flat_dim == 4 * channels * side * side
    assert encoder(torch.rand(2, *OBS) * 255).shape == (2, 16)


def test_fusion_is_newer_frames_and_their_differences():
    torch.manual_seed(0)
    encoder = FrozenResNetEncoder(OBS, layer=1, head_dim=8).eval()
    obs = torch.rand(1, *OBS) * 255
    maps = [encoder.trunk(encoder.normalise(obs[:, 3 * i:3 * i + 3])) for i in range(3)]
    fused = encoder.trunk_features(obs)[0]
    assert torch.allclose(fused[0], maps[1][0], atol=1e-5) and torch.allclose(fused[1], maps[2][0], atol=1e-5)
    assert torch.allclose(fused[2], (maps[1] - maps[0])[0], atol=1e-5)
    assert torch.allclose(fused[3], (maps[2] - maps[1])[0], atol=1e-5)


def test_frozen_mode_normalises_with_torchvision_imagenet_statistics():
    declared = models.ResNet18_Weights.IMAGENET1K_V1.transforms()
    assert imagenet_mean_std("resnet18") == (list(declared.mean), list(declared.std))
    frozen = FrozenResNetEncoder(OBS, bn="frozen", head_dim=8)
    pixels = torch.rand(4, 3, 84, 84) * 255
    expected = (pixels / 255 - torch.tensor(declared.mean).view(1, 3, 1, 1)) / torch.tensor(declared.std).view(1, 3, 1, 1)
    assert torch.allclose(frozen.normalise(pixels), expected, atol=1e-5)
    adaptive = FrozenResNetEncoder(OBS, bn="adaptive", head_dim=8)
    assert torch.allclose(adaptive.normalise(pixels), pixels / 255 - 0.5)


class RandomBatches(IterableDataset):
    """A seeded stream of replay-shaped batches, so the learner can be driven without environments."""

    def __init__(self, count: int, batch: int = 4, action_dim: int = 2):
        self.count, self.batch, self.action_dim = count, batch, action_dim

    def __iter__(self):
        generator = torch.Generator().manual_seed(0)
        for step in range(self.count):
            obs = torch.randint(0, 256, (self.batch, *OBS), generator=generator, dtype=torch.uint8)
            next_obs = torch.randint(0, 256, (self.batch, *OBS), generator=generator, dtype=torch.uint8)
            action = torch.rand(self.batch, self.action_dim, generator=generator) * 2 - 1
            yield obs, action, torch.rand(self.batch, 1), torch.full((self.batch, 1), 0.99), next_obs, torch.tensor(step)


def tiny_module(bn: str) -> PIEGModule:
    pl.seed_everything(0, verbose=False)
    return PIEGModule(OBS, 2, agent="pieg", feature_dim=8, hidden_dim=16, num_expl_steps=0,
                      encoder={"layer": 2, "bn": bn, "head_dim": 16})


def fit(module: PIEGModule, updates: int) -> None:
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu")
    trainer.fit(module, DataLoader(RandomBatches(updates), batch_size=None))


def bn_buffers(module: PIEGModule) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.encoder.trunk.state_dict().items() if "running" in k}


@pytest.mark.parametrize("bn", ["adaptive", "frozen"])
def test_trunk_frozen_and_outside_optimizers_head_trains(bn):
    module = tiny_module(bn)
    trunk_before = {k: v.clone() for k, v in module.encoder.trunk.named_parameters()}
    head_before = copy.deepcopy(module.encoder.head.state_dict())
    stats_before = bn_buffers(module)
    fit(module, updates=3)
    optimised = {id(p) for opt in module.trainer.optimizers for group in opt.param_groups for p in group["params"]}
    for name, param in module.encoder.trunk.named_parameters():
        assert not param.requires_grad and id(param) not in optimised, name
        assert torch.equal(param, trunk_before[name]), name
    assert all(id(p) in optimised for p in module.encoder.head.parameters())
    assert any(not torch.equal(v, module.encoder.head.state_dict()[k]) for k, v in head_before.items())
    stats_after = bn_buffers(module)
    moved = [k for k in stats_before if not torch.equal(stats_before[k], stats_after[k])]
    if bn == "adaptive":
        assert len(moved) == len(stats_before)  # every running mean and variance kept moving
    else:
        assert moved == []


def test_acting_and_per_observation_evaluation_move_no_statistics():
    module = tiny_module("adaptive")
    before = bn_buffers(module)
    obs = torch.randint(0, 256, (3, *OBS), dtype=torch.uint8)
    module.act(obs[0].numpy(), step=0, explore=False)
    together = module.act_batch(obs, per_observation_bn=True)
    alone = torch.cat([module.act_batch(obs[i:i + 1], per_observation_bn=True) for i in range(3)])
    assert torch.allclose(together, alone, atol=1e-5)  # statistics are per observation, not per batch
    after = bn_buffers(module)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_per_observation_statistics_normalise_each_observation_alone():
    norm = AdaptiveBatchNorm2d(2)
    x = torch.randn(6, 2, 4, 4) * 3 + 1
    norm.group_size = 3
    out = norm(x)
    first = out[:3]
    assert torch.allclose(first.mean(dim=(0, 2, 3)), torch.zeros(2), atol=1e-5)
    assert torch.allclose(first.var(dim=(0, 2, 3), unbiased=False), torch.ones(2), atol=1e-3)
    assert torch.equal(norm.running_mean, torch.zeros(2))


def test_weights_file_round_trips(tmp_path):
    torch.manual_seed(1)
    reference = models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    encoder = FrozenResNetEncoder(OBS, state_dict=load_weights("resnet18", str(path)), head_dim=8)
    assert torch.equal(encoder.trunk[0].weight, reference.conv1.weight)
    assert torch.equal(encoder.trunk[4][0].conv1.weight, reference.layer1[0].conv1.weight)
    assert torch.equal(encoder.trunk[5][1].bn2.running_var, reference.layer2[1].bn2.running_var)


def test_bad_weights_are_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(EncoderConfigError, match="no such file.*encoder.weights=none"):
        load_weights("resnet18", str(tmp_path / "missing.pth"))
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(EncoderConfigError, match="does not fit"):
        FrozenResNetEncoder(OBS, state_dict=load_weights("resnet18", str(tmp_path / "wrong.pth")))

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(models.ResNet18_Weights.IMAGENET1K_V1.__class__, "get_state_dict", offline)
    with pytest.raises(EncoderConfigError) as error:
        load_weights("resnet18", "imagenet")
    assert "encoder.weights=/path/to/resnet18-f37072fd.pth" in str(error.value)
    assert "encoder.weights=none" in str(error.value)


def test_invalid_settings_are_named():
    with pytest.raises(EncoderConfigError, match="encoder.layer=5"):
        FrozenResNetEncoder(OBS, layer=5)
    with pytest.raises(EncoderConfigError, match="encoder.bn='sometimes'"):
        FrozenResNetEncoder(OBS, bn="sometimes")
