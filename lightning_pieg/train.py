"""Train PIE-G (or DrQ-v2) on a pixel task: ``python -m lightning_pieg.train task=walker_walk seed=2``.

Every value is checked (``config.py``), the checkpoint folder locked and checked, the resume request compared with
its checkpoint, the weights and the overlay images read, before the training environment is built.
"""
from __future__ import annotations

import os
import sys
import time
from contextlib import ExitStack, closing
from pathlib import Path

import hydra
import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf

import lightning_pieg  # noqa: F401  (torch/torchvision before dm_control: see lightning_pieg/__init__.py)
from lightning_pieg import checkpoints, pipeline
from lightning_pieg.callbacks import (DivergenceError, DivergenceGuard, FrameCheckpoint, GracefulStop,
                                      PeriodicEvaluation, TrainingProgress)
from lightning_pieg.collector import Collector
from lightning_pieg.config import (CONF_DIR, ConfigError, check_group_arguments, check_train, hydra_output_dir,
                                   split_overrides)
from lightning_pieg.console import fail, run_cli, say
from lightning_pieg.data import ReplayDataModule, ReplayStream
from lightning_pieg.diagnostics import feature_shift_callbacks
from lightning_pieg.encoders import load_weights
from lightning_pieg.envs.rendering import renderer_string
from lightning_pieg.module import PIEGModule, expected_lightning_warnings
from lightning_pieg.replay import Replay, StreamReplay
from lightning_pieg.rollouts import evaluation_seed
from lightning_pieg.tracking import log_artifact, log_config, log_resume, log_tags, make_logger, mark_killed, \
    tracking_uri


class Interrupted(Exception):
    """The run stopped on SIGINT/SIGTERM (after writing a resumable checkpoint where it could)."""

    EXIT_STATUS = {"SIGINT": 130, "SIGTERM": 143}


def train(cfg: DictConfig, extra_callbacks: list[pl.Callback] = (), output_dir: Path | None = None) -> str | None:
    """Run one training job; returns the MLflow run id (None when ``resume=last`` finds the run finished)."""
    cfg = check_train(cfg)
    directory = Path(cfg.checkpoint_dir)
    try:
        resume = checkpoints.plan_resume(cfg.resume, directory, OmegaConf.to_container(cfg), warn=say)
    except checkpoints.RunFinished as finished:
        say(str(finished))
        return None
    except checkpoints.CheckpointError as error:  # the request's resume= value
        raise ConfigError(str(error)) from None
    with checkpoints.RunLock(directory) as lock, ExitStack() as cleanup:
        if lock.stale_owner:
            say(f"took over the lock of {directory} from a run that is no longer alive ({lock.stale_owner})")
        removed = checkpoints.clean_leftovers(directory)
        if removed:
            say(f"removed what an interrupted save left in {directory}: {', '.join(p.name for p in removed)}")
        earlier = sorted(directory.glob(checkpoints.PATTERN))
        if resume is None and earlier:
            say(f"WARNING: {directory} holds checkpoints of an earlier run (newest {earlier[-1].name}); this new run "
                f"replaces those at the frames it reaches. Pass resume=last to continue that run instead, or "
                f"checkpoint_dir=<another folder> to keep both.")
        return _train(cfg, resume, extra_callbacks, output_dir, cleanup)


