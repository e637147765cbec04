"""What a run costs: a short timing of its update, act and environment step on this machine, multiplied out.

The update is ``training_step`` without a Trainer (optimisers and ``manual_backward`` patched in, as
``scripts/bench_update.py`` does) on a random batch, with fixed overlay images where the method overlays. It is
timed at two small batch sizes and fitted with ``a + b * batch`` (a PIE-G update has a large fixed part: Adam over
its 250 MB head), then read at the run's batch size, so the dry run finishes in seconds. GPU figures take the
update from the H200 measurements in docs/measurements.md, and the environment step and act from this machine
(rendering and physics are CPU work there too; a GPU host's EGL rendering is likely faster).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch
from omegaconf import DictConfig

from lightning_pieg import envs, pipeline
from lightning_pieg.data import count_updates

TIMING_BATCHES = (8, 32)
LARGE_BATCHES = (64, 128, 256)
REPEAT_BELOW_S = 0.5
LARGE_BATCH_S = 0.4  # predicted seconds per update under which a large batch is timed as well
TIMED_STEPS = 4  # environment steps timed per task, after one untimed
STEP = 10_000  # past the exploration steps: the actor's scheduled noise
# One update (overlay augmentation included) on one NVIDIA H200, 2026-11-26, by batch size: docs/measurements.md.
# "resnet" is PIE-G's frozen ResNet encoder, "conv" DrQ-v2's encoder (SVEA's too).
H200_UPDATE_S = {"resnet": {64: 0.011, 256: 0.017, 512: 0.031}, "conv": {64: 0.008, 256: 0.012, 512: 0.018}}
H200_MEASURED = "one NVIDIA H200, 2026-11-26 (docs/measurements.md)"
# Where a task's environment cannot be built here (Meta-World not installed): docs/measurements.md, 2026-12-01.
FALLBACK_STEP_S = {"drawer_close": 1 / 11, "reach_duplo": 1 / 12}


@dataclass(frozen=True)
class UpdateTime:
    """Seconds of one update at batch ``b``: ``fixed + per_sample * b``, fitted on ``TIMING_BATCHES``."""

    fixed: float
    per_sample: float
    measured: dict[int, float]

    def at(self, batch: int) -> float:
        return max(self.fixed + self.per_sample * batch, min(self.measured.values()))


@dataclass(frozen=True)
class StepTime:
    """Seconds of one agent step of a task's training environment (physics and one render), and where it came from."""

    seconds: float
    source: str


@dataclass(frozen=True)
class RunCost:
    agent_steps: int
    updates: int
    eval_steps: int  # agent steps of the periodic evaluations and the final one
    cpu_s: float
    gpu_s: float


class _FixedImages:
    """Stands in for the overlay image folder: the same random images every call."""

    def __init__(self, size: int, count: int):
        self.images = torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(1))

    def sample(self, batch_size: int) -> torch.Tensor:
        return self.images[torch.arange(batch_size) % len(self.images)]


