"""Environments in worker processes: ``EnvWorkers`` steps N ``lightning_pieg.envs.make`` environments in parallel.

Protocol. Each worker is a ``spawn``ed process that builds its own environment (so its GL context lives there) and
serves commands from one ``Pipe``: the parent sends ``(command, payload)`` and the worker answers every command
with ``("ok", result)`` or ``("error", (exception class names, message, traceback summary, traceback text))``.
Commands: ``attach`` (the shared memory), ``reset``, ``step``, ``get_reset_state``, ``set_reset_state``, ``close``
(no answer). On start the worker answers with its specs, or with the error that stopped ``make``.

Shared memory. One ``SharedMemory`` block, created by the parent once the specs are known, holds the observations
``(N, *obs_shape)`` followed by the newest frames ``(N, *frame_shape)``; worker i writes row i of both before it
answers ``reset``/``step``, so only (reward, discount, step type, ``env.info``) cross the pipe.

Faults. Every wait is ``multiprocessing.connection.wait`` on the pipes and the process sentinels, with a deadline:
a worker that dies (signal, exit) or raises makes the call close all workers and raise within moments, naming the
worker, its task, mode and seed, and its exit code or exception. Startup errors come back as the child's
exception type where it is a builtin one (``ValueError``, ``FileNotFoundError``), with a one-line message.

Workers are ``spawn``ed, so a script that starts them needs the ``if __name__ == "__main__":`` guard.
"""
from __future__ import annotations

import builtins
import multiprocessing as mp
import os
import signal
import time
import traceback
import weakref
from multiprocessing.connection import Connection, wait
from multiprocessing.shared_memory import SharedMemory
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch

from lightning_pieg.console import Fault


# Mesa llvmpipe's rasterizer threads in a worker unless the user sets LP_NUM_THREADS: one, so that N workers do
# not start N times the cores in render threads. "0" (rasterize in the worker's own thread) measured the same here
# (scripts/bench_envs.py --render-threads 0 1, docs/measurements.md).
WORKER_RENDER_THREADS = "1"


class WorkerError(Fault):
    """A worker process died, hung or raised."""


class Steps(NamedTuple):
    """One batched step (or reset) of the envs asked for, in their order. ``observation`` and ``frame`` are views of
    the shared memory when all envs took part (valid until the next reset/step writes them), copies otherwise."""

    reward: np.ndarray     # float64 (B,)
    discount: np.ndarray   # float64 (B,)
    last: np.ndarray       # bool (B,)
    info: list[dict]
    observation: np.ndarray
    frame: np.ndarray


# ------------------------------------------------------------------------------------------------------ the worker
def _describe(error: BaseException) -> tuple:
    frames = traceback.extract_tb(error.__traceback__)[-3:]
    summary = " <- ".join(f"{os.path.basename(f.filename)}:{f.lineno} in {f.name}" for f in reversed(frames))
    return [c.__name__ for c in type(error).__mro__], str(error), summary, "".join(traceback.format_exception(error))


