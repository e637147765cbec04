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
from lightning_fabric.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf

import lightning_pieg  # noqa: F401  (torch/torchvision before dm_control: see lightning_pieg/__init__.py)
from lightning_pieg import checkpoints, distributed, host_memory, pipeline
from lightning_pieg.callbacks import (DivergenceError, DivergenceGuard, FrameCheckpoint, GracefulStop,
                                      PeriodicEvaluation, TrainingProgress)
from lightning_pieg.collector import Collector
from lightning_pieg.config import (CONF_DIR, ConfigError, check_group_arguments, check_train, hydra_output_dir,
                                   split_overrides)
from lightning_pieg.console import fail, run_cli, say
from lightning_pieg.data import ReplayDataModule, ReplayStream, count_updates
from lightning_pieg.diagnostics import feature_shift_callbacks
from lightning_pieg.encoders import load_encoder_weights
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
    """Run one training job (this process's part of it under DDP); returns the MLflow run id (None when
    ``resume=last`` finds the run finished, and on processes other than rank 0)."""
    cfg = check_train(cfg)
    checkpoint_io = checkpoints.SafeCheckpointIO()
    trainer = make_trainer(cfg, checkpoint_io, extra_callbacks)  # knows this process's rank from here on
    rank, world_size = trainer.global_rank, trainer.world_size
    directory = Path(cfg.checkpoint_dir)
    config = {**OmegaConf.to_container(cfg), "world_size": world_size}
    try:
        resume = checkpoints.plan_resume(cfg.resume, directory, config, warn=say)
    except checkpoints.RunFinished as finished:
        if rank == 0:
            say(str(finished))
        return None
    except checkpoints.CheckpointError as error:  # the request's resume= value
        raise ConfigError(str(error)) from None
    if resume is not None:
        checkpoint_io.preloaded[str(resume.path)] = resume.state
    with checkpoints.RunLock(directory, rank) as lock, ExitStack() as cleanup:
        if rank == 0:
            if lock.stale_owner:
                say(f"took over the lock of {directory} from a run that is no longer alive ({lock.stale_owner})")
            removed = checkpoints.clean_leftovers(directory)
            if removed:
                say(f"removed what an interrupted save left in {directory}: {', '.join(p.name for p in removed)}")
            earlier = sorted(directory.glob(checkpoints.PATTERN))
            if resume is None and earlier:
                say(f"WARNING: {directory} holds checkpoints of an earlier run (newest {earlier[-1].name}); this new "
                    f"run replaces those at the frames it reaches. Pass resume=last to continue that run instead, or "
                    f"checkpoint_dir=<another folder> to keep both.")
        return _train(cfg, trainer, resume, output_dir, cleanup)


def make_trainer(cfg: DictConfig, checkpoint_io: checkpoints.SafeCheckpointIO,
                 extra_callbacks: list[pl.Callback] = ()) -> pl.Trainer:
    """Lightning's Trainer for this config: one process, or ``ActorCriticDDP`` (``trainer.strategy=ddp``, or more
    than one process). A request Lightning cannot serve is a ConfigError here, before any work."""
    world_size = distributed.world_size(cfg.trainer)
    strategy = "auto"
    if cfg.trainer.strategy == "ddp" or world_size > 1:
        strategy = distributed.ActorCriticDDP(timeout_s=cfg.trainer.ddp_timeout_s)
    total_steps, seed_steps = schedule(cfg, world_size)
    try:
        return pl.Trainer(
            accelerator=cfg.trainer.accelerator, devices=cfg.trainer.devices, num_nodes=cfg.trainer.num_nodes,
            strategy=strategy, precision=cfg.trainer.precision, max_epochs=1,
            # 2 optimiser steps per update, one update of slack: the stream itself ends the epoch at the frame
            # budget, after its last collection steps
            max_steps=2 * count_updates(seed_steps, total_steps, cfg.update_every_steps) + 2,
            logger=False, callbacks=list(extra_callbacks), enable_progress_bar=False, enable_checkpointing=False,
            plugins=[checkpoint_io], enable_model_summary=False, num_sanity_val_steps=0, log_every_n_steps=1,
            deterministic=False)
    except (MisconfigurationException, ValueError, RuntimeError) as error:
        raise ConfigError(f"trainer: {error} (trainer.accelerator={cfg.trainer.accelerator}, trainer.devices="
                          f"{cfg.trainer.devices}, trainer.num_nodes={cfg.trainer.num_nodes})") from None


