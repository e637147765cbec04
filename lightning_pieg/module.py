"""The learner: DrQ-v2's DDPG (clipped double Q, n-step targets, random shifts) over the encoder its config names
(PIE-G's frozen ResNet or DrQ-v2's conv), with the critic loss also on overlaid observations when given images
(PIE-G, SVEA)."""
from __future__ import annotations

import time
import warnings
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from lightning_pieg.augment import RandomShift
from lightning_pieg.encoders import build_encoder
from lightning_pieg.legacy import method_and_encoder
from lightning_pieg.networks import Actor, Critic, stddev_at


@contextmanager
def expected_lightning_warnings() -> Iterator[None]:
    """Silence the warnings Lightning gives about choices this module makes on purpose, while fitting it."""
    with warnings.catch_warnings():
        # the dataloader_iter step is flagged experimental; the learner relies on exactly its no-prefetch behaviour
        warnings.filterwarnings("ignore", message=".*dataloader_iter.*")
        warnings.filterwarnings("ignore", message=".*isinstance.treespec, LeafSpec.*")
        # PIE-G's frozen trunk is in eval mode on purpose (frozen BatchNorm statistics)
        warnings.filterwarnings("ignore", message=".*module.s. in eval mode at the start of training.*")
        yield


class CriticForward(torch.nn.Module):
    """The encoder and the critic as one module: everything the critic loss trains, run in one forward per update
    (clean, and overlaid when given), so that data parallelism can wrap it with its own gradient reducer."""

    def __init__(self, encoder: torch.nn.Module, critic: Critic):
        super().__init__()
        self.encoder, self.critic = encoder, critic

    def forward(self, obs: torch.Tensor, action: torch.Tensor, next_obs: torch.Tensor,
                overlaid: torch.Tensor | None = None):
        """``(features, next features (no gradient), (Q1, Q2), (Q1, Q2) of the overlaid observations or None)``.
        The encoder sees the clean, the next and the overlaid batch separately and in this order, as the authors'
        update does (adaptive BatchNorm statistics are per batch and updated in that order)."""
        features = self.encoder(obs)
        with torch.no_grad():
            next_features = self.encoder(next_obs)
        overlaid_q = self.critic(self.encoder(overlaid), action) if overlaid is not None else None
        return features, next_features, self.critic(features, action), overlaid_q


@contextmanager
def cast_once(device_type: str) -> Iterator[None]:
    """Under mixed precision, cast each trainable weight to the low precision once for the whole block instead of
    once per use. Lightning's autocast runs with the cast cache off, so PIE-G's 250 MB head would be cast for each
    of the critic's three encoder passes and get a gradient cast back per pass; with the cache, one cast and one
    gradient. Entries are dropped at the end: an optimiser step afterwards changes the weights."""
    if not torch.is_autocast_enabled(device_type):
        yield
        return
    try:
        with torch.autocast(device_type, dtype=torch.get_autocast_dtype(device_type), cache_enabled=True):
            yield
    finally:
        torch.clear_autocast_cache()


@contextmanager
def no_parameter_grads(module: torch.nn.Module) -> Iterator[None]:
    """Gradients flow through ``module`` to its inputs but not into its parameters: the actor loss differentiates
    the critic with respect to the action only (the critic's parameter gradients would be discarded anyway, and
    under DDP they would be all-reduced for nothing)."""
    parameters = [p for p in module.parameters() if p.requires_grad]
    for parameter in parameters:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter in parameters:
            parameter.requires_grad_(True)


