"""The typed schema of ``conf/config.yaml`` (training) and ``conf/evaluate.yaml`` (evaluation), and every value check.

Both entry points call ``check_train`` / ``check_evaluate`` on the composed config before anything is built. A
value of the wrong type, a key the schema does not know, a number out of its range or a choice that does not exist
is a ``ConfigError`` whose one-line message names the key, the value and what would work. The schema's defaults are
the YAML files' (``conf/``): the YAML is what users read, the schema is what the code trusts.
"""
from __future__ import annotations

import math
import os
import shlex
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Dict, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from lightning_pieg.console import UserError
from lightning_pieg.encoders import ARCHS, BN_MODES, BN_STATISTICS, ENCODER_DEFAULTS, ENCODERS, LAYERS

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def presets(group: str) -> list[str]:
    """The presets of a config group: ``conf/<group>/*.yaml``."""
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))


METHODS = tuple(presets("method"))  # conf/method/: a new preset there is a new method
STRONG_AUGMENTATIONS = ("overlay", "none")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda")
STRATEGIES = ("auto", "ddp")  # auto: one process, or DDP when devices x num_nodes > 1
PRECISIONS = ("32-true", "32", "bf16-mixed", "16-mixed", "bf16-true")
MIN_IMAGE_SIZE = 32  # below this the ResNet trunk's maps (stride 8 at layer 2) shrink to a few pixels
MODE_DATA_OPTIONS = ("dmcgb_dir", "davis_dir", "distracting_intensity", "distracting_background")


class ConfigError(UserError):
    """A configuration value that cannot work; the message names the key, the value and the fix."""


def rule(default: Any = MISSING, *, low: float | None = None, high: float | None = None, low_open: bool = False,
         choices: tuple | None = None, hint: str = "", factory: Any = None):
    """A schema field with its range (``low``/``high``, ``low_open`` excludes ``low``) or its ``choices``."""
    metadata = {"low": low, "high": high, "low_open": low_open, "choices": choices, "hint": hint}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


# --------------------------------------------------------------------------------------------------- the schema
@dataclass
class EvalConfig:
    """Evaluation modes and protocol, shared by training-time evaluation and ``lightning_pieg.evaluate``."""

    modes: Any = field(default_factory=lambda: ["train"])
    bn: str = rule("per_observation", choices=BN_STATISTICS)
    stop_on_success: bool = True
    dmcgb_dir: Optional[str] = None
    davis_dir: Optional[str] = None
    distracting_intensity: Optional[float] = None
    distracting_background: Optional[bool] = None


@dataclass
class EncoderConfig:
    """``conf/encoder/<name>.yaml``: the encoder's name and every encoder's settings; those the named encoder does
    not take are null (``check_train`` sets them so)."""

    name: str = rule("resnet", choices=tuple(ENCODERS))
    arch: Optional[str] = rule("resnet18", choices=tuple(ARCHS))
    layer: Optional[int] = rule(2, choices=LAYERS)
    bn: Optional[str] = rule("adaptive", choices=BN_MODES)
    weights: Optional[str] = "imagenet"
    head_dim: Optional[int] = rule(1024, low=1)


@dataclass
class AugmentConfig:
    shift_pad: int = rule(4, low=0, high=32)
    strong: str = rule("overlay", choices=STRONG_AUGMENTATIONS)
    overlay: str = "none"
    overlay_alpha: float = rule(0.5, low=0.0, high=1.0)
    clean_loss_weight: float = rule(0.5, low=0.0, high=1.0, hint=" (SVEA's alpha; PIE-G and SVEA: 0.5)")
    overlay_loss_weight: float = rule(0.5, low=0.0, high=1.0, hint=" (SVEA's beta; PIE-G and SVEA: 0.5)")


@dataclass
class DiagConfig:
    feature_shift: bool = True
    feature_shift_steps: int = rule(8, low=0)


@dataclass
class TrainerConfig:
    accelerator: str = rule("auto", choices=ACCELERATORS)
    devices: Any = 1
    num_nodes: int = rule(1, low=1)
    strategy: str = rule("auto", choices=STRATEGIES, hint=" (Lightning's ddp launches one process per device and "
                         "works under torchrun and srun; spawn-based strategies cannot carry the environments over)")
    ddp_timeout_s: float = rule(1800.0, low=0.0, low_open=True)
    precision: str = rule("32-true", choices=PRECISIONS)
    reuse_freed_memory: bool = True
    log_every_n_updates: int = rule(50, low=1)


@dataclass
class CollectorConfig:
    num_envs: int = rule(1, low=0, high=64, hint=" (0: one environment in this process)")
    worker_timeout_s: float = rule(120.0, low=0.0, low_open=True)


