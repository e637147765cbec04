"""Reproduce the paper's experiments in one command (README: "Reproducing the paper")::

    python scripts/reproduce.py plan table1                 # or --dry-run table1: the runs and their cost
    python scripts/reproduce.py run table1 --overlay /data/places365/train --dmcgb-dir /data/dmcgb
    python scripts/reproduce.py aggregate table1            # tables (markdown, CSV) and plots beside the paper's

Experiments: table1, table2, table3, fig4, or all. Hydra overrides for every training run go after ``--``
(``-- batch_size=128 mlflow.tracking_uri=sqlite:///runs.db``). Running ``run`` again skips what is done and
resumes what was interrupted.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import lightning_pieg  # noqa: F401  (torch/torchvision before dm_control: see lightning_pieg/__init__.py)
from lightning_pieg import experiments, reproduce
from lightning_pieg.config import split_overrides
from lightning_pieg.console import UserError, run_cli


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["plan", "run", "aggregate"])
    parser.add_argument("experiments", nargs="+", help=f"{', '.join(experiments.EXPERIMENTS)} or all")
    parser.add_argument("--dry-run", action="store_true", help="run: only plan (the runs and their cost)")
    parser.add_argument("--root", type=Path, default=Path("reproduce"), help="checkpoints and results (reproduce/)")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(experiments.DEFAULT_SEEDS))
    parser.add_argument("--frames", type=int, default=None, help="frame budget of every run (default: the task "
                        "presets', the paper's)")
    parser.add_argument("--tasks", nargs="+", help="only these of the experiment's tasks")
    parser.add_argument("--methods", nargs="+", help="only these of its methods (pieg, drqv2, svea)")
    parser.add_argument("--modes", nargs="+", help="only these of its evaluation modes")
    parser.add_argument("--episodes", type=int, default=100, help="episodes per mode of the final evaluation (100)")
    parser.add_argument("--weights", default="imagenet", help="PIE-G's ResNet weights: imagenet (torchvision's "
                        "cache, downloaded once), a state-dict file, or none (random; needs --allow-missing)")
    parser.add_argument("--overlay", help="image folder of the overlay augmentation (Places365), for PIE-G and SVEA")
    parser.add_argument("--dmcgb-dir", help="DMC-GB's data, for the video and colour modes (default $DMCGB_DIR)")
    parser.add_argument("--blanket", help="Drawer World's blanket.png (default $DRAWERWORLD_BLANKET); without it "
                        "table2 evaluates blanket_generated, ours, never compared with the paper")
    parser.add_argument("--allow-missing", action="store_true", help="go on without ImageNet weights or overlay "
                        "images (every table then says what was missing)")
    parser.add_argument("--eval-override", action="append", default=[], metavar="KEY=VALUE",
                        help="an override of the final evaluation (conf/evaluate.yaml), e.g. num_envs=8")
    return parser


def main(argv: list[str]) -> None:
    head, overrides = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    head = [word for arg in head for word in shlex.split(arg)]  # `mlflow run` passes a parameter as one argument
    if head[:1] == ["--dry-run"]:  # scripts/reproduce.py --dry-run table1
        head = ["plan", *head[1:]]
    args = parser().parse_args(head)
    overrides = split_overrides(overrides)
    if args.episodes < 1:
        raise UserError(f"--episodes {args.episodes} must be at least 1 (the paper: 100).")
    names = list(experiments.EXPERIMENTS) if args.experiments == ["all"] else args.experiments
    inputs = reproduce.Inputs.resolve(args.weights, args.overlay, args.dmcgb_dir, args.blanket, args.allow_missing)
    reproduce.main("plan" if args.dry_run else args.command, [experiments.experiment(name) for name in names],
                   root=args.root, seeds=tuple(args.seeds), frames=args.frames, tasks=args.tasks,
                   methods=args.methods, modes=args.modes, episodes=args.episodes, inputs=inputs,
                   overrides=overrides, eval_overrides=args.eval_override)


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
