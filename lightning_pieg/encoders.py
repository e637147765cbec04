"""Image encoders: PIE-G's frozen pre-trained ResNet trunk with a trainable head, and DrQ-v2's conv encoder,
registered by name in ``ENCODERS`` (``conf/encoder/<name>.yaml``) and built from their config by ``build_encoder``.

Which BatchNorm statistics the frozen ResNet uses, by ``bn`` mode and phase:

=====================  ==================================  =========================
phase                  ``adaptive`` (default)              ``frozen``
=====================  ==================================  =========================
agent update           batch statistics; running stats      running (ImageNet) stats
                       move (momentum 0.1)
acting (collection,    running statistics                  running (ImageNet) stats
training-env eval)
benchmark evaluation   each observation's own statistics   running (ImageNet) stats
(``per_observation``)  over its frames; nothing moves
=====================  ==================================  =========================

Inputs: ``adaptive`` feeds ``obs / 255 - 0.5`` as the authors do (batch statistics cancel the input's global
scale and per-channel shift anyway); ``frozen`` normalises with the ImageNet mean and std declared by
torchvision's weights, which its running statistics expect.
"""
from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from torch import nn
from torchvision import models

from lightning_pieg.console import UserError
from lightning_pieg.networks import orthogonal_init

ARCHS = {
    "resnet18": (models.resnet18, models.ResNet18_Weights.IMAGENET1K_V1),
    "resnet34": (models.resnet34, models.ResNet34_Weights.IMAGENET1K_V1),
    "resnet50": (models.resnet50, models.ResNet50_Weights.IMAGENET1K_V1),
}
BN_MODES = ("adaptive", "frozen")
# Which statistics the trunk's BatchNorm uses when evaluating outside the training scene (see the table above):
# each observation's own, or the running ones (a diagnostic).
BN_STATISTICS = ("per_observation", "running")
LAYERS = (1, 2, 3, 4)
DOWNLOAD_TIMEOUT_S = 60


class EncoderConfigError(UserError):
    """A bad encoder setting or a weights file that cannot be had; the message names the fix."""


def check_config(arch: str, layer: int, bn: str) -> None:
    if arch not in ARCHS:
        raise EncoderConfigError(f"encoder.arch={arch!r} is unknown; choose one of {', '.join(ARCHS)}.")
    if layer not in LAYERS:
        raise EncoderConfigError(f"encoder.layer={layer!r} is invalid; the ResNet has layers 1, 2, 3 and 4.")
    if bn not in BN_MODES:
        raise EncoderConfigError(f"encoder.bn={bn!r} is unknown; choose 'adaptive' or 'frozen'.")


def imagenet_mean_std(arch: str) -> tuple[list[float], list[float]]:
    """The normalisation that torchvision's ImageNet weights for ``arch`` declare."""
    transforms = ARCHS[arch][1].transforms()
    return list(transforms.mean), list(transforms.std)


