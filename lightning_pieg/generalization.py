"""Zero-shot generalization of a trained checkpoint, with the paper's protocol: ``evaluate_checkpoint``.

Defaults follow the paper: 100 episodes per mode, mean actions, environment seed = training seed + 42, the task's
own episode length, the training frame stack, action repeat and image size, and per-observation BatchNorm
statistics (``eval.bn``). ``num_envs`` environments (each in a worker process with ``env_workers=true``) run
in lockstep and their observations share one encoder pass; episode k starts the same way whatever ``num_envs`` is
(see ``rollouts.py``). Results go to the checkpoint's MLflow run (``eval/<mode>/*`` at the checkpoint's frame) with a
CSV, a markdown table and an mp4 of each mode's first episode. Every request error (checkpoint, mode, data folder,
MLflow run) stops before the module is loaded.
"""
from __future__ import annotations

import csv
import pickle
import sys
import time
from contextlib import ExitStack, closing
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from lightning_pieg import envs, tracking
from lightning_pieg.checkpoints import check_checkpoint, read_sidecar
from lightning_pieg.config import ConfigError, check_env_options, check_evaluate, eval_modes, mode_options
from lightning_pieg.console import say
from lightning_pieg.envs.distracting import reported_name
from lightning_pieg.policy import load_module, mean_action_policy
from lightning_pieg.rollouts import EpisodeMetrics, EpisodeStarts, evaluation_seed, run_lockstep
from lightning_pieg.video import write_video
from lightning_pieg.workers import EnvWorkers, InProcessEnvs, egl_devices

CSV_COLUMNS = ("mode", "episodes", "mean", "std", "success_rate", "mean_length", "frame", "env_seed", "bn")


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


def _check_modes(modes: list[str], task: str) -> None:
    for mode in modes:
        try:
            envs.check(task, mode)
        except ValueError as error:
            raise ConfigError(f"{error} (the checkpoint's task)") from None


def _resolve_checkpoint(spec: str, uri: str, download_dir: Path, modes: list[str]) -> tuple[Path, str | None]:
    """(checkpoint file, run id if ``spec`` was one); a run's modes are checked against its task before any
    download."""
    path = Path(spec).expanduser()
    if path.exists():
        return check_checkpoint(path), None
    if tracking.RUN_ID.match(spec):
        try:
            run = tracking.check_run(uri, spec)
        except tracking.TrackingError:
            raise ConfigError(f"checkpoint={spec}: no such MLflow run in the tracking store {uri}; pass "
                              f"mlflow.tracking_uri=<the store the training logged to>, or a checkpoint path.") from None
        if "task" in run.data.params:
            _check_modes(modes, run.data.params["task"])
        return check_checkpoint(tracking.download_final_checkpoint(uri, spec, download_dir)), spec
    raise ConfigError(f"checkpoint={spec!r} is neither a file nor an MLflow run id (32 hex digits); pass a "
                      f"frame_*.ckpt path or the run id of a training run.")


def _env_options(cfg: DictConfig, train_config: dict) -> dict:
    """``envs.make`` options: the training environment's (the network expects its frame stack, action repeat and
    image size) with the task's own episode length, then this command's ``env`` entries and data options."""
    options = {key: value for key, value in train_config.get("env", {}).items() if key != "time_limit"}
    options["time_limit"] = None
    options.update({key: value for key, value in OmegaConf.to_container(cfg.env, resolve=True).items()
                    if value is not None})
    options.update(mode_options(cfg.eval))
    return options


def plan(cfg: DictConfig, download_dir: Path) -> Plan:
    """Every check that needs no environment and no network weights (``cfg`` as ``check_evaluate`` returns it)."""
    modes = eval_modes(cfg)
    uri = tracking.tracking_uri(cfg.mlflow.tracking_uri)
    path, run_id = _resolve_checkpoint(str(cfg.checkpoint), uri, download_dir, modes)
    meta = read_sidecar(path)
    train_config = meta["config"]
    _check_modes(modes, train_config["task"])
    options = _env_options(cfg, train_config)
    check_env_options(train_config["task"], options)
    try:
        names = {mode: reported_name(mode, options) for mode in modes}
    except ValueError as error:
        raise ConfigError(str(error)) from None
    mlflow_config = train_config.get("mlflow", {})
    if run_id is None:  # a checkpoint path: its run lives in the store the training logged to
        uri = tracking.tracking_uri(cfg.mlflow.tracking_uri or mlflow_config.get("tracking_uri"))
        run_id = meta.get("mlflow_run_id")
        if run_id is not None:
            tracking.check_run(uri, run_id)
    seed = evaluation_seed(cfg.seed if cfg.seed is not None else int(train_config["seed"]))
    return Plan(path, train_config["task"], names, options, seed, int(meta.get("frame", 0)), uri, run_id,
                mlflow_config.get("experiment") or "lightning_pieg")


def artifact_folder(frame: int) -> str:
    return f"evaluation/frame_{frame:09d}"


