"""Zero-shot generalization of a trained agent, evaluated as in the paper::

    python -m lightning_pieg.evaluate checkpoint=checkpoints/walker_walk_pieg_s1/frame_001100000.ckpt \\
        modes=[train,color_hard,video_easy,video_hard,distracting_cs] dmcgb_dir=/data/dmcgb davis_dir=/data/DAVIS

``checkpoint`` is a ``frame_*.ckpt`` (the ``frame_*.json`` beside it gives the training config and MLflow run) or an
MLflow run id (its final checkpoint artifact is downloaded). Defaults follow the paper's protocol: 100 episodes per
mode, mean actions, environment seed = training seed + 42, the task's own episode length, the training frame stack,
action repeat and image size, and per-observation BatchNorm statistics (``eval.bn``). ``num_envs`` environments run
in lockstep and their observations share one encoder pass; episode k starts the same way whatever ``num_envs`` is
(see ``evaluation.py``). Results go to the checkpoint's MLflow run (``eval/<mode>/*`` at the checkpoint's frame)
with a CSV, a markdown table and an mp4 of each mode's first episode.

Every request error (checkpoint, mode, data folder, MLflow run) stops the command before the module is loaded.
"""
from __future__ import annotations

import csv
import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

import lightning_pieg  # noqa: F401  (torch/torchvision before dm_control: see lightning_pieg/__init__.py)
from lightning_pieg import envs
from lightning_pieg.envs.distracting import reported_name
from lightning_pieg.evaluation import EpisodeMetrics, EpisodeStarts, run_lockstep
from lightning_pieg.policy import CheckpointError, check_checkpoint, load_module
from lightning_pieg.tracking import tracking_uri
from lightning_pieg.video import write_video

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
BN_CHOICES = ("per_observation", "running")
DATA_OPTIONS = ("dmcgb_dir", "davis_dir", "distracting_intensity", "distracting_background")
SEED_OFFSET = 42  # the authors evaluate on seed + 42
RUN_ID = re.compile(r"^[0-9a-f]{32}$")
CSV_COLUMNS = ("mode", "episodes", "mean", "std", "success_rate", "mean_length", "frame", "env_seed", "bn")


class EvaluateError(ValueError):
    """A request that cannot work; the message names the value and the fix."""


def say(message: str) -> None:
    print(f"[lightning_pieg] {message}", flush=True)


# ------------------------------------------------------------------------------------------------- the request
def check_request(cfg: DictConfig) -> list[str]:
    """Cheap checks of the values that need no file; returns the modes as a list."""
    if cfg.checkpoint in (None, ""):
        raise EvaluateError("checkpoint is required: checkpoint=<path to frame_*.ckpt> or checkpoint=<MLflow run id>.")
    for key in ("episodes", "num_envs"):
        if not isinstance(cfg[key], int) or isinstance(cfg[key], bool) or cfg[key] <= 0:
            raise EvaluateError(f"{key}={cfg[key]!r} must be a positive integer.")
    if cfg.seed is not None and not isinstance(cfg.seed, int):
        raise EvaluateError(f"seed={cfg.seed!r} must be an integer (the training seed; environments use seed + 42).")
    if cfg.eval.bn not in BN_CHOICES:
        raise EvaluateError(f"eval.bn={cfg.eval.bn!r} is unknown; choose {' or '.join(BN_CHOICES)}.")
    modes = [cfg.modes] if isinstance(cfg.modes, str) else [str(mode) for mode in cfg.modes]
    if not modes:
        raise EvaluateError("modes=[] is empty; pass e.g. modes=[train,video_hard].")
    return list(dict.fromkeys(modes))


def check_modes(modes: list[str], task: str) -> None:
    known = envs.mode_names(task)
    unknown = [mode for mode in modes if mode not in known]
    if unknown:
        raise EvaluateError(f"unknown mode {unknown[0]!r} for task {task} (the checkpoint's task); "
                            f"valid modes: {', '.join(known)}.")


