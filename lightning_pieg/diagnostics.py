"""Encoder diagnostics: the paper's feature-shift metric (Fig. 2), ResNet feature maps by layer (Fig. 5), and a
training callback that logs the metric as ``diag/feature_shift/<mode>``.

Feature shift. Render the same physical states under ``train`` and under another mode (two environments built with
the same seed reset to the same state; both are then stepped with the same actions), encode both renderings and
compare their feature maps. Each feature map (one channel of one rendering) is first scaled to unit root mean
square, ``m / sqrt(mean(m**2) + eps)``: the metric ignores the maps' scale (a global one, or one per channel) and is
comparable across encoders whose maps differ in size. The shift is the mean absolute difference of the normalised
maps over every map and location; it lies in [0, 2], is 0 for identical renderings, and a map that is all zero in
both renderings counts as zero difference.

Which maps: for PIE-G, the frozen trunk's output (cut after ``encoder.layer``) for the newest frame of each
observation, computed frame by frame as the agent computes it; for DrQ-v2, the conv net's output maps of the whole
frame stack. BatchNorm (PIE-G): ``per_observation`` (the benchmark evaluation: each observation normalised by its
own statistics, in both renderings) or ``running`` (the trunk's running statistics).
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn

from lightning_pieg.encoders import ARCHS, BN_STATISTICS, ConvEncoder, FrozenResNetEncoder, imagenet_mean_std

NORM_EPS = 1e-8

Pair = tuple[np.ndarray, np.ndarray]


# ----------------------------------------------------------------------------------------------- paired renderings
def _physical_state(env) -> np.ndarray:
    return np.asarray(env.physics.get_state()).copy()


def paired_observations(task: str, mode: str, seed: int = 0, steps: int = 8, **env_options) -> list[Pair]:
    """``steps + 1`` pairs ``(train observation, mode observation)`` of the same physical states.

    Both environments are built with ``seed`` (so their resets draw the same state) and stepped with the same
    seeded uniform random actions; the walk stops early when the episode ends. ``env_options`` go to
    ``envs.make`` (data directories, ``frame_stack``, ``image_size``...). A mode whose physics drifts from
    ``train``'s is an error, since its pairs would not show the same state.
    """
    from lightning_pieg import envs

    if steps < 0:
        raise ValueError(f"steps={steps} must be >= 0 (agent steps after the reset).")
    reference = envs.make(task, "train", seed=seed, **env_options)
    try:
        other = envs.make(task, mode, seed=seed, **env_options)
    except BaseException:
        reference.close()
        raise
    try:
        random = np.random.default_rng(seed)
        spec = reference.action_spec()
        first, second = reference.reset(), other.reset()
        pairs = [(first.observation.copy(), second.observation.copy())]
        for step in range(steps + 1):
            if not np.array_equal(_physical_state(reference), _physical_state(other)):
                raise RuntimeError(f"{task} in mode {mode!r} is not in train's physical state after {step} steps "
                                   f"with seed {seed}: this mode changes the dynamics, so it has no paired "
                                   f"renderings; compare modes that change only the appearance.")
            if step == steps or first.last():
                break
            action = random.uniform(spec.minimum, spec.maximum, spec.shape).astype(spec.dtype)
            first, second = reference.step(action), other.step(action)
            pairs.append((first.observation.copy(), second.observation.copy()))
        return pairs
    finally:
        reference.close()
        other.close()


# ---------------------------------------------------------------------------------------------------- the metric
def normalise_maps(maps: torch.Tensor) -> torch.Tensor:
    """``(..., h, w)`` maps, each scaled to unit root mean square (all-zero maps stay zero)."""
    rms = maps.float().pow(2).mean(dim=(-2, -1), keepdim=True).add(NORM_EPS).sqrt()
    return maps.float() / rms


def map_shift(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Per-location shift ``(B, h, w)``: mean over channels of |normalised first - normalised second|."""
    if first.shape != second.shape:
        raise ValueError(f"feature maps of different shapes: {tuple(first.shape)} vs {tuple(second.shape)}")
    return (normalise_maps(first) - normalise_maps(second)).abs().mean(dim=1)


def maps_shift(first: torch.Tensor, second: torch.Tensor) -> float:
    """The feature-shift metric of two ``(B, C, h, w)`` batches of feature maps (see the module docstring)."""
    return float(map_shift(first, second).mean())