def _worker(conn: Connection, task: str, mode: str, seed: int, options: dict, device: int | None,
            torch_threads: int) -> None:
    """The worker process: build the env, then serve commands until ``close`` or the parent goes away."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it closes the workers
    os.environ.setdefault("LP_NUM_THREADS", WORKER_RENDER_THREADS)
    if device is not None:
        os.environ["MUJOCO_EGL_DEVICE_ID"] = str(device)
    try:
        import lightning_pieg  # noqa: F401  (torch before dm_control: see lightning_pieg/__init__.py)
        from lightning_pieg import envs
        from lightning_pieg.envs.wrappers import FrameStack

        # DMC-GB's video resize (bilinear, then truncated to uint8) flips pixels by one with torch's thread count:
        # the parent's count keeps a worker's pixels those of the same environment in the parent
        torch.set_num_threads(torch_threads)

        env = envs.make(task, mode, seed=seed, **options)
        frame_spec = env._env.observation_spec() if isinstance(env, FrameStack) else env.observation_spec()
        conn.send(("ok", (env.observation_spec(), env.action_spec(), tuple(frame_spec.shape))))
    except BaseException as error:
        conn.send(("error", _describe(error)))
        return
    shm, observation, frame, resets = None, None, None, 0

    def write(time_step) -> tuple:
        observation[...] = time_step.observation
        frame[...] = env.frame
        return float(time_step.reward or 0.0), float(time_step.discount), time_step.last(), dict(env.info)

    while True:
        try:
            command, payload = conn.recv()
        except (EOFError, OSError):
            break
        if command == "close":
            break
        try:
            if command == "attach":
                name, index, num = payload
                shm, obs_spec = SharedMemory(name), env.observation_spec()
                observation = np.ndarray((num, *obs_spec.shape), obs_spec.dtype, shm.buf)[index]
                frame = np.ndarray((num, *frame_spec.shape), obs_spec.dtype, shm.buf,
                                   offset=num * observation.nbytes)[index]
                result = None
            elif command == "reset":
                result, resets = write(env.reset()), resets + 1
            elif command == "step":
                result = write(env.step(payload))
            elif command == "get_reset_state":
                result = envs.get_reset_state(env)
            elif command == "set_reset_state":
                state, from_first_reset = payload
                warm_up = resets == 0 and not from_first_reset  # composer envs draw more on their first reset
                result = envs.restore_reset_state(env, state, later_reset_on_fresh_env=warm_up)
                resets = 1 if warm_up else resets
            else:
                raise ValueError(f"unknown command {command!r}")
            conn.send(("ok", result))
        except Exception as error:
            conn.send(("error", _describe(error)))
    del observation, frame
    try:
        env.close()
    finally:
        if shm is not None:
            shm.close()


def _shutdown(processes: list, conns: list, memory: list, timeout: float) -> None:
    """Ask every worker to stop, join them until ``timeout``, terminate (then kill) stragglers, free the memory."""
    for conn in conns:
        try:
            conn.send(("close", None))
        except (OSError, ValueError):
            pass
    deadline = time.monotonic() + timeout
    for process in processes:
        process.join(max(deadline - time.monotonic(), 0.0))
    for process in processes:
        for stop in (process.terminate, process.kill):
            if process.is_alive():
                stop()
                process.join(2.0)
    for conn in conns:
        conn.close()
    for shm in memory:
        try:
            shm.close()
        except BufferError:  # the caller still holds views; the mapping goes when they do
            pass
        shm.unlink()


# ------------------------------------------------------------------------------------------------------ the parent
def egl_devices() -> list[int] | None:
    """The GPUs that workers can render on (EGL on a CUDA host), or None: the default device or software."""
    from lightning_pieg import envs

    count = torch.cuda.device_count() if envs.select_backend() == "egl" else 0
    return list(range(count)) or None


class EnvWorkers:
    """``len(seeds)`` environments ``envs.make(task, mode, seed=seeds[i], **options)``, each in its own process.

    ``devices`` (optional) are EGL device indices, worker i renders on ``devices[i % len(devices)]``; ``timeout`` bounds
    each command's wait and ``start_timeout`` the start (importing torch and building the env).
    """

    def __init__(self, task: str, mode: str = "train", seeds: Sequence[int] = (0,), *, options: dict | None = None,
                 devices: Sequence[int] | None = None, timeout: float = 60.0, start_timeout: float = 300.0,
                 close_timeout: float = 5.0):
        if not seeds:
            raise ValueError("EnvWorkers needs at least one seed.")
        self.task, self.mode, self.seeds, self.timeout = task, mode, [int(s) for s in seeds], timeout
        self.num = len(self.seeds)
        self._processes: list = []
        self._conns: list[Connection] = []
        self._memory: list[SharedMemory] = []
        self._pending: list[int] | None = None
        self._closer = weakref.finalize(self, _shutdown, self._processes, self._conns, self._memory, close_timeout)
        context = mp.get_context("spawn")
        threads = torch.get_num_threads()
        for index, seed in enumerate(self.seeds):
            parent, child = context.Pipe()
            device = None if not devices else devices[index % len(devices)]
            process = context.Process(target=_worker,
                                      args=(child, task, mode, seed, dict(options or {}), device, threads),
                                      name=f"env-worker-{index}", daemon=True)
            process.start()
            child.close()
            self._processes.append(process)
            self._conns.append(parent)
        try:
            replies = self._receive(range(self.num), start_timeout)
        except WorkerError as error:
            raise self._startup_error(error) from error.__cause__
        self._obs_spec, self._action_spec, frame_shape = replies[0]
        shape, dtype = (self.num, *self._obs_spec.shape), np.dtype(self._obs_spec.dtype)
        size = (int(np.prod(shape)) + self.num * int(np.prod(frame_shape))) * dtype.itemsize
        self._memory.append(SharedMemory(create=True, size=size))
        self.observation = np.ndarray(shape, dtype, self._memory[0].buf)  # (N, *obs_shape), then (N, *frame_shape)
        self.frame = np.ndarray((self.num, *frame_shape), dtype, self._memory[0].buf, offset=self.observation.nbytes)
        for index in range(self.num):
            self._send(index, "attach", (self._memory[0].name, index, self.num))
        self._receive(range(self.num), self.timeout)

    # --- faults ---------------------------------------------------------------------------------------------------
    def _name(self, index: int) -> str:
        return f"env worker {index} ({self.task}, mode {self.mode}, seed {self.seeds[index]})"

    def _died(self, index: int) -> WorkerError:
        process = self._processes[index]
        process.join(1.0)
        code = process.exitcode
        how = f", signal {signal.Signals(-code).name}" if code is not None and code < 0 else ""
        return WorkerError(f"{self._name(index)} died (exit code {code}{how}).")

    def _fail(self, error: Exception, cause: BaseException | None = None):
        self.close()
        raise error from cause

    @staticmethod
    def _startup_error(error: WorkerError) -> Exception:
        """The child's error as its nearest builtin exception type (not bare ``Exception``), else ``error``."""
        types, index_name, message = getattr(error, "child", ([], "", ""))
        for name in types:
            cls = getattr(builtins, name, None)
            if name != "Exception" and isinstance(cls, type) and issubclass(cls, Exception):
                prefix = "" if name == types[0] else f"{types[0]}: "
                try:
                    return cls(f"{index_name}: {prefix}{message}")
                except Exception:  # a constructor that wants more than a message
                    break
        return error

    def _receive(self, indices: Sequence[int], timeout: float) -> list:
        """The workers' answers to their last command, in ``indices`` order; raises (after closing) on a fault."""
        deadline = time.monotonic() + timeout
        waiting = {self._conns[i]: i for i in indices}
        sentinels = {self._processes[i].sentinel: i for i in indices}
        replies: dict[int, Any] = {}
        while waiting:
            ready = wait([*waiting, *(s for s, i in sentinels.items() if i not in replies)],
                         max(deadline - time.monotonic(), 0.0))
            if not ready:
                names = ", ".join(self._name(i) for i in waiting.values())
                self._fail(WorkerError(f"{names}: no answer within {timeout:g} s."))
            for handle in ready:
                if handle in waiting:
                    index = waiting.pop(handle)
                    try:
                        replies[index] = handle.recv()
                    except (EOFError, OSError):
                        self._fail(self._died(index))
                elif sentinels[handle] not in replies and not self._conns[sentinels[handle]].poll():
                    self._fail(self._died(sentinels[handle]))
        for index in indices:
            status, result = replies[index]
            if status == "error":
                types, message, summary, text = result
                error = WorkerError(f"{self._name(index)} raised {types[0]}: {message} (at {summary})")
                error.child = (types, self._name(index), message)
                self._fail(error, WorkerError(f"traceback in {self._name(index)}:\n{text}"))
        return [replies[i][1] for i in indices]

    # --- the environment API --------------------------------------------------------------------------------------
    def observation_spec(self):
        return self._obs_spec

    def action_spec(self):
        return self._action_spec

    def _send(self, index: int, command: str, payload: Any = None) -> None:
        try:
            self._conns[index].send((command, payload))
        except OSError:  # the worker is gone: its end of the pipe is closed
            self._fail(self._died(index))

    def _call(self, index: int, command: str, payload: Any = None) -> Any:
        self._check_idle()
        self._send(index, command, payload)
        return self._receive([index], self.timeout)[0]

    def _check_idle(self) -> None:
        if not self._closer.alive:
            raise WorkerError("EnvWorkers is closed.")
        if self._pending is not None:
            raise RuntimeError("a step is in flight: call step_wait() first.")

    def _steps(self, indices: list[int], replies: list) -> Steps:
        rows = slice(None) if indices == list(range(self.num)) else indices
        reward, discount, last, info = zip(*replies)
        return Steps(np.array(reward), np.array(discount), np.array(last), list(info), self.observation[rows],
                     self.frame[rows])

    def reset(self, indices: Sequence[int] | None = None) -> Steps:
        """Reset the envs ``indices`` (all by default) and wait for their first observations."""
        self._check_idle()
        indices = list(range(self.num)) if indices is None else list(indices)
        for index in indices:
            self._send(index, "reset")
        return self._steps(indices, self._receive(indices, self.timeout))

    def step_async(self, actions: np.ndarray, indices: Sequence[int] | None = None) -> None:
        """Send ``actions[k]`` to env ``indices[k]`` (all envs by default) and return at once."""
        self._check_idle()
        indices = list(range(self.num)) if indices is None else list(indices)
        if len(actions) != len(indices):
            raise ValueError(f"{len(actions)} actions for {len(indices)} environments.")
        for index, action in zip(indices, actions):
            self._send(index, "step", np.asarray(action, dtype=self._action_spec.dtype))
        self._pending = indices

    def step_wait(self, timeout: float | None = None) -> Steps:
        """Wait for the step sent by ``step_async``; don't read the observations before this returns."""
        if self._pending is None:
            raise RuntimeError("step_wait() without step_async().")
        indices, self._pending = self._pending, None
        return self._steps(indices, self._receive(indices, self.timeout if timeout is None else timeout))

    def step(self, actions: np.ndarray, indices: Sequence[int] | None = None) -> Steps:
        self.step_async(actions, indices)
        return self.step_wait()

    def get_reset_state(self, index: int) -> list:
        """``lightning_pieg.envs.get_reset_state`` of env ``index``: what its next reset draws from."""
        return self._call(index, "get_reset_state")

    def set_reset_state(self, index: int, state: list, from_first_reset: bool = False) -> None:
        """Restore ``state`` into env ``index`` so its next reset repeats the saved one. Unless the state was saved
        before its env's first reset, a worker not reset yet is reset once first (composer envs' first-reset draws)."""
        self._call(index, "set_reset_state", (state, from_first_reset))

    @property
    def processes(self) -> list:
        return list(self._processes)

    def close(self) -> None:
        """Stop every worker (idempotent): ask, join with a timeout, terminate stragglers, free the shared memory."""
        self._pending = None
        self._closer()

    def __enter__(self) -> EnvWorkers:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __len__(self) -> int:
        return self.num