def _train(cfg: DictConfig, resume: checkpoints.Resume | None, extra_callbacks, output_dir,
           cleanup: ExitStack) -> str | None:
    """The run itself, in the locked folder; what it opens (environments, workers, image threads) is closed by
    ``cleanup`` however it ends."""
    directory = Path(cfg.checkpoint_dir)
    replay_file = checkpoints.replay_path(resume.path) if resume else None
    with_replay = bool(resume and cfg.save_replay and replay_file.is_file())
    capacity = pipeline.replay_capacity(cfg)
    if with_replay:  # the saved replay keeps its capacity whatever the new frame budget
        try:
            capacity = StreamReplay.saved_capacity(replay_file, pipeline.num_envs(cfg))
        except ValueError as error:
            raise checkpoints.CheckpointError(f"resume={cfg.resume}: {error}; resume with save_replay=false to "
                                              f"refill the replay instead, or from an earlier checkpoint.") from None
    Replay.check_fits(capacity, pipeline.frame_shape(cfg), action_dim=64)  # the action size is not known yet
    checkpoints.check_directory(directory, pipeline.module_bytes(cfg) + (
        capacity * Replay.bytes_per_transition(pipeline.frame_shape(cfg), 64) if cfg.save_replay else 0))
    encoder_weights = None
    if cfg.agent == "pieg":
        encoder_weights = load_weights(cfg.encoder.arch, cfg.encoder.weights)
        if encoder_weights is None:
            say("encoder.weights=none: the frozen ResNet is RANDOMLY initialised (an ablation, not PIE-G).")
    overlay = pipeline.build_overlay(cfg)
    if overlay is not None:
        cleanup.callback(overlay.close)
    eval_targets = pipeline.build_eval_targets(cfg)  # a generalization mode's missing data stops the run here
    for target in eval_targets:
        cleanup.callback(lambda target=target: target.env.close())  # the env a rank > 0 rebuilt, too
    try:  # diag.feature_shift: diag/feature_shift/<mode> at each evaluation (lightning_pieg/diagnostics.py)
        diagnostics = feature_shift_callbacks(cfg, eval_targets, pipeline.eval_env_options(cfg),
                                              evaluation_seed(cfg.seed), say)
    except ValueError as error:
        raise ConfigError(str(error)) from None

    renderer = renderer_string()
    say(f"OpenGL renderer: {renderer} (MUJOCO_GL={os.environ.get('MUJOCO_GL')})")
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    training_envs = cleanup.enter_context(closing(pipeline.build_training_envs(cfg)))
    obs_shape, action_dim = tuple(training_envs.observation_spec().shape), training_envs.action_spec().shape[0]
    module = PIEGModule(obs_shape=obs_shape, action_dim=action_dim, encoder_state_dict=encoder_weights,
                        **pipeline.module_arguments(cfg))
    module.overlay_images = overlay

    total_steps, seed_steps = cfg.num_train_frames // cfg.action_repeat, cfg.num_seed_frames // cfg.action_repeat
    replay = StreamReplay(len(training_envs), capacity, pipeline.frame_shape(cfg), action_dim, cfg.frame_stack,
                          cfg.nstep, cfg.discount, seed=cfg.seed)
    collector = Collector(training_envs, replay, module.explore, cfg.action_repeat)
    stream = ReplayStream(collector, cfg.batch_size, cfg.update_every_steps, max(seed_steps, cfg.nstep), total_steps)
    datamodule = ReplayDataModule(stream, seed_steps=max(seed_steps, cfg.nstep))
    if resume is not None:
        if with_replay:
            replay.load(replay_file)
            datamodule.replay_restored = True
            say(f"resuming from {resume.path} at frame {resume.frame:,} with its replay")
        else:
            say(f"resuming from {resume.path} at frame {resume.frame:,} WITHOUT its replay (save_replay was off): "
                f"refilling the replay with {seed_steps * cfg.action_repeat:,} frames from the restored policy "
                f"before updating again")
        for key, (old, new) in resume.changes.items():
            say(f"resume: {key} changed from {old!r} to {new!r} (allowed)")

    output_dir = Path(output_dir) if output_dir is not None else hydra_output_dir("train")
    output_dir.mkdir(parents=True, exist_ok=True)
    logger = make_logger(cfg, resume.meta.get("mlflow_run_id") if resume else None, output_dir)
    if resume is None:
        log_config(logger, cfg)
    else:
        log_resume(logger, resume.frame, resume.changes)
    log_tags(logger, renderer)
    (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    log_artifact(logger, output_dir / "config.yaml")

    evaluation = PeriodicEvaluation(eval_targets, cfg.num_eval_episodes, cfg.eval_every_frames,
                                    output_dir / "videos" if cfg.save_video else None, print_fn=say,
                                    make_env=lambda mode, rank: pipeline.make_eval_env(cfg, mode, rank),
                                    stop_on_success=cfg.eval.stop_on_success)
    hint = (f"learning or target rates too high for this task (lr={cfg.lr}, critic_target_tau={cfg.critic_target_tau}; "
            f"DrQ-v2 uses lr=1e-4, critic_target_tau=0.01)")
    callbacks = [
        DivergenceGuard(hint),  # before FrameCheckpoint: no checkpoint of a diverged update
        TrainingProgress(cfg.num_train_frames, cfg.trainer.log_every_n_updates, print_fn=say,
                         paused=lambda: evaluation.seconds),
        evaluation,
        FrameCheckpoint(directory, cfg.checkpoint_every_frames, cfg.keep_checkpoints, cfg.save_replay,
                        OmegaConf.to_container(cfg), print_fn=say),
        GracefulStop(print_fn=say),
        *diagnostics,
        *extra_callbacks,
    ]
    trainer = pl.Trainer(
        accelerator=cfg.trainer.accelerator, devices=cfg.trainer.devices, precision=cfg.trainer.precision,
        max_epochs=1, max_steps=2 * stream.num_updates() + 2,  # 2 optimiser steps per update, one update of slack:
        # the stream itself ends the epoch at the frame budget, after its last collection steps
        logger=logger, callbacks=callbacks, enable_progress_bar=False, enable_checkpointing=False,
        plugins=[checkpoints.SafeCheckpointIO({str(resume.path): resume.state} if resume else None)], enable_model_summary=False, num_sanity_val_steps=0, log_every_n_steps=1,
        deterministic=False)
    store = tracking_uri(cfg.mlflow.tracking_uri) if cfg.mlflow.enabled else f"CSV in {output_dir / 'metrics'}"
    say(f"task={cfg.task} agent={cfg.agent} frames={cfg.num_train_frames:,} batch={cfg.batch_size} "
        f"environments={len(training_envs)}{' (in process)' if cfg.collector.num_envs == 0 else ''} "
        f"updates={stream.num_updates():,}; first update after {stream.first_update_step * cfg.action_repeat:,} "
        f"seed frames; {'MLflow run ' + str(logger.run_id) if cfg.mlflow.enabled else 'metrics'} ({store})")
    started = time.perf_counter()
    try:
        with expected_lightning_warnings():
            trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume.path) if resume else None)
    except FloatingPointError as error:  # a non-finite action: the collector stops before MuJoCo sees it
        raise DivergenceError(f"training diverged: {error}. Likely cause: {hint}. No checkpoint holds the diverged "
                              f"weights; the earlier ones are intact.") from None
    except (KeyboardInterrupt, SystemExit):
        mark_killed(logger)
        raise
    if stream.stop_requested:
        mark_killed(logger)
        raise Interrupted(stream.stop_requested)
    say(f"done: {collector.frame:,} frames in {(time.perf_counter() - started) / 60:.1f} min. " +
        (f"Compare runs with: mlflow ui --backend-store-uri {store}" if cfg.mlflow.enabled else f"Metrics: {store}"))
    return getattr(logger, "run_id", None)


def _run(cfg: DictConfig) -> None:
    try:
        run_cli(lambda: train(cfg))
    except Interrupted as stop:
        say(f"stopped on {stop.args[0]}; resume with resume=last")
        sys.exit(Interrupted.EXIT_STATUS.get(stop.args[0], 1))


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    _run(cfg)


def main() -> None:
    try:
        sys.argv = [sys.argv[0], *split_overrides(sys.argv[1:])]
        check_group_arguments(sys.argv[1:])
    except ConfigError as error:
        fail(str(error))
    _hydra_main()


if __name__ == "__main__":
    main()
