"""Feature shift (paper Fig. 2): paired renderings, the metric's zero and scale invariance, the training callback."""
from __future__ import annotations

import lightning_pieg  # noqa: F401  (torch before dm_control)
import mlflow
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from lightning_pieg import diagnostics, envs
from lightning_pieg.callbacks import EvalEnv
from lightning_pieg.diagnostics import (FeatureShift, feature_shift, feature_shift_callbacks, maps_shift,
                                        paired_observations)
from lightning_pieg.encoders import ConvEncoder, FrozenResNetEncoder
from lightning_pieg.train import ConfigError, train

FRAMES = 100
OBS_SHAPE = (9, 84, 84)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def encoders() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    return {"pieg": FrozenResNetEncoder(OBS_SHAPE, state_dict=None, head_dim=1), "drqv2": ConvEncoder(OBS_SHAPE)}


def test_same_renderings_do_not_shift_and_a_new_background_does(data_dir, encoders):
    options = {"dmcgb_dir": str(data_dir), "time_limit": 1}
    same = paired_observations("walker_walk", "train", seed=3, steps=3, **options)
    changed = paired_observations("walker_walk", "video_easy", seed=3, steps=3, **options)
    assert len(same) == len(changed) == 4
    for (a, b), (c, _) in zip(same, changed):
        np.testing.assert_array_equal(a, b)  # train vs train: the very same pixels
        np.testing.assert_array_equal(a, c)  # the same states, rendered under train in both calls
    assert all(not np.array_equal(a, b) for a, b in changed)
    for name, encoder in encoders.items():
        assert feature_shift(encoder, same) == 0.0, name
        assert feature_shift(encoder, [(b, b) for _, b in changed]) == 0.0, name
        shift = feature_shift(encoder, changed)
        assert 0.05 < shift <= 2.0, (name, shift)
        image = diagnostics.shift_image(encoder, changed[-1])
        assert image.ndim == 2 and image.max() > 0


def test_pairs_of_different_physical_states_are_refused(monkeypatch):
    make = envs.make
    monkeypatch.setattr(envs, "make", lambda task, mode, seed, **o: make(task, "train", seed=seed + (mode != "train"),
                                                                         **o))
    with pytest.raises(RuntimeError, match="'color_hard' is not in train's physical state after 0 steps"):
        paired_observations("cartpole_balance", "color_hard", seed=0, steps=1)


def test_the_metric_ignores_the_scale_of_the_feature_maps(encoders):
    random = torch.Generator().manual_seed(1)
    first = torch.relu(torch.randn(4, 16, 9, 9, generator=random))
    second = torch.relu(first + 0.5 * torch.randn(4, 16, 9, 9, generator=random))
    shift = maps_shift(first, second)
    assert shift > 0.1
    assert maps_shift(7.0 * first, 7.0 * second) == pytest.approx(shift, rel=1e-5)
    per_channel = torch.rand(1, 16, 1, 1, generator=random) + 0.1  # any positive scale per channel, too
    assert maps_shift(per_channel * first, per_channel * second) == pytest.approx(shift, rel=1e-5)
    assert maps_shift(first, 3.0 * first) == pytest.approx(0.0, abs=1e-6)

    # through an encoder: scaling DrQ-v2's last convolution scales its (ReLU) output maps, and nothing else
    torch.manual_seed(2)
    encoder = ConvEncoder(OBS_SHAPE)
    observations = np.random.default_rng(0).integers(0, 256, (2, 2, *OBS_SHAPE), dtype=np.uint8)
    pairs = [(a, b) for a, b in observations]
    before = feature_shift(encoder, pairs)
    with torch.no_grad():
        encoder.convnet[6].weight.mul_(5.0)
        encoder.convnet[6].bias.mul_(5.0)
    assert feature_shift(encoder, pairs) == pytest.approx(before, rel=1e-4)


def test_measuring_moves_no_batchnorm_statistics_and_keeps_the_phase(encoders):
    encoder = encoders["pieg"].train()
    buffers = {name: buffer.clone() for name, buffer in encoder.named_buffers()}
    observations = np.random.default_rng(1).integers(0, 256, (2, *OBS_SHAPE), dtype=np.uint8)
    for bn in diagnostics.BN_STATISTICS:
        feature_shift(encoder, [(observations[0], observations[1])], bn=bn)
    for name, buffer in encoder.named_buffers():
        assert torch.equal(buffer, buffers[name]), name
    assert encoder.training and encoder.trunk.training
    with pytest.raises(ValueError, match="bn='batch' is unknown"):
        feature_shift(encoder, [(observations[0], observations[1])], bn="batch")


def test_the_callback_is_built_only_when_there_is_something_to_measure(compose):
    targets = [EvalEnv("train", None), EvalEnv("distracting_cs", None, name="distracting_cs_0.1")]
    cfg = compose("eval.modes=[train,distracting_cs]")
    [callback] = feature_shift_callbacks(cfg, targets, {}, seed=43)
    assert isinstance(callback, FeatureShift) and callback.modes == ["distracting_cs"]
    assert callback.names == {"distracting_cs": "distracting_cs_0.1"}
    assert feature_shift_callbacks(cfg, targets[:1], {}, seed=43) == []  # train only: nothing to compare
    assert feature_shift_callbacks(compose("diag.feature_shift=false"), targets, {}, seed=43) == []
    with pytest.raises(ValueError, match=r"diag.feature_shift_steps=-1 must be a non-negative integer"):
        feature_shift_callbacks(compose("diag.feature_shift_steps=-1"), targets, {}, seed=43)


def test_training_logs_the_feature_shift_of_each_generalization_mode(compose, data_dir, tmp_path):
    cfg = compose(f"num_train_frames={FRAMES}", "env.time_limit=0.5", "num_eval_episodes=1",
                  "eval.modes=[train,video_easy]", f"eval.dmcgb_dir={data_dir}", "diag.feature_shift_steps=3")
    run_id = train(cfg, output_dir=tmp_path / "out")
    client = mlflow.MlflowClient(tracking_uri=cfg.mlflow.tracking_uri)
    history = client.get_metric_history(run_id, "diag/feature_shift/video_easy")
    assert [m.step for m in history] == [0, FRAMES]  # at each evaluation, with the frame as step
    assert all(0.0 < m.value <= 2.0 for m in history)
    assert not any(key.startswith("diag/feature_shift/train") for key in client.get_run(run_id).data.metrics)
    with pytest.raises(ConfigError, match="diag.feature_shift_steps=-2"):
        train(OmegaConf.merge(cfg, {"diag": {"feature_shift_steps": -2}}), output_dir=tmp_path / "bad")