class InProcessEnvs:
    """``EnvWorkers``' interface over environments in this process (``collector.num_envs=0``, ``env_workers=false``):
    ``step_async`` only remembers the actions and ``step_wait`` runs them, so nothing overlaps with the learner."""

    def __init__(self, environments: Sequence):
        self.environments = list(environments)
        self.num = len(self.environments)
        self._pending: tuple[list[int], np.ndarray] | None = None
        self._resets = [0] * self.num

    def _steps(self, indices: list[int], time_steps: list) -> Steps:
        environments = [self.environments[index] for index in indices]
        return Steps(np.array([float(t.reward or 0.0) for t in time_steps]),
                     np.array([float(t.discount) for t in time_steps]), np.array([t.last() for t in time_steps]),
                     [dict(env.info) for env in environments],
                     np.stack([t.observation for t in time_steps]), np.stack([env.frame for env in environments]))

    def observation_spec(self):
        return self.environments[0].observation_spec()

    def action_spec(self):
        return self.environments[0].action_spec()

    def _indices(self, indices: Sequence[int] | None) -> list[int]:
        return list(range(self.num)) if indices is None else list(indices)

    def reset(self, indices: Sequence[int] | None = None) -> Steps:
        indices = self._indices(indices)
        for index in indices:
            self._resets[index] += 1
        return self._steps(indices, [self.environments[index].reset() for index in indices])

    def step_async(self, actions: np.ndarray, indices: Sequence[int] | None = None) -> None:
        indices = self._indices(indices)
        if len(actions) != len(indices):
            raise ValueError(f"{len(actions)} actions for {len(indices)} environments.")
        self._pending = (indices, np.asarray(actions))

    def step_wait(self, timeout: float | None = None) -> Steps:
        (indices, actions), self._pending = self._pending, None
        return self._steps(indices, [self.environments[index].step(action)
                                     for index, action in zip(indices, actions)])

    def step(self, actions: np.ndarray, indices: Sequence[int] | None = None) -> Steps:
        self.step_async(actions, indices)
        return self.step_wait()

    def get_reset_state(self, index: int) -> list:
        from lightning_pieg import envs

        return envs.get_reset_state(self.environments[index])

    def set_reset_state(self, index: int, state: list, from_first_reset: bool = False) -> None:
        from lightning_pieg import envs

        warm_up = self._resets[index] == 0 and not from_first_reset
        envs.restore_reset_state(self.environments[index], state, later_reset_on_fresh_env=warm_up)
        self._resets[index] += int(warm_up)

    def close(self) -> None:
        for env in self.environments:
            env.close()

    def __len__(self) -> int:
        return self.num