def evaluate_mode(cfg: DictConfig, request: Plan, mode: str, reference, module, run_id: str,
                  output_dir: Path) -> tuple[dict, Path | None]:
    """``cfg.episodes`` episodes of ``mode`` on ``cfg.num_envs`` environments in lockstep; logs the metrics and the
    first episode's video at once (a later mode's failure keeps them). Returns (CSV row, video path or None)."""
    name, started = request.names[mode], time.perf_counter()
    count = min(cfg.num_envs, cfg.episodes)
    metrics = EpisodeMetrics()
    act = mean_action_policy(module, per_observation_bn=cfg.eval.bn == "per_observation")
    with ExitStack() as cleanup:
        if cfg.env_workers:
            workers = cleanup.enter_context(EnvWorkers(request.task, mode, [request.seed] * count,
                                                       options=request.options, devices=egl_devices()))
        else:
            workers = InProcessEnvs([cleanup.enter_context(closing(envs.make(request.task, mode, seed=request.seed,
                                                                               **request.options)))
                                     for _ in range(count)])
        with tqdm(total=cfg.episodes, desc=name, unit="episode", file=sys.stderr, dynamic_ncols=True) as bar:
            def finished(episode) -> None:
                metrics.update(episode)
                bar.update(1)
                bar.set_postfix(reward=f"{episode.reward:.1f}")

            episodes = run_lockstep(workers, act, cfg.episodes, EpisodeStarts(reference), record_first=cfg.video,
                                    stop_on_success=cfg.eval.stop_on_success, on_episode=finished)
    summary = metrics.compute()
    tracking.log_step_metrics(request.uri, run_id, {f"eval/{name}/{key}": value for key, value in summary.items()},
                              request.frame)
    video = None
    if cfg.video:
        video = write_video(output_dir / f"{name}.mp4", episodes[0].frames)
        tracking.upload(request.uri, run_id, video, artifact_folder(request.frame))
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


def write_results(rows: list[dict], caption: str, output_dir: Path) -> tuple[Path, Path]:
    """``results.csv`` and ``results.md`` in ``output_dir``."""
    csv_path, md_path = output_dir / "results.csv", output_dir / "results.md"
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    md_path.write_text(markdown_table(rows, caption))
    return csv_path, md_path


def evaluate_checkpoint(cfg: DictConfig, output_dir: Path) -> dict:
    """Run the request; returns ``run_id``, ``rows`` (one dict per mode, as in the CSV) and the written files."""
    cfg = check_evaluate(cfg)
    request = plan(cfg, output_dir / "checkpoint")
    references = {}  # one per mode, built now: a mode's missing data stops the command before any work
    try:
        for mode in request.names:
            try:
                references[mode] = envs.make(request.task, mode, seed=request.seed, **request.options)
            except (FileNotFoundError, ValueError, pickle.UnpicklingError) as error:  # missing or hostile data
                raise ConfigError(f"mode {mode}: {error}") from None
        device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        module = load_module(request.checkpoint, device)
        obs_shape = tuple(next(iter(references.values())).observation_spec().shape)
        if obs_shape != tuple(module.hparams.obs_shape):
            raise ConfigError(f"the environments give {obs_shape} observations but the network takes "
                              f"{tuple(module.hparams.obs_shape)}: keep env.frame_stack and env.image_size as "
                              f"in training.")
        run_id, created = tracking.open_run(request.uri, request.run_id, request.experiment,
                                            f"evaluate-{request.task}")
        if created:
            say(f"the checkpoint names no MLflow run: results go to a new run {run_id} in experiment "
                f"{request.experiment!r}")
        say(f"evaluating {request.checkpoint} ({request.task}, frame {request.frame:,}) in "
            f"{', '.join(request.names.values())}: {cfg.episodes} episodes each, env seed {request.seed}, "
            f"{cfg.num_envs} environments in lockstep{' (worker processes)' if cfg.env_workers else ''}, "
            f"BatchNorm {cfg.eval.bn}; MLflow run {run_id}")
        output_dir.mkdir(parents=True, exist_ok=True)
        rows, videos = [], []
        for mode in request.names:
            row, video = evaluate_mode(cfg, request, mode, references[mode], module, run_id, output_dir)
            rows.append(row)
            videos.extend([video] if video else [])
    finally:
        for env in references.values():
            env.close()
    caption = (f"{request.task}, {request.checkpoint.name} (frame {request.frame:,}): {cfg.episodes} episodes per "
               f"mode, mean actions, env seed {request.seed}, BatchNorm statistics {cfg.eval.bn}"
               f"{'' if cfg.eval.stop_on_success else ', episodes run to their full length'}")
    csv_path, md_path = write_results(rows, caption, output_dir)
    for item in (csv_path, md_path):
        tracking.upload(request.uri, run_id, item, artifact_folder(request.frame))
    print(md_path.read_text(), flush=True)
    return {"run_id": run_id, "rows": rows, "csv": csv_path, "markdown": md_path, "videos": videos,
            "checkpoint": request.checkpoint}