def download_final_checkpoint(run_id: str, uri: str, directory: Path, modes: list[str]) -> Path:
    """The run's newest ``checkpoints/frame_*.ckpt`` artifact (training uploads the final one) and its sidecar;
    ``modes`` are checked against the run's task first."""
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise EvaluateError(f"checkpoint={run_id}: no such MLflow run in the tracking store {uri}; pass "
                            f"mlflow.tracking_uri=<the store the training logged to>, or a checkpoint path.") from None
    if "task" in run.data.params:
        check_modes(modes, run.data.params["task"])
    names = sorted(item.path for item in client.list_artifacts(run_id, "checkpoints") if item.path.endswith(".ckpt"))
    if not names:
        raise EvaluateError(f"MLflow run {run_id} has no checkpoints/*.ckpt artifact (training uploads it when it "
                            f"ends); pass checkpoint=<path to a frame_*.ckpt> instead.")
    directory.mkdir(parents=True, exist_ok=True)
    local = [Path(download_artifacts(run_id=run_id, artifact_path=name, dst_path=str(directory), tracking_uri=uri))
             for name in (names[-1], names[-1][:-len(".ckpt")] + ".json")]
    return local[0]


def resolve_checkpoint(spec: str, uri: str, download_dir: Path, modes: list[str]) -> tuple[Path, str | None]:
    """(checkpoint file, run id if ``spec`` was one)."""
    path = Path(spec).expanduser()
    if path.exists():
        return check_checkpoint(path), None
    if RUN_ID.match(spec):
        return check_checkpoint(download_final_checkpoint(spec, uri, download_dir, modes)), spec
    raise EvaluateError(f"checkpoint={spec!r} is neither a file nor an MLflow run id (32 hex digits); pass a "
                        f"frame_*.ckpt path or the run id of a training run.")


def read_sidecar(path: Path) -> dict:
    """The ``frame_*.json`` written beside a checkpoint: frame, MLflow run id, training config."""
    meta_path = path.with_suffix(".json")
    if not meta_path.is_file():
        raise EvaluateError(f"{str(path)!r} has no {meta_path.name} beside it; it holds the training config (task, "
                            f"seed, environment options). Copy it from the checkpoint's folder.")
    meta = json.loads(meta_path.read_text())
    if "task" not in meta.get("config", {}):
        raise EvaluateError(f"{str(meta_path)!r} holds no training config; use the file training wrote beside "
                            f"{path.name}.")
    return meta


def env_options(cfg: DictConfig, train_config: dict) -> dict:
    """``envs.make`` options: the training environment's (the network expects its frame stack, action repeat and
    image size) with the task's own episode length, then this command's ``env`` entries and data options."""
    options = {key: value for key, value in train_config.get("env", {}).items() if key != "time_limit"}
    options["time_limit"] = None
    options.update({key: value for key, value in OmegaConf.to_container(cfg.env, resolve=True).items()
                    if value is not None})
    options.update({key: cfg[key] for key in DATA_OPTIONS if cfg.get(key) is not None})
    return options


def check_run(run_id: str, uri: str) -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(tracking_uri=uri).get_run(run_id)
    except MlflowException:
        raise EvaluateError(f"the checkpoint's MLflow run {run_id} is not in the tracking store {uri}; pass "
                            f"mlflow.tracking_uri=<the store the training logged to>.") from None


@dataclass
class Plan:
    """A checked request: what to evaluate, how, and where the results go."""

    checkpoint: Path
    task: str
    names: dict[str, str]  # mode -> the name its results carry (distracting_cs -> distracting_cs_0.1)
    options: dict
    seed: int              # of the environments: training seed (or ``seed``) + 42
    frame: int
    uri: str
    run_id: str | None     # None: the checkpoint names no run (results go to a new one)
    experiment: str