def _unwrap(encoder: nn.Module) -> nn.Module:
    """The image encoder of a module or a trained ``PIEGModule``."""
    if isinstance(encoder, (FrozenResNetEncoder, ConvEncoder)):
        return encoder
    inner = getattr(encoder, "encoder", None)
    if isinstance(inner, (FrozenResNetEncoder, ConvEncoder)):
        return inner
    raise TypeError(f"feature shift needs a FrozenResNetEncoder, a ConvEncoder or a module with one as .encoder; "
                    f"got {type(encoder).__name__}.")


@torch.no_grad()
def feature_maps(encoder: nn.Module, observations: np.ndarray | torch.Tensor,
                 bn: str = "per_observation") -> torch.Tensor:
    """``(B, 3F, H, W)`` uint8 observations -> ``(B, C, h, w)`` maps: PIE-G's trunk output for the newest frame,
    or DrQ-v2's conv maps. Leaves the encoder's phase (train/eval) and BatchNorm buffers as they were."""
    if bn not in BN_STATISTICS:
        raise ValueError(f"bn={bn!r} is unknown; choose {' or '.join(BN_STATISTICS)}.")
    encoder = _unwrap(encoder)
    device = next(encoder.parameters()).device
    obs = torch.as_tensor(np.asarray(observations), device=device).float()
    was_training = encoder.training
    encoder.eval()
    try:
        if isinstance(encoder, ConvEncoder):
            return encoder.convnet((obs / 255.0 - 0.5).contiguous(memory_format=torch.channels_last)).float()
        b, _, h, w = obs.shape
        frames = encoder.normalise(obs.reshape(b * encoder.num_frames, 3, h, w))
        if bn == "per_observation":
            with encoder.per_observation_statistics():
                maps = encoder.trunk(frames)
        else:
            maps = encoder.trunk(frames)
        return maps.reshape(b, encoder.num_frames, *maps.shape[1:])[:, -1].float()
    finally:
        encoder.train(was_training)


def stack_pairs(pairs: Sequence[Pair]) -> tuple[np.ndarray, np.ndarray]:
    if not pairs:
        raise ValueError("no pairs of observations to compare.")
    return np.stack([a for a, _ in pairs]), np.stack([b for _, b in pairs])


def feature_shift(encoder: nn.Module, pairs: Sequence[Pair], bn: str = "per_observation") -> float:
    """Mean absolute difference of the unit-RMS feature maps of each pair's two renderings (0 = no shift)."""
    first, second = stack_pairs(pairs)
    return maps_shift(feature_maps(encoder, first, bn), feature_maps(encoder, second, bn))


def shift_image(encoder: nn.Module, pair: Pair, bn: str = "per_observation") -> np.ndarray:
    """The per-location shift of one pair, ``(h, w)`` float: where in the image the features moved."""
    first, second = (np.asarray(x)[None] for x in pair)
    return map_shift(feature_maps(encoder, first, bn), feature_maps(encoder, second, bn))[0].cpu().numpy()


# ------------------------------------------------------------------------------------ ResNet layers (paper Fig. 5)
def build_resnet(arch: str, state_dict: dict[str, torch.Tensor] | None) -> nn.Module:
    """A full torchvision ResNet in eval mode, with the given weights (``encoders.load_weights``) or random ones."""
    if arch not in ARCHS:
        raise ValueError(f"arch={arch!r} is unknown; choose one of {', '.join(ARCHS)}.")
    resnet = ARCHS[arch][0](weights=None)
    if state_dict is not None:
        resnet.load_state_dict(state_dict)
    return resnet.eval()


@torch.no_grad()
def resnet_layer_maps(resnet: nn.Module, frame: np.ndarray, arch: str = "resnet18") -> list[torch.Tensor]:
    """The ``(C, h, w)`` outputs of layers 1-4 for one ``(3, H, W)`` uint8 frame, with ImageNet input
    normalisation and the running BatchNorm statistics (what a frozen pre-trained trunk computes)."""
    mean, std = imagenet_mean_std(arch)
    x = torch.as_tensor(np.asarray(frame)).float()[None] / 255.0
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    x = resnet.maxpool(resnet.relu(resnet.bn1(resnet.conv1(x))))
    outputs = []
    for index in range(1, 5):
        x = getattr(resnet, f"layer{index}")(x)
        outputs.append(x[0])
    return outputs


