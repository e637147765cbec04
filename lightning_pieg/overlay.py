"""The paper's strong augmentation (SVEA-style overlay): natural images mixed into observations.

``ImageOverlay`` serves random-resized-cropped, randomly flipped images from a folder (Places365 in the paper; any
ImageFolder-style or flat folder of jpg/png files); background threads prepare them ahead of the learner, so
``sample`` normally only slices a ready buffer. ``overlay`` mixes one image into every frame of an observation.
"""
from __future__ import annotations

import math
import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
# torchvision's RandomResizedCrop defaults, which SVEA's overlay uses.
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
CROP_ATTEMPTS = 10
FLIP_PROBABILITY = 0.5
CHUNK_IMAGES = 32  # images the producer hands over at a time
PREFETCH_CHUNKS = 32  # chunks kept ready: 1024 images, about 21 MB at 84x84
DECODE_WORKERS = 4
QUEUE_POLL_S = 0.1


def image_files(folder: str | os.PathLike) -> list[Path]:
    """All jpg/png files under ``folder`` (class sub-folders or flat), sorted so that seeds mean the same images."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"Overlay image folder {str(folder)!r} does not exist. Point augment.overlay at a "
                                "folder of jpg/png images (Places365 in the paper), or set it to none.")
    files = sorted(path for path in folder.rglob("*")
                   if path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".") and path.is_file())
    if not files:
        raise ValueError(f"Overlay image folder {str(folder)!r} holds no {'/'.join(IMAGE_SUFFIXES)} images. Point "
                         "augment.overlay at a folder of images (Places365 in the paper), or set it to none.")
    return files


def check_images(folder: str | os.PathLike, count: int) -> None:
    """Decode the first ``count`` images of ``folder``: a ``ValueError`` naming the first that cannot be read."""
    for path in image_files(folder)[:count]:
        try:
            with Image.open(path) as opened:
                opened.convert("RGB")
        except (OSError, ValueError) as error:
            raise ValueError(f"cannot read overlay image {str(path)!r} ({error}); remove it or point "
                             f"augment.overlay at a folder of valid jpg/png images.") from None


def random_resized_crop_box(width: int, height: int, random: np.random.Generator) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a crop covering 8-100% of the image with aspect ratio in [3/4, 4/3].

    After ``CROP_ATTEMPTS`` misses it falls back to the largest centred crop within the ratio range.
    """
    area = width * height
    log_ratio = (math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]))
    for _ in range(CROP_ATTEMPTS):
        target_area = area * random.uniform(*CROP_SCALE)
        aspect = math.exp(random.uniform(*log_ratio))
        crop_width = int(round(math.sqrt(target_area * aspect)))
        crop_height = int(round(math.sqrt(target_area / aspect)))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            top = int(random.integers(0, height - crop_height + 1))
            left = int(random.integers(0, width - crop_width + 1))
            return top, left, crop_height, crop_width
    ratio = width / height
    if ratio < CROP_RATIO[0]:
        crop_width, crop_height = width, int(round(width / CROP_RATIO[0]))
    elif ratio > CROP_RATIO[1]:
        crop_width, crop_height = int(round(height * CROP_RATIO[1])), height
    else:
        crop_width, crop_height = width, height
    return (height - crop_height) // 2, (width - crop_width) // 2, crop_height, crop_width


