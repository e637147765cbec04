"""Paper Fig. 5: what each ResNet layer (1-4) of the pre-trained trunk makes of one observation.

One PNG grid: the frame (the newest of the observation after ``--steps`` seeded random actions) with each layer's
channel-mean activation, then one row per layer with its first ``--channels`` channels (each on its own colour
scale). The ResNet runs in eval mode (running BatchNorm statistics) on ImageNet-normalised input, as a frozen
pre-trained trunk does. The PNG is logged to MLflow (experiment ``figures``).

    python scripts/feature_maps.py --weights imagenet --task walker_walk --mode train --out feature_maps.png
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import lightning_pieg  # noqa: F401  (torch before dm_control's EGL renderer: see lightning_pieg/__init__.py)
import numpy as np
import torch

from lightning_pieg import diagnostics, envs
from lightning_pieg.encoders import EncoderConfigError, load_weights
from lightning_pieg.envs.distracting import reported_name
from lightning_pieg.tracking import FIGURES_EXPERIMENT, log_figure_run, tracking_uri


def observe(task: str, mode: str, seed: int, steps: int, **options) -> np.ndarray:
    """The newest ``(3, H, W)`` frame after a reset and ``steps`` seeded uniform random actions."""
    env = envs.make(task, mode, seed=seed, **options)
    try:
        random = np.random.default_rng(seed)
        spec = env.action_spec()
        time_step = env.reset()
        for _ in range(steps):
            if time_step.last():
                break
            time_step = env.step(random.uniform(spec.minimum, spec.maximum, spec.shape).astype(spec.dtype))
        return env.frame.copy()
    finally:
        env.close()


def plot(path: Path, frame: np.ndarray, maps: list[torch.Tensor], channels: int, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = max(channels, 5)
    figure, axes = plt.subplots(5, columns, figsize=(1.6 * columns, 1.75 * 5), squeeze=False)
    for axis in axes.ravel():
        axis.set_xticks([])
        axis.set_yticks([])
        axis.set_frame_on(False)
    axes[0, 0].imshow(frame.transpose(1, 2, 0), interpolation="nearest")
    axes[0, 0].set_title("frame", fontsize=8)
    for index, layer in enumerate(maps, start=1):
        axes[0, index].imshow(layer.mean(0).numpy(), cmap="viridis", interpolation="nearest")
        axes[0, index].set_title(f"layer {index} mean", fontsize=8)
        for channel in range(min(channels, layer.shape[0])):
            axis = axes[index, channel]
            axis.imshow(layer[channel].numpy(), cmap="viridis", interpolation="nearest")
            if channel == 0:
                axis.set_ylabel(f"layer {index}\n{layer.shape[0]}x{layer.shape[1]}x{layer.shape[2]}", fontsize=8)
            axis.set_title(f"ch {channel}", fontsize=7)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default="imagenet", help="imagenet, a state-dict file, or none (random)")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--task", default="walker_walk")
    parser.add_argument("--mode", default="train")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=20, help="random agent steps before the observation")
    parser.add_argument("--channels", type=int, default=8, help="channels shown per layer")
    parser.add_argument("--image-size", type=int, default=84)
    parser.add_argument("--dmcgb-dir", default=os.environ.get("DMCGB_DIR"))
    parser.add_argument("--davis-dir", default=os.environ.get("DAVIS_DIR"))
    parser.add_argument("--no-distracting-background", dest="distracting_background", action="store_false")
    parser.add_argument("--out", default="feature_maps.png")
    parser.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")
    parser.add_argument("--no-mlflow", dest="mlflow", action="store_false")
    args = parser.parse_args()

    options = {"image_size": args.image_size}
    options.update({key: getattr(args, key) for key in ("dmcgb_dir", "davis_dir") if getattr(args, key)})
    if not args.distracting_background:
        options["distracting_background"] = False
    try:
        if args.channels <= 0:
            raise ValueError(f"--channels {args.channels} must be positive.")
        envs.check(args.task, args.mode)
        resnet = diagnostics.build_resnet(args.arch, load_weights(args.arch, args.weights))
        name = reported_name(args.mode, options)
        frame = observe(args.task, args.mode, args.seed, args.steps, **options)
    except (ValueError, FileNotFoundError, EncoderConfigError, envs.RenderingError) as error:
        hint = " (--weights takes the values of encoder.weights)" if isinstance(error, EncoderConfigError) else ""
        print(f"error: {error}{hint}", file=sys.stderr)
        sys.exit(2)
    maps = diagnostics.resnet_layer_maps(resnet, frame, args.arch)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(out, frame, maps, args.channels,
         f"{args.arch} (weights={args.weights}) feature maps, {args.task} {name}, seed {args.seed}, step {args.steps}")
    for index, layer in enumerate(maps, start=1):
        print(f"layer {index}: {tuple(layer.shape)}, mean activation {float(layer.mean()):.3f}, "
              f"zero fraction {float((layer == 0).float().mean()):.2f}")
    print(f"wrote {out}")
    if args.mlflow:
        uri = tracking_uri(args.tracking_uri)
        params = {"task": args.task, "mode": name, "seed": args.seed, "steps": args.steps, "arch": args.arch,
                  "weights": args.weights}
        metrics = {f"feature_maps/layer{i}/mean_activation": float(m.mean()) for i, m in enumerate(maps, start=1)}
        run_id = log_figure_run(uri, f"feature_maps-{args.task}-{name}", params, metrics, [out])
        print(f"logged to MLflow run {run_id} (experiment {FIGURES_EXPERIMENT!r}, {uri})")


if __name__ == "__main__":
    main()
