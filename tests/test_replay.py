"""Replay: n-step targets against hand-computed values, episode boundaries, ring overwrite, persistence."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_pieg.replay import Replay, ReplayCapacityError

GAMMA = 0.9


def frame(value: int) -> np.ndarray:
    return np.full((3, 2, 2), value, dtype=np.uint8)


def fill_episode(replay: Replay, first_value: int, rewards: list[float], discounts: list[float]) -> None:
    """Episode whose frames carry ``first_value, first_value + 1, ...`` and whose actions carry the step index."""
    replay.add_first(frame(first_value))
    for i, (reward, discount) in enumerate(zip(rewards, discounts), start=1):
        replay.add(np.array([first_value + i], np.float32), reward, discount, frame(first_value + i))


def sample_by_anchor(replay: Replay, batch: int = 512) -> dict[int, tuple]:
    """Map each sampled anchor (identified by its newest obs frame value) to its sample."""
    obs, action, reward, discount, next_obs = replay.sample(batch)
    out = {}
    for i in range(batch):
        out[int(obs[i, -3, 0, 0])] = (obs[i, ::3, 0, 0].tolist(), float(action[i, 0]), float(reward[i, 0]),
                                      float(discount[i, 0]), next_obs[i, ::3, 0, 0].tolist())
    return out


def test_nstep_matches_hand_computed_values_with_terminal_inside_window():
    replay = Replay(100, (3, 2, 2), 1, frame_stack=3, nstep=3, discount=GAMMA, seed=0)
    # steps 1..5, rewards 1..5, the episode terminates (discount 0) at step 5
    fill_episode(replay, 0, [1, 2, 3, 4, 5], [1, 1, 1, 1, 0])
    samples = sample_by_anchor(replay)
    assert sorted(samples) == [0, 1, 2, 3, 4]
    # anchor 1: obs = frames (0, 0, 1); action of step 2; reward r2 + g r3 + g^2 r4; discount g^3
    assert samples[1] == ([0, 0, 1], 2.0, pytest.approx(2 + GAMMA * 3 + GAMMA**2 * 4), pytest.approx(GAMMA**3),
                          [2, 3, 4])
    # anchor 2: the window holds the terminal at its end: reward r3 + g r4 + g^2 r5, discount 0
    assert samples[2][2] == pytest.approx(3 + GAMMA * 4 + GAMMA**2 * 5)
    assert samples[2][3] == 0.0
    # anchor 3: the terminal comes after 2 steps: the window stops there, nothing is bootstrapped
    assert samples[3] == ([1, 2, 3], 4.0, pytest.approx(4 + GAMMA * 5), 0.0, [3, 4, 5])
    assert samples[4] == ([2, 3, 4], 5.0, pytest.approx(5.0), 0.0, [3, 4, 5])


def test_discount_multiplies_env_discounts_and_gamma():
    replay = Replay(100, (3, 2, 2), 1, frame_stack=3, nstep=2, discount=GAMMA, seed=0)
    fill_episode(replay, 0, [1, 1, 1, 1], [0.5, 1, 0.5, 1])
    samples = sample_by_anchor(replay)
    # anchor 0: reward r1 + (g * d1) r2 = 1 + 0.45; discount g d1 g d2 = 0.9*0.5*0.9*1
    assert samples[0][2] == pytest.approx(1 + GAMMA * 0.5)
    assert samples[0][3] == pytest.approx(GAMMA * 0.5 * GAMMA)


def test_windows_never_cross_an_episode_and_time_limits_are_not_truncated():
    replay = Replay(1000, (3, 2, 2), 1, frame_stack=3, nstep=3, discount=GAMMA, seed=1)
    for episode in range(5):  # time-limited episodes (discount 1 at the end): frames 40*e + i
        fill_episode(replay, 40 * episode, [1.0] * 10, [1.0] * 10)
    obs, action, reward, discount, next_obs = replay.sample(2000)
    stacks = torch.cat([obs[:, ::3, 0, 0], next_obs[:, ::3, 0, 0]], dim=1).numpy() // 40
    assert (stacks == stacks[:, :1]).all()
    # a time limit is not a terminal: every window has all n steps, so the discount is always g^3
    assert np.allclose(discount.numpy(), GAMMA**3)
    assert (next_obs[:, -3, 0, 0] - obs[:, -3, 0, 0] == 3).all()
    assert set(np.unique(obs[:, -3, 0, 0].numpy() % 40)) == set(range(8))  # anchors 0..7 of each episode


def test_ring_overwrite_never_mixes_old_and_new_frames():
    replay = Replay(25, (3, 2, 2), 1, frame_stack=3, nstep=2, discount=GAMMA, seed=2)
    for episode in range(4):
        fill_episode(replay, 50 * episode, [1.0] * 10, [1.0] * 10)  # 44 positions into 25 slots
    assert replay.size == 44 and replay.oldest == 19
    obs, _, _, _, next_obs = replay.sample(500)
    values = torch.cat([obs[:, ::3, 0, 0], next_obs[:, ::3, 0, 0]], dim=1).numpy().astype(int)
    assert (values // 50 == values[:, :1] // 50).all()
    # the oldest retained episode starts at position 11 (frame 50), of which positions < 19 were overwritten:
    # its anchors must have all their stacked frames still in memory
    assert values.min() >= 50 + (19 - 11)


def test_save_and_load_round_trip(tmp_path):
    replay = Replay(50, (3, 2, 2), 1, frame_stack=3, nstep=3, discount=GAMMA, seed=3)
    fill_episode(replay, 0, list(range(1, 12)), [1.0] * 11)
    replay.save(tmp_path / "replay.npz")
    copy = Replay(50, (3, 2, 2), 1, frame_stack=3, nstep=3, discount=GAMMA, seed=99)
    copy.load(tmp_path / "replay.npz")
    for a, b in zip(replay.sample(16), copy.sample(16)):  # same contents and same sampler state
        assert (a == b).all()
    with pytest.raises(ValueError, match="capacity"):
        Replay(60, (3, 2, 2), 1, 3, 3, GAMMA).load(tmp_path / "replay.npz")


def test_capacity_check_names_a_capacity_that_fits():
    per = Replay.bytes_per_transition((3, 84, 84), 6)
    assert 21_000 < per < 21_500  # one uint8 frame plus a few scalars per transition
    with pytest.raises(ReplayCapacityError, match=r"replay_buffer_size=\d"):
        Replay.check_fits(1_000_000, (3, 84, 84), 6, available=2 * 2**30)
    Replay.check_fits(10_000, (3, 84, 84), 6, available=2 * 2**30)  # 0.2 GiB fits in 2 GiB