class ImageOverlay:
    """Overlay images from ``folder``: ``sample(batch_size)`` gives a float ``(B, 3, S, S)`` batch in [0, 1].

    Images come as one endless stream: image ``k`` is file ``permutation_e[k mod N]`` of epoch ``e = k // N``
    (every file once per epoch), cropped and flipped with a generator seeded by ``(seed, k)``. The stream depends
    only on the folder and the seed, never on thread timing or batch sizes. A producer thread keeps up to
    ``PREFETCH_CHUNKS * CHUNK_IMAGES`` images ready, decoding with ``workers`` threads.
    """

    def __init__(self, folder: str | os.PathLike, image_size: int = 84, seed: int = 0,
                 workers: int = DECODE_WORKERS):
        self.files = image_files(folder)
        self.image_size = image_size
        self.seed = seed
        self._ready: queue.Queue = queue.Queue(maxsize=PREFETCH_CHUNKS)
        self._buffer = torch.empty((0, 3, image_size, image_size), dtype=torch.uint8)
        self._stop = threading.Event()
        self._decoders = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="overlay-decode")
        self._producer = threading.Thread(target=self._produce, name="overlay-producer", daemon=True)
        self._producer.start()

    def _file(self, serial: int, permutations: dict[int, np.ndarray]) -> Path:
        epoch, position = divmod(serial, len(self.files))
        if epoch not in permutations:
            permutations.clear()
            shuffle = np.random.default_rng([self.seed, epoch, len(self.files)])
            permutations[epoch] = shuffle.permutation(len(self.files))
        return self.files[permutations[epoch][position]]

    def _image(self, serial: int, path: Path) -> torch.Tensor:
        random = np.random.default_rng([self.seed, serial])
        try:
            with Image.open(path) as opened:
                image = opened.convert("RGB")
        except (OSError, ValueError) as error:
            raise ValueError(f"Cannot read overlay image {str(path)!r}: {error}") from error
        top, left, height, width = random_resized_crop_box(image.width, image.height, random)
        image = TF.resized_crop(image, top, left, height, width, [self.image_size, self.image_size],
                                interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
        if random.random() < FLIP_PROBABILITY:
            image = TF.hflip(image)
        return TF.pil_to_tensor(image)

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._ready.put(item, timeout=QUEUE_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        permutations: dict[int, np.ndarray] = {}
        serial = 0
        while not self._stop.is_set():
            serials = range(serial, serial + CHUNK_IMAGES)
            paths = [self._file(k, permutations) for k in serials]
            try:
                chunk = torch.stack(list(self._decoders.map(self._image, serials, paths)))
            except Exception as error:  # hand any failure to the learner's thread, which raises it
                self._put(error)
                return
            if not self._put(chunk):
                return
            serial += CHUNK_IMAGES

    def sample(self, batch_size: int) -> torch.Tensor:
        """The next ``batch_size`` images of the stream, float ``(B, 3, S, S)`` in [0, 1]."""
        if self._stop.is_set():
            raise RuntimeError("ImageOverlay.sample() after close().")
        chunks = [self._buffer]
        available = len(self._buffer)
        while available < batch_size:
            item = self._ready.get()
            if isinstance(item, Exception):
                self.close()
                raise RuntimeError(f"Overlay image loading failed: {item}") from item
            chunks.append(item)
            available += len(item)
        images = torch.cat(chunks)
        self._buffer = images[batch_size:]
        return images[:batch_size].float().div_(255.0)

    def close(self) -> None:
        """Stop the background threads."""
        self._stop.set()
        self._producer.join()
        self._decoders.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "ImageOverlay":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def overlay(obs: torch.Tensor, images: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """Mix one image into every frame of each observation: ``((1 - alpha) * obs / 255 + alpha * image) * 255``.

    ``obs`` is a float ``(B, 3 * F, H, W)`` frame stack in 0..255, ``images`` a ``(B, 3, H, W)`` batch in [0, 1];
    the result is in 0..255 like ``obs``.
    """
    if images.dim() != 4 or images.shape[1] != 3 or obs.dim() != 4 or obs.shape[1] % 3:
        raise ValueError(f"overlay needs obs (B, 3*F, H, W) and images (B, 3, H, W); got {tuple(obs.shape)} and "
                         f"{tuple(images.shape)}.")
    if images.shape[0] != obs.shape[0] or images.shape[-2:] != obs.shape[-2:]:
        raise ValueError(f"overlay needs one image per observation at the observation size: obs "
                         f"{tuple(obs.shape)}, images {tuple(images.shape)}.")
    frames = obs.shape[1] // 3
    tiled = images.to(device=obs.device, dtype=obs.dtype).repeat(1, frames, 1, 1)
    return ((1.0 - alpha) * obs / 255.0 + alpha * tiled) * 255.0
