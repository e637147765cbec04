"""Random shift: every output is a crop of the edge-replicated input; both crop paths agree."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lightning_pieg.augment import RandomShift, crop_by_gather, crop_by_slices


def test_shift_is_a_crop_of_the_replicate_padded_image():
    torch.manual_seed(0)
    images = torch.rand(16, 9, 12, 12)
    shifted = RandomShift(pad=2)(images)
    padded = F.pad(images, (2,) * 4, mode="replicate")
    seen = set()
    for i in range(16):
        matches = [(y, x) for y in range(5) for x in range(5)
                   if torch.equal(shifted[i], padded[i, :, y:y + 12, x:x + 12])]
        assert matches, f"sample {i} is not a crop"
        seen.update(matches)
    assert len(seen) > 5  # offsets vary across the batch (and all 9 channels share one offset per sample)


def test_gather_and_slice_crops_agree():
    padded = torch.rand(8, 3, 16, 16)
    offsets = torch.randint(0, 9, (8, 2))
    assert torch.equal(crop_by_gather(padded, offsets, 8, 8), crop_by_slices(padded, offsets, 8, 8))
