"""Does it learn? Train cartpole_balance from pixels with a few seeds and plot the eval curves beside DrQ-v2's.

    python scripts/learning_check.py --agent drqv2 --batch-size 64 --seeds 1 2 --frames 60000   # side by side
    python scripts/learning_check.py --agent drqv2 --batch-size 64 --seeds 1 2 --frames 60000 --jobs 1  # in turn
    python scripts/learning_check.py --agent pieg --weights none --batch-size 16 --seeds 1 --frames 10000 --eval-every 5000
    python scripts/learning_check.py --report         # results so far, from the MLflow runs under --out
    python scripts/learning_check.py --quick          # smoke test of the pipeline (CI)

Each seed is one MLflow run in the experiment ``learning_check`` of ``<out>/mlflow.db`` (``mlflow ui
--backend-store-uri sqlite:///learning_check/mlflow.db``). Every ``--eval-every`` frames the policy's mean action
is evaluated for ``--eval-episodes`` episodes. ``--jobs N`` trains N seeds at once, in processes that split the
CPU cores between them (each logs to ``<out>/seed_<seed>.log``); by default every seed at once, up to one per core.
Side by side keeps every core busy: a process that steps and renders its environment uses one core, and another
process's update uses the rest, whereas one process on all cores leaves most of them idle while its environment runs.

The report is built from the MLflow runs (every ``mlflow.db`` under ``--out``; the newest run per seed with this
agent, batch and budget), so ``--report`` can read it while runs go on or long after. It writes
``<out>/learning_check_<agent>.csv`` (seed, frame, eval return, wall time, frames/s) and ``<out>/learning_check_<agent>.png``
(mean and min-max over seeds, with DrQ-v2's published batch-256 curve), prints the return per seed at each
evaluation and, for the drqv2 agent at 60,000 frames, a verdict against the check's thresholds: mean eval return
at 60k >= 350, higher than at 20k for every seed, and at least 19 training frames/s.

Training frames/s is DrQ-v2's per-episode rate: frames between two training-episode ends over the wall time
between them, the median over the episodes after the seed phase (so the episodes that contain an evaluation drop
out). Seeds trained side by side share the machine: the throughput is the sum of their rates.
"""
from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import lightning_pieg  # noqa: F401  (import order)
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
import numpy as np  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from lightning_pieg.train import CONF_DIR, train  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT.parent / "shared" / "paper" / "drqv2_curves" / "dmc_cartpole_balance.csv"
EXPERIMENT = "learning_check"
THRESHOLD_RETURN, THRESHOLD_FPS = 350.0, 19.0
# the authors' DrQ-v2 code at batch 64 on the project's 2-core CPU (seed 1, 5 eval episodes), as the check reports it
REFERENCE_CPU_BATCH_64 = ([0, 20_000, 40_000, 60_000], [391.0, 136.0, 258.0, 448.0])


def tracking_uri(out: Path) -> str:
    return f"sqlite:///{(out / 'mlflow.db').resolve()}"


def train_seed(args, seed: int) -> None:
    overrides = [
        "task=cartpole_balance", f"agent={args.agent}", f"seed={seed}", f"batch_size={args.batch_size}",
        f"num_train_frames={args.frames}", f"eval_every_frames={args.eval_every}",
        f"num_eval_episodes={args.eval_episodes}", f"mlflow.experiment={EXPERIMENT}",
        f"mlflow.tracking_uri={tracking_uri(args.out)}",
        f"mlflow.run_name=learning_check-{args.agent}-b{args.batch_size}-s{seed}",
        f"checkpoint_dir={args.out}/checkpoints/{args.agent}_s{seed}", f"checkpoint_every_frames={args.frames}",
        f"encoder.weights={args.weights}", *args.override]
    if args.quick:
        overrides += ["num_seed_frames=400", "num_expl_steps=200", "env.time_limit=2"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    train(cfg, output_dir=args.out / "outputs" / f"{args.agent}_s{seed}")


def train_side_by_side(args) -> None:
    """One process per seed, ``--jobs`` at a time, each with its share of the cores."""
    # Tables and experiment are created here, once: children that both find no experiment would both create it,
    # and the second fails on the unique name.
    client = mlflow.MlflowClient(tracking_uri(args.out))
    if client.get_experiment_by_name(EXPERIMENT) is None:
        client.create_experiment(EXPERIMENT)
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    pending, running = list(args.seeds), []
    while pending or running:
        while pending and len(running) < args.jobs:
            seed = pending.pop(0)
            log = args.out / f"seed_{seed}.log"
            command = [sys.executable, __file__, "--agent", args.agent, "--batch-size", str(args.batch_size),
                       "--seeds", str(seed), "--frames", str(args.frames), "--eval-every", str(args.eval_every),
                       "--eval-episodes", str(args.eval_episodes), "--weights", args.weights, "--out", str(args.out),
                       "--train-only", *(["--quick"] if args.quick else []), *args.override]
            with open(log, "w") as handle:
                running.append((seed, subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env)))
            print(f"seed {seed}: training in process {running[-1][1].pid} with {threads} thread(s); "
                  f"progress in {log}", flush=True)
        time.sleep(5)
        for seed, process in [item for item in running if item[1].poll() is not None]:
            running.remove((seed, process))
            if process.returncode != 0:
                log = args.out / f"seed_{seed}.log"
                tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-20:])
                sys.exit(f"{tail}\nseed {seed} failed with exit status {process.returncode}: the last lines of {log} "
                         f"are above")