def load_weights(arch: str, weights: str) -> dict[str, torch.Tensor] | None:
    """State dict for the full torchvision ResNet: ``imagenet``, a file path, or ``none`` (returns None).

    Runs before anything expensive so that a missing file or an offline machine stops the run at once.
    """
    weights = str(weights)
    if weights.lower() == "none":
        return None
    alternatives = (
        f"Either download the file on a machine with internet ({ARCHS[arch][1].url}) and pass "
        f"encoder.weights=/path/to/{Path(ARCHS[arch][1].url).name}, or train from random weights with "
        f"encoder.weights=none (an ablation, not PIE-G).")
    if weights == "imagenet":
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)  # a firewalled machine must fail, not hang
        try:
            return ARCHS[arch][1].get_state_dict(progress=False, check_hash=True)
        except Exception as error:  # URLError, socket timeouts, hash mismatch: all mean "no usable weights"
            raise EncoderConfigError(
                f"encoder.weights=imagenet: torchvision's {arch} IMAGENET1K_V1 weights are not in the cache "
                f"({torch.hub.get_dir()}/checkpoints) and could not be downloaded ({error}). {alternatives}"
            ) from error
        finally:
            socket.setdefaulttimeout(previous)
    path = Path(os.path.expanduser(weights))
    if not path.is_file():
        raise EncoderConfigError(f"encoder.weights={weights!r}: no such file. {alternatives}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise EncoderConfigError(f"encoder.weights={weights!r} is not a readable state-dict file: {error}") from error
    if isinstance(state, nn.Module):
        state = state.state_dict()
    if not isinstance(state, dict):
        raise EncoderConfigError(f"encoder.weights={weights!r} holds a {type(state).__name__}, not a state dict.")
    return state


class AdaptiveBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm that can also normalise each group of ``group_size`` consecutive images by its own statistics.

    With ``group_size`` set, the running statistics are neither used nor updated: each observation (its frames)
    is normalised alone, however many observations share the forward pass.
    """

    group_size: int = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.group_size:
            return super().forward(x)
        n, c, h, w = x.shape
        groups = x.view(n // self.group_size, self.group_size, c, h, w)
        var, mean = torch.var_mean(groups, dim=(1, 3, 4), correction=0, keepdim=True)
        out = (groups - mean) * torch.rsqrt(var + self.eps)
        out = out * self.weight.view(1, 1, c, 1, 1) + self.bias.view(1, 1, c, 1, 1)
        return out.view(n, c, h, w)


def _adaptive_batchnorms(module: nn.Module) -> nn.Module:
    """Swap every BatchNorm2d for an AdaptiveBatchNorm2d with the same parameters and buffers."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            replacement = AdaptiveBatchNorm2d(child.num_features, child.eps, child.momentum)
            replacement.load_state_dict(child.state_dict())
            setattr(module, name, replacement)
        else:
            _adaptive_batchnorms(child)
    return module


class FrozenResNetEncoder(nn.Module):
    """PIE-G's encoder: a frozen ResNet trunk cut after ``layer``, applied to each RGB frame alone.

    The newer frames' feature maps and their differences to the previous frame are concatenated, flattened and
    mapped by a trainable Linear + LayerNorm head of width ``head_dim`` (trained by the critic loss).
    """

    settings = ("arch", "layer", "bn", "weights", "head_dim")  # its keys of the ``encoder`` config section
    min_frames = 2  # it fuses differences between consecutive frames

    def __init__(self, obs_shape: tuple[int, int, int], arch: str = "resnet18", layer: int = 2,
                 bn: str = "adaptive", state_dict: dict[str, torch.Tensor] | None = None, head_dim: int = 1024):
        super().__init__()
        check_config(arch, layer, bn)
        self.bn, self.num_frames = bn, obs_shape[0] // 3
        build = ARCHS[arch][0]
        resnet = build(weights=None)
        if state_dict is not None:
            try:
                resnet.load_state_dict(state_dict)
            except RuntimeError as error:
                raise EncoderConfigError(f"the weights file does not fit torchvision's {arch}: {error}") from error
        stages = [resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool] + [
            getattr(resnet, f"layer{i}") for i in range(1, layer + 1)]
        # channels_last: about 1.8x faster convolutions on CPU (oneDNN), and the layout tensor cores want
        self.trunk = _adaptive_batchnorms(nn.Sequential(*stages)).to(memory_format=torch.channels_last)
        self.trunk.requires_grad_(False)
        mean, std = imagenet_mean_std(arch)
        self.register_buffer("input_mean", torch.tensor(mean).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("input_std", torch.tensor(std).view(1, 3, 1, 1) * 255.0, persistent=False)
        with torch.no_grad():
            self.trunk.eval()
            probe = self.trunk(torch.zeros(1, 3, *obs_shape[1:]))
        self.feature_map_shape = tuple(probe.shape[1:])
        self.flat_dim = 2 * (self.num_frames - 1) * probe[0].numel()
        self.head = nn.Sequential(nn.Linear(self.flat_dim, head_dim), nn.LayerNorm(head_dim))
        self.head.apply(orthogonal_init)
        self.repr_dim = head_dim
        self.train()

    def train(self, mode: bool = True) -> "FrozenResNetEncoder":
        super().train(mode)
        # BatchNorm statistics follow the learner's phase only in adaptive mode (see the module docstring).
        self.trunk.train(mode and self.bn == "adaptive")
        return self

    def normalise(self, frames: torch.Tensor) -> torch.Tensor:
        if self.bn == "frozen":
            frames = (frames - self.input_mean) / self.input_std
        else:
            frames = frames / 255.0 - 0.5
        return frames.contiguous(memory_format=torch.channels_last)

    @torch.no_grad()
    def trunk_features(self, obs: torch.Tensor) -> torch.Tensor:
        """``(B, 3F, H, W)`` pixels in 0..255 -> fused ``(B, 2(F-1), C, h, w)`` feature maps."""
        b, _, h, w = obs.shape
        frames = self.normalise(obs.reshape(b * self.num_frames, 3, h, w))
        maps = self.trunk(frames).view(b, self.num_frames, *self.feature_map_shape)
        newer = maps[:, 1:]
        return torch.cat([newer, newer - maps[:, :-1]], dim=1)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk_features(obs).flatten(1))

    @contextmanager
    def per_observation_statistics(self) -> Iterator[None]:
        """Normalise each observation with its own BatchNorm statistics (``adaptive`` benchmark evaluation)."""
        norms = [m for m in self.trunk.modules() if isinstance(m, AdaptiveBatchNorm2d)]
        active = self.bn == "adaptive"
        for norm in norms:
            norm.group_size = self.num_frames if active else 0
        try:
            yield
        finally:
            for norm in norms:
                norm.group_size = 0


class ConvEncoder(nn.Module):
    """DrQ-v2's encoder, learned from scratch: four 3x3 convolutions (32 channels, the first with stride 2)."""

    settings: tuple[str, ...] = ()  # nothing to set, no pre-trained weights
    min_frames = 1

    def __init__(self, obs_shape: tuple[int, int, int]):
        super().__init__()
        self.convnet = nn.Sequential(
            nn.Conv2d(obs_shape[0], 32, 3, stride=2), nn.ReLU(),
            nn.Conv2d(32, 32, 3, stride=1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, stride=1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, stride=1), nn.ReLU())
        self.apply(orthogonal_init)
        self.convnet.to(memory_format=torch.channels_last)  # faster convolutions (see FrozenResNetEncoder)
        with torch.no_grad():
            self.repr_dim = self.convnet(torch.zeros(1, *obs_shape)).numel()

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.convnet((obs / 255.0 - 0.5).contiguous(memory_format=torch.channels_last)).flatten(1)

    @contextmanager
    def per_observation_statistics(self) -> Iterator[None]:
        yield  # no BatchNorm: nothing to switch


ENCODERS: dict[str, type[nn.Module]] = {"resnet": FrozenResNetEncoder, "conv": ConvEncoder}
"""``encoder.name`` -> its class. A name, not a class path, is what checkpoints record, so they survive renames."""
ENCODER_DEFAULTS = {"arch": "resnet18", "layer": 2, "bn": "adaptive", "weights": "imagenet", "head_dim": 1024}
"""Every encoder setting and its default (``conf/encoder/resnet.yaml``); an encoder takes those in its ``settings``."""


def build_encoder(obs_shape: tuple[int, int, int], config: dict,
                  state_dict: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """The encoder ``config["name"]`` names, with its ``settings`` from ``config`` (missing ones at their defaults;
    the others are ignored) and, for a pre-trained one, ``state_dict`` (from ``load_encoder_weights``)."""
    name = config.get("name")
    if name not in ENCODERS:
        raise EncoderConfigError(f"encoder.name={name!r} is unknown; choose one of {', '.join(ENCODERS)}.")
    cls = ENCODERS[name]
    options = {key: ENCODER_DEFAULTS[key] if config.get(key) is None else config[key]
               for key in cls.settings if key != "weights"}
    if "weights" in cls.settings:
        options["state_dict"] = state_dict
    elif state_dict is not None:
        raise EncoderConfigError(f"the {name} encoder is learned from scratch; it takes no pre-trained weights.")
    return cls(tuple(obs_shape), **options)


def load_encoder_weights(config: dict) -> dict[str, torch.Tensor] | None:
    """The pre-trained weights the encoder ``config`` asks for (``encoder.weights``); None for ``none`` and for an
    encoder without pre-trained weights."""
    if "weights" not in ENCODERS[config["name"]].settings:
        return None
    return load_weights(config.get("arch") or ENCODER_DEFAULTS["arch"], config.get("weights") or "none")