class PIEGModule(pl.LightningModule):
    """Actor, critic and target critic over an image encoder, optimised manually once per yielded batch.

    Optimisers: Adam over the critic and the encoder's trainable part (PIE-G: the head only; the ResNet trunk is
    frozen and in no optimiser), and Adam over the actor, which sees detached features.
    """

    def __init__(self, obs_shape: tuple[int, ...], action_dim: int, method: str | None = None, lr: float = 1e-4,
                 feature_dim: int = 256, hidden_dim: int = 1024, critic_target_tau: float = 0.01,
                 num_expl_steps: int = 2000, stddev_schedule: str | float = "linear(1.0,0.1,100000)",
                 stddev_clip: float = 0.3, encoder: dict | None = None, overlay_alpha: float = 0.5,
                 encoder_state_dict: dict | None = None, shift_pad: int | None = None, clean_loss_weight: float = 0.5,
                 overlay_loss_weight: float = 0.5, compile: bool = False, agent: str | None = None):
        super().__init__()
        # ``agent`` is how checkpoints before methods named ``method`` (lightning_pieg/legacy.py); the hparams
        # record today's layout whatever the call used
        method, encoder = method_and_encoder(method, agent, encoder)
        self.save_hyperparameters(ignore=["encoder_state_dict", "agent"])
        self.encoder = build_encoder(tuple(obs_shape), encoder, encoder_state_dict)
        self.actor = Actor(self.encoder.repr_dim, action_dim, feature_dim, hidden_dim)
        self.critic = Critic(self.encoder.repr_dim, action_dim, feature_dim, hidden_dim)
        self.critic_target = Critic(self.encoder.repr_dim, action_dim, feature_dim, hidden_dim)
        self.critic_target.load_state_dict(self.critic.state_dict())
        self.critic_target.requires_grad_(False)
        # shift_pad was an encoder option in checkpoints written before it moved to the augmentation
        self.shift = RandomShift(shift_pad if shift_pad is not None else encoder.get("shift_pad", 4))
        self.overlay_images = None  # set by train.py when augment.overlay names a folder (not saved)
        # what each optimiser's loss runs through: the plain modules, or their DDP replicas (``replicate``); kept
        # in a dict so that they are not registered twice (the checkpoint's keys stay those of the modules)
        self.trained: dict[str, torch.nn.Module] = {"critic": CriticForward(self.encoder, self.critic),
                                                    "actor": self.actor}
        self.automatic_optimization = False
        self.last_metrics: dict[str, float] = {}
        self.update_seconds = 0.0  # wall time in updates (the batch's collection excluded), for bench_train

    def replicate(self, wrap) -> None:
        """Give each optimiser's modules their own data-parallel wrapper (``wrap(module)``, e.g. DDP): the critic
        step and the actor step are separate backward passes over disjoint parameters, each all-reducing only its
        own gradients, in full, before its optimiser steps."""
        self.trained = {name: wrap(module) for name, module in self.trained.items()}

    def on_fit_start(self) -> None:
        if self.hparams.compile:  # in place: the checkpoint's parameter names stay those of the plain modules
            for network in (self.encoder, self.actor, self.critic, self.critic_target):
                network.compile()

    # --- acting ---------------------------------------------------------------------------------------------------
    def act(self, observation: np.ndarray, step: int, explore: bool) -> np.ndarray:
        """Action for one uint8 observation: ``explore``'s (a scheduled noisy sample, or uniform noise for the first
        ``num_expl_steps`` agent steps) or the mean action; running BatchNorm statistics."""
        if explore:
            return self.explore(np.asarray(observation)[None], np.array([step]))[0]
        return self.act_batch(torch.as_tensor(observation, device=self.device)[None])[0].cpu().numpy()

    @torch.no_grad()
    def explore(self, observations: np.ndarray, steps: np.ndarray) -> np.ndarray:
        """Exploration actions for a batch of uint8 observations taken at agent steps ``steps``: a noisy sample at
        each step's scheduled stddev, or uniform noise for steps before ``num_expl_steps``; running BatchNorm
        statistics."""
        was_training = self.training
        self.eval()
        try:
            obs = torch.as_tensor(observations, device=self.device).float()
            std = torch.tensor([[stddev_at(self.hparams.stddev_schedule, int(s))] for s in steps], device=self.device)
            # the stream runs inside training_step, so under bf16-mixed Lightning's autocast is on here: acting stays
            # fp32 (autocast would cast PIE-G's 250 MB head on every call, which made acting 2.5x slower)
            with torch.autocast(self.device.type, enabled=False):
                action = self.actor(self.encoder(obs), std).sample(clip=None)
            uniform = torch.as_tensor(np.asarray(steps) < self.hparams.num_expl_steps, device=self.device)
            if uniform.any():
                noise = torch.empty_like(action).uniform_(-1.0, 1.0)
                action = torch.where(uniform[:, None], noise, action)
        finally:
            self.train(was_training)
        return action.cpu().numpy()

    @torch.no_grad()
    def act_batch(self, observations: torch.Tensor, per_observation_bn: bool = False) -> torch.Tensor:
        """Mean actions for a batch of observations (evaluation); optionally with per-observation BatchNorm."""
        was_training = self.training
        self.eval()
        try:
            if per_observation_bn:
                with self.encoder.per_observation_statistics():
                    features = self.encoder(observations.float())
            else:
                features = self.encoder(observations.float())
            return self.actor(features, 1.0).mean
        finally:
            self.train(was_training)

    # --- learning -------------------------------------------------------------------------------------------------
    def configure_optimizers(self):
        encoder_params = [p for p in self.encoder.parameters() if p.requires_grad]
        # fused: one kernel over all parameters; torch's default on CPU loops over them in Python (an isolated
        # step over DrQ-v2's 7M parameters at one thread: 48 ms looped, 17 ms fused; whole updates: see README)
        critic_opt = torch.optim.Adam(list(self.critic.parameters()) + encoder_params, lr=self.hparams.lr, fused=True)
        actor_opt = torch.optim.Adam(self.actor.parameters(), lr=self.hparams.lr, fused=True)
        return [critic_opt, actor_opt]

    def td_target(self, reward: torch.Tensor, discount: torch.Tensor, next_features: torch.Tensor,
                  std: float) -> torch.Tensor:
        """n-step TD target: ``reward + discount * min(Q1', Q2')`` of the target critic at the online actor's
        clipped noisy action for the next observation (clipped double Q)."""
        with torch.no_grad():
            next_action = self.actor(next_features, std).sample(clip=self.hparams.stddev_clip)
            target_q1, target_q2 = self.critic_target(next_features, next_action)
            return reward + discount * torch.min(target_q1, target_q2)

    @staticmethod
    def q_loss(q1: torch.Tensor, q2: torch.Tensor, target_q: torch.Tensor) -> torch.Tensor:
        """``MSE(Q1, target) + MSE(Q2, target)``."""
        return F.mse_loss(q1, target_q) + F.mse_loss(q2, target_q)

    def actor_loss(self, features: torch.Tensor, std: float) -> tuple[torch.Tensor, torch.distributions.Normal]:
        """``-mean(min(Q1, Q2))`` at the actor's clipped noisy action; the features are detached, so only the
        actor learns from it."""
        dist = self.trained["actor"](features.detach(), std)
        policy_action = dist.sample(clip=self.hparams.stddev_clip)
        with no_parameter_grads(self.critic):
            actor_q1, actor_q2 = self.critic(features.detach(), policy_action)
        return -torch.min(actor_q1, actor_q2).mean(), dist

    @torch.no_grad()
    def update_target(self) -> None:
        """Soft target update: ``target <- (1 - tau) * target + tau * online``."""
        tau = self.hparams.critic_target_tau
        torch._foreach_lerp_(list(self.critic_target.parameters()), list(self.critic.parameters()), tau)

    def on_train_start(self) -> None:
        # a resumed run restores its optimisers' state, learning rate included: the requested lr applies from here
        for optimizer in self.trainer.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = self.hparams.lr

    def training_step(self, dataloader_iter: Iterator) -> dict[str, torch.Tensor]:
        """One update. Returns the critic loss; when the stream is spent Lightning swallows the StopIteration
        and calls the batch-end hooks with empty outputs, which callbacks therefore skip."""
        batch, _, _ = next(dataloader_iter)  # collection runs inside: the stream steps the environments
        started = time.perf_counter()
        obs, action, reward, discount, next_obs, step = (x.to(self.device) for x in batch)
        step = int(step)
        critic_opt, actor_opt = self.optimizers()
        std = stddev_at(self.hparams.stddev_schedule, step)

        # one shift per observation, shared by its frames (the stack is shifted as one image)
        obs, next_obs = self.shift(obs.float()), self.shift(next_obs.float())
        overlaid = None
        if self.overlay_images is not None:  # the image stream has its own random generator
            from lightning_pieg.overlay import overlay

            images = self.overlay_images.sample(obs.shape[0]).to(self.device)
            overlaid = overlay(obs, images, self.hparams.overlay_alpha)
        with cast_once(self.device.type):
            features, next_features, (q1, q2), overlaid_q = self.trained["critic"](obs, action, next_obs, overlaid)
        target_q = self.td_target(reward, discount, next_features, std)
        critic_loss = self.q_loss(q1, q2, target_q)
        if overlaid_q is not None:  # SVEA's weighting; PIE-G's 0.5 * (clean + overlaid) is alpha = beta = 0.5
            critic_loss = (self.hparams.clean_loss_weight * critic_loss
                           + self.hparams.overlay_loss_weight * self.q_loss(*overlaid_q, target_q))
        critic_opt.zero_grad(set_to_none=True)
        self.manual_backward(critic_loss)
        critic_opt.step()

        actor_loss, dist = self.actor_loss(features, std)
        actor_opt.zero_grad(set_to_none=True)
        self.manual_backward(actor_loss)
        actor_opt.step()
        self.update_target()

        self.last_metrics = {
            "train/critic_loss": critic_loss.item(), "train/critic_q1": q1.mean().item(),
            "train/critic_q2": q2.mean().item(), "train/critic_target_q": target_q.mean().item(),
            "train/actor_loss": actor_loss.item(), "train/actor_ent": dist.entropy().sum(-1).mean().item(),
            "train/batch_reward": reward.mean().item(), "train/stddev": std,
        }
        self.update_seconds += time.perf_counter() - started
        return {"critic_loss": critic_loss.detach()}
