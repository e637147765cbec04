"""Actor and critic heads of DrQ-v2 / PIE-G, the truncated normal policy and the exploration schedule."""
from __future__ import annotations

import re

import numpy as np
import torch
from torch import nn
from torch.distributions.utils import _standard_normal


def orthogonal_init(module: nn.Module) -> None:
    """Orthogonal weights and zero biases, as the reference initialises every layer."""
    if isinstance(module, nn.Linear):
        nn.init.orthogonal_(module.weight.data)
        if module.bias is not None:
            module.bias.data.fill_(0.0)
    elif isinstance(module, nn.Conv2d):
        nn.init.orthogonal_(module.weight.data, nn.init.calculate_gain("relu"))
        if module.bias is not None:
            module.bias.data.fill_(0.0)


class TruncatedNormal(torch.distributions.Normal):
    """A normal whose samples are clamped into (-1, 1) with a straight-through gradient."""

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6):
        super().__init__(loc, scale, validate_args=False)
        self.eps = eps

    def sample(self, clip: float | None = None, sample_shape=torch.Size()) -> torch.Tensor:
        noise = _standard_normal(self._extended_shape(sample_shape), dtype=self.loc.dtype, device=self.loc.device)
        noise = noise * self.scale
        if clip is not None:
            noise = noise.clamp(-clip, clip)
        x = self.loc + noise
        clamped = x.clamp(-1.0 + self.eps, 1.0 - self.eps)
        return x - x.detach() + clamped.detach()


_LINEAR = re.compile(r"linear\(([^,]+),([^,]+),([^,]+)\)")


def parse_schedule(schedule: str | float) -> None:
    """Raise ``ValueError`` for a schedule string that ``schedule`` cannot evaluate."""
    stddev_at(schedule, 0)


def stddev_at(schedule: str | float, step: int) -> float:
    """Exploration stddev at agent ``step``: a constant or ``linear(init, final, duration_steps)``."""
    try:
        return float(schedule)
    except ValueError:
        match = _LINEAR.fullmatch(str(schedule).replace(" ", ""))
        problem = f"stddev_schedule={schedule!r} is not a number or 'linear(init,final,duration)' with numbers"
        if match is None:
            raise ValueError(problem) from None
        try:
            init, final, duration = (float(g) for g in match.groups())
        except ValueError:
            raise ValueError(problem) from None
        if not duration > 0 or min(init, final) < 0:
            raise ValueError(f"{problem}, stddevs >= 0 and a positive duration") from None
        mix = float(np.clip(step / duration, 0.0, 1.0))
        return (1.0 - mix) * init + mix * final


class Actor(nn.Module):
    """Deterministic policy with scheduled Gaussian noise: features -> LayerNorm/Tanh trunk -> MLP -> tanh."""

    def __init__(self, repr_dim: int, action_dim: int, feature_dim: int, hidden_dim: int):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(repr_dim, feature_dim), nn.LayerNorm(feature_dim), nn.Tanh())
        self.policy = nn.Sequential(
            nn.Linear(feature_dim, hidden_dim), nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, hidden_dim), nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, action_dim))
        self.apply(orthogonal_init)

    def forward(self, features: torch.Tensor, std: float | torch.Tensor) -> TruncatedNormal:
        """The policy at ``features``; ``std`` is one stddev, or one per row (a ``(B, 1)`` tensor)."""
        mu = torch.tanh(self.policy(self.trunk(features)))
        return TruncatedNormal(mu, torch.as_tensor(std, dtype=mu.dtype, device=mu.device).expand_as(mu))


class Critic(nn.Module):
    """Two Q networks on a shared LayerNorm/Tanh trunk (clipped double Q)."""

    def __init__(self, repr_dim: int, action_dim: int, feature_dim: int, hidden_dim: int):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(repr_dim, feature_dim), nn.LayerNorm(feature_dim), nn.Tanh())

        def q_net() -> nn.Sequential:
            return nn.Sequential(
                nn.Linear(feature_dim + action_dim, hidden_dim), nn.ReLU(inplace=True),
                nn.Linear(hidden_dim, hidden_dim), nn.ReLU(inplace=True),
                nn.Linear(hidden_dim, 1))

        self.q1, self.q2 = q_net(), q_net()
        self.apply(orthogonal_init)

    def forward(self, features: torch.Tensor, action: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.cat([self.trunk(features), action], dim=-1)
        return self.q1(h), self.q2(h)