def _fast_orthogonal(tensor: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
    with torch.no_grad():
        return tensor.normal_(0.0, gain / max(tensor.shape[-1], 1) ** 0.5)


def build_module(cfg: DictConfig, action_dim: int) -> torch.nn.Module:
    """The run's module with random weights, and fixed overlay images where its method overlays (the paper's
    setup, whether or not an image folder is given), ready for ``training_step``. Speed does not depend on the
    weights' values, and an orthogonal initialisation of PIE-G's 62k x 1024 head alone takes about 10 s here:
    scaled normal values stand in for it."""
    from unittest import mock

    from lightning_pieg.module import PIEGModule

    torch.manual_seed(0)
    with mock.patch.object(torch.nn.init, "orthogonal_", _fast_orthogonal):
        module = PIEGModule(obs_shape=pipeline.observation_shape(cfg), action_dim=action_dim,
                            **pipeline.module_arguments(cfg)).train()
    if cfg.augment.strong == "overlay":
        module.overlay_images = _FixedImages(pipeline.frame_shape(cfg)[-1], max(TIMING_BATCHES))
    optimisers = module.configure_optimizers()
    module.optimizers = lambda: optimisers
    module.manual_backward = lambda loss: loss.backward()
    return module


def _batch(cfg: DictConfig, batch_size: int, action_dim: int) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(0)
    shape = (batch_size, *pipeline.observation_shape(cfg))
    return (torch.randint(0, 256, shape, generator=generator, dtype=torch.uint8),
            torch.rand(batch_size, action_dim, generator=generator) * 2 - 1,
            torch.rand(batch_size, 1, generator=generator), torch.full((batch_size, 1), cfg.discount),
            torch.randint(0, 256, shape, generator=generator, dtype=torch.uint8), torch.tensor(STEP))


def _fastest_update(module: torch.nn.Module, batch: tuple[torch.Tensor, ...], repeats: int) -> float:
    """Up to ``repeats`` timed updates (one where an update takes over ``REPEAT_BELOW_S``, to keep the dry run
    short); the fastest counts (on a shared machine the slower ones measure the neighbours)."""
    seconds: list[float] = []
    while len(seconds) < repeats and not (seconds and seconds[-1] > REPEAT_BELOW_S):
        start = time.perf_counter()
        module.training_step(iter([(batch, 0, 0)]))
        seconds.append(time.perf_counter() - start)
    return min(seconds)


def time_update(module: torch.nn.Module, cfg: DictConfig, action_dim: int, repeats: int = 2) -> UpdateTime:
    """After one untimed update, updates timed at ``TIMING_BATCHES`` (the faster of torch's threads and one) and,
    where the fit predicts it takes under
    ``LARGE_BATCH_S``, at the largest of ``LARGE_BATCHES`` too (small batches underestimate large ones: caches),
    fitted with a line through the two largest."""
    module.training_step(iter([(_batch(cfg, TIMING_BATCHES[0], action_dim), 0, 0)]))  # first-call overheads
    measured = {b: _fastest_update(module, _batch(cfg, b, action_dim), repeats) for b in TIMING_BATCHES}
    threads = torch.get_num_threads()
    if threads > 1:  # on a shared machine OpenMP threads that wait for each other can be several times slower
        torch.set_num_threads(1)
        try:
            for b in TIMING_BATCHES:  # the larger batches only where one thread won at the smallest
                one = _fastest_update(module, _batch(cfg, b, action_dim), 1)
                if one >= measured[b]:
                    break
                measured[b] = one
        finally:
            torch.set_num_threads(threads)

    def fit() -> UpdateTime:
        (b0, t0), (b1, t1) = sorted(measured.items())[-2:]
        per_sample = max((t1 - t0) / (b1 - b0), 0.0)
        return UpdateTime(t0 - per_sample * b0, per_sample, dict(measured))

    first = fit()
    large = [b for b in LARGE_BATCHES if first.at(b) <= LARGE_BATCH_S]
    if large:
        measured[max(large)] = _fastest_update(module, _batch(cfg, max(large), action_dim), repeats)
    return fit()


def time_act(module: torch.nn.Module, cfg: DictConfig, repeats: int = 3) -> float:
    """Seconds of one mean action for one observation."""
    observation = np.random.default_rng(0).integers(0, 256, pipeline.observation_shape(cfg), dtype=np.uint8)
    module.act(observation, step=STEP, explore=False)
    start = time.perf_counter()
    for _ in range(repeats):
        module.act(observation, step=STEP, explore=False)
    return (time.perf_counter() - start) / repeats


def time_env_step(cfg: DictConfig) -> tuple[StepTime, int, int | None]:
    """(agent step time of ``cfg.task``'s training environment, its action size, and its episode length in agent
    steps where ``env.time_limit`` shortens it, else None) with random actions."""
    try:
        env = envs.make(cfg.task, "train", seed=0, **pipeline.env_options(cfg))
    except Exception as error:  # noqa: BLE001 - a family that is not installed here: use the recorded rate
        if cfg.task not in FALLBACK_STEP_S:
            raise
        reason = " ".join(str(error).split())[:80]
        return StepTime(FALLBACK_STEP_S[cfg.task], f"docs/measurements.md (not built here: {reason})"), 4, None
    try:
        spec = env.action_spec()
        rng = np.random.default_rng(0)
        env.reset()
        seconds, length, shortened = [], 0, bool(cfg.env.get("time_limit"))
        while length <= TIMED_STEPS or shortened:
            action = rng.uniform(spec.minimum, spec.maximum, spec.shape).astype(spec.dtype)
            start = time.perf_counter()
            last = env.step(action).last()
            seconds.append(time.perf_counter() - start)
            length += 1
            if last:
                break
        return StepTime(statistics.median(seconds[1:] or seconds), "timed here"), int(spec.shape[0]), \
            length if shortened else None
    finally:
        env.close()


def h200_update_s(encoder: str, batch: int) -> float:
    """The H200 update time at ``batch``, linear between (and beyond) the measured batch sizes."""
    points = sorted(H200_UPDATE_S[encoder].items())
    sizes, seconds = [p[0] for p in points], [p[1] for p in points]
    if batch >= sizes[-1]:
        slope = (seconds[-1] - seconds[-2]) / (sizes[-1] - sizes[-2])
        return seconds[-1] + slope * (batch - sizes[-1])
    return float(np.interp(batch, sizes, seconds))


def evaluations(cfg: DictConfig) -> int:
    """Periodic evaluations of a run: at the start, every ``eval_every_frames`` and at the end."""
    if cfg.num_eval_episodes <= 0:
        return 0
    if cfg.eval_every_frames <= 0:
        return 2
    return 1 + -(-cfg.num_train_frames // cfg.eval_every_frames)


def run_cost(cfg: DictConfig, curve_modes: int, final_modes: int, final_episodes: int, episode_steps: int,
             update: UpdateTime, act_s: float, step: StepTime, gpu_update_s: float) -> RunCost:
    """Seconds of one run: its collection (environment step and act), updates, periodic and final evaluations
    (episodes of ``episode_steps`` agent steps)."""
    agent_steps = cfg.num_train_frames // cfg.action_repeat
    seed_steps = cfg.num_seed_frames // cfg.action_repeat
    updates = count_updates(max(seed_steps, cfg.nstep), agent_steps, cfg.update_every_steps)
    eval_steps = episode_steps * (evaluations(cfg) * cfg.num_eval_episodes * curve_modes + final_episodes * final_modes)
    steps = agent_steps + eval_steps
    cpu = steps * (step.seconds + act_s) + updates * update.at(cfg.batch_size)
    gpu = steps * step.seconds + updates * gpu_update_s
    return RunCost(agent_steps, updates, eval_steps, cpu, gpu)