@dataclass
class TrackingConfig:
    enabled: bool = True
    experiment: str = "lightning_pieg"
    tracking_uri: Optional[str] = None
    run_name: Optional[str] = None
    tags: Dict[str, str] = field(default_factory=dict)


@dataclass
class TrainConfig:
    task: str = "walker_stand"
    method: str = rule("pieg", choices=METHODS)
    seed: int = rule(1, low=0)
    compile: bool = False
    frame_stack: int = rule(3, low=1)
    action_repeat: int = rule(2, low=1)
    discount: float = rule(0.99, low=0.0, high=1.0, low_open=True)
    num_train_frames: int = rule(1_100_000, low=1)
    num_seed_frames: int = rule(4000, low=0)
    update_every_steps: int = rule(2, low=1)
    eval_every_frames: int = rule(10_000, low=0)
    num_eval_episodes: int = rule(10, low=0)
    eval_workers: int = rule(0, low=0, high=64, hint=" (0: the episodes one after another in this process)")
    save_video: bool = True
    eval: EvalConfig = field(default_factory=EvalConfig)
    diag: DiagConfig = field(default_factory=DiagConfig)
    replay_buffer_size: int = rule(1_000_000, low=1)
    nstep: int = rule(3, low=1)
    batch_size: int = rule(256, low=1)
    lr: float = rule(1e-4, low=0.0, low_open=True, hint=" (DrQ-v2 and PIE-G: 1e-4)")
    feature_dim: int = rule(256, low=1)
    hidden_dim: int = rule(1024, low=1)
    critic_target_tau: float = rule(0.01, low=0.0, high=1.0, low_open=True, hint=" (DrQ-v2: 0.01)")
    num_expl_steps: int = rule(2000, low=0)
    stddev_schedule: Any = "linear(1.0,0.1,100000)"
    stddev_clip: float = rule(0.3, low=0.0, hint=" (DrQ-v2: 0.3)")
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    env: Dict[str, Any] = field(default_factory=dict)
    collector: CollectorConfig = field(default_factory=CollectorConfig)
    frames: Any = "preset"
    checkpoint_dir: str = "checkpoints"
    checkpoint_every_frames: int = rule(100_000, low=0)
    keep_checkpoints: int = rule(3, low=0, hint=" (0 keeps every checkpoint)")
    save_replay: bool = False
    resume: Optional[str] = None
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    mlflow: TrackingConfig = field(default_factory=TrackingConfig)


@dataclass
class EvaluateConfig:
    checkpoint: Optional[str] = None
    episodes: int = rule(100, low=1)
    seed: Optional[int] = rule(None, low=0)
    num_envs: int = rule(4, low=1, high=64)
    env_workers: bool = False
    device: str = rule("auto", choices=("auto", "cpu", "cuda"))
    video: bool = True
    eval: EvalConfig = field(default_factory=EvalConfig)
    env: Dict[str, Any] = field(default_factory=dict)
    mlflow: TrackingConfig = field(default_factory=TrackingConfig)


# ----------------------------------------------------------------------------------------------- the checks
def _typed(schema: type, cfg: DictConfig) -> DictConfig:
    """``cfg`` resolved and merged into ``schema``: wrong types and unknown keys are ConfigErrors."""
    try:
        return OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.create(OmegaConf.to_container(cfg, resolve=True)))
    except ConfigKeyError as error:
        raise ConfigError(f"{error.full_key} is not a setting (a typo?); see conf/ for the settings there "
                          f"are.") from None
    except OmegaConfBaseException as error:
        value = OmegaConf.select(cfg, str(error.full_key), default=None) if error.full_key else None
        raise ConfigError(f"{error.full_key}={value!r}: {error.msg.splitlines()[0]}.") from None


def _check_rules(schema: type, cfg: DictConfig, prefix: str = "") -> None:
    """Ranges and choices declared with ``rule``, section by section."""
    for spec in fields(schema):
        key, value = f"{prefix}{spec.name}", cfg[spec.name]
        if is_dataclass(spec.default_factory):
            _check_rules(spec.default_factory, value, f"{key}.")
            continue
        meta = spec.metadata
        if not meta or value is None:
            continue
        if meta["choices"] is not None and value not in meta["choices"]:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(map(str, meta['choices']))}.")
        low, high = meta["low"], meta["high"]
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key}={value!r} must be a finite number{meta['hint']}.")
        too_low = low is not None and (value <= low if meta["low_open"] else value < low)
        too_high = high is not None and value > high
        if too_low or too_high:
            bound = (f"in {'(' if meta['low_open'] else '['}{low}, {high}]" if high is not None else
                     f"{'>' if meta['low_open'] else '>='} {low}")
            raise ConfigError(f"{key}={value!r} must be {bound}{meta['hint']}.")


