"""In-memory replay that stores each frame once (uint8) and rebuilds frame stacks and n-step returns on sampling.

Positions are global step counters; position ``p`` lives in slot ``p % capacity``. Position ``p`` holds the frame
observed at that step and the transition that led to it (action, reward, discount); an episode's first position
holds its reset frame and no transition. A sample anchored at ``t`` is::

    obs      = frames[t - F + 1 .. t]           (clamped to the episode's first frame, like the env's frame stack)
    action   = action[t + 1]
    reward   = sum_k  r[t + 1 + k] * prod_{j<k} (gamma * d[t + 1 + j])      k = 0 .. n - 1
    discount = prod_k (gamma * d[t + 1 + k])
    next_obs = frames[t + n - F + 1 .. t + n]

exactly DrQ-v2's n-step definition. Windows never leave their episode: an anchor is valid only when ``t + n`` is in
the same episode, or when the episode ended in a true terminal (discount 0) within the window, in which case the
window stops there (the discount is then 0, so nothing is bootstrapped from ``next_obs``).
"""
from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import torch

BYTES_FIELDS = ("frames", "actions", "rewards", "discounts", "episode_starts")


class ReplayCapacityError(MemoryError):
    """The replay would not fit in the memory available."""


def available_memory_bytes() -> int:
    """MemAvailable from /proc/meminfo (Linux), else the free physical pages."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class Replay:
    """Ring buffer of single frames plus per-step action, reward, discount and episode start."""

    def __init__(self, capacity: int, frame_shape: tuple[int, int, int], action_dim: int, frame_stack: int,
                 nstep: int, discount: float, seed: int = 0):
        if capacity < nstep + frame_stack:
            raise ValueError(f"replay capacity {capacity} is too small for nstep={nstep}, frame_stack={frame_stack}")
        self.capacity, self.frame_stack, self.nstep, self.discount = capacity, frame_stack, nstep, discount
        self.frames = np.empty((capacity, *frame_shape), dtype=np.uint8)
        self.actions = np.zeros((capacity, action_dim), dtype=np.float32)
        self.rewards = np.zeros(capacity, dtype=np.float32)
        self.discounts = np.ones(capacity, dtype=np.float32)
        self.episode_starts = np.zeros(capacity, dtype=np.int64)
        self.size = 0  # positions written so far (global counter)
        self._episode_start = 0
        self.rng = np.random.default_rng(seed)

    @staticmethod
    def bytes_per_transition(frame_shape: tuple[int, int, int], action_dim: int) -> int:
        return int(np.prod(frame_shape)) + 4 * action_dim + 4 + 4 + 8

    @classmethod
    def check_fits(cls, capacity: int, frame_shape: tuple[int, int, int], action_dim: int,
                   available: int | None = None, headroom: float = 0.8) -> None:
        """Raise ``ReplayCapacityError`` naming a capacity that fits, before any memory is touched."""
        available = available_memory_bytes() if available is None else available
        per = cls.bytes_per_transition(frame_shape, action_dim)
        needed = capacity * per
        if needed > headroom * available:
            fits = int(headroom * available // per)
            raise ReplayCapacityError(
                f"a replay of {capacity:,} transitions needs {needed / 2**30:.1f} GiB, but only "
                f"{available / 2**30:.1f} GiB of memory is available. Set replay_buffer_size={fits:,} or less "
                f"(about {per / 1024:.1f} KiB a transition), or free memory.")

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, name).nbytes for name in BYTES_FIELDS)

    @property
    def oldest(self) -> int:
        return max(0, self.size - self.capacity)

    def add_first(self, frame: np.ndarray) -> None:
        """Start an episode with its reset frame (the newest frame of the reset observation)."""
        self._episode_start = self.size
        self._write(frame, np.zeros(self.actions.shape[1], np.float32), 0.0, 1.0)

    def add(self, action: np.ndarray, reward: float, discount: float, frame: np.ndarray) -> None:
        """Record one environment step: the action taken, its reward and discount, and the frame that followed."""
        self._write(frame, action, reward, discount)

    def _write(self, frame, action, reward, discount) -> None:
        slot = self.size % self.capacity
        self.frames[slot] = frame
        self.actions[slot] = action
        self.rewards[slot] = reward
        self.discounts[slot] = discount
        self.episode_starts[slot] = self._episode_start
        self.size += 1

    def _same_episode(self, positions: np.ndarray, start: np.ndarray) -> np.ndarray:
        inside = (positions < self.size) & (positions >= self.oldest)
        slots = positions % self.capacity
        return inside & (self.episode_starts[slots] == start)

    def _windows(self, anchors: np.ndarray):
        """Validity, step mask (n steps) and end position of each anchor's window."""
        starts = self.episode_starts[anchors % self.capacity]
        steps = anchors[:, None] + 1 + np.arange(self.nstep)[None, :]
        in_episode = self._same_episode(steps, starts[:, None])
        count = in_episode.cumprod(axis=1).sum(axis=1)  # steps before leaving the episode
        last = anchors + count
        ended_terminal = self.discounts[last % self.capacity] == 0.0
        stack_kept = np.maximum(starts, anchors - self.frame_stack + 1) >= self.oldest
        valid = (count >= 1) & ((count == self.nstep) | ended_terminal) & stack_kept
        mask = np.arange(self.nstep)[None, :] < count[:, None]
        return valid, mask, last

    def _stack(self, positions: np.ndarray) -> np.ndarray:
        """Frame stacks ending at ``positions``, the episode's first frame repeated before its start."""
        starts = self.episode_starts[positions % self.capacity]
        offsets = np.arange(-self.frame_stack + 1, 1)
        frame_positions = np.maximum(positions[:, None] + offsets[None, :], starts[:, None])
        frames = self.frames[frame_positions % self.capacity]  # (B, F, 3, H, W)
        return frames.reshape(len(positions), -1, *frames.shape[3:])

    def sample(self, batch_size: int) -> tuple[torch.Tensor, ...]:
        """``(obs, action, reward, discount, next_obs)`` tensors; obs uint8, reward and discount shaped (B, 1)."""
        anchors, masks, lasts = [], [], []
        found = 0
        for _ in range(100):
            candidates = self.rng.integers(self.oldest, self.size, size=2 * batch_size)
            valid, mask, last = self._windows(candidates)
            anchors.append(candidates[valid]), masks.append(mask[valid]), lasts.append(last[valid])
            found += int(valid.sum())
            if found >= batch_size:
                break
        else:
            raise RuntimeError("the replay holds no complete n-step window yet; collect more steps first")
        anchors, mask, last = (np.concatenate(parts)[:batch_size] for parts in (anchors, masks, lasts))
        steps = (anchors[:, None] + 1 + np.arange(self.nstep)[None, :]) % self.capacity
        rewards = np.where(mask, self.rewards[steps], 0.0)
        discounts = np.where(mask, self.discounts[steps] * self.discount, 1.0)
        # discount before step k: product of gamma * d over the earlier steps of the window
        running = np.concatenate([np.ones((len(anchors), 1)), np.cumprod(discounts, axis=1)[:, :-1]], axis=1)
        reward = (rewards * running).sum(axis=1, keepdims=True).astype(np.float32)
        discount = np.prod(discounts, axis=1, keepdims=True).astype(np.float32)
        return (torch.from_numpy(self._stack(anchors)), torch.from_numpy(self.actions[(anchors + 1) % self.capacity]),
                torch.from_numpy(reward), torch.from_numpy(discount), torch.from_numpy(self._stack(last)))

    # --- persistence (save_replay) ---------------------------------------------------------------------------
    def arrays(self, prefix: str = "") -> dict[str, np.ndarray]:
        """The replay's contents as named arrays (``prefix`` names a stream in a file that holds several)."""
        used = min(self.size, self.capacity)
        return {**{f"{prefix}{name}": getattr(self, name)[:used] for name in BYTES_FIELDS},
                f"{prefix}meta": np.array([self.size, self._episode_start, self.capacity], dtype=np.int64),
                f"{prefix}rng": np.array([repr(self.rng.bit_generator.state)])}

    def restore(self, data, prefix: str = "", path: str | Path = "") -> None:
        """Load ``arrays(prefix)`` back from an open ``.npz``."""
        size, episode_start, capacity = (int(v) for v in data[f"{prefix}meta"])
        if capacity != self.capacity:
            raise ValueError(f"{path} holds a replay of capacity {capacity}, this run has {self.capacity}; "
                             f"resume with the same replay_buffer_size")
        used = min(size, capacity)
        for name in BYTES_FIELDS:
            getattr(self, name)[:used] = data[f"{prefix}{name}"]
        self.size, self._episode_start = size, episode_start
        self.rng.bit_generator.state = _literal(str(data[f"{prefix}rng"][0]))

    def write(self, handle) -> None:
        """Serialise the replay into an open binary file (``checkpoints.atomic_write`` gives one)."""
        np.savez(handle, **self.arrays())

    def save(self, path: str | Path) -> None:
        """Write the replay atomically (temporary file, fsync, rename)."""
        from lightning_pieg.checkpoints import atomic_write

        atomic_write(Path(path), self.write)

    @staticmethod
    def check_file(path: str | Path, prefixes: tuple[str, ...] = ("",)) -> None:
        """Raise ``ValueError`` naming ``path`` if it is not a complete saved replay (before anything is built)."""
        try:
            with zipfile.ZipFile(path) as archive:
                broken = archive.testzip()
                names = {name.removesuffix(".npy") for name in archive.namelist()}
        except (zipfile.BadZipFile, OSError) as error:
            raise ValueError(f"replay file {str(path)!r} is corrupt or truncated ({error})") from None
        missing = sorted({f"{prefix}{key}" for prefix in prefixes for key in (*BYTES_FIELDS, "meta", "rng")} - names)
        if broken is not None or missing:
            problem = f"member {broken!r} fails its CRC check" if broken else f"it lacks {', '.join(missing)}"
            raise ValueError(f"replay file {str(path)!r} is corrupt ({problem})")

    def load(self, path: str | Path) -> None:
        self.check_file(path)
        with np.load(path, allow_pickle=False) as data:
            self.restore(data, path=path)


