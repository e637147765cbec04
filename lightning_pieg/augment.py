"""Random-shift augmentation (DrQ): pad by replicating borders, then crop back at a random integer offset."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RandomShift(nn.Module):
    """Shift each image of a batch by an integer in [-pad, pad] on both axes (edges replicated)."""

    def __init__(self, pad: int = 4):
        super().__init__()
        self.pad = pad

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.pad == 0:
            return images
        n, c, h, w = images.shape
        padded = F.pad(images, (self.pad,) * 4, mode="replicate")
        offsets = torch.randint(0, 2 * self.pad + 1, (n, 2), device=images.device)
        rows = (offsets[:, :1] + torch.arange(h, device=images.device)).view(n, 1, h, 1)
        cols = (offsets[:, 1:] + torch.arange(w, device=images.device)).view(n, 1, 1, w)
        # Integer crops equal the reference's grid_sample at pixel centres, without interpolation cost.
        rows_taken = padded.gather(2, rows.expand(n, c, h, w + 2 * self.pad))
        return rows_taken.gather(3, cols.expand(n, c, h, w))