def training_fps(episode_ends: list[tuple[int, int]], seed_frames: int) -> float:
    """Median frames/s between consecutive training-episode ends (frame, timestamp in ms) after the seed phase."""
    rates = [(f1 - f0) / ((t1 - t0) / 1000) for (f0, t0), (f1, t1) in zip(episode_ends, episode_ends[1:])
             if f0 >= seed_frames and t1 > t0]
    return float(np.median(rates)) if rates else float("nan")


def collect_runs(args) -> list[dict]:
    """The newest run per seed with this agent, batch size and budget, from every mlflow.db under ``--out``."""
    newest: dict[int, dict] = {}
    for db in sorted(args.out.rglob("mlflow.db")):
        client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db.resolve()}")
        experiment = client.get_experiment_by_name(EXPERIMENT)
        if experiment is None:
            continue
        for run in client.search_runs([experiment.experiment_id]):
            params = run.data.params
            method = params.get("method", params.get("agent"))  # runs before methods logged agent
            if (method, params.get("batch_size"), params.get("num_train_frames")) != \
                    (args.agent, str(args.batch_size), str(args.frames)):
                continue
            seed = int(params["seed"])
            if seed in args.seeds and (seed not in newest or run.info.start_time > newest[seed]["start"]):
                history = lambda key: client.get_metric_history(run.info.run_id, key)  # noqa: E731
                episodes = sorted((m.step, m.timestamp) for m in history("train/episode_reward"))
                end = run.info.end_time if run.info.status == "FINISHED" else None
                newest[seed] = {
                    "seed": seed, "run_id": run.info.run_id, "status": run.info.status, "db": db,
                    "start": run.info.start_time, "end": end,
                    "evals": sorted((m.step, m.value) for m in history("eval/train/episode_reward")),
                    "wall": ((end or int(time.time() * 1000)) - run.info.start_time) / 1000,
                    "fps": training_fps(episodes, int(params.get("num_seed_frames", 0))),
                    "frame": episodes[-1][0] if episodes else 0}
    return [newest[seed] for seed in sorted(newest)]


def side_by_side(results: list[dict]) -> None:
    """Each run's ``sharing``: how many of the runs were training at its midpoint (1 when run alone)."""
    for r in results:
        middle = r["start"] + r["wall"] * 500
        r["sharing"] = sum(o["start"] <= middle <= (o["end"] or float("inf")) for o in results)


def reference_curve() -> tuple[np.ndarray, np.ndarray] | None:
    if not REFERENCE.is_file():
        return None
    with open(REFERENCE) as handle:
        rows = [(int(r["frame"]), float(r["episode_reward"])) for r in csv.DictReader(handle)]
    frames = np.array(sorted({f for f, _ in rows}))
    return frames, np.array([np.mean([v for f, v in rows if f == frame]) for frame in frames])


