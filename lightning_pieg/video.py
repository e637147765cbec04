"""H.264 mp4 writing (plays in browsers and in the MLflow UI) with PyAV."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import av
import numpy as np


def write_video(path: str | Path, frames: Sequence[np.ndarray], fps: int = 30, scale: int = 3) -> Path:
    """Write ``(H, W, 3)`` or ``(3, H, W)`` uint8 frames, enlarged ``scale`` times (nearest), as H.264 yuv420p."""
    path = Path(path)
    if not frames:
        raise ValueError("no frames to write")
    images = [np.asarray(f) for f in frames]
    images = [f.transpose(1, 2, 0) if f.shape[0] == 3 and f.shape[-1] != 3 else f for f in images]
    images = [np.ascontiguousarray(f.repeat(scale, axis=0).repeat(scale, axis=1)) for f in images]
    height, width = images[0].shape[:2]
    tmp = path.with_name(path.name + ".tmp.mp4")
    with av.open(str(tmp), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = width + width % 2, height + height % 2  # yuv420p needs even sizes
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "20"}
        for image in images:
            if image.shape[:2] != (stream.height, stream.width):
                image = np.pad(image, ((0, stream.height - height), (0, stream.width - width), (0, 0)))
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    os.replace(tmp, path)
    return path
