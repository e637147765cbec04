"""The learner: DrQ-v2's DDPG (clipped double Q, n-step targets, random shifts) over PIE-G's or DrQ-v2's encoder."""
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
from lightning_pieg.encoders import ConvEncoder, FrozenResNetEncoder
from lightning_pieg.networks import Actor, Critic, stddev_at

AGENTS = ("pieg", "drqv2")


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


class PIEGModule(pl.LightningModule):
    """Actor, critic and target critic over an image encoder, optimised manually once per yielded batch.

    Optimisers: Adam over the critic and the encoder's trainable part (PIE-G: the head only; the ResNet trunk is
    frozen and in no optimiser), and Adam over the actor, which sees detached features.
    """

    def __init__(self, obs_shape: tuple[int, ...], action_dim: int, agent: str = "pieg", lr: float = 1e-4,
                 feature_dim: int = 256, hidden_dim: int = 1024, critic_target_tau: float = 0.01,
                 num_expl_steps: int = 2000, stddev_schedule: str | float = "linear(1.0,0.1,100000)",
                 stddev_clip: float = 0.3, encoder: dict | None = None, overlay_alpha: float = 0.5,
                 encoder_state_dict: dict | None = None, shift_pad: int | None = None):
        super().__init__()
        self.save_hyperparameters(ignore=["encoder_state_dict"])
        if agent not in AGENTS:
            raise ValueError(f"agent={agent!r} is unknown; choose one of {', '.join(AGENTS)}.")
        encoder = dict(encoder or {})
        obs_shape = tuple(obs_shape)
        if agent == "pieg":
            self.encoder = FrozenResNetEncoder(
                obs_shape, arch=encoder.get("arch", "resnet18"), layer=encoder.get("layer", 2),
                bn=encoder.get("bn", "adaptive"), state_dict=encoder_state_dict,
                head_dim=encoder.get("head_dim", 1024))
        else:
            self.encoder = ConvEncoder(obs_shape)
        self.actor = Actor(self.encoder.repr_dim, action_dim, feature_dim, hidden_dim)
        self.critic = Critic(self.encoder.repr_dim, action_dim, feature_dim, hidden_dim)
        self.critic_target = Critic(self.encoder.repr_dim, action_dim, feature_dim, hidden_dim)
        self.critic_target.load_state_dict(self.critic.state_dict())
        self.critic_target.requires_grad_(False)
        # shift_pad was an encoder option in checkpoints written before it moved to the augmentation
        self.shift = RandomShift(shift_pad if shift_pad is not None else encoder.get("shift_pad", 4))
        self.overlay_images = None  # set by train.py when augment.overlay names a folder (not saved)
        self.automatic_optimization = False
        self.last_metrics: dict[str, float] = {}
        self.update_seconds = 0.0  # wall time in updates (the batch's collection excluded), for bench_train

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

    def critic_loss(self, features: torch.Tensor, action: torch.Tensor,
                    target_q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``MSE(Q1, target) + MSE(Q2, target)``; returns the loss and both Q estimates."""
        q1, q2 = self.critic(features, action)
        return F.mse_loss(q1, target_q) + F.mse_loss(q2, target_q), q1, q2

    def actor_loss(self, features: torch.Tensor, std: float) -> tuple[torch.Tensor, torch.distributions.Normal]:
        """``-mean(min(Q1, Q2))`` at the actor's clipped noisy action; the features are detached, so only the
        actor learns from it."""
        dist = self.actor(features.detach(), std)
        policy_action = dist.sample(clip=self.hparams.stddev_clip)
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
        features = self.encoder(obs)
        with torch.no_grad():
            next_features = self.encoder(next_obs)
        target_q = self.td_target(reward, discount, next_features, std)
        critic_loss, q1, q2 = self.critic_loss(features, action, target_q)
        if self.overlay_images is not None:
            from lightning_pieg.overlay import overlay

            images = self.overlay_images.sample(obs.shape[0]).to(self.device)
            overlaid = self.encoder(overlay(obs, images, self.hparams.overlay_alpha))
            critic_loss = 0.5 * (critic_loss + self.critic_loss(overlaid, action, target_q)[0])
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
