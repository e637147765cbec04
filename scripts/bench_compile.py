"""One update with ``compile=true`` (torch.compile of the encoder, actor and critics, in place) against eager fp32.

    python scripts/bench_compile.py                       # PIE-G and DrQ-v2, batch 32, CPU
    python scripts/bench_compile.py --batches 256 --device gpu

The update is ``scripts/bench_update.py``'s (overlay on, a fixed synthetic batch, random-init encoder). Both
modules start from the same weights; the first compiled update includes the compilation and is reported on its
own; after ``--warmup`` untimed rounds the configurations alternate, and the table gives medians, the speed ratio
and the critic loss of the first update in both (same batch, same seed).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_update import FEATURE_DIM, SEED, attach_optimisers, build_module, make_batch, timed_update, update  # noqa: E402


def compiled(module):
    for network in (module.encoder, module.actor, module.critic, module.critic_target):
        network.compile()  # what PIEGModule.on_fit_start does with compile=true
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[32])
    parser.add_argument("--agents", nargs="+", default=list(FEATURE_DIM), choices=list(FEATURE_DIM))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    args = parser.parse_args()
    device = torch.device("cuda" if args.device == "gpu" else "cpu")
    rows = []
    for batch_size in args.batches:
        batch = make_batch(batch_size, device)
        for agent in args.agents:
            eager = attach_optimisers(build_module(agent, batch_size, device))
            fast = compiled(attach_optimisers(copy.deepcopy(eager)))
            losses = {}
            for name, module in (("eager", eager), ("compiled", fast)):
                torch.manual_seed(SEED + 1)
                started = time.perf_counter()
                losses[name] = update(module, batch, "fp32")["train/critic_loss"]
                if name == "compiled":
                    first = time.perf_counter() - started
            seconds = {"eager": [], "compiled": []}
            for round_ in range(args.warmup + args.repeats):
                order = (("eager", eager), ("compiled", fast))
                for name, module in order if round_ % 2 == 0 else reversed(order):
                    elapsed = timed_update(module, batch, "fp32")
                    if round_ >= args.warmup:
                        seconds[name].append(elapsed)
            eager_s, fast_s = statistics.median(seconds["eager"]), statistics.median(seconds["compiled"])
            rows.append((agent, batch_size, eager_s, fast_s, first, losses["eager"], losses["compiled"]))
            print(f"{agent} batch {batch_size}: eager {eager_s:.3f} s, compiled {fast_s:.3f} s", flush=True)
    print(f"\ntorch {torch.__version__}, {args.device}, {torch.get_num_threads()} threads; medians of "
          f"{args.repeats} after {args.warmup} warm-up rounds\n")
    print("| agent | batch | eager fp32 (s) | compiled (s) | eager / compiled | first compiled update (s) | "
          "critic loss eager | critic loss compiled |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for agent, batch_size, eager_s, fast_s, first, loss_eager, loss_fast in rows:
        print(f"| {agent} | {batch_size} | {eager_s:.3f} | {fast_s:.3f} | {eager_s / fast_s:.2f} | {first:.1f} | "
              f"{loss_eager:.6g} | {loss_fast:.6g} |")


if __name__ == "__main__":
    main()
