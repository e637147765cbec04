"""Train PIE-G (or DrQ-v2) on a pixel task: ``python -m lightning_pieg.train task=walker_walk seed=2``.

Everything that can be wrong with the request (task, encoder settings, weights, data folders, memory,
checkpoint to resume) is checked before any environment is built or any weights are loaded into a network.
"""
from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path

import hydra
import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf

import lightning_pieg  # noqa: F401  (torch/torchvision before dm_control: see lightning_pieg/__init__.py)
from lightning_pieg import envs
from lightning_pieg.callbacks import EvalEnv, Evaluate, FrameCheckpoint, TrainingProgress
from lightning_pieg.collector import Collector
from lightning_pieg.data import ReplayDataModule, ReplayStream
from lightning_pieg.diagnostics import feature_shift_callbacks
from lightning_pieg.encoders import EncoderConfigError, check_config, load_weights
from lightning_pieg.envs.distracting import reported_name
from lightning_pieg.module import AGENTS, PIEGModule
from lightning_pieg.networks import parse_schedule
from lightning_pieg.policy import check_checkpoint
from lightning_pieg.replay import Replay
from lightning_pieg.tracking import log_artifact, log_config, log_tags, make_logger, tracking_uri

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
FRAME_SHAPE = (3, 84, 84)
EVAL_BN = ("per_observation", "running")
EVAL_DATA_OPTIONS = ("dmcgb_dir", "davis_dir", "distracting_intensity", "distracting_background")
EVAL_SEED_OFFSET = 42  # evaluation environments are seeded with seed + 42, as the authors'
EVAL_RANK_SEED_STRIDE = 10_000  # under DDP, process r evaluates with seed + 42 + r * stride


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the key, the value and the fix."""


# Errors that are the request's fault: printed as one clear line, exit status 2, no traceback.
USER_ERRORS = (ConfigError, EncoderConfigError, MemoryError, envs.RenderingError, FileNotFoundError)


def say(message: str) -> None:
    print(f"[lightning_pieg] {message}", flush=True)


def validate(cfg: DictConfig) -> None:
    """Cheap checks of every value, before anything is built."""
    if cfg.agent not in AGENTS:
        raise ConfigError(f"agent={cfg.agent!r} is unknown; choose one of {', '.join(AGENTS)}.")
    try:
        envs.check(cfg.task)
    except ValueError as error:
        raise ConfigError(f"task={cfg.task!r}: {error}") from None
    try:
        check_config(cfg.encoder.arch, cfg.encoder.layer, cfg.encoder.bn)
        parse_schedule(cfg.stddev_schedule)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    positive = ("num_train_frames", "action_repeat", "frame_stack", "batch_size", "nstep", "update_every_steps",
                "replay_buffer_size", "hidden_dim", "feature_dim")
    for key in positive:
        if not isinstance(cfg[key], int) or cfg[key] <= 0:
            raise ConfigError(f"{key}={cfg[key]!r} must be a positive integer.")
    for key in ("num_seed_frames", "eval_every_frames", "num_eval_episodes", "checkpoint_every_frames",
                "num_expl_steps"):
        if not isinstance(cfg[key], int) or cfg[key] < 0:
            raise ConfigError(f"{key}={cfg[key]!r} must be a non-negative integer.")
    if not 0.0 < cfg.discount <= 1.0:
        raise ConfigError(f"discount={cfg.discount!r} must be in (0, 1].")
    if cfg.frame_stack < 2 and cfg.agent == "pieg":
        raise ConfigError("PIE-G fuses frame differences: frame_stack must be at least 2.")
    modes, known = eval_modes(cfg), envs.mode_names(cfg.task)
    unknown = [mode for mode in modes if mode not in known]
    if unknown or not modes:
        raise ConfigError(f"eval.modes={modes}: {'unknown mode ' + repr(unknown[0]) if unknown else 'empty'} for "
                          f"task {cfg.task}; choose from {', '.join(known)} (e.g. eval.modes=[train,{known[-1]}]).")
    if cfg.eval.bn not in EVAL_BN:
        raise ConfigError(f"eval.bn={cfg.eval.bn!r} is unknown; choose {' or '.join(EVAL_BN)}.")


def eval_modes(cfg: DictConfig) -> list[str]:
    modes = cfg.eval.modes
    return [modes] if isinstance(modes, str) else [str(mode) for mode in modes]


def eval_env_options(cfg: DictConfig) -> dict:
    """Options of the evaluation environments: the training environment's plus the ``eval`` section's data options."""
    options = OmegaConf.to_container(cfg.env, resolve=True)
    options.update({key: cfg.eval[key] for key in EVAL_DATA_OPTIONS if cfg.eval.get(key) is not None})
    return options


def make_eval_env(cfg: DictConfig, mode: str, rank: int = 0):
    """``mode``'s evaluation environment for process ``rank``; a mode's missing data is a ConfigError."""
    try:
        return envs.make(cfg.task, mode, seed=cfg.seed + EVAL_SEED_OFFSET + rank * EVAL_RANK_SEED_STRIDE,
                         **eval_env_options(cfg))
    except (FileNotFoundError, ValueError) as error:
        raise ConfigError(f"eval.modes: {mode}: {error}") from None


def build_eval_envs(cfg: DictConfig) -> list[EvalEnv]:
    """One environment per evaluation mode; ``train`` acts with running BatchNorm statistics (the authors' training
    loop), the others with ``eval.bn``."""
    if cfg.num_eval_episodes <= 0:
        return []
    options = eval_env_options(cfg)
    try:
        names = {mode: reported_name(mode, options) for mode in eval_modes(cfg)}
    except ValueError as error:
        raise ConfigError(f"eval: {error}") from None
    return [EvalEnv(mode, make_eval_env(cfg, mode), mode != "train" and cfg.eval.bn == "per_observation", name)
            for mode, name in names.items()]


def resolve_resume(cfg: DictConfig, checkpoint_dir: Path) -> tuple[Path | None, dict]:
    """``resume=last`` is the newest resumable checkpoint of this task/agent/seed; a path is taken as given."""
    if cfg.resume in (None, "", "none"):
        return None, {}
    if cfg.resume == "last":
        candidates = []
        for meta_path in sorted(checkpoint_dir.glob("frame_*.json")):
            meta = json.loads(meta_path.read_text())
            if not meta.get("final") and meta_path.with_suffix(".ckpt").is_file():
                candidates.append(meta_path.with_suffix(".ckpt"))
        if not candidates:
            raise ConfigError(f"resume=last: no resumable checkpoint in {checkpoint_dir}; pass resume=<path>.")
        path = candidates[-1]
    else:
        path = Path(cfg.resume)
    try:
        check_checkpoint(path)
    except ValueError as error:
        raise ConfigError(f"resume={cfg.resume!r}: {error}") from None
    meta_path = path.with_suffix(".json")
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    if meta.get("final"):
        raise ConfigError(f"resume={cfg.resume!r}: {path.name} is a final, weights-only checkpoint; "
                          f"resume from a periodic one (resume=last picks the newest).")
    return path, meta


def build_overlay(cfg: DictConfig, seed: int):
    if str(cfg.augment.overlay).lower() == "none":
        say("augment.overlay=none: training WITHOUT the paper's strong overlay augmentation (no image folder "
            "configured). Set augment.overlay=/path/to/places365 (any image folder) to train full PIE-G.")
        return None
    from lightning_pieg.overlay import ImageOverlay

    return ImageOverlay(cfg.augment.overlay, image_size=FRAME_SHAPE[-1], seed=seed)


def split_overrides(argv: list[str]) -> list[str]:
    """``mlflow run`` passes the free-form ``overrides`` parameter as one quoted argument: split it; drop empties."""
    out: list[str] = []
    for arg in argv:
        out.extend(shlex.split(arg) if (" " in arg.strip() or not arg.strip()) else [arg])
    return out


def _output_dir() -> Path:
    try:
        return Path(hydra.core.hydra_config.HydraConfig.get().runtime.output_dir)
    except ValueError:  # composed without @hydra.main (tests, notebooks)
        return Path("outputs") / time.strftime("%Y-%m-%d/%H-%M-%S")


def train(cfg: DictConfig, extra_callbacks: list[pl.Callback] = (), output_dir: Path | None = None) -> str | None:
    """Run one training job; returns the MLflow run id."""
    if cfg.frames not in (None, "preset"):
        cfg.num_train_frames = int(cfg.frames)
    validate(cfg)
    checkpoint_dir = Path(cfg.checkpoint_dir)
    resume_path, resume_meta = resolve_resume(cfg, checkpoint_dir)
    eval_targets = build_eval_envs(cfg)  # here: a generalization mode's missing data stops the run at once
    try:  # diag.feature_shift: diag/feature_shift/<mode> at each evaluation (lightning_pieg/diagnostics.py)
        diagnostics = feature_shift_callbacks(cfg, eval_targets, eval_env_options(cfg),
                                              cfg.seed + EVAL_SEED_OFFSET, say)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    encoder_weights = None
    if cfg.agent == "pieg":
        encoder_weights = load_weights(cfg.encoder.arch, cfg.encoder.weights)
        if encoder_weights is None:
            say("encoder.weights=none: the frozen ResNet is RANDOMLY initialised (an ablation, not PIE-G).")
    overlay = build_overlay(cfg, cfg.seed)

    action_repeat = cfg.action_repeat
    total_steps = cfg.num_train_frames // action_repeat
    seed_steps = cfg.num_seed_frames // action_repeat
    capacity = min(cfg.replay_buffer_size, total_steps + total_steps // 50 + cfg.nstep + cfg.frame_stack + 2)
    Replay.check_fits(capacity, FRAME_SHAPE, action_dim=64)  # the action size is not known yet: bound it

    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    env_options = OmegaConf.to_container(cfg.env, resolve=True)
    env = envs.make(cfg.task, "train", seed=cfg.seed, **env_options)
    obs_shape, action_dim = env.observation_spec().shape, env.action_spec().shape[0]

    module = PIEGModule(
        obs_shape=obs_shape, action_dim=action_dim, agent=cfg.agent, lr=cfg.lr, feature_dim=cfg.feature_dim,
        hidden_dim=cfg.hidden_dim, critic_target_tau=cfg.critic_target_tau, num_expl_steps=cfg.num_expl_steps,
        stddev_schedule=cfg.stddev_schedule, stddev_clip=cfg.stddev_clip,
        encoder=OmegaConf.to_container(cfg.encoder, resolve=True), overlay_alpha=cfg.augment.overlay_alpha,
        encoder_state_dict=encoder_weights)
    module.overlay_images = overlay

    replay = Replay(capacity, FRAME_SHAPE, action_dim, cfg.frame_stack, cfg.nstep, cfg.discount, seed=cfg.seed)
    collector = Collector(env, replay, module.act, action_repeat)
    stream = ReplayStream(collector, cfg.batch_size, cfg.update_every_steps, max(seed_steps, cfg.nstep), total_steps)
    datamodule = ReplayDataModule(stream, seed_steps=max(seed_steps, cfg.nstep))
    if resume_path is not None:
        replay_path = resume_path.with_suffix(".replay.npz")
        if cfg.save_replay and replay_path.is_file():
            replay.load(replay_path)
            datamodule.replay_restored = True
            say(f"resuming from {resume_path} at frame {resume_meta.get('frame', '?'):,} with its replay")
        else:
            say(f"resuming from {resume_path} at frame {resume_meta.get('frame', '?'):,} WITHOUT its replay "
                f"(save_replay was off): refilling the replay with {seed_steps * action_repeat:,} frames from "
                f"the restored policy before updating again")

    logger = make_logger(cfg, resume_meta.get("mlflow_run_id"))
    store = tracking_uri(cfg.mlflow.tracking_uri)
    config = OmegaConf.to_container(cfg, resolve=True)
    if resume_path is None:
        log_config(logger, cfg)
    log_tags(logger)
    output_dir = Path(output_dir) if output_dir is not None else _output_dir()
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    log_artifact(logger, output_dir / "config.yaml")

    evaluate = Evaluate(eval_targets, cfg.num_eval_episodes, cfg.eval_every_frames,
                        output_dir / "videos" if cfg.save_video else None, print_fn=say,
                        make_env=lambda mode, rank: make_eval_env(cfg, mode, rank))
    callbacks = [
        TrainingProgress(cfg.num_train_frames, cfg.trainer.log_every_n_updates, print_fn=say,
                         paused=lambda: evaluate.seconds),
        evaluate,
        FrameCheckpoint(checkpoint_dir, cfg.checkpoint_every_frames, cfg.keep_checkpoints, cfg.save_replay,
                        config, print_fn=say),
        *diagnostics,
        *extra_callbacks,
    ]
    trainer = pl.Trainer(
        accelerator=cfg.trainer.accelerator, devices=cfg.trainer.devices, precision=cfg.trainer.precision,
        max_epochs=1, max_steps=2 * stream.num_updates() + 2,  # 2 optimiser steps per update, one update of slack:
        # the stream itself ends the epoch at the frame budget, after its last collection steps
        logger=logger, callbacks=callbacks, enable_progress_bar=False, enable_checkpointing=False,
        enable_model_summary=False, num_sanity_val_steps=0, log_every_n_steps=1, deterministic=False)
    say(f"task={cfg.task} agent={cfg.agent} frames={cfg.num_train_frames:,} batch={cfg.batch_size} "
        f"updates={stream.num_updates():,}; first update after {stream.first_update_step * action_repeat:,} "
        f"seed frames; MLflow run {logger.run_id} ({store})")
    started = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume_path) if resume_path else None)
    say(f"done: {collector.frame:,} frames in {(time.perf_counter() - started) / 60:.1f} min. "
        f"Compare runs with: mlflow ui --backend-store-uri {store}")
    for item in (env, *(target.env for target in eval_targets)):
        item.close()
    return logger.run_id


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        train(cfg)
    except USER_ERRORS as error:
        say(f"error: {error}")
        sys.exit(2)


def check_task_argument(argv: list[str]) -> None:
    """Hydra's own message for an unknown task lists config files; name the valid tasks instead, at once."""
    tasks = [arg.split("=", 1)[1] for arg in argv if arg.startswith("task=")]
    if not tasks:
        return
    presets = sorted(p.stem for p in (Path(CONF_DIR) / "task").glob("*.yaml"))
    if tasks[-1] not in presets:
        known = envs.task_names()
        say(f"error: unknown task {tasks[-1]!r}. Valid tasks: {', '.join(t for t in known if t in presets)}."
            if tasks[-1] not in known else
            f"error: task {tasks[-1]!r} has no preset; add conf/task/{tasks[-1]}.yaml (see the other presets).")
        sys.exit(2)


def main() -> None:
    sys.argv = [sys.argv[0], *split_overrides(sys.argv[1:])]
    try:
        check_task_argument(sys.argv[1:])
    except USER_ERRORS as error:
        say(f"error: {error}")
        sys.exit(2)
    _hydra_main()


if __name__ == "__main__":
    main()
