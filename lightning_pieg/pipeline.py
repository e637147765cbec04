"""The pieces of a training run, built from its checked config: evaluation environments, the overlay image source,
the module, the replay and the stream. ``train.py`` wires them to Lightning."""
from __future__ import annotations

import pickle

import torch
from omegaconf import DictConfig, OmegaConf

from lightning_pieg import envs
from lightning_pieg.callbacks import EvalEnv
from lightning_pieg.config import ConfigError, eval_modes, mode_options
from lightning_pieg.console import say
from lightning_pieg.envs.distracting import reported_name
from lightning_pieg.module import PIEGModule
from lightning_pieg.rollouts import evaluation_seed

OVERLAY_PROBE_FILES = 8  # overlay images decoded up front, so an unreadable folder fails before any work


def frame_shape(cfg: DictConfig) -> tuple[int, int, int]:
    """One RGB frame as the environment renders it (``env.image_size``)."""
    size = cfg.env.get("image_size", 84)
    return 3, size, size


def observation_shape(cfg: DictConfig) -> tuple[int, int, int]:
    channels, height, width = frame_shape(cfg)
    return channels * cfg.frame_stack, height, width


def env_options(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg.env, resolve=True)


def eval_env_options(cfg: DictConfig) -> dict:
    """Options of the evaluation environments: the training environment's plus the ``eval`` section's data options."""
    return {**env_options(cfg), **mode_options(cfg.eval)}


def make_eval_env(cfg: DictConfig, mode: str, rank: int = 0):
    """``mode``'s evaluation environment for process ``rank``; a mode's missing data is a ConfigError."""
    try:
        return envs.make(cfg.task, mode, seed=evaluation_seed(cfg.seed, rank), **eval_env_options(cfg))
    except (FileNotFoundError, ValueError, pickle.UnpicklingError) as error:  # missing or hostile data files
        raise ConfigError(f"eval.modes: {mode}: {error}") from None


def build_eval_workers(cfg: DictConfig, mode: str, rank: int, count: int, render_gpu: int | None = None):
    """``count`` worker processes with ``mode``'s evaluation environment for process ``rank`` (lockstep evaluation:
    each episode's start is restored from the mode's own environment, so they all take its seed), rendering as the
    training workers do (``build_training_envs``)."""
    from lightning_pieg.workers import EnvWorkers, egl_devices

    devices = [render_gpu] if render_gpu is not None else egl_devices()
    return EnvWorkers(cfg.task, mode, [evaluation_seed(cfg.seed, rank)] * count, options=eval_env_options(cfg),
                      devices=devices, timeout=cfg.collector.worker_timeout_s)


def build_eval_targets(cfg: DictConfig) -> list[EvalEnv]:
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


def build_overlay(cfg: DictConfig, seed: int | None = None):
    """The strong overlay augmentation's image source (its image order seeded by ``seed``, default ``cfg.seed``),
    or None: for a method without it (``augment.strong=none``), and (said loudly) without an image folder."""
    folder = str(cfg.augment.overlay)
    if cfg.augment.strong == "none":
        if folder.lower() != "none":
            say(f"method={cfg.method} has no overlay augmentation (augment.strong=none): augment.overlay={folder} "
                f"is not used.")
        return None
    if folder.lower() == "none":
        say(f"augment.overlay=none: training method={cfg.method} WITHOUT its strong overlay augmentation (no image "
            f"folder configured), so its critic loss has only the clean term: an ablation, not the method. Set "
            f"augment.overlay=/path/to/places365 (any image folder) to train it in full.")
        return None
    from lightning_pieg.overlay import ImageOverlay, check_images

    try:
        check_images(cfg.augment.overlay, OVERLAY_PROBE_FILES)
    except ValueError as error:
        raise ConfigError(f"augment.overlay: {error}") from None
    return ImageOverlay(cfg.augment.overlay, image_size=frame_shape(cfg)[-1], seed=cfg.seed if seed is None else seed)


def module_arguments(cfg: DictConfig) -> dict:
    """``PIEGModule``'s hyperparameters from the config (saved in every checkpoint)."""
    return dict(method=cfg.method, lr=cfg.lr, feature_dim=cfg.feature_dim, hidden_dim=cfg.hidden_dim,
                critic_target_tau=cfg.critic_target_tau, num_expl_steps=cfg.num_expl_steps,
                stddev_schedule=cfg.stddev_schedule, stddev_clip=cfg.stddev_clip,
                encoder=OmegaConf.to_container(cfg.encoder, resolve=True), overlay_alpha=cfg.augment.overlay_alpha,
                shift_pad=cfg.augment.shift_pad, clean_loss_weight=cfg.augment.clean_loss_weight,
                overlay_loss_weight=cfg.augment.overlay_loss_weight, compile=cfg.compile)


def module_bytes(cfg: DictConfig, action_dim: int = 64) -> int:
    """Parameter and buffer bytes of this config's module, counted on the meta device (no memory, no weights);
    the action size is bounded, as the environment is not built yet."""
    from lightning_pieg.checkpoints import checkpoint_bytes

    with torch.device("meta"):
        module = PIEGModule(obs_shape=observation_shape(cfg), action_dim=action_dim, **module_arguments(cfg))
    return checkpoint_bytes(module)


def num_envs(cfg: DictConfig) -> int:
    """Training environments (``collector.num_envs=0`` is one, in this process)."""
    return max(cfg.collector.num_envs, 1)


def replay_capacity(cfg: DictConfig, world_size: int = 1) -> int:
    """Transitions one process's replay holds: ``replay_buffer_size``, capped at what the process can ever write.
    That is one position per agent step, plus one reset frame per episode (bounded by 2% of the steps: episodes of
    50 agent steps or more), plus, per environment stream, a window's worth (n-step + frame stack) and two
    positions of slack."""
    total_steps = -(-(cfg.num_train_frames // cfg.action_repeat) // world_size)
    reset_frames = total_steps // 50
    return min(cfg.replay_buffer_size,
               total_steps + reset_frames + num_envs(cfg) * (cfg.nstep + cfg.frame_stack + 2))


def build_training_envs(cfg: DictConfig, seed: int | None = None, render_gpu: int | None = None):
    """The training environments, seeded from ``seed`` (default ``cfg.seed``): ``EnvWorkers``
    (``collector.num_envs`` processes; on a GPU host with EGL, worker i renders on GPU ``i % device_count``, or
    all on ``render_gpu``: a DDP process's own) or one ``InProcessEnvs`` environment."""
    from lightning_pieg.collector import env_seeds
    from lightning_pieg.workers import EnvWorkers, InProcessEnvs, egl_devices

    seed = cfg.seed if seed is None else seed
    if cfg.collector.num_envs == 0:
        return InProcessEnvs([envs.make(cfg.task, "train", seed=seed, **env_options(cfg))])
    devices = [render_gpu] if render_gpu is not None else egl_devices()
    return EnvWorkers(cfg.task, "train", env_seeds(seed, cfg.collector.num_envs), options=env_options(cfg),
                      devices=devices, timeout=cfg.collector.worker_timeout_s)


def action_dim(cfg: DictConfig, eval_targets: list[EvalEnv]) -> int:
    """The task's action size, from an evaluation environment or, without one, a training environment built and
    closed (the module is built before the processes' own environments)."""
    if eval_targets:
        return eval_targets[0].env.action_spec().shape[0]
    env = envs.make(cfg.task, "train", seed=cfg.seed, **env_options(cfg))
    try:
        return env.action_spec().shape[0]
    finally:
        env.close()
