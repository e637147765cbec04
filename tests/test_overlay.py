"""Overlay augmentation: image source (folders, crops, flips, seeding, prefetching, errors) and the mixing rule."""
from __future__ import annotations

import time
from pathlib import Path

import lightning_pieg  # noqa: F401
import numpy as np
import pytest
import torch
from PIL import Image

from lightning_pieg.overlay import ImageOverlay, image_files, overlay

SIZE = 84


def write_half_images(folder: Path, count: int, suffix: str = ".png") -> None:
    """Images whose left half is red and right half blue, so a horizontal flip is visible after any crop."""
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        image = np.zeros((96 + 8 * index, 128, 3), np.uint8)
        image[:, :64, 0] = 255
        image[:, 64:, 2] = 255
        Image.fromarray(image).save(folder / f"image{index}{suffix}")


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """ImageFolder style: class sub-folders with jpg and png files."""
    write_half_images(tmp_path / "images" / "class_a", 3, ".png")
    write_half_images(tmp_path / "images" / "class_b", 3, ".jpg")
    return tmp_path / "images"


def test_samples_are_float_batches_in_unit_range(image_folder):
    with ImageOverlay(image_folder, image_size=SIZE, seed=0) as images:
        batch = images.sample(16)
    assert batch.shape == (16, 3, SIZE, SIZE) and batch.dtype == torch.float32
    assert 0.0 <= batch.min() and batch.max() <= 1.0


def test_flat_folder_and_image_folder_layouts(tmp_path, image_folder):
    write_half_images(tmp_path / "flat", 2, ".jpg")
    assert len(image_files(tmp_path / "flat")) == 2
    assert len(image_files(image_folder)) == 6


def test_crops_and_flips_vary(image_folder):
    with ImageOverlay(image_folder, image_size=SIZE, seed=0) as images:
        batch = images.sample(64)
    red_left = batch[:, 0, :, :4].mean(dim=(1, 2)) > batch[:, 2, :, :4].mean(dim=(1, 2))
    red_right = batch[:, 0, :, -4:].mean(dim=(1, 2)) > batch[:, 2, :, -4:].mean(dim=(1, 2))
    assert (red_left & ~red_right).any() and (red_right & ~red_left).any(), "expected flipped and unflipped images"
    red_share = batch[:, 0].mean(dim=(1, 2))
    assert red_share.std() > 0.05, "crops should cover different parts of the images"


def test_stream_is_seeded_and_independent_of_batch_sizes(image_folder):
    with ImageOverlay(image_folder, seed=3) as first, ImageOverlay(image_folder, seed=3) as second, \
            ImageOverlay(image_folder, seed=4) as other:
        together = first.sample(40)
        apart = torch.cat([second.sample(5), second.sample(35)])
        different = other.sample(40)
    torch.testing.assert_close(together, apart, rtol=0, atol=0)
    assert not torch.equal(together, different)


def test_images_are_prepared_in_the_background(image_folder):
    images = ImageOverlay(image_folder, seed=0)
    try:
        deadline = time.monotonic() + 10
        while images._ready.qsize() < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        for path in image_files(image_folder):  # what sample() returns now must already be in memory
            path.unlink()
        assert images.sample(4 * 32).shape[0] == 4 * 32
    finally:
        images.close()


def test_missing_empty_and_broken_folders_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*augment.overlay"):
        ImageOverlay(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match="holds no .jpg/.jpeg/.png images"):
        ImageOverlay(tmp_path / "empty")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "bad.jpg").write_bytes(b"not a jpeg")
    with ImageOverlay(tmp_path / "broken") as images:
        with pytest.raises(RuntimeError, match="bad.jpg"):
            images.sample(2)


def test_overlay_mixes_one_image_into_every_frame():
    generator = torch.Generator().manual_seed(0)
    batch, frames = 4, 3
    obs = torch.rand(batch, 3 * frames, SIZE, SIZE, generator=generator) * 255
    images = torch.rand(batch, 3, SIZE, SIZE, generator=generator)
    alpha = 0.5
    mixed = overlay(obs, images, alpha)
    assert mixed.shape == obs.shape
    for b in range(batch):
        for f in range(frames):
            frame = obs[b, 3 * f:3 * f + 3]
            expected = ((1 - alpha) * frame / 255 + alpha * images[b]) * 255
            torch.testing.assert_close(mixed[b, 3 * f:3 * f + 3], expected)
    torch.testing.assert_close(overlay(obs, images, 0.0), obs)
    torch.testing.assert_close(overlay(obs, images, 1.0), images.repeat(1, frames, 1, 1) * 255)


def test_overlay_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="one image per observation"):
        overlay(torch.zeros(4, 9, SIZE, SIZE), torch.zeros(3, 3, SIZE, SIZE))
    with pytest.raises(ValueError, match="one image per observation"):
        overlay(torch.zeros(4, 9, SIZE, SIZE), torch.zeros(4, 3, 64, 64))
