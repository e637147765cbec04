"""Time one agent update (critic + actor + target) at several batch sizes, PIE-G and DrQ-v2 encoders.

    python scripts/bench_update.py [--batches 32 256] [--repeats 5] [--device cpu]

Prints the median of ``--repeats`` timed updates (after warm-up) per configuration, the ratio of PIE-G to DrQ-v2
at the same batch (the baseline, measured in the same process), and the replay's bytes per stored transition.
Full-size networks: PIE-G's ResNet-18 trunk to layer 2 with its 1024-wide head, hidden 1024.
"""
from __future__ import annotations

import argparse
import statistics
import time

import lightning_pieg  # noqa: F401  (import order)
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, IterableDataset

from lightning_pieg.module import PIEGModule
from lightning_pieg.replay import Replay

OBS, ACTION_DIM = (9, 84, 84), 6  # walker


class SameBatch(IterableDataset):
    def __init__(self, batch: int, count: int):
        generator = torch.Generator().manual_seed(0)
        self.batch = (torch.randint(0, 256, (batch, *OBS), generator=generator, dtype=torch.uint8),
                      torch.rand(batch, ACTION_DIM, generator=generator) * 2 - 1, torch.rand(batch, 1),
                      torch.full((batch, 1), 0.99),
                      torch.randint(0, 256, (batch, *OBS), generator=generator, dtype=torch.uint8),
                      torch.tensor(10_000))
        self.count = count

    def __iter__(self):
        for _ in range(self.count):
            yield self.batch


class UpdateTimer(pl.Callback):
    def __init__(self):
        self.seconds: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if outputs:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.seconds.append(time.perf_counter() - self._start)


def time_updates(agent: str, batch: int, repeats: int, warmup: int, device: str) -> float:
    pl.seed_everything(0, verbose=False)
    module = PIEGModule(OBS, ACTION_DIM, agent=agent, feature_dim=256 if agent == "pieg" else 50,
                        hidden_dim=1024, encoder={"arch": "resnet18", "layer": 2, "bn": "adaptive",
                                                  "head_dim": 1024})
    timer = UpdateTimer()
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator=device, devices=1, callbacks=[timer])
    trainer.fit(module, DataLoader(SameBatch(batch, warmup + repeats), batch_size=None))
    return statistics.median(timer.seconds[warmup:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 256])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu | gpu")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    rows = []
    for batch in args.batches:
        baseline = time_updates("drqv2", batch, args.repeats, args.warmup, args.device)
        pieg = time_updates("pieg", batch, args.repeats, args.warmup, args.device)
        rows.append((batch, pieg, baseline))
        print(f"  batch {batch}: pieg {pieg:.3f} s, drqv2 {baseline:.3f} s", flush=True)
    print("\n| batch | PIE-G update (s) | DrQ-v2 update (s, baseline) | PIE-G / DrQ-v2 |")
    print("|---:|---:|---:|---:|")
    for batch, pieg, baseline in rows:
        print(f"| {batch} | {pieg:.3f} | {baseline:.3f} | {pieg / baseline:.2f} |")
    print(f"\nmedian of {args.repeats} updates after {args.warmup} warm-up updates")
    replay = Replay(1000, (3, 84, 84), ACTION_DIM, frame_stack=3, nstep=3, discount=0.99)
    print(f"replay: {replay.nbytes / replay.capacity:,.0f} bytes per stored transition (walker, action dim "
          f"{ACTION_DIM}); a stacked (9, 84, 84) observation pair would take {2 * 9 * 84 * 84:,}")


if __name__ == "__main__":
    main()
