"""Methods, not encoder switches: the ``method=`` presets (PIE-G, DrQ-v2, SVEA), the ``agent=`` aliases, SVEA's
weighted critic loss against a hand computation, and checkpoints from before methods existed."""
from __future__ import annotations

import copy
import os
import subprocess
import sys

import mlflow
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from PIL import Image

import lightning_pieg
from lightning_pieg import checkpoints
from lightning_pieg.config import METHODS, ConfigError, check_group_arguments, check_train
from lightning_pieg.encoders import ConvEncoder, FrozenResNetEncoder
from lightning_pieg.module import PIEGModule
from lightning_pieg.pipeline import build_overlay, module_arguments, observation_shape
from lightning_pieg.train import train

from test_update_maths import hand_actor_mean, hand_actor_step_and_target, hand_q, hand_sample, perturb_, td_inputs

ALPHA, BETA = 0.3, 0.9  # SVEA's clean and overlaid weights, away from PIE-G's 0.5 / 0.5 and unequal


def plain(*overrides: str):
    """The composed config of a command line, without the tests' tiny settings (``TINY``)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from lightning_pieg.config import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides))


def image_folder(path):
    """Six random RGB images: a stand-in for Places365."""
    path.mkdir()
    rng = np.random.default_rng(0)
    for index in range(6):
        Image.fromarray(rng.integers(0, 256, (100, 120, 3), dtype=np.uint8)).save(path / f"{index}.png")
    return path


# --- presets and aliases ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method, encoder, feature_dim, strong", [
    ("pieg", FrozenResNetEncoder, 256, "overlay"),
    ("drqv2", ConvEncoder, 50, "none"),
    ("svea", ConvEncoder, 50, "overlay"),
])
def test_each_preset_resolves_to_its_encoder_and_augmentation(compose, tmp_path, method, encoder, feature_dim, strong):
    cfg = check_train(plain(f"method={method}"))
    assert cfg.method == method and cfg.feature_dim == feature_dim and cfg.augment.strong == strong
    assert (cfg.augment.clean_loss_weight, cfg.augment.overlay_loss_weight, cfg.augment.overlay_alpha) == (0.5,) * 3
    assert cfg.augment.overlay == "none" and cfg.checkpoint_dir == f"checkpoints/walker_stand_{method}_s1"
    if encoder is ConvEncoder:
        assert dict(cfg.encoder) == {"name": "conv", "arch": None, "layer": None, "bn": None, "weights": None,
                                     "head_dim": None}
    else:
        assert dict(cfg.encoder) == {"name": "resnet", "arch": "resnet18", "layer": 2, "bn": "adaptive",
                                     "weights": "imagenet", "head_dim": 1024}
    # the tiny version builds the preset's encoder; the ResNet's settings TINY gives a conv run are recorded unused
    tiny = check_train(compose(f"method={method}"))
    assert tiny.encoder.head_dim == (32 if encoder is FrozenResNetEncoder else None)
    module = PIEGModule(observation_shape(tiny), 1, **module_arguments(tiny))
    assert type(module.encoder) is encoder and module.hparams.method == method and not module.hparams.compile
    # the overlay is the method's: DrQ-v2 leaves a folder given to every method of a sweep unused
    overlay = build_overlay(check_train(compose(f"method={method}", f"augment.overlay={image_folder(tmp_path / 'p')}")))
    try:
        assert (overlay is not None) == (strong == "overlay")
    finally:
        if overlay is not None:
            overlay.close()


@pytest.mark.parametrize("method", ["pieg", "drqv2"])
def test_agent_aliases_give_their_methods_config(compose, method):
    as_method = OmegaConf.to_container(check_train(compose(f"method={method}")))
    assert OmegaConf.to_container(check_train(compose(f"agent={method}"))) == as_method
    assert as_method["method"] == method and "agent" not in as_method
    # the run folder is the one agent= gave (the method keeps the agent's name), and so is the MLflow run name
    assert plain("task=walker_walk", f"agent={method}").checkpoint_dir == f"checkpoints/walker_walk_{method}_s1"


def test_default_is_pieg_and_method_wins_over_agent(compose):
    assert check_train(compose()).method == "pieg"
    assert check_train(compose("agent=drqv2", "method=svea")).method == "svea"


def test_unknown_method_is_one_line_error_naming_the_valid_ones(tmp_path):
    with pytest.raises(ConfigError) as error:
        check_group_arguments(["task=walker_walk", "method=sac"])
    assert str(error.value) == "unknown method 'sac'; choose one of drqv2, pieg, svea."
    assert METHODS == ("drqv2", "pieg", "svea")
    with pytest.raises(ConfigError, match="unknown method 'nope'"):
        check_group_arguments(["-m", "method=pieg,nope"])
    with pytest.raises(ConfigError, match="unknown agent 'svea'.*drqv2, pieg.*method="):
        check_group_arguments(["agent=svea"])
    result = subprocess.run([sys.executable, "-m", "lightning_pieg.train", "method=sac"], capture_output=True,
                            text=True, timeout=120, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2 and "Traceback" not in result.stdout + result.stderr
    errors = [line for line in result.stdout.splitlines() if line.startswith("[lightning_pieg] error:")]
    assert errors == ["[lightning_pieg] error: unknown method 'sac'; choose one of drqv2, pieg, svea."]


@pytest.mark.parametrize("bad, named", [
    ("augment.clean_loss_weight=-0.1", "augment.clean_loss_weight=-0.1"),
    ("augment.overlay_loss_weight=2", "augment.overlay_loss_weight=2"),
    ("augment.strong=mixup", "augment.strong='mixup'"),
    ("compile=maybe", "compile='maybe'"),
])
def test_loss_weights_strong_augmentation_and_compile_are_checked(compose, bad, named):
    with pytest.raises(ConfigError, match=named.replace("(", r"\(").replace(".", r"\.")):
        check_train(compose("method=svea", bad))


def test_zero_loss_weights_and_a_resnet_setting_left_null_are_errors(compose):
    with pytest.raises(ConfigError, match="critic loss would be zero"):
        check_train(compose("augment.clean_loss_weight=0", "augment.overlay_loss_weight=0"))
    with pytest.raises(ConfigError, match="encoder.layer=null: the resnet encoder needs it"):
        check_train(compose("encoder.layer=null"))


def test_config_keys_reach_the_module(compose):
    cfg = check_train(compose("method=svea", f"augment.clean_loss_weight={ALPHA}",
                              f"augment.overlay_loss_weight={BETA}", "compile=true"))
    arguments = module_arguments(cfg)
    assert (arguments["clean_loss_weight"], arguments["overlay_loss_weight"], arguments["compile"]) == (ALPHA, BETA,
                                                                                                         True)
    assert arguments["method"] == "svea" and arguments["encoder"]["name"] == "conv"


# --- SVEA's critic loss ----------------------------------------------------------------------------------------------
class FixedImages:
    """An overlay image source that hands out the same batch of images every time (no random draws)."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def sample(self, n: int) -> torch.Tensor:
        return self.images[:n]