def plot(results: list[dict], args, path: Path) -> None:
    frames = sorted(set.intersection(*({f for f, _ in r["evals"]} for r in results)))
    returns = np.array([[dict(r["evals"])[f] for f in frames] for r in results])
    fig, ax = plt.subplots(figsize=(6, 4))
    label = f"lightning_pieg {args.agent}, batch {args.batch_size} ({len(results)} seed{'s' * (len(results) > 1)})"
    ax.plot(frames, returns.mean(0), "-o", markersize=3, label=label)
    ax.fill_between(frames, returns.min(0), returns.max(0), alpha=0.25)
    reference = reference_curve()
    if reference is not None:
        keep = reference[0] <= max(max(frames), args.frames)
        ax.plot(reference[0][keep], reference[1][keep], "k--o", markersize=3, label="DrQ-v2 published, batch 256 (10 seeds)")
    if args.agent == "drqv2" and args.batch_size == 64:
        ax.plot(*REFERENCE_CPU_BATCH_64, ":s", color="gray", markersize=3,
                label="DrQ-v2 authors' code, batch 64, 2-core CPU (1 seed)")
    ax.set(xlabel="frames", ylabel="eval episode return (mean action)", title="cartpole_balance", ylim=(0, 1000))
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), fontsize=8)  # below the axes: it hides no curve
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def report(args) -> None:
    results = collect_runs(args)
    if not results:
        sys.exit(f"no {args.agent} runs at batch {args.batch_size} and {args.frames:,} frames for seeds "
                 f"{args.seeds} in any mlflow.db under {args.out}: train them first (see --help)")
    side_by_side(results)
    for r in results:
        state = "" if r["status"] == "FINISHED" else f" [{r['status'].lower()} at frame {r['frame']:,}]"
        shared = f", {r['sharing']} runs side by side" if r["sharing"] > 1 else ""
        print(f"seed {r['seed']}: " + ", ".join(f"{f:,}: {v:.0f}" for f, v in r["evals"])
              + f" | {r['fps']:.1f} training frames/s{shared} | {r['wall'] / 60:.1f} min{state}", flush=True)

    stem = args.out / f"learning_check_{args.agent}"
    with open(stem.with_suffix(".csv"), "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["agent", "batch_size", "seed", "frame", "eval_return", "wall_minutes",
                         "training_frames_per_s", "runs_side_by_side", "status"])
        for r in results:
            for frame, value in r["evals"]:
                writer.writerow([args.agent, args.batch_size, r["seed"], frame, f"{value:.1f}",
                                 f"{r['wall'] / 60:.1f}", f"{r['fps']:.1f}", r["sharing"], r["status"]])
    if any(r["evals"] for r in results):
        plot([r for r in results if r["evals"]], args, stem.with_suffix(".png"))
    print(f"wrote {stem.with_suffix('.csv')} and {stem.with_suffix('.png')}; "
          f"runs in {', '.join(sorted({tracking_uri(r['db'].parent) for r in results}))}")

    if args.quick or args.agent != "drqv2" or args.frames != 60_000:
        return
    if any(r["status"] != "FINISHED" for r in results):
        print("verdict: not yet - some runs are still going (or did not finish)")
        return
    at = lambda r, frame: dict(r["evals"]).get(frame, float("nan"))  # noqa: E731
    final = float(np.mean([at(r, 60_000) for r in results]))
    rising = all(at(r, 60_000) > at(r, 20_000) for r in results)
    throughput = min(r["fps"] * r["sharing"] for r in results)
    ok = final >= THRESHOLD_RETURN and rising and throughput >= THRESHOLD_FPS
    print(f"verdict: {'PASS' if ok else 'FAIL'} - mean eval return at 60k {final:.0f} (>= {THRESHOLD_RETURN:.0f}), "
          f"60k > 20k for every seed: {rising}, {throughput:.1f} training frames/s on this machine "
          f"(>= {THRESHOLD_FPS:.0f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agent", default="drqv2", choices=["drqv2", "pieg"])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seeds", type=int, nargs="+", help="default: 1 2 (--quick: 1)")
    parser.add_argument("--frames", type=int, default=60_000)
    parser.add_argument("--eval-every", type=int, default=10_000)
    parser.add_argument("--eval-episodes", type=int, default=10)
    parser.add_argument("--weights", default="none", help="PIE-G encoder weights: none, imagenet or a file")
    parser.add_argument("--out", type=Path, default=Path("learning_check"))
    parser.add_argument("--jobs", type=int, default=None,
                        help="seeds trained at once, each in its own process (default: all, up to one per core)")
    parser.add_argument("--report", action="store_true", help="no training: report the runs under --out")
    parser.add_argument("--train-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true",
                        help="2,000 frames, batch <= 16, short episodes, no verdict; seed 1 unless --seeds")
    parser.add_argument("override", nargs="*", help="extra Hydra overrides")
    args = parser.parse_args()
    if args.jobs is not None and args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    args.seeds = args.seeds or ([1] if args.quick else [1, 2])
    args.jobs = args.jobs or min(len(args.seeds), os.cpu_count() or 1)
    if args.quick:
        args.frames, args.eval_every, args.eval_episodes = 2_000, 1_000, 2
        args.batch_size = min(args.batch_size, 16)
    args.out.mkdir(parents=True, exist_ok=True)

    if not args.report:
        if args.jobs > 1 and len(args.seeds) > 1:
            train_side_by_side(args)
        else:
            for seed in args.seeds:
                train_seed(args, seed)
    if not args.train_only:
        report(args)


if __name__ == "__main__":
    main()