def plan(cfg: DictConfig, download_dir: Path) -> Plan:
    """Every check that needs no environment and no network weights."""
    modes = check_request(cfg)
    uri = tracking_uri(cfg.mlflow.tracking_uri)
    path, run_id = resolve_checkpoint(str(cfg.checkpoint), uri, download_dir, modes)
    meta = read_sidecar(path)
    train_config = meta["config"]
    check_modes(modes, train_config["task"])
    options = env_options(cfg, train_config)
    try:
        names = {mode: reported_name(mode, options) for mode in modes}
    except ValueError as error:
        raise EvaluateError(str(error)) from None
    mlflow_config = train_config.get("mlflow", {})
    if run_id is None:  # a checkpoint path: its run lives in the store the training logged to
        uri = tracking_uri(cfg.mlflow.tracking_uri or mlflow_config.get("tracking_uri"))
        run_id = meta.get("mlflow_run_id")
    if run_id is not None:
        check_run(run_id, uri)
    seed = (cfg.seed if cfg.seed is not None else int(train_config["seed"])) + SEED_OFFSET
    return Plan(path, train_config["task"], names, options, seed, int(meta.get("frame", 0)), uri, run_id,
                mlflow_config.get("experiment") or "lightning_pieg")


def open_run(request: Plan):
    """(MLflow client, run id): the checkpoint's run, or a new run when the checkpoint names none."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=request.uri)
    if request.run_id is not None:
        return client, request.run_id
    found = client.get_experiment_by_name(request.experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(request.experiment)
    run_id = client.create_run(experiment_id, run_name=f"evaluate-{request.task}").info.run_id
    say(f"the checkpoint names no MLflow run: results go to a new run {run_id} in experiment {request.experiment!r}")
    return client, run_id


# ------------------------------------------------------------------------------------------------- the evaluation
def batch_actor(module, per_observation_bn: bool):
    """``(B, *obs_shape)`` uint8 observations -> ``(B, action_dim)`` mean actions in one encoder pass."""
    def act(observations: np.ndarray) -> np.ndarray:
        batch = torch.as_tensor(observations, device=module.device)
        return module.act_batch(batch, per_observation_bn=per_observation_bn).cpu().numpy()

    return act


def artifact_folder(frame: int) -> str:
    return f"evaluation/frame_{frame:09d}"


def evaluate_mode(cfg: DictConfig, request: Plan, mode: str, reference, module, client, run_id: str,
                  output_dir: Path) -> tuple[dict, Path | None]:
    """``cfg.episodes`` episodes of ``mode`` on ``cfg.num_envs`` environments in lockstep; logs the metrics and the
    first episode's video at once (a later mode's failure keeps them). Returns (CSV row, video path or None)."""
    from mlflow.entities import Metric

    name, started = request.names[mode], time.perf_counter()
    workers = [envs.make(request.task, mode, seed=request.seed, **request.options)
               for _ in range(min(cfg.num_envs, cfg.episodes))]
    metrics = EpisodeMetrics()
    act = batch_actor(module, per_observation_bn=cfg.eval.bn == "per_observation")
    try:
        with tqdm(total=cfg.episodes, desc=name, unit="episode", file=sys.stderr, dynamic_ncols=True) as bar:
            def finished(episode) -> None:
                metrics.update(episode)
                bar.update(1)
                bar.set_postfix(reward=f"{episode.reward:.1f}")

            episodes = run_lockstep(workers, act, cfg.episodes, EpisodeStarts(reference), record_first=cfg.video,
                                    on_episode=finished)
    finally:
        for env in workers:
            env.close()
    summary = metrics.compute()
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(f"eval/{name}/{key}", value, now, request.frame)
                                      for key, value in summary.items()])
    video = None
    if cfg.video:
        video = write_video(output_dir / f"{name}.mp4", episodes[0].frames)
        client.log_artifact(run_id, str(video), artifact_folder(request.frame))
    say(f"{name}: episode_reward {summary['episode_reward']:.1f} ± {summary['episode_reward_std']:.1f} "
        f"({time.perf_counter() - started:.0f} s)")
    row = {"mode": name, "episodes": cfg.episodes, "mean": summary["episode_reward"],
           "std": summary["episode_reward_std"], "success_rate": summary.get("success_rate", ""),
           "mean_length": summary["episode_length"], "frame": request.frame, "env_seed": request.seed,
           "bn": cfg.eval.bn}
    return row, video


def markdown_table(rows: list[dict], caption: str) -> str:
    lines = [caption, "", "| mode | episodes | mean | std | success rate |", "|---|---:|---:|---:|---:|"]
    for row in rows:
        success = "–" if row["success_rate"] == "" else f"{row['success_rate']:.2f}"
        lines.append(f"| {row['mode']} | {row['episodes']} | {row['mean']:.1f} | {row['std']:.1f} | {success} |")
    return "\n".join(lines) + "\n"


def evaluate(cfg: DictConfig, output_dir: Path | None = None) -> dict:
    """Run the request; returns ``run_id``, ``rows`` (one dict per mode, as in the CSV) and the written files."""
    output_dir = Path(output_dir) if output_dir is not None else _output_dir()
    request = plan(cfg, output_dir / "checkpoint")
    references = {}  # one per mode, built now: a mode's missing data stops the command before any work
    try:
        for mode in request.names:
            try:
                references[mode] = envs.make(request.task, mode, seed=request.seed, **request.options)
            except (FileNotFoundError, ValueError) as error:
                raise EvaluateError(f"mode {mode}: {error}") from None
        device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        module = load_module(request.checkpoint, device)
        obs_shape = tuple(next(iter(references.values())).observation_spec().shape)
        if obs_shape != tuple(module.hparams.obs_shape):
            raise EvaluateError(f"the environments give {obs_shape} observations but the network takes "
                                f"{tuple(module.hparams.obs_shape)}: keep env.frame_stack and env.image_size as "
                                f"in training.")
        client, run_id = open_run(request)
        say(f"evaluating {request.checkpoint} ({request.task}, frame {request.frame:,}) in "
            f"{', '.join(request.names.values())}: {cfg.episodes} episodes each, env seed {request.seed}, "
            f"{cfg.num_envs} environments in lockstep, BatchNorm {cfg.eval.bn}; MLflow run {run_id}")
        output_dir.mkdir(parents=True, exist_ok=True)
        rows, videos = [], []
        for mode in request.names:
            row, video = evaluate_mode(cfg, request, mode, references[mode], module, client, run_id, output_dir)
            rows.append(row)
            videos.extend([video] if video else [])
    finally:
        for env in references.values():
            env.close()
    csv_path, md_path = output_dir / "results.csv", output_dir / "results.md"
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    md_path.write_text(markdown_table(rows, f"{request.task}, {request.checkpoint.name} (frame {request.frame:,}): "
                                            f"{cfg.episodes} episodes per mode, mean actions, env seed "
                                            f"{request.seed}, BatchNorm statistics {cfg.eval.bn}"))
    for item in (csv_path, md_path):
        client.log_artifact(run_id, str(item), artifact_folder(request.frame))
    print(md_path.read_text(), flush=True)
    return {"run_id": run_id, "rows": rows, "csv": csv_path, "markdown": md_path, "videos": videos,
            "checkpoint": request.checkpoint}


def _output_dir() -> Path:
    try:
        return Path(hydra.core.hydra_config.HydraConfig.get().runtime.output_dir)
    except ValueError:  # composed without @hydra.main (tests, notebooks)
        return Path("outputs") / "evaluate" / time.strftime("%Y-%m-%d/%H-%M-%S")


USER_ERRORS = (EvaluateError, CheckpointError, FileNotFoundError, envs.RenderingError)


@hydra.main(config_path=CONF_DIR, config_name="evaluate", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        evaluate(cfg)
    except USER_ERRORS as error:
        say(f"error: {error}")
        sys.exit(2)


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