def test_svea_training_step_is_alpha_clean_plus_beta_overlaid_with_the_clean_target(compose, monkeypatch,
                                                                                    one_thread):
    """One training_step of method=svea (alpha, beta from the config) equals, written out by hand: shift obs and
    next obs, overlay the shifted obs, encode clean, next (no gradient) and overlaid; the target from the clean next
    features; critic_loss = alpha * (MSE(Q1, y) + MSE(Q2, y)) + beta * (MSE(Q1o, y) + MSE(Q2o, y)); a critic +
    encoder Adam step on it, then the actor step on the clean features and the soft target update."""
    cfg = check_train(compose("method=svea", "env.image_size=32", f"augment.clean_loss_weight={ALPHA}",
                              f"augment.overlay_loss_weight={BETA}", "augment.overlay_alpha=0.4", "lr=0.01",
                              "critic_target_tau=0.25", "stddev_schedule=0.5"))
    torch.manual_seed(0)
    module = PIEGModule(observation_shape(cfg), 2, **module_arguments(cfg))
    assert type(module.encoder) is ConvEncoder
    for network in (module.actor, module.critic, module.critic_target):
        perturb_(network)
    hand = copy.deepcopy(module)

    g = torch.Generator().manual_seed(12)
    n, shape = 8, observation_shape(cfg)
    obs = torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8)
    next_obs = torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8)
    action = torch.rand(n, 2, generator=g) * 2 - 1
    images = torch.rand(n, 3, *shape[1:], generator=g)
    reward, discount = td_inputs(n)
    module.overlay_images = FixedImages(images)
    optimisers = module.configure_optimizers()
    critic_grads, critic_step = {}, optimisers[0].step

    def recording_step(*args, **kwargs):  # the critic optimiser's gradients, as it steps
        critic_grads.update({name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None})
        return critic_step(*args, **kwargs)

    monkeypatch.setattr(optimisers[0], "step", recording_step)
    monkeypatch.setattr(module, "optimizers", lambda: optimisers)
    monkeypatch.setattr(module, "manual_backward", lambda loss: loss.backward())
    torch.manual_seed(13)
    module.training_step(iter([((obs, action, reward, discount, next_obs, torch.tensor(100)), 0, 0)]))

    critic_opt = torch.optim.Adam(list(hand.critic.parameters()) + list(hand.encoder.parameters()), lr=0.01,
                                  fused=True)
    actor_opt = torch.optim.Adam(hand.actor.parameters(), lr=0.01, fused=True)
    torch.manual_seed(13)
    shifted, next_shifted = hand.shift(obs.float()), hand.shift(next_obs.float())
    overlaid = (0.6 * shifted / 255.0 + 0.4 * images.repeat(1, shape[0] // 3, 1, 1)) * 255.0
    features, overlaid_features = hand.encoder(shifted), hand.encoder(overlaid)
    with torch.no_grad():
        next_features = hand.encoder(next_shifted)
        next_action = hand_sample(hand_actor_mean(hand.actor, next_features), 0.5, cfg.stddev_clip)
        target_q = reward + discount * torch.min(*hand_q(hand.critic_target, next_features, next_action))
    q1, q2 = hand_q(hand.critic, features, action)
    o1, o2 = hand_q(hand.critic, overlaid_features, action)
    clean = ((q1 - target_q) ** 2).mean() + ((q2 - target_q) ** 2).mean()
    overlaid_term = ((o1 - target_q) ** 2).mean() + ((o2 - target_q) ** 2).mean()
    critic_loss = ALPHA * clean + BETA * overlaid_term
    critic_opt.zero_grad()
    critic_loss.backward()
    hand_grads = {name: p.grad.clone() for name, p in hand.named_parameters() if p.grad is not None}
    critic_opt.step()
    actor_loss = hand_actor_step_and_target(hand, features, 0.5, cfg.stddev_clip, actor_opt, tau=0.25)

    assert module.last_metrics["train/critic_loss"] == pytest.approx(critic_loss.item(), rel=1e-5)
    # the overlaid term is there, with its own weight: neither the clean loss alone nor PIE-G's mean would match
    assert abs(overlaid_term.item() - clean.item()) > 0.05 * clean.item()
    for other in (clean.item(), 0.5 * (clean + overlaid_term).item(), (ALPHA * clean).item()):
        assert module.last_metrics["train/critic_loss"] != pytest.approx(other, rel=1e-3)
    assert module.last_metrics["train/actor_loss"] == pytest.approx(actor_loss.item(), rel=1e-5)
    # the encoder's and the critic's gradients are those of alpha * clean + beta * overlaid
    assert critic_grads.keys() == hand_grads.keys() and any(name.startswith("encoder.") for name in hand_grads)
    for name, grad in hand_grads.items():
        torch.testing.assert_close(critic_grads[name], grad, msg=lambda m, name=name: f"{name}: {m}")
    # after both steps; Adam's first step divides each gradient by its own size, so the rounding of a near-zero
    # gradient element can move its parameter by a few thousandths of lr
    expected = dict(hand.named_parameters())
    for name, p in module.named_parameters():
        torch.testing.assert_close(p, expected[name], rtol=1e-5, atol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


class LossRecorder(pl.Callback):
    def __init__(self):
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if outputs:
            self.losses.append(pl_module.last_metrics["train/critic_loss"])


def test_svea_trains_with_its_overlay_and_its_checkpoint_acts(compose, tmp_path, monkeypatch):
    import lightning_pieg.overlay as overlay_module

    calls = []
    original = overlay_module.overlay

    def counting_overlay(obs, images, alpha=0.5):
        calls.append(alpha)
        return original(obs, images, alpha)

    monkeypatch.setattr(overlay_module, "overlay", counting_overlay)
    cfg = compose("method=svea", "num_train_frames=120", f"augment.overlay={image_folder(tmp_path / 'places')}",
                  f"augment.clean_loss_weight={ALPHA}", f"augment.overlay_loss_weight={BETA}")
    recorder = LossRecorder()
    run_id = train(cfg, extra_callbacks=[recorder], output_dir=tmp_path / "run")
    assert len(recorder.losses) == len(calls) == 20 and all(np.isfinite(recorder.losses))  # one overlay per update
    record = mlflow.MlflowClient(tracking_uri=cfg.mlflow.tracking_uri).get_run(run_id)
    params = record.data.params
    assert (params["method"], params["encoder.name"], params["augment.strong"]) == ("svea", "conv", "overlay")
    assert (params["augment.clean_loss_weight"], params["augment.overlay_loss_weight"]) == (str(ALPHA), str(BETA))
    assert record.info.run_name == "cartpole_balance-svea-s1"
    act = lightning_pieg.load_policy(tmp_path / "checkpoints" / "frame_000000120.ckpt")
    assert type(act.module.encoder) is ConvEncoder and act.module.hparams.method == "svea"
    assert act.module.hparams.overlay_loss_weight == BETA
    action = act(np.random.default_rng(0).integers(0, 256, (9, 84, 84), dtype=np.uint8))
    assert action.shape == (1,) and -1 <= action[0] <= 1


# --- checkpoints from before methods ---------------------------------------------------------------------------------
def layer_keys(prefix: str, layers: tuple[int, ...]) -> list[str]:
    return [f"{prefix}.{i}.{kind}" for i in layers for kind in ("weight", "bias")]


HEADS = [*layer_keys("actor.trunk", (0, 1)), *layer_keys("actor.policy", (0, 2, 4))] + [
    key for critic in ("critic", "critic_target")
    for key in (*layer_keys(f"{critic}.trunk", (0, 1)), *layer_keys(f"{critic}.q1", (0, 2, 4)),
                *layer_keys(f"{critic}.q2", (0, 2, 4)))]
# the state dict's keys as the code before methods (commit 7dbd031) wrote them for these two modules
OLD_KEYS = {"drqv2": layer_keys("encoder.convnet", (0, 2, 4, 6)) + HEADS,
            "pieg": layer_keys("encoder.head", (0, 1)) + HEADS}
OLD_TRUNK_KEYS = {"drqv2": 0, "pieg": 30}  # ResNet-18 up to layer 1: conv1, bn1 and layer1's convs and BatchNorms
OLD_ENCODER = {"arch": "resnet18", "layer": 1, "bn": "adaptive", "weights": "imagenet", "head_dim": 8}


def old_hparams(agent: str, shift_pad_in_encoder: bool) -> dict:
    """``save_hyperparameters`` of the module before methods: ``agent`` and the ResNet's settings as ``encoder``
    (recorded for DrQ-v2 runs too), ``shift_pad`` at the top or, earlier still, inside ``encoder``."""
    hparams = {"obs_shape": (9, 32, 32), "action_dim": 1, "agent": agent, "lr": 0.0001, "feature_dim": 8,
               "hidden_dim": 16, "critic_target_tau": 0.01, "num_expl_steps": 2000,
               "stddev_schedule": "linear(1.0,0.1,100000)", "stddev_clip": 0.3, "encoder": dict(OLD_ENCODER),
               "overlay_alpha": 0.5, "shift_pad": 4}
    if shift_pad_in_encoder:
        del hparams["shift_pad"]
        hparams["encoder"]["shift_pad"] = 2
    return hparams


@pytest.mark.parametrize("shift_pad_in_encoder", [False, True], ids=["shift_pad", "encoder.shift_pad"])
@pytest.mark.parametrize("agent, encoder", [("pieg", FrozenResNetEncoder), ("drqv2", ConvEncoder)])
def test_a_checkpoint_from_before_methods_loads_and_acts(tmp_path, agent, encoder, shift_pad_in_encoder):
    torch.manual_seed(3)
    hparams = old_hparams(agent, shift_pad_in_encoder)
    trained = PIEGModule(**copy.deepcopy(hparams))
    state = trained.state_dict()
    assert [k for k in state if not k.startswith("encoder.trunk.")] == OLD_KEYS[agent]
    assert sum(k.startswith("encoder.trunk.") for k in state) == OLD_TRUNK_KEYS[agent]
    path = tmp_path / "frame_000001000.ckpt"
    torch.save({"epoch": 0, "global_step": 10, "pytorch-lightning_version": pl.__version__, "state_dict": state,
                "hyper_parameters": hparams}, path)

    act = lightning_pieg.load_policy(path)
    module = act.module
    assert type(module.encoder) is encoder and module.hparams.method == agent
    assert module.hparams.encoder["name"] == ("resnet" if agent == "pieg" else "conv")
    assert module.shift.pad == (2 if shift_pad_in_encoder else 4)
    if agent == "pieg":  # the ResNet's settings are the checkpoint's: cut after layer 1, an 8-wide head
        assert len(module.encoder.trunk) == 5 and module.encoder.repr_dim == 8
    observation = np.random.default_rng(1).integers(0, 256, (9, 32, 32), dtype=np.uint8)
    expected = trained.act(observation, step=0, explore=False)
    np.testing.assert_allclose(act(observation), expected, rtol=0, atol=1e-6)  # its own weights, not new ones


def test_resuming_a_run_from_before_methods_compares_in_todays_layout(compose, tmp_path):
    """The sidecar config of an ``agent=drqv2`` run (ResNet settings recorded, unused) matches ``method=drqv2``;
    an ``agent=pieg`` run does not match ``method=drqv2``."""
    requested = OmegaConf.to_container(check_train(compose("method=drqv2")))
    saved = copy.deepcopy(requested)
    del saved["method"]
    saved["agent"] = "drqv2"
    saved["encoder"] = dict(OLD_ENCODER, layer=2, head_dim=32)
    assert checkpoints.compare_configs(saved, requested, tmp_path / "x.ckpt") == {}
    saved["agent"] = "pieg"
    with pytest.raises(checkpoints.CheckpointError, match="method='pieg'.*method='drqv2'"):
        checkpoints.compare_configs(saved, requested, tmp_path / "x.ckpt")
