"""Write one PNG grid of every generalization mode x every DMC-GB domain, as the agent sees them.

Rows: walker, cheetah, cartpole, finger, ball_in_cup. Columns: train; color_easy and color_hard in two consecutive
episodes each (their colours are drawn per episode: sky, floor and body should all change between the two);
video_easy (only the sky replaced) and video_hard (sky and floor replaced); distracting_cs. A mode whose data is
missing is shown as a labelled grey cell, never replaced by other data. Without a DAVIS folder distracting_cs runs
with ``distracting_background=False`` and its column says so. The PNG is logged to MLflow (experiment ``figures``).

    python scripts/montage_modes.py --dmcgb-dir /data/dmcgb [--davis-dir /data/DAVIS] [--size 84] --out modes.png
"""
from __future__ import annotations

import argparse
import os
import textwrap
from pathlib import Path

import lightning_pieg  # noqa: F401  (torch before dm_control's EGL renderer: see lightning_pieg/__init__.py)
import numpy as np

from lightning_pieg import envs
from lightning_pieg.envs.distracting import reported_name
from lightning_pieg.envs.dmcgb import RandomColors, VideoBackground
from lightning_pieg.envs.wrappers import Wrapper
from lightning_pieg.tracking import FIGURES_EXPERIMENT, log_figure_run, tracking_uri

DOMAIN_TASKS = {"walker": "walker_walk", "cheetah": "cheetah_run", "cartpole": "cartpole_swingup",
                "finger": "finger_spin", "ball_in_cup": "cup_catch"}
MODES = ("train", "color_easy", "color_hard", "video_easy", "video_hard", "distracting_cs")
COLOR_MODES = ("color_easy", "color_hard")


def layer_of(env, kind: type):
    while isinstance(env, Wrapper):
        if isinstance(env, kind):
            return env
        env = env._env
    return None


def episode_frames(task: str, mode: str, episodes: int, seed: int, steps: int,
                   **options) -> list[tuple[np.ndarray, str]]:
    """(newest frame ``(H, W, 3)``, note) for each of ``episodes`` consecutive episodes of one environment, after
    the reset and ``steps`` seeded random actions; the note names the colour set or video shown."""
    env = envs.make(task, mode, seed=seed, **options)
    try:
        random = np.random.default_rng(seed)
        spec = env.action_spec()
        out = []
        for _ in range(episodes):
            time_step = env.reset()
            for _ in range(steps):
                if time_step.last():
                    break
                time_step = env.step(random.uniform(spec.minimum, spec.maximum, spec.shape).astype(spec.dtype))
            colors, video = layer_of(env, RandomColors), layer_of(env, VideoBackground)
            note = (f"colour set {colors.color_index}" if colors is not None else
                    f"video{video.video_index}.mp4" if video is not None else "")
            out.append((env.frame.transpose(1, 2, 0).copy(), note))
        return out
    finally:
        env.close()


def columns_of(options: dict) -> list[tuple[str, int, str]]:
    """(mode, episode, column title) for each column of the grid."""
    columns = []
    for mode in MODES:
        name = reported_name(mode, options)
        if mode in COLOR_MODES:
            columns += [(mode, episode, f"{name}\nepisode {episode + 1}") for episode in range(2)]
        else:
            columns.append((mode, 0, name.replace("_no_background", "\nNO background (no DAVIS dir)")))
    return columns


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dmcgb-dir", default=os.environ.get("DMCGB_DIR"))
    parser.add_argument("--davis-dir", default=os.environ.get("DAVIS_DIR"))
    parser.add_argument("--size", type=int, default=84, help="observation side (84: what the agent sees)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=5, help="random agent steps after each reset")
    parser.add_argument("--domains", nargs="+", default=list(DOMAIN_TASKS), choices=list(DOMAIN_TASKS))
    parser.add_argument("--out", default="montage_modes.png")
    parser.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")
    parser.add_argument("--no-mlflow", dest="mlflow", action="store_false")
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    options: dict = {"image_size": args.size}
    if args.dmcgb_dir:
        options["dmcgb_dir"] = args.dmcgb_dir
    if args.davis_dir:
        options["davis_dir"] = args.davis_dir
    else:
        options["distracting_background"] = False
    columns = columns_of(options)
    figure, axes = plt.subplots(len(args.domains), len(columns), figsize=(1.75 * len(columns),
                                                                          1.9 * len(args.domains)), squeeze=False)
    skipped: dict[str, str] = {}
    for row, domain in enumerate(args.domains):
        task = DOMAIN_TASKS[domain]
        frames: dict[str, list[tuple[np.ndarray, str]] | str] = {}
        for mode in MODES:
            try:
                frames[mode] = episode_frames(task, mode, 2 if mode in COLOR_MODES else 1, args.seed, args.steps,
                                              **options)
            except (FileNotFoundError, ValueError) as error:  # missing data: say so in the cell, substitute nothing
                frames[mode] = str(error)
                skipped.setdefault(mode, str(error))
        for column, (mode, episode, title) in enumerate(columns):
            axis = axes[row, column]
            axis.set_xticks([])
            axis.set_yticks([])
            entry = frames[mode]
            if isinstance(entry, str):
                axis.set_facecolor("0.85")
                missing = entry.split("'")[1].rsplit("/", 2) if "'" in entry else ["data"]
                axis.text(0.5, 0.5, "SKIPPED:\ndata missing\n" + "\n".join(textwrap.wrap("/".join(missing[-2:]), 16)),
                          ha="center", va="center", fontsize=6.5, color="darkred", transform=axis.transAxes)
            else:
                image, note = entry[episode]
                axis.imshow(image, interpolation="nearest")
                if note:
                    axis.set_xlabel(note, fontsize=6.5, labelpad=1)
            if row == 0:
                axis.set_title(title, fontsize=7.5)
            if column == 0:
                axis.set_ylabel(f"{domain}\n({task})", fontsize=8)
    figure.suptitle(f"generalization modes, {args.size}x{args.size} observations, seed {args.seed}, "
                    f"{args.steps} random steps after each reset", fontsize=9)
    figure.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=120)
    plt.close(figure)
    print(f"wrote {out}")
    for mode, reason in skipped.items():
        print(f"skipped {mode}: {reason}")
    if args.mlflow:
        params = {"domains": ",".join(args.domains), "size": args.size, "seed": args.seed, "steps": args.steps,
                  "dmcgb_dir": args.dmcgb_dir, "davis_dir": args.davis_dir,
                  "skipped": ",".join(skipped) or "none"}
        run_id = log_figure_run(tracking_uri(args.tracking_uri), "montage_modes", params, {}, [out])
        print(f"logged to MLflow run {run_id} (experiment {FIGURES_EXPERIMENT!r})")


if __name__ == "__main__":
    main()
