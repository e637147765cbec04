"""Write a PNG montage of the unseen-shape and unseen-texture modes, as the agent sees them and at a larger size.

Columns: reach_duplo in train / deformed / deformed_thin, drawer_close in train / wood / metal / blanket (only when a
blanket path is given, else blanket_generated). Rows: the 84x84 observation (shown pixel for pixel, enlarged) and the
same scene rendered at ``--size``.

    python scripts/montage.py --out montage.png [--size 256] [--blanket-path /path/to/blanket.png]
"""
from __future__ import annotations

import argparse
import os

import lightning_pieg  # noqa: F401  (torch before dm_control's EGL renderer: see lightning_pieg/__init__.py)
import numpy as np

from lightning_pieg import envs
from lightning_pieg.envs import drawerworld


def last_frame(task: str, mode: str, seed: int, image_size: int, steps: int, **options) -> np.ndarray:
    """The newest (H, W, 3) frame after a reset and ``steps`` zero actions."""
    env = envs.make(task, mode, seed, image_size=image_size, **options)
    try:
        env.reset()
        for _ in range(steps):
            env.step(np.zeros(env.action_spec().shape, np.float32))
        return env.frame.transpose(1, 2, 0)
    finally:
        env.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="montage.png")
    parser.add_argument("--size", type=int, default=256, help="side of the larger rendering")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--blanket-path", default=os.environ.get(drawerworld.BLANKET_ENV_VAR))
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blanket = "blanket" if args.blanket_path else "blanket_generated"
    columns = [("reach_duplo", mode) for mode in ("train", "deformed", "deformed_thin")]
    columns += [("drawer_close", mode) for mode in ("train", "wood", "metal", blanket)]
    options = {"blanket_path": args.blanket_path} if args.blanket_path else {}

    figure, axes = plt.subplots(2, len(columns), figsize=(2.2 * len(columns), 4.8), squeeze=False)
    for column, (task, mode) in enumerate(columns):
        for row, size in enumerate((84, args.size)):
            image = last_frame(task, mode, args.seed, size, steps=5, **options)
            axis = axes[row, column]
            axis.imshow(image, interpolation="nearest")
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title(f"{task}\n{mode}", fontsize=9)
            if column == 0:
                axis.set_ylabel(f"{size}x{size}", fontsize=9)
    figure.tight_layout()
    figure.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