def eval_modes(cfg: DictConfig) -> list[str]:
    """``eval.modes`` as a list without repeats (a single mode may be given as a string)."""
    modes = cfg.eval.modes
    return list(dict.fromkeys([modes] if isinstance(modes, str) else [str(mode) for mode in modes]))


def mode_options(eval_cfg: DictConfig) -> dict:
    """The ``eval`` section's data options that ``envs.make`` takes (set ones only)."""
    return {key: eval_cfg[key] for key in MODE_DATA_OPTIONS if eval_cfg.get(key) is not None}


def _check_modes(modes: list[str], task: str, key: str) -> None:
    from lightning_pieg import envs

    if not modes:
        raise ConfigError(f"{key}=[] is empty; pass e.g. {key}=[train,{envs.mode_names(task)[-1]}].")
    for mode in modes:
        try:
            envs.check(task, mode)
        except ValueError as error:
            raise ConfigError(f"{key}: {error}") from None


def check_env_options(task: str, options: dict, key: str = "env") -> None:
    """Options the task's family does not know, and image sizes the encoders cannot take, are ConfigErrors."""
    from lightning_pieg import envs

    try:
        envs.check_options(task, options)
    except ValueError as error:
        raise ConfigError(f"{key}: {error}") from None
    size = options.get("image_size", 84)
    if not isinstance(size, int) or isinstance(size, bool) or size < MIN_IMAGE_SIZE:
        raise ConfigError(f"{key}.image_size={size!r} must be an integer >= {MIN_IMAGE_SIZE} (the paper: 84).")
    limit = options.get("time_limit")
    if limit is not None and (not isinstance(limit, (int, float)) or isinstance(limit, bool) or limit <= 0):
        raise ConfigError(f"{key}.time_limit={limit!r} must be a positive number of seconds, or null for the "
                          f"task's own episode length.")


def check_train(cfg: DictConfig) -> DictConfig:
    """The typed, checked training config (``frames`` applied); raises ConfigError naming the first bad value."""
    from lightning_pieg import envs
    from lightning_pieg.networks import parse_schedule

    frames = cfg.get("frames")
    if frames not in (None, "preset"):
        if not isinstance(frames, int) or isinstance(frames, bool) or frames <= 0:
            raise ConfigError(f"frames={frames!r} must be a positive number of frames or 'preset' (the task "
                              f"preset's num_train_frames).")
        cfg.num_train_frames = frames
    try:
        envs.check(cfg.task)
    except ValueError as error:
        raise ConfigError(f"task={cfg.task!r}: {error}") from None
    typed = _typed(TrainConfig, cfg)
    _check_rules(TrainConfig, typed)
    try:
        parse_schedule(typed.stddev_schedule)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    _check_encoder(typed)
    if typed.augment.clean_loss_weight + typed.augment.overlay_loss_weight == 0:
        raise ConfigError("augment.clean_loss_weight=0 and augment.overlay_loss_weight=0: the critic loss would be "
                          "zero; PIE-G and SVEA use 0.5 and 0.5.")
    if typed.num_seed_frames >= typed.num_train_frames:
        raise ConfigError(f"num_seed_frames={typed.num_seed_frames:,} is not below num_train_frames="
                          f"{typed.num_train_frames:,}: the run would end before its first update. Lower "
                          f"num_seed_frames or raise the frame budget.")
    _check_modes(eval_modes(typed), typed.task, "eval.modes")
    check_env_options(typed.task, dict(OmegaConf.to_container(typed.env)), "env")
    check_devices(typed.trainer)
    return typed


def _check_encoder(typed: DictConfig) -> None:
    """The named encoder's settings are set; the others are made null, so that the run's params and checkpoints
    record only what it uses."""
    name = typed.encoder.name
    encoder = ENCODERS[name]
    for key in ENCODER_DEFAULTS:
        if key not in encoder.settings:
            typed.encoder[key] = None
        elif typed.encoder[key] is None:
            raise ConfigError(f"encoder.{key}=null: the {name} encoder needs it (conf/encoder/{name}.yaml: "
                              f"{ENCODER_DEFAULTS[key]}).")
    if typed.frame_stack < encoder.min_frames:
        raise ConfigError(f"frame_stack={typed.frame_stack}: the {name} encoder fuses frame differences, so it needs "
                          f"at least {encoder.min_frames}.")


