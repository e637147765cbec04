"""End-to-end training frames/s at the paper's update schedule, with the wall time split by where it goes.

    python scripts/bench_train.py                                  # PIE-G b32 and DrQ-v2 b64, walker_walk, CPU
    python scripts/bench_train.py --agents pieg --batch 256 --envs 1 4 8 --precision 32-true bf16-mixed \\
        --accelerator gpu --frames 20000                            # a GPU node

Each configuration is a short ``lightning_pieg.train`` run in this process (one update every 2 agent steps, n-step,
the overlay augmentation on, with a folder of synthetic images, random-init encoder; no evaluation, no
checkpoints). ``--envs`` lists the collectors: 0 is one environment in this process, N is N worker processes
stepping while the learner updates. Frames/s counts the frames after the seed phase over the time they took.
The split: ``act`` (choosing actions), ``env`` (waiting for the environments: with workers, only what the update
did not hide), ``sample`` (replay), ``update`` (the optimiser steps), and the rest (logging, Lightning). The first
configuration listed is the baseline of the ratio column; repeats alternate the configurations so that this
machine's drift hits them alike; the table gives medians, and each repeat's frames/s.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
from hydra import compose, initialize_config_dir
from PIL import Image

import lightning_pieg  # noqa: F401  (torch before dm_control)
from lightning_pieg.config import CONF_DIR
from lightning_pieg.envs.rendering import renderer_string
from lightning_pieg.train import train

BATCH = {"pieg": 32, "drqv2": 64}


class Split(pl.Callback):
    """Where the wall time after the seed phase went: from the end of the first update to the end of the last (so
    neither the first update, which starts the image threads, nor the final checkpoint counts)."""

    def __init__(self):
        self.started, self.frames_at_start = None, 0

    def _seconds(self, trainer, pl_module) -> dict[str, float]:
        collector, stream = trainer.datamodule.collector, trainer.datamodule.stream
        return dict(collector.seconds, sample=stream.sample_seconds, update=pl_module.update_seconds)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not outputs:  # no update in this batch
            return
        now, frame, seconds = time.perf_counter(), trainer.datamodule.collector.frame, self._seconds(trainer, pl_module)
        if self.started is None:  # the first update: the seed phase is over
            self.started, self.frames_at_start, self.base = now, frame, seconds
        self.wall = now - self.started
        self.parts = {key: seconds[key] - self.base[key] for key in seconds}
        self.frames = frame - self.frames_at_start


def synthetic_images(folder: Path, count: int = 64) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    random = np.random.default_rng(0)
    for index in range(count):
        Image.fromarray(random.integers(0, 256, (96, 128, 3), dtype=np.uint8)).save(folder / f"{index}.png")
    return folder


def run(args, agent: str, envs: int, precision: str, images: Path, work: Path) -> dict:
    batch = args.batch or BATCH[agent]
    overrides = [f"task={args.task}", f"agent={agent}", "encoder.weights=none", f"batch_size={batch}",
                 f"num_train_frames={args.frames}", f"num_seed_frames={args.seed_frames}", "num_eval_episodes=0",
                 "save_video=false", "checkpoint_every_frames=0", "diag.feature_shift=false",
                 f"augment.overlay={images}", f"collector.num_envs={envs}", f"trainer.precision={precision}",
                 f"trainer.accelerator={args.accelerator}", "update_every_steps=2",
                 f"checkpoint_dir={work / 'checkpoints'}", "mlflow.enabled=false"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    split = Split()
    train(cfg, extra_callbacks=[split], output_dir=work / "out")
    return {"fps": split.frames / split.wall, "wall": split.wall, **{k: v / split.wall for k, v in split.parts.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="walker_walk")
    parser.add_argument("--agents", nargs="+", default=["pieg", "drqv2"], choices=sorted(BATCH))
    parser.add_argument("--batch", type=int, default=None, help="default: PIE-G 32, DrQ-v2 64")
    parser.add_argument("--envs", nargs="+", type=int, default=[0, 1, 2], help="0: in process; N: N workers")
    parser.add_argument("--precision", nargs="+", default=["32-true"], help="e.g. 32-true bf16-mixed")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--frames", type=int, default=3000)
    parser.add_argument("--seed-frames", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    os.environ.setdefault("MUJOCO_GL", "egl")
    print(f"renderer: {renderer_string()}", flush=True)
    configs = [(agent, envs, precision) for agent in args.agents for precision in args.precision for envs in args.envs]
    results: dict[tuple, list[dict]] = {config: [] for config in configs}
    with tempfile.TemporaryDirectory() as tmp:
        images = synthetic_images(Path(tmp) / "images")
        for repeat in range(args.repeats):
            for index, config in enumerate(configs if repeat % 2 == 0 else configs[::-1]):
                results[config].append(run(args, *config, images, Path(tmp) / f"r{repeat}_{index}"))
    print(f"\n{args.task}, {args.frames:,} frames ({args.seed_frames:,} seed), update every 2 agent steps, overlay on, "
          f"median of {args.repeats}; shares of the wall time after the seed phase\n")
    print("| agent | batch | collector | precision | frames/s | ratio | act | env | sample | update | other | "
          "each run's frames/s |")
    print("|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    baseline: dict[str, float] = {}
    for (agent, envs, precision), runs in results.items():
        median = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        baseline.setdefault(agent, median["fps"])
        other = 1.0 - sum(median[key] for key in ("act", "env", "sample", "update"))
        each = " / ".join(f"{run['fps']:.1f}" for run in runs)
        collector = "in process" if envs == 0 else f"{envs} worker{'s' if envs > 1 else ''}"
        print(f"| {agent} | {args.batch or BATCH[agent]} | {collector} | {precision} | {median['fps']:.1f} | "
              f"{median['fps'] / baseline[agent]:.2f} | {median['act']:.0%} | {median['env']:.0%} | "
              f"{median['sample']:.0%} | {median['update']:.0%} | {other:.0%} | {each} |")


if __name__ == "__main__":
    main()
