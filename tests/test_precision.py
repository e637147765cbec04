"""bf16-mixed as training runs it (Lightning's precision plugin: autocast with its cast cache off): the update casts
each of the critic side's weights once (``cast_once``), which changes no value, only the number of casts."""
from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from pytorch_lightning.plugins.precision import MixedPrecision
from torch.utils._python_dispatch import TorchDispatchMode

import lightning_pieg.module as module_file
from lightning_pieg.module import PIEGModule

pytestmark = pytest.mark.usefixtures("one_thread")

OBS = (9, 32, 32)
BATCH = 8


class HeadCasts(TorchDispatchMode):
    """Counts the casts of one weight's shape: fp32 -> bf16 (forward) and bf16 -> fp32 (its gradient, backward)."""

    def __init__(self, shape: torch.Size):
        super().__init__()
        self.shape, self.down, self.up = shape, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default and args[0].shape == self.shape:
            if args[0].dtype == torch.float32 and kwargs.get("dtype") == torch.bfloat16:
                self.down += 1
            elif args[0].dtype == torch.bfloat16 and kwargs.get("dtype") == torch.float32:
                self.up += 1
        return func(*args, **kwargs)


def tiny_pieg() -> PIEGModule:
    torch.manual_seed(0)
    module = PIEGModule(OBS, 2, method="pieg", feature_dim=8, hidden_dim=16,
                        encoder={"name": "resnet", "arch": "resnet18", "layer": 2, "bn": "adaptive",
                                 "head_dim": 32}).train()
    images = torch.rand(BATCH, 3, *OBS[1:], generator=torch.Generator().manual_seed(1))
    module.overlay_images = type("Images", (), {"sample": staticmethod(lambda b: images[:b])})()
    return module


def batch() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(2)
    return (torch.randint(0, 256, (BATCH, *OBS), generator=g, dtype=torch.uint8), torch.rand(BATCH, 2, generator=g),
            torch.rand(BATCH, 1, generator=g), torch.full((BATCH, 1), 0.99),
            torch.randint(0, 256, (BATCH, *OBS), generator=g, dtype=torch.uint8), torch.tensor(10_000))


ORIGINAL_CAST_ONCE = module_file.cast_once


def bf16_update(module: PIEGModule, cast_once: bool, monkeypatch, counter: HeadCasts | None = None) -> dict:
    optimisers = module.configure_optimizers()
    module.optimizers = lambda: optimisers
    module.manual_backward = lambda loss: loss.backward()
    monkeypatch.setattr(module_file, "cast_once",
                        ORIGINAL_CAST_ONCE if cast_once else (lambda device: contextlib.nullcontext()))
    torch.manual_seed(3)
    with MixedPrecision("bf16-mixed", "cpu").forward_context(), (counter or contextlib.nullcontext()):
        module.training_step(iter([(batch(), 0, 0)]))
    return module.last_metrics


def test_the_head_is_cast_once_per_update_and_its_gradient_once(monkeypatch):
    module = tiny_pieg()
    shape = module.encoder.head[0].weight.shape
    without, with_ = HeadCasts(shape), HeadCasts(shape)
    bf16_update(copy.deepcopy(module), False, monkeypatch, without)
    bf16_update(module, True, monkeypatch, with_)
    assert (without.down, without.up) == (3, 2)  # clean, next, overlaid passes; gradients of clean and overlaid
    assert (with_.down, with_.up) == (1, 1)


def test_casting_once_changes_no_value(monkeypatch):
    """The same weights cast once or per pass are the same bf16 numbers: the losses agree exactly; the head's
    gradient differs only by where its two passes' parts are summed (bf16 before the cast, fp32 after)."""
    base = tiny_pieg()
    copies = {flag: copy.deepcopy(base) for flag in (False, True)}
    metrics = {flag: bf16_update(module, flag, monkeypatch) for flag, module in copies.items()}
    assert metrics[True]["train/critic_loss"] == metrics[False]["train/critic_loss"]
    grads = {flag: module.encoder.head[0].weight.grad for flag, module in copies.items()}
    assert grads[True].dtype == torch.float32 and grads[True].abs().sum() > 0
    assert torch.allclose(grads[True], grads[False], rtol=2e-2, atol=1e-3 * grads[False].abs().max().item())
    for flag, module in copies.items():  # every trained part moved: no gradient was lost to a cached cast
        for name, network in (("head", module.encoder.head), ("critic", module.critic), ("actor", module.actor)):
            before = dict((base.encoder.head if name == "head" else getattr(base, name)).named_parameters())
            assert any(not torch.equal(p, before[n]) for n, p in network.named_parameters()), (flag, name)


def test_cast_once_does_nothing_without_autocast():
    with module_file.cast_once("cpu"):
        assert not torch.is_autocast_enabled("cpu")
