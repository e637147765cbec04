"""Does it learn? Train cartpole_balance from pixels with a few seeds and plot the eval curves beside DrQ-v2's.

    python scripts/learning_check.py --agent drqv2 --batch-size 64 --seeds 1 2 --frames 60000
    python scripts/learning_check.py --agent pieg --batch-size 32 --seeds 1 --frames 20000 --weights none
    python scripts/learning_check.py --quick                  # smoke test of the pipeline (CI)

Each seed is one MLflow run in the experiment ``learning_check`` (``mlflow ui --backend-store-uri
sqlite:///mlflow.db``). Every ``--eval-every`` frames the policy's mean action is evaluated for ``--eval-episodes``
episodes. Writes ``<out>/learning_check_<agent>.csv`` (agent, seed, frame, eval return, wall time) and
``<out>/learning_check_<agent>.png`` (mean and min-max over seeds, with DrQ-v2's published batch-256 curve), prints
the return per seed at each evaluation and, for the drqv2 agent, a verdict against the thresholds of the check:
mean eval return at 60k frames >= 350, higher than at 20k for every seed, and at least 19 frames/s.

Run it detached and read the results later: see the README section "Does it learn?".
"""
from __future__ import annotations

import argparse
import csv
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
THRESHOLD_RETURN, THRESHOLD_FPS = 350.0, 19.0


def run_seed(args, seed: int, tracking_uri: str) -> dict:
    overrides = [
        "task=cartpole_balance", f"agent={args.agent}", f"seed={seed}", f"batch_size={args.batch_size}",
        f"num_train_frames={args.frames}", f"eval_every_frames={args.eval_every}",
        f"num_eval_episodes={args.eval_episodes}", "mlflow.experiment=learning_check",
        f"mlflow.tracking_uri={tracking_uri}", f"mlflow.run_name=learning_check-{args.agent}-b{args.batch_size}-s{seed}",
        f"checkpoint_dir={args.out}/checkpoints/{args.agent}_s{seed}", f"checkpoint_every_frames={args.frames}",
        f"encoder.weights={args.weights}", *args.override]
    if args.quick:
        overrides += ["num_seed_frames=400", "num_expl_steps=200", "env.time_limit=2"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    started = time.perf_counter()
    run_id = train(cfg, output_dir=args.out / "outputs" / f"{args.agent}_s{seed}")
    wall = time.perf_counter() - started
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    evals = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "eval/train/episode_reward"))
    fps = [m.value for m in client.get_metric_history(run_id, "train/fps")]
    return {"seed": seed, "run_id": run_id, "evals": evals, "wall": wall, "fps": args.frames / wall,
            "train_fps": fps[-1] if fps else float("nan")}


def reference_curve() -> tuple[np.ndarray, np.ndarray] | None:
    if not REFERENCE.is_file():
        return None
    with open(REFERENCE) as handle:
        rows = [(int(r["frame"]), float(r["episode_reward"])) for r in csv.DictReader(handle)]
    frames = np.array(sorted({f for f, _ in rows}))
    return frames, np.array([np.mean([v for f, v in rows if f == frame]) for frame in frames])


def plot(results: list[dict], args, path: Path) -> None:
    frames = np.array([f for f, _ in results[0]["evals"]])
    returns = np.array([[v for _, v in r["evals"]] for r in results])
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(frames, returns.mean(0), label=f"lightning_pieg {args.agent}, batch {args.batch_size} "
                                           f"({len(results)} seed{'s' * (len(results) > 1)})")
    ax.fill_between(frames, returns.min(0), returns.max(0), alpha=0.25)
    reference = reference_curve()
    if reference is not None:
        keep = reference[0] <= max(frames.max(), 1)
        ax.plot(reference[0][keep], reference[1][keep], "k--o", markersize=3, label="DrQ-v2 published, batch 256 (10 seeds)")
    ax.set(xlabel="frames", ylabel="eval episode return", title="cartpole_balance", ylim=(0, 1000))
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agent", default="drqv2", choices=["drqv2", "pieg"])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--frames", type=int, default=60_000)
    parser.add_argument("--eval-every", type=int, default=10_000)
    parser.add_argument("--eval-episodes", type=int, default=10)
    parser.add_argument("--weights", default="none", help="PIE-G encoder weights: none, imagenet or a file")
    parser.add_argument("--out", type=Path, default=Path("learning_check"))
    parser.add_argument("--quick", action="store_true",
                        help="one seed, 2,000 frames, batch <= 16, short episodes, no verdict")
    parser.add_argument("override", nargs="*", help="extra Hydra overrides")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.frames, args.eval_every, args.eval_episodes = args.seeds[:1], 2_000, 1_000, 2
        args.batch_size = min(args.batch_size, 16)
    args.out.mkdir(parents=True, exist_ok=True)
    tracking_uri = f"sqlite:///{(args.out / 'mlflow.db').resolve()}"

    results = []
    for seed in args.seeds:
        result = run_seed(args, seed, tracking_uri)
        results.append(result)
        print(f"seed {seed}: " + ", ".join(f"{f:,}: {v:.0f}" for f, v in result["evals"])
              + f" | {result['fps']:.1f} frames/s overall ({result['wall'] / 60:.1f} min)", flush=True)

    stem = args.out / f"learning_check_{args.agent}"
    with open(stem.with_suffix(".csv"), "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["agent", "batch_size", "seed", "frame", "eval_return", "wall_minutes", "frames_per_s"])
        for r in results:
            for frame, value in r["evals"]:
                writer.writerow([args.agent, args.batch_size, r["seed"], frame, f"{value:.1f}",
                                 f"{r['wall'] / 60:.1f}", f"{r['fps']:.1f}"])
    plot(results, args, stem.with_suffix(".png"))
    print(f"wrote {stem.with_suffix('.csv')} and {stem.with_suffix('.png')}; runs in {tracking_uri}")

    if args.quick or args.agent != "drqv2":
        return
    at = lambda r, frame: dict(r["evals"]).get(frame, float("nan"))  # noqa: E731
    final = float(np.mean([at(r, 60_000) for r in results]))
    rising = all(at(r, 60_000) > at(r, 20_000) for r in results)
    fps = min(r["fps"] for r in results)
    ok = final >= THRESHOLD_RETURN and rising and fps >= THRESHOLD_FPS
    print(f"verdict: {'PASS' if ok else 'FAIL'} - mean eval return at 60k {final:.0f} (>= {THRESHOLD_RETURN:.0f}), "
          f"60k > 20k for every seed: {rising}, slowest seed {fps:.1f} frames/s (>= {THRESHOLD_FPS:.0f})")


if __name__ == "__main__":
    main()