def stream_prefixes(num_streams: int) -> tuple[str, ...]:
    """Array-name prefixes of the streams in a saved replay: none for one stream (the single-environment format)."""
    return ("",) if num_streams == 1 else tuple(f"s{i}." for i in range(num_streams))


class StreamReplay:
    """The replay of ``N`` environment streams: one ``Replay`` per environment (the capacity split evenly), so that
    no window crosses from one environment into another and memory per transition is unchanged. ``sample`` draws an
    equal share of the batch from every stream (they fill in lockstep), each share vectorised; with one stream it is
    that stream's ``Replay`` exactly. Stream 0 samples with ``seed`` (the single-environment run's), stream ``i``
    with ``[seed, i]``."""

    def __init__(self, num_streams: int, capacity: int, frame_shape: tuple[int, int, int], action_dim: int,
                 frame_stack: int, nstep: int, discount: float, seed: int = 0):
        per_stream = capacity // num_streams
        self.streams = [Replay(per_stream, frame_shape, action_dim, frame_stack, nstep, discount,
                               seed=seed if i == 0 else [seed, i]) for i in range(num_streams)]

    def __len__(self) -> int:
        return len(self.streams)

    def __getitem__(self, stream: int) -> Replay:
        return self.streams[stream]

    @property
    def capacity(self) -> int:
        return sum(replay.capacity for replay in self.streams)

    @property
    def nbytes(self) -> int:
        return sum(replay.nbytes for replay in self.streams)

    def sample(self, batch_size: int) -> tuple[torch.Tensor, ...]:
        """``(obs, action, reward, discount, next_obs)``, an equal share from every stream (see the class)."""
        if len(self.streams) == 1:
            return self.streams[0].sample(batch_size)
        count = len(self.streams)
        shares = [batch_size // count + (i < batch_size % count) for i in range(count)]
        parts = [replay.sample(share) for replay, share in zip(self.streams, shares) if share]
        return tuple(torch.cat(tensors) for tensors in zip(*parts))

    def write(self, handle) -> None:
        np.savez(handle, **{key: value for replay, prefix in zip(self.streams, stream_prefixes(len(self)))
                            for key, value in replay.arrays(prefix).items()})

    @staticmethod
    def saved_capacity(path: str | Path, num_streams: int) -> int:
        """The total capacity of a saved replay of ``num_streams`` streams (a resumed run keeps it)."""
        prefixes = stream_prefixes(num_streams)
        Replay.check_file(path, prefixes)
        with np.load(path, allow_pickle=False) as data:
            return sum(int(data[f"{prefix}meta"][2]) for prefix in prefixes)

    def load(self, path: str | Path) -> None:
        prefixes = stream_prefixes(len(self))
        Replay.check_file(path, prefixes)
        with np.load(path, allow_pickle=False) as data:
            for replay, prefix in zip(self.streams, prefixes):
                replay.restore(data, prefix, path)


def _literal(text: str):
    import ast

    return ast.literal_eval(text)