def schedule(cfg: DictConfig, world_size: int) -> tuple[int, int]:
    """(agent steps, seed steps) of one process: the frame budget and the seed frames count every process's
    frames, so each of ``world_size`` processes takes its share (rounded up); the first update waits for a full
    n-step window."""
    total_steps = cfg.num_train_frames // cfg.action_repeat
    seed_steps = cfg.num_seed_frames // cfg.action_repeat
    return -(-total_steps // world_size), max(-(-seed_steps // world_size), cfg.nstep)


def _train(cfg: DictConfig, trainer: pl.Trainer, resume: checkpoints.Resume | None, output_dir,
           cleanup: ExitStack) -> str | None:
    """The run itself, in the locked folder; what it opens (environments, workers, image threads) is closed by
    ``cleanup`` however it ends."""
    rank, world_size = trainer.global_rank, trainer.world_size
    info = say if rank == 0 else (lambda message: None)  # progress once; every process prints its errors
    directory = Path(cfg.checkpoint_dir)
    capacity = pipeline.replay_capacity(cfg, world_size)
    replay_file = checkpoints.replay_path(resume.path, rank) if resume else None
    with_replay = bool(resume and cfg.save_replay and replay_file.is_file())
    size = capacity
    if with_replay:  # the saved replay keeps its capacity whatever the new frame budget; a broken file stops here
        try:
            size = StreamReplay.saved_capacity(replay_file, pipeline.num_envs(cfg))
        except ValueError as error:
            raise checkpoints.CheckpointError(f"resume={cfg.resume}: {error}; resume with save_replay=false to "
                                              f"refill the replay instead, or from an earlier checkpoint.") from None
    Replay.check_fits(size, pipeline.frame_shape(cfg), action_dim=64)  # the action size is not known yet
    checkpoints.check_directory(directory, pipeline.module_bytes(cfg) + (
        size * Replay.bytes_per_transition(pipeline.frame_shape(cfg), 64) if cfg.save_replay else 0))
    encoder_weights = load_encoder_weights(cfg.encoder)  # None for an encoder learned from scratch (weights null)
    if encoder_weights is None and cfg.encoder.weights is not None:
        info(f"encoder.weights=none: the {cfg.encoder.name} encoder's frozen trunk is RANDOMLY initialised (an "
             f"ablation, not PIE-G).")
    render_gpu = distributed.use_render_gpu(trainer.local_rank)  # before this process's first render
    overlay = pipeline.build_overlay(cfg, distributed.rank_seed(cfg.seed, rank))
    if overlay is not None:
        cleanup.callback(overlay.close)
    eval_targets = pipeline.build_eval_targets(cfg)  # a generalization mode's missing data stops the run here
    for target in eval_targets:
        cleanup.callback(lambda target=target: target.env.close())  # the env a rank > 0 rebuilt, too
    try:  # diag.feature_shift: diag/feature_shift/<mode> at each evaluation (lightning_pieg/diagnostics.py)
        diagnostics = feature_shift_callbacks(cfg, eval_targets, pipeline.eval_env_options(cfg),
                                              evaluation_seed(cfg.seed), info)
    except ValueError as error:
        raise ConfigError(str(error)) from None

    renderer = renderer_string()
    say(f"{f'process {rank}: ' if world_size > 1 else ''}OpenGL renderer: {renderer} "
        f"(MUJOCO_GL={os.environ.get('MUJOCO_GL')}{f', GPU {render_gpu}' if render_gpu is not None else ''})")
    if cfg.trainer.reuse_freed_memory:
        host_memory.keep_freed_memory()
    pl.seed_everything(cfg.seed, workers=True, verbose=False)  # the same initial networks on every process
    module = PIEGModule(obs_shape=pipeline.observation_shape(cfg), action_dim=pipeline.action_dim(cfg, eval_targets),
                        encoder_state_dict=encoder_weights, **pipeline.module_arguments(cfg))
    module.overlay_images = overlay
    total_steps, seed_steps = schedule(cfg, world_size)

    def build_stream(global_rank: int, local_rank: int, processes: int) -> ReplayStream:
        """This process's environments, replay and collector, seeded from ``seed`` and its rank."""
        seed = distributed.rank_seed(cfg.seed, global_rank)
        pl.seed_everything(seed, workers=True, verbose=False)
        envs = cleanup.enter_context(closing(pipeline.build_training_envs(cfg, seed, render_gpu)))
        replay = StreamReplay(len(envs), size, pipeline.frame_shape(cfg), module.hparams.action_dim, cfg.frame_stack,
                              cfg.nstep, cfg.discount, seed=seed)
        if with_replay:
            replay.load(replay_file)
            datamodule.replay_restored = True
        collector = Collector(envs, replay, module.explore, cfg.action_repeat, global_rank, processes)
        return ReplayStream(collector, cfg.batch_size, cfg.update_every_steps, seed_steps, total_steps)

    datamodule = ReplayDataModule(build_stream, seed_steps=seed_steps,
                                  rank_state=lambda r: checkpoints.read_rank_state(resume.path, r))
    if resume is not None:
        if with_replay:
            info(f"resuming from {resume.path} at frame {resume.frame:,} with its replay")
        else:
            info(f"resuming from {resume.path} at frame {resume.frame:,} WITHOUT its replay (save_replay was off): "
                 f"refilling the replay with {seed_steps * cfg.action_repeat * world_size:,} frames from the restored "
                 f"policy before updating again")
        for key, (old, new) in resume.changes.items():
            info(f"resume: {key} changed from {old!r} to {new!r} (allowed)")

    output_dir = Path(output_dir) if output_dir is not None else hydra_output_dir("train")
    logger = None
    if rank == 0:  # one MLflow run for the whole job: only rank 0 opens it and logs
        output_dir.mkdir(parents=True, exist_ok=True)
        logger = make_logger(cfg, resume.meta.get("mlflow_run_id") if resume else None, output_dir)
        if resume is None:
            log_config(logger, cfg)
        else:
            log_resume(logger, resume.frame, resume.changes)
        log_tags(logger, renderer, cfg.mlflow.tags)
        (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        log_artifact(logger, output_dir / "config.yaml")
        trainer.logger = logger

    evaluation = PeriodicEvaluation(eval_targets, cfg.num_eval_episodes, cfg.eval_every_frames,
                                    output_dir / "videos" if cfg.save_video else None, print_fn=info,
                                    make_env=lambda mode, r: pipeline.make_eval_env(cfg, mode, r),
                                    stop_on_success=cfg.eval.stop_on_success,
                                    make_workers=lambda mode, r, n: pipeline.build_eval_workers(cfg, mode, r, n,
                                                                                                render_gpu),
                                    num_workers=cfg.eval_workers)
    hint = (f"learning or target rates too high for this task (lr={cfg.lr}, critic_target_tau={cfg.critic_target_tau}; "
            f"DrQ-v2 uses lr=1e-4, critic_target_tau=0.01)")
    trainer.callbacks[0:0] = [  # before the extra callbacks (and whatever Lightning added)
        DivergenceGuard(hint),  # before FrameCheckpoint: no checkpoint of a diverged update
        TrainingProgress(cfg.num_train_frames, cfg.trainer.log_every_n_updates, print_fn=info,
                         paused=lambda: evaluation.seconds),
        evaluation,
        FrameCheckpoint(directory, cfg.checkpoint_every_frames, cfg.keep_checkpoints, cfg.save_replay,
                        OmegaConf.to_container(cfg), print_fn=info),
        GracefulStop(print_fn=say),
        *diagnostics,
    ]
    store = tracking_uri(cfg.mlflow.tracking_uri) if cfg.mlflow.enabled else f"CSV in {output_dir / 'metrics'}"
    processes = f" processes={world_size} (DDP; batch_size {cfg.batch_size} per process)" if world_size > 1 else ""
    info(f"task={cfg.task} method={cfg.method} encoder={cfg.encoder.name} frames={cfg.num_train_frames:,} "
         f"batch={cfg.batch_size} "
         f"environments={pipeline.num_envs(cfg)}{' (in process)' if cfg.collector.num_envs == 0 else ''}"
         f"{' per process' if world_size > 1 else ''}{processes} "
         f"updates={count_updates(seed_steps, total_steps, cfg.update_every_steps):,}"
         f"{' per process' if world_size > 1 else ''}; first update after {seed_steps * cfg.action_repeat * world_size:,} "
         f"seed frames; {'MLflow run ' + str(logger.run_id) if cfg.mlflow.enabled and logger else 'metrics'} ({store})")
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
    stream = datamodule.stream
    if stream.stop_requested:
        mark_killed(logger)
        raise Interrupted(stream.stop_requested)
    info(f"done: {stream.collector.frame:,} frames in {(time.perf_counter() - started) / 60:.1f} min. " +
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
