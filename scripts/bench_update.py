"""Time, count and size one agent update of the paper (PIE-G and its DrQ-v2 baseline), overlay augmentation included.

    python scripts/bench_update.py [--batches 32 256] [--repeats 5] [--warmup 2] [--device cpu|gpu] [--threads N]

One update is ``PIEGModule.training_step`` run without a Trainer (its optimisers and ``manual_backward`` patched in,
as tests/test_update_maths.py does): random shift, encoder, n-step clipped double-Q critic loss plus the critic loss
on the overlaid observations (``module.overlay_images`` is a fixed synthetic image batch in [0, 1]), the critic +
encoder Adam step, the actor loss and step, and the soft target update. The batch and the images are placed on the
device beforehand, so host-to-device copies are not timed. Networks are full size (conf/config.yaml and
conf/method/*.yaml): hidden 1024; PIE-G feature_dim 256 over a ResNet-18 trunk to layer 2 with a 1024-wide head;
DrQ-v2 feature_dim 50 over its conv encoder. Encoder weights are random (nothing is downloaded); speed and FLOPs do
not depend on them. Walker's shapes: 3 stacked 84x84 RGB frames, action dimension 6.

Printed tables:
  1. fp32, per agent and batch: median seconds per update, FLOPs of one update (counted once with
     torch.utils.flop_counter.FlopCounterMode: forward and backward of the whole update), GFLOP/s, and that rate as
     a fraction of an fp32 N^3 matmul's GFLOP/s timed in the same run.
  2. fp32 against bf16 (the whole training_step inside the forward context of Lightning's bf16-mixed precision
     plugin, as ``trainer.precision=bf16-mixed`` runs it: autocast with its cast cache off, the module's
     ``cast_once`` casting the encoder and critic weights once per update; parameters, gradients and Adam stay fp32): the speed ratio, and the relative change of the first update's critic loss (the actor loss
     beside it), from identical module copies on the same batch with torch reseeded before each.
  3. Peak memory of one configuration alone, in a fresh process: on GPU torch.cuda.max_memory_allocated, on CPU
     the growth of the process's peak RSS over its first updates (VmHWM from /proc/self/status, which is
     getrusage's ru_maxrss for this process image alone: ru_maxrss itself would carry the parent's peak into a
     spawned child; ru_maxrss is the fallback where /proc is missing).

Within each timing round every configuration (agent x precision) runs one update, in alternating order (forward,
then reversed), so drift of the machine's speed hits all of them alike.
"""
from __future__ import annotations

import argparse
import copy
import gc
import multiprocessing
import platform
import resource
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext

import torch
from torch.distributions.utils import _standard_normal
from torch.utils.flop_counter import FlopCounterMode

import lightning_pieg  # noqa: F401  (import order)
from pytorch_lightning.plugins.precision import MixedPrecision
from lightning_pieg.host_memory import keep_freed_memory
from lightning_pieg.module import PIEGModule
from lightning_pieg.replay import Replay

OBS, ACTION_DIM = (9, 84, 84), 6  # walker: 3 stacked RGB frames
FEATURE_DIM = {"pieg": 256, "drqv2": 50}  # conf/method/{pieg,drqv2}.yaml
HIDDEN_DIM = 1024  # conf/config.yaml
ENCODER = {"arch": "resnet18", "layer": 2, "bn": "adaptive", "head_dim": 1024}  # conf/config.yaml (weights: random)
PRECISIONS = ("fp32", "bf16")
STEP = 10_000  # past the exploration steps; sets the actor's noise scale
SEED = 0
MEMORY_UPDATES = 2  # the first update also allocates Adam's state


# --- inputs ----------------------------------------------------------------------------------------------------------
class FixedImages:
    """Stands in for ``ImageOverlay``: ``sample(b)`` returns the same ``(b, 3, 84, 84)`` float images in [0, 1]."""

    def __init__(self, batch_size: int, device: torch.device):
        generator = torch.Generator().manual_seed(1)
        self.images = torch.rand(batch_size, 3, *OBS[1:], generator=generator).to(device)

    def sample(self, batch_size: int) -> torch.Tensor:
        if batch_size > len(self.images):
            raise ValueError(f"FixedImages holds {len(self.images)} images; {batch_size} were asked for.")
        return self.images[:batch_size]


