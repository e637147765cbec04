"""Training frames/s of one process against N DDP processes (``trainer.devices=N``), the same job otherwise.

    python scripts/bench_ddp.py                                   # DrQ-v2, walker_walk, CPU: 1 vs 2 processes
    python scripts/bench_ddp.py --agent pieg --batch 256 --devices 1 2 4 8 --accelerator gpu --frames 40000

Each configuration is a ``python -m lightning_pieg.train`` job in a subprocess (DDP launches its own processes);
random-init encoder, no overlay, no evaluation, no checkpoints, metrics to CSV. Frames/s is the median of the
progress lines' frames/s after the seed phase (frames of all processes together, rank 0's clock). Repeats
alternate the configurations so that this machine's drift hits them alike; the first ``--devices`` value is the
baseline of the ratio column. With N processes each takes 1/N of the frame budget and of the seed frames, and
runs 1/N of the updates on its own batch of ``--batch`` (README, "Several GPUs and nodes").
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

PROGRESS = re.compile(r"frame\s+([\d,]+)/[\d,]+ \| episode .*\|\s+([\d.]+) frames/s")


def run(args, devices: int, work: Path) -> float:
    """Median frames/s of one job after its seed phase."""
    command = [sys.executable, "-m", "lightning_pieg.train", f"task={args.task}", f"agent={args.agent}",
               f"num_train_frames={args.frames}", f"num_seed_frames={args.seed_frames}", f"batch_size={args.batch}",
               "encoder.weights=none", "augment.overlay=none", "num_eval_episodes=0", "save_video=false",
               "checkpoint_every_frames=0", "diag.feature_shift=false", "mlflow.enabled=false",
               f"trainer.accelerator={args.accelerator}", f"trainer.devices={devices}", "trainer.strategy=ddp"
               if devices > 1 else "trainer.strategy=auto", f"checkpoint_dir={work / f'c{devices}'}",
               f"hydra.run.dir={work / f'out{devices}'}"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=work, timeout=args.timeout)
    if done.returncode != 0:
        raise SystemExit(f"devices={devices} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    rates = [float(rate) for frame, rate in PROGRESS.findall(done.stdout)
             if int(frame.replace(",", "")) > args.seed_frames]
    if not rates:
        raise SystemExit(f"devices={devices}: no progress line after the seed phase; raise --frames")
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="walker_walk")
    parser.add_argument("--agent", default="drqv2", choices=["pieg", "drqv2"])
    parser.add_argument("--batch", type=int, default=64, help="per process")
    parser.add_argument("--devices", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--frames", type=int, default=4000)
    parser.add_argument("--seed-frames", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=3600)
    args = parser.parse_args()
    os.environ.setdefault("MUJOCO_GL", "egl")
    results: dict[int, list[float]] = {devices: [] for devices in args.devices}
    with tempfile.TemporaryDirectory() as folder:
        for repeat in range(args.repeats):
            for devices in args.devices:
                results[devices].append(run(args, devices, Path(folder)))
                print(f"repeat {repeat + 1}/{args.repeats}: devices={devices}: {results[devices][-1]:.1f} frames/s",
                      flush=True)
    base = statistics.median(results[args.devices[0]])
    print(f"\n{args.task}, {args.agent}, batch {args.batch} per process, {args.frames:,} frames "
          f"({args.seed_frames:,} seed), {args.accelerator}, {os.cpu_count()} cores; median of {args.repeats}\n")
    print("| processes | global batch | frames/s | ratio |")
    print("|---:|---:|---:|---:|")
    for devices, rates in results.items():
        rate = statistics.median(rates)
        print(f"| {devices} | {devices * args.batch} | {rate:.1f} | {rate / base:.2f} |")


if __name__ == "__main__":
    main()
