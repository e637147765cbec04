"""Paper Fig. 2: how far an encoder's feature maps move when only the appearance of the scene changes.

For each mode, pairs of renderings of the same physical states under ``train`` and under the mode (see
``lightning_pieg.diagnostics``) go through PIE-G's frozen trunk and DrQ-v2's conv encoder; the table gives the mean
absolute difference of the unit-RMS feature maps (0: no change; at most 2). The PNG shows, per mode, one pair and
where each encoder's maps moved. Metrics, table and PNG are logged to MLflow (experiment ``figures``).

    python scripts/feature_shift.py --checkpoint-pieg pieg/frame_X.ckpt --checkpoint-drqv2 drqv2/frame_Y.ckpt \\
        --task walker_walk --modes video_hard color_hard --dmcgb-dir /data/dmcgb

Without ``--checkpoint-pieg``, PIE-G's trunk is built from ``--weights`` (imagenet, a state-dict file, or none for
random weights: an ablation); without ``--checkpoint-drqv2`` the DrQ-v2 column is left out.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import lightning_pieg  # noqa: F401  (torch before dm_control's EGL renderer: see lightning_pieg/__init__.py)
import torch

from lightning_pieg import diagnostics, envs
from lightning_pieg.encoders import EncoderConfigError, FrozenResNetEncoder, check_config, load_weights
from lightning_pieg.envs.distracting import reported_name
from lightning_pieg.policy import CheckpointError, load_module
from lightning_pieg.tracking import FIGURES_EXPERIMENT, log_figure_run, tracking_uri


class RequestError(ValueError):
    """A request that cannot work; the message names the value and the fix."""


FLAG_OF_ENCODER = {"resnet": "pieg", "conv": "drqv2"}  # --checkpoint-pieg: a ResNet encoder; -drqv2: a conv one


def load_encoder(path: str, agent: str) -> tuple[torch.nn.Module, tuple[int, ...], str]:
    """(encoder, observation shape, description) from a training checkpoint whose encoder is ``agent``'s (a SVEA
    checkpoint passes as ``drqv2``: the same conv encoder)."""
    module = load_module(path)
    encoder = module.hparams.encoder["name"]
    if FLAG_OF_ENCODER[encoder] != agent:
        flag = "--checkpoint-" + FLAG_OF_ENCODER[encoder]
        raise RequestError(f"--checkpoint-{agent} {path} is a {module.hparams.method} checkpoint ({encoder} encoder); "
                           f"pass it as {flag}.")
    return module.encoder, tuple(module.hparams.obs_shape), f"checkpoint {path}"


def encoders_of(args) -> tuple[dict[str, torch.nn.Module], dict[str, str], tuple[int, ...]]:
    """The encoders to compare (``pieg`` always, ``drqv2`` with a checkpoint), their sources, the obs shape."""
    encoders, sources, shapes = {}, {}, {}
    if args.checkpoint_pieg:
        if args.weights:
            raise RequestError("pass either --checkpoint-pieg (the trunk a run trained with) or --weights, not both.")
        encoders["pieg"], shapes["pieg"], sources["pieg"] = load_encoder(args.checkpoint_pieg, "pieg")
    else:
        weights = args.weights or "imagenet"
        check_config(args.arch, args.layer, "adaptive")
        shape = (3 * args.frame_stack, args.image_size, args.image_size)
        encoders["pieg"] = FrozenResNetEncoder(shape, arch=args.arch, layer=args.layer,
                                               state_dict=load_weights(args.arch, weights), head_dim=1)
        shapes["pieg"], sources["pieg"] = shape, f"{args.arch} layer {args.layer}, weights={weights}"
    if args.checkpoint_drqv2:
        encoders["drqv2"], shapes["drqv2"], sources["drqv2"] = load_encoder(args.checkpoint_drqv2, "drqv2")
    if len(set(shapes.values())) > 1:
        raise RequestError(f"the encoders take different observations ({shapes}); compare checkpoints trained with "
                           f"the same frame stack and image size (or set --frame-stack/--image-size to match).")
    for encoder in encoders.values():
        encoder.eval()
    return encoders, sources, next(iter(shapes.values()))


def env_options(args, obs_shape: tuple[int, ...]) -> dict:
    options = {"frame_stack": obs_shape[0] // 3, "image_size": obs_shape[-1], "action_repeat": args.action_repeat}
    for key in ("dmcgb_dir", "davis_dir"):
        if getattr(args, key):
            options[key] = getattr(args, key)
    if not args.distracting_background:
        options["distracting_background"] = False
    return options


def plot(path: Path, task: str, rows: list[dict], encoders: list[str]) -> Path:
    """One row per mode: the train and mode renderings of one state, then each encoder's per-location shift."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = 2 + len(encoders)
    vmax = {name: max(float(row["images"][name].max()) for row in rows) for name in encoders}
    figure, axes = plt.subplots(len(rows), columns, figsize=(2.6 * columns, 2.6 * len(rows)), squeeze=False)
    for r, row in enumerate(rows):
        train_frame, mode_frame = (frame[-3:].transpose(1, 2, 0) for frame in row["pair"])
        panels = [(train_frame, "train"), (mode_frame, row["name"])]
        panels += [(row["images"][name], f"{name} shift {row['shift'][name]:.3f}") for name in encoders]
        for c, (image, title) in enumerate(panels):
            axis = axes[r, c]
            if c < 2:
                axis.imshow(image, interpolation="nearest")
            else:
                shown = axis.imshow(image, cmap="magma", vmin=0.0, vmax=vmax[encoders[c - 2]],
                                    interpolation="nearest")
                figure.colorbar(shown, ax=axis, fraction=0.046, pad=0.04)
            axis.set_title(title, fontsize=9)
            axis.set_xticks([])
            axis.set_yticks([])
    figure.suptitle(f"{task}: feature-map shift vs train (mean |a-b| of unit-RMS maps)", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def table(task: str, rows: list[dict], encoders: list[str], sources: dict[str, str]) -> str:
    lines = [f"Feature shift vs train on {task} (mean |a-b| of unit-RMS feature maps; 0 = unchanged, max 2)", ""]
    lines += ["| mode | pairs | " + " | ".join(encoders) + " |", "|---|---:|" + "---:|" * len(encoders)]
    for row in rows:
        lines.append(f"| {row['name']} | {len(row['pairs'])} | "
                     + " | ".join(f"{row['shift'][name]:.4f}" for name in encoders) + " |")
    lines += [""] + [f"- {name}: {source}" for name, source in sources.items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint-pieg", help="a PIE-G training checkpoint (frame_*.ckpt)")
    parser.add_argument("--checkpoint-drqv2", help="a DrQ-v2 training checkpoint (frame_*.ckpt)")
    parser.add_argument("--weights", help="without --checkpoint-pieg: imagenet (default), a state-dict file, or none")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--layer", type=int, default=2, help="with --weights: cut the ResNet after this layer")
    parser.add_argument("--task", default="walker_walk")
    parser.add_argument("--modes", nargs="+", default=["video_hard", "color_hard"])
    parser.add_argument("--dmcgb-dir", default=os.environ.get("DMCGB_DIR"))
    parser.add_argument("--davis-dir", default=os.environ.get("DAVIS_DIR"))
    parser.add_argument("--no-distracting-background", dest="distracting_background", action="store_false",
                        help="distracting_cs without DAVIS videos (results are named ..._no_background)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=16, help="agent steps after the reset (pairs = steps + 1)")
    parser.add_argument("--bn", choices=diagnostics.BN_STATISTICS, default="per_observation",
                        help="PIE-G's BatchNorm statistics (per_observation: the benchmark evaluation's)")
    parser.add_argument("--frame-stack", type=int, default=3, help="with --weights")
    parser.add_argument("--image-size", type=int, default=84, help="with --weights")
    parser.add_argument("--action-repeat", type=int, default=2)
    parser.add_argument("--out", default="feature_shift.png")
    parser.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")
    parser.add_argument("--no-mlflow", dest="mlflow", action="store_false")
    args = parser.parse_args()

    torch.set_num_threads(max(1, min(torch.get_num_threads(), 4)))
    try:
        for mode in args.modes:
            envs.check(args.task, mode)
        if "train" in args.modes:
            raise RequestError("--modes: train is the reference every mode is compared with; leave it out.")
        encoders, sources, obs_shape = encoders_of(args)
        options = env_options(args, obs_shape)
        names = {mode: reported_name(mode, options) for mode in args.modes}
        rows = []
        for mode in args.modes:
            pairs = diagnostics.paired_observations(args.task, mode, args.seed, args.steps, **options)
            shift = {name: diagnostics.feature_shift(encoder, pairs, args.bn) for name, encoder in encoders.items()}
            images = {name: diagnostics.shift_image(encoder, pairs[-1], args.bn) for name, encoder in encoders.items()}
            rows.append({"mode": mode, "name": names[mode], "pairs": pairs, "pair": pairs[-1], "shift": shift,
                         "images": images})
    except (RequestError, ValueError, FileNotFoundError, CheckpointError, EncoderConfigError,
            envs.RenderingError) as error:
        hint = " (--weights takes the values of encoder.weights)" if isinstance(error, EncoderConfigError) else ""
        print(f"error: {error}{hint}", file=sys.stderr)
        sys.exit(2)

    text = table(args.task, rows, list(encoders), sources)
    print(text, flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(out, args.task, rows, list(encoders))
    markdown = out.with_suffix(".md")
    markdown.write_text(text)
    print(f"wrote {out} and {markdown}")
    if args.mlflow:
        uri = tracking_uri(args.tracking_uri)
        metrics = {f"feature_shift/{name}/{row['name']}": row["shift"][name] for row in rows for name in encoders}
        params = {"task": args.task, "modes": ",".join(args.modes), "seed": args.seed, "steps": args.steps,
                  "bn": args.bn, **{f"encoder.{name}": source for name, source in sources.items()}}
        run_id = log_figure_run(uri, f"feature_shift-{args.task}", params, metrics, [out, markdown])
        print(f"logged to MLflow run {run_id} (experiment {FIGURES_EXPERIMENT!r}, {uri})")


if __name__ == "__main__":
    main()