def make_batch(batch_size: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """One replay batch ``(obs, action, reward, discount, next_obs, step)``, fixed by a seed, on ``device``."""
    generator = torch.Generator().manual_seed(0)
    batch = (torch.randint(0, 256, (batch_size, *OBS), generator=generator, dtype=torch.uint8),
             torch.rand(batch_size, ACTION_DIM, generator=generator) * 2 - 1,
             torch.rand(batch_size, 1, generator=generator),
             torch.full((batch_size, 1), 0.99),
             torch.randint(0, 256, (batch_size, *OBS), generator=generator, dtype=torch.uint8),
             torch.tensor(STEP))
    return tuple(x.to(device) for x in batch)


# --- the update ------------------------------------------------------------------------------------------------------
def build_module(agent: str, batch_size: int, device: torch.device) -> PIEGModule:
    """A full-size module with random weights (seeded) and the fixed overlay images, in training mode."""
    torch.manual_seed(SEED)
    module = PIEGModule(OBS, ACTION_DIM, agent=agent, feature_dim=FEATURE_DIM[agent], hidden_dim=HIDDEN_DIM,
                        encoder=ENCODER).to(device)
    module.overlay_images = FixedImages(batch_size, device)
    return module.train()


def attach_optimisers(module: PIEGModule) -> PIEGModule:
    """Let ``training_step`` run without a Trainer (as tests/test_update_maths.py does). Call after any deepcopy:
    the patched attributes hold this module's own optimisers."""
    optimisers = module.configure_optimizers()
    module.optimizers = lambda: optimisers
    module.manual_backward = lambda loss: loss.backward()
    return module


def update(module: PIEGModule, batch: tuple[torch.Tensor, ...], precision: str) -> dict[str, float]:
    """One whole update (``training_step``); bf16 runs it in Lightning's bf16-mixed forward context, as training
    does. Returns its logged metrics."""
    context = (MixedPrecision("bf16-mixed", module.device.type).forward_context() if precision == "bf16"
               else nullcontext())
    with context:
        module.training_step(iter([(batch, 0, 0)]))
    return module.last_metrics


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_update(module: PIEGModule, batch: tuple[torch.Tensor, ...], precision: str) -> float:
    synchronize(module.device)
    start = time.perf_counter()
    update(module, batch, precision)
    synchronize(module.device)
    return time.perf_counter() - start


def count_flops(module: PIEGModule, batch: tuple[torch.Tensor, ...]) -> int:
    """FLOPs of one fp32 update (forward and backward; FlopCounterMode counts matmuls and convolutions)."""
    with FlopCounterMode(display=False) as counter:
        update(module, batch, "fp32")
    return counter.get_total_flops()


def noise_draws_agree(batch_size: int, device: torch.device) -> bool:
    """Whether the actor's first ``(B, action_dim)`` noise draw (networks.TruncatedNormal: in the dtype of the
    mean, bf16 under autocast) is the fp32 draw rounded, from the same seed. torch's CPU generator fills bf16 and
    fp32 alike only for some sizes (here: element counts that are multiples of 16); otherwise the precision
    comparison also compares different noise."""
    torch.manual_seed(SEED)
    fp32 = _standard_normal((batch_size, ACTION_DIM), dtype=torch.float32, device=device)
    torch.manual_seed(SEED)
    bf16 = _standard_normal((batch_size, ACTION_DIM), dtype=torch.bfloat16, device=device)
    return bool(torch.equal(fp32.bfloat16(), bf16))


# --- measurements ----------------------------------------------------------------------------------------------------
def matmul_gflops(size: int, repeats: int, device: torch.device) -> float:
    """GFLOP/s of an fp32 ``size^3`` matmul: ``2 size^3`` FLOPs over the median of ``repeats`` runs (after one)."""
    generator = torch.Generator().manual_seed(2)
    a, b = (torch.randn(size, size, generator=generator).to(device) for _ in range(2))
    out = torch.mm(a, b)
    seconds = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return 2 * size ** 3 / statistics.median(seconds) / 1e9


def measure_batch(batch_size: int, args: argparse.Namespace, device: torch.device) -> dict[tuple[str, str], dict]:
    """Per (agent, precision): first-update losses (same weights, batch and seed), fp32 FLOPs, update seconds."""
    batch = make_batch(batch_size, device)
    modules, results = {}, {}
    for agent in FEATURE_DIM:
        base = build_module(agent, batch_size, device)
        copies = {"fp32": base, "bf16": copy.deepcopy(base)}  # identical weights, BatchNorm statistics, images
        for precision, module in copies.items():
            attach_optimisers(module)
            torch.manual_seed(SEED + 1)  # same shifts in both; the same actor noise where noise_draws_agree
            metrics = update(module, batch, precision)
            results[agent, precision] = {"critic_loss": metrics["train/critic_loss"],
                                         "actor_loss": metrics["train/actor_loss"]}
            modules[agent, precision] = module
        results[agent, "fp32"]["flops"] = count_flops(copies["fp32"], batch)  # an extra (untimed) update
        results[agent, "bf16"]["same_noise"] = noise_draws_agree(batch_size, device)

    configs = list(modules)
    seconds = {config: [] for config in configs}
    for round_ in range(args.warmup + args.repeats):
        for config in configs if round_ % 2 == 0 else reversed(configs):
            elapsed = timed_update(modules[config], batch, config[1])
            if round_ >= args.warmup:
                seconds[config].append(elapsed)
    for config in configs:
        results[config]["seconds"] = statistics.median(seconds[config])
    del modules
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return results


def peak_rss_bytes() -> tuple[int, str]:
    """This process's peak resident set size and where it was read. VmHWM (/proc/self/status) first: it belongs to
    the process image, whereas getrusage's ru_maxrss carries the parent's peak over fork + exec (a spawned probe
    would report the benchmark's own peak)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024, "VmHWM of /proc/self/status"
    except OSError:
        pass
    scale = 1 if platform.system() == "Darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale, "resource.getrusage ru_maxrss"


def memory_probe(agent: str, precision: str, batch_size: int, device_name: str,
                 threads: int, reuse_freed_memory: bool) -> tuple[float, float, str]:
    """In a fresh process: (MiB before the updates, peak MiB during ``MEMORY_UPDATES`` updates, what was read).
    GPU: torch's allocated and max allocated bytes; CPU: the process's peak RSS before and after."""
    torch.set_num_threads(threads)
    if reuse_freed_memory:
        keep_freed_memory()
    device = resolve_device(device_name)
    module = attach_optimisers(build_module(agent, batch_size, device))
    batch = make_batch(batch_size, device)
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before, source = torch.cuda.memory_allocated(device), "torch.cuda.max_memory_allocated"
    else:
        gc.collect()
        before, source = peak_rss_bytes()
    for _ in range(MEMORY_UPDATES):
        update(module, batch, precision)
    if device.type == "cuda":
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak, _ = peak_rss_bytes()
    return before / 2 ** 20, peak / 2 ** 20, source


def measure_memory(batches: list[int], device_name: str,
                   reuse_freed_memory: bool) -> dict[tuple[str, int, str], tuple[float, float, str]]:
    """One fresh (spawned) process per configuration, so no configuration's peak hides another's."""
    context = multiprocessing.get_context("spawn")
    memory = {}
    for batch_size in batches:
        for agent in FEATURE_DIM:
            for precision in PRECISIONS:
                with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
                    memory[agent, batch_size, precision] = pool.submit(
                        memory_probe, agent, precision, batch_size, device_name, torch.get_num_threads(),
                        reuse_freed_memory).result()
    return memory


# --- reporting -------------------------------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    if name == "gpu":
        if not torch.cuda.is_available():
            raise SystemExit("--device gpu: CUDA is not available here.")
        return torch.device("cuda", 0)
    return torch.device("cpu")


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            lines = cpuinfo.read().splitlines()
        models = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
        return f"{models[0]} ({len(models)} logical CPUs)" if models else platform.processor()
    except OSError:
        return platform.processor() or platform.machine()


def relative_change(new: float, old: float) -> str:
    return f"{(new - old) / abs(old):+.2e}" if old else "n/a"


def print_tables(results: dict[tuple[str, int, str], dict], memory: dict | None, matmul: float,
                 args: argparse.Namespace, device: torch.device) -> None:
    rows = sorted({(agent, batch) for agent, batch, _ in results}, key=lambda row: (row[0] != "pieg", row[1]))
    timing = (f"median of {args.repeats} timed updates after {args.warmup} warm-up rounds; in every round the four "
              f"configurations (PIE-G and DrQ-v2, fp32 and bf16) ran one update each, alternating the order "
              f"(forward, then reversed), so drift hits them alike")

    print(f"\n**1. fp32 update, overlay augmentation included** ({timing}). FLOPs of one update counted once with "
          f"FlopCounterMode (forward + backward of the whole update, overlay pass included; it counts matmuls and "
          f"convolutions, not elementwise ops or the Adam steps). Matmul reference: fp32 {args.matmul_size}^3, "
          f"{matmul:,.1f} GFLOP/s.\n")
    print("| agent | batch | update (s) | GFLOP per update | GFLOP/s | fraction of matmul GFLOP/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for agent, batch in rows:
        fp32 = results[agent, batch, "fp32"]
        rate = fp32["flops"] / fp32["seconds"] / 1e9
        print(f"| {agent} | {batch} | {fp32['seconds']:.4f} | {fp32['flops'] / 1e9:,.1f} | {rate:,.1f} | "
              f"{rate / matmul:.3f} |")

    print(f"\n**2. fp32 against bf16** (bf16: the whole training_step in Lightning's bf16-mixed forward context "
          f"on {device.type!r}, as training runs it; {timing}). Losses: the first update of identical module copies on the same batch, torch "
          f"reseeded before each; relative change = (bf16 - fp32) / |fp32|. The actor loss (-mean min Q, near 0 at "
          f"random weights) is shown as values. 'same noise': whether the actor's first noise draw in bf16 is the "
          f"fp32 draw rounded (otherwise the two losses also differ by their noise).\n")
    print("| agent | batch | fp32 (s) | bf16 (s) | fp32 / bf16 | critic loss fp32 | critic loss bf16 | "
          "critic rel. change | actor loss fp32 / bf16 | same noise |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for agent, batch in rows:
        fp32, bf16 = results[agent, batch, "fp32"], results[agent, batch, "bf16"]
        print(f"| {agent} | {batch} | {fp32['seconds']:.4f} | {bf16['seconds']:.4f} | "
              f"{fp32['seconds'] / bf16['seconds']:.2f} | {fp32['critic_loss']:.6g} | {bf16['critic_loss']:.6g} | "
              f"{relative_change(bf16['critic_loss'], fp32['critic_loss'])} | "
              f"{fp32['actor_loss']:.4g} / {bf16['actor_loss']:.4g} | {'yes' if bf16['same_noise'] else 'no'} |")

    if memory is None:
        return
    source = next(iter(memory.values()))[2]
    if device.type == "cuda":
        print(f"\n**3. Peak GPU memory** (torch.cuda.max_memory_allocated over {MEMORY_UPDATES} updates, each "
              f"configuration alone in a fresh process; 'before': allocated after building the module, its "
              f"optimisers and the batch).\n")
        print("| agent | batch | precision | before (MiB) | peak (MiB) | peak - before (MiB) |")
    else:
        print(f"\n**3. Peak CPU memory** (the process's peak RSS, read from {source}, each configuration alone in "
              f"a fresh process: 'before' after imports, module, optimisers and batch; 'growth' is how much the "
              f"peak rose over {MEMORY_UPDATES} updates, Adam's state included).\n")
        print("| agent | batch | precision | peak RSS before (MiB) | peak RSS after (MiB) | growth (MiB) |")
    print("|---|---:|---|---:|---:|---:|")
    for agent, batch in rows:
        for precision in PRECISIONS:
            before, peak, _ = memory[agent, batch, precision]
            print(f"| {agent} | {batch} | {precision} | {before:,.0f} | {peak:,.0f} | {peak - before:,.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 256])
    parser.add_argument("--repeats", type=int, default=5, help="timed updates per configuration")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds before them")
    parser.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--matmul-size", type=int, default=4096, help="side of the fp32 reference matmul")
    parser.add_argument("--matmul-repeats", type=int, default=5)
    parser.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                        help="table 3 (one fresh process per configuration)")
    parser.add_argument("--reuse-freed-memory", action=argparse.BooleanOptionalAction, default=True,
                        help="glibc keeps large freed blocks, as training does (trainer.reuse_freed_memory)")
    args = parser.parse_args()
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be at least 1 and --warmup at least 0")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    reusing = args.reuse_freed_memory and keep_freed_memory()

    print(f"machine: {machine(device)}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}, float32 matmul precision "
          f"{torch.get_float32_matmul_precision()!r}, freed memory kept for reuse: {'yes' if reusing else 'no'}")
    matmul = matmul_gflops(args.matmul_size, args.matmul_repeats, device)
    print(f"fp32 {args.matmul_size}^3 matmul: {matmul:,.1f} GFLOP/s (median of {args.matmul_repeats})", flush=True)

    results = {}
    for batch in args.batches:
        for (agent, precision), result in measure_batch(batch, args, device).items():
            results[agent, batch, precision] = result
            print(f"  batch {batch} {agent} {precision}: {result['seconds']:.4f} s", flush=True)
    memory = measure_memory(args.batches, args.device, args.reuse_freed_memory) if args.memory else None
    print_tables(results, memory, matmul, args, device)

    replay = Replay(1000, (3, 84, 84), ACTION_DIM, frame_stack=3, nstep=3, discount=0.99)
    print(f"\nreplay: {replay.nbytes / replay.capacity:,.0f} bytes per stored transition (walker, action dim "
          f"{ACTION_DIM}); a stacked (9, 84, 84) observation pair would take {2 * 9 * 84 * 84:,}")


if __name__ == "__main__":
    main()