# ------------------------------------------------------------------------------------------- training callback
class FeatureShift(pl.Callback):
    """Logs ``diag/feature_shift/<name>`` of the module's encoder at every evaluation (start, every
    ``every_frames``, end), with the frame as step, for each non-train evaluation mode.

    ``make_pairs(mode)`` returns the mode's pairs of renderings; they are made once, when training starts, so the
    logged curve follows the encoder alone. ``names`` maps each mode to the name its metrics carry.
    """

    def __init__(self, modes: Sequence[str], make_pairs: Callable[[str], list[Pair]], every_frames: int,
                 bn: str = "per_observation", names: dict[str, str] | None = None,
                 print_fn: Callable[[str], None] = print):
        if bn not in BN_STATISTICS:
            raise ValueError(f"bn={bn!r} is unknown; choose {' or '.join(BN_STATISTICS)}.")
        self.modes = [mode for mode in modes if mode != "train"]
        from lightning_pieg.callbacks import Every

        self.make_pairs, self.bn, self._marks = make_pairs, bn, Every(every_frames)
        self.names = dict(names or {})
        self.print = print_fn
        self.pairs: dict[str, list[Pair]] = {}
        self._last_frame: int | None = None

    def on_fit_start(self, trainer, pl_module) -> None:
        if trainer.is_global_zero and not self.pairs:
            self.pairs = {mode: self.make_pairs(mode) for mode in self.modes}

    def _frame(self, trainer) -> int:
        return trainer.datamodule.collector.frame

    def measure(self, trainer, pl_module) -> dict[str, float]:
        from lightning_pieg.callbacks import log_metrics

        frame = self._frame(trainer)
        if not trainer.is_global_zero or not self.pairs or self._last_frame == frame:
            return {}
        metrics = {f"diag/feature_shift/{self.names.get(mode, mode)}": feature_shift(pl_module, pairs, self.bn)
                   for mode, pairs in self.pairs.items()}
        log_metrics(trainer, metrics, frame)
        self._marks.done(frame)
        self.print(f"feature shift at frame {frame:,}: " + ", ".join(f"{k.rsplit('/', 1)[-1]} {v:.3f}"
                                                                      for k, v in metrics.items()))
        self._last_frame = frame
        return metrics

    def on_train_start(self, trainer, pl_module) -> None:
        self._marks.start(self._frame(trainer))
        if trainer.datamodule.collector.stats.step == 0:
            self.measure(trainer, pl_module)
        else:  # resumed: the next measurement is at the next multiple of every_frames, as evaluation does
            self._last_frame = self._frame(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if outputs and self._marks.due(self._frame(trainer)):
            self.measure(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self.measure(trainer, pl_module)


def feature_shift_callbacks(cfg, eval_targets: Sequence, env_options: dict, seed: int,
                            print_fn: Callable[[str], None] = print) -> list[FeatureShift]:
    """The training run's ``FeatureShift`` callback (as a list: empty when ``diag.feature_shift`` is off, when
    nothing is evaluated, or when ``eval.modes`` has no mode but ``train``). ``eval_targets`` are the run's
    ``callbacks.EvalEnv``s; ``env_options`` and ``seed`` those of its evaluation environments. Both renderings of
    a pair go through PIE-G's trunk with the BatchNorm statistics of ``eval.bn``, so only the scene differs."""
    diag = cfg.get("diag") or {}
    if not diag.get("feature_shift", False):
        return []
    steps = diag.get("feature_shift_steps", 8)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"diag.feature_shift_steps={steps!r} must be a non-negative integer (agent steps of the "
                         f"paired renderings), e.g. diag.feature_shift_steps=8.")
    names = {target.mode: target.reported for target in eval_targets if target.mode != "train"}
    if not names:
        return []
    bn = cfg.eval.bn  # an encoder without BatchNorm (DrQ-v2's conv) ignores it
    task = cfg.task
    return [FeatureShift(list(names), lambda mode: paired_observations(task, mode, seed, steps, **env_options),
                         cfg.eval_every_frames, bn=bn, names=names, print_fn=print_fn)]