def check_evaluate(cfg: DictConfig) -> DictConfig:
    """The typed, checked evaluation request (modes are checked against the checkpoint's task later)."""
    typed = _typed(EvaluateConfig, cfg)
    if not typed.checkpoint:
        raise ConfigError("checkpoint is required: checkpoint=<path to frame_*.ckpt> or checkpoint=<MLflow run id>.")
    _check_rules(EvaluateConfig, typed)
    if not eval_modes(typed):
        raise ConfigError("eval.modes=[] is empty; pass e.g. eval.modes=[train,video_hard].")
    if typed.device == "cuda":
        check_devices(OmegaConf.create({"accelerator": "cuda", "devices": 1}))
    return typed


def check_devices(trainer: DictConfig) -> None:
    """A GPU asked for where there is none, or more devices than there are, fails now rather than in Lightning."""
    import torch

    devices = trainer.devices
    if devices != "auto" and (not isinstance(devices, int) or isinstance(devices, bool) or devices < 1):
        raise ConfigError(f"trainer.devices={devices!r} must be a positive integer or 'auto'.")
    if trainer.accelerator in ("gpu", "cuda"):
        available = torch.cuda.device_count()
        if available == 0:
            raise ConfigError(f"trainer.accelerator={trainer.accelerator} but torch sees no CUDA device (torch "
                              f"{torch.__version__}); use trainer.accelerator=cpu, or install a CUDA build of torch.")
    on_gpu = trainer.accelerator in ("gpu", "cuda") or (trainer.accelerator == "auto" and torch.cuda.is_available())
    if on_gpu and isinstance(devices, int) and devices > torch.cuda.device_count():
        raise ConfigError(f"trainer.devices={devices} but only {torch.cuda.device_count()} CUDA device(s) are "
                          f"visible; use trainer.devices={torch.cuda.device_count()} or fewer (one process per GPU).")
    cores = os.cpu_count() or 1
    if not on_gpu and isinstance(devices, int) and devices > cores:
        raise ConfigError(f"trainer.devices={devices} CPU processes on {cores} cores; use trainer.devices={cores} "
                          f"or fewer (each process also steps its environments).")


# ------------------------------------------------------------------------------------------- the command line
def split_overrides(argv: list[str]) -> list[str]:
    """``mlflow run`` passes the free-form ``overrides`` parameter as one argument: split it into Hydra overrides,
    keeping a bracketed list (``eval.modes=[train, video_hard]``) in one piece; drop empty arguments."""
    out: list[str] = []
    for arg in argv:
        if not arg.strip():
            continue
        try:  # one override per argument is left alone (Hydra reads its quotes)
            words = shlex.split(arg) if any(c.isspace() for c in arg.strip()) else [arg]
        except ValueError as error:
            raise ConfigError(f"cannot split the overrides {arg!r}: {error} (close the quote).") from None
        for word in words:
            depth = sum(out[-1].count(o) - out[-1].count(c) for o, c in ("[]", "{}")) if out else 0
            if out and depth > 0:
                out[-1] = f"{out[-1]} {word}"
            else:
                out.append(word)
    return out


def check_group_arguments(argv: list[str]) -> None:
    """Hydra's own message for an unknown task, method, agent or encoder lists config files; name the valid
    choices instead."""
    from lightning_pieg import envs

    for group in ("task", "method", "agent", "encoder"):
        chosen = [arg.split("=", 1)[1] for arg in argv if arg.startswith(f"{group}=")]
        choices = presets(group)
        unknown = [value for value in (chosen[-1].split(",") if chosen else []) if value not in choices]  # -m a,b
        if not unknown:
            continue
        if group == "agent":
            raise ConfigError(f"unknown agent {unknown[0]!r}; choose one of {', '.join(choices)} (agent= is the old "
                              f"name of method=, which takes {', '.join(METHODS)}).")
        if group != "task":
            raise ConfigError(f"unknown {group} {unknown[0]!r}; choose one of {', '.join(choices)}.")
        known = envs.task_names()
        raise ConfigError(f"unknown task {unknown[0]!r}. Valid tasks: {', '.join(t for t in known if t in choices)}."
                          if unknown[0] not in known else
                          f"task {unknown[0]!r} has no preset; add conf/task/{unknown[0]}.yaml (see the other "
                          f"presets).")


def hydra_output_dir(fallback: str) -> Path:
    """The Hydra run's output folder, or ``outputs/<fallback>/<date>/<time>`` when composed without
    ``@hydra.main`` (tests, notebooks)."""
    import time

    from hydra.core.hydra_config import HydraConfig

    try:
        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:
        return Path("outputs") / fallback / time.strftime("%Y-%m-%d/%H-%M-%S")
