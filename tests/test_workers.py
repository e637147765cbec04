"""EnvWorkers: environments in worker processes match in-process ones exactly, and faults stop the caller quickly.

Every wait inside EnvWorkers has a deadline, so these tests fail rather than hang; each keeps its episodes short
(cartpole_balance, 0.5 s time limit: 25 agent steps). Starting a worker (importing torch, building the env) takes a
few seconds, so the two-worker pool is shared by the tests that only step it.
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import time
from multiprocessing.shared_memory import SharedMemory

import numpy as np
import pytest

from lightning_pieg import envs
from lightning_pieg.workers import EnvWorkers, WorkerError

TASK = "cartpole_balance"
OPTIONS = {"time_limit": 0.5, "image_size": 84}
SEEDS = (3, 11)
START_TIMEOUT = 120.0  # two busy cores: importing torch in each worker takes seconds


@pytest.fixture(scope="module")
def pool():
    workers = EnvWorkers(TASK, seeds=SEEDS, options=OPTIONS, timeout=30.0, start_timeout=START_TIMEOUT)
    yield workers
    workers.close()
    workers.close()
    assert [process.exitcode for process in workers.processes] == [0, 0]  # a clean close: every worker returned
    assert not multiprocessing.active_children()


def _actions(rng: np.random.Generator, num: int) -> np.ndarray:
    return rng.uniform(-1.0, 1.0, (num, 1)).astype(np.float32)


def test_workers_match_in_process_envs(pool):
    local = [envs.make(TASK, seed=seed, **OPTIONS) for seed in SEEDS]
    assert pool.observation_spec() == local[0].observation_spec()
    assert pool.action_spec() == local[0].action_spec()
    batch = pool.reset()
    for index, env in enumerate(local):
        assert np.array_equal(batch.observation[index], env.reset().observation)
        assert np.array_equal(batch.frame[index], env.frame)
    rng, resets = np.random.default_rng(0), 0
    for _ in range(35):  # one episode end and reset
        actions = _actions(rng, len(local))
        batch = pool.step(actions)
        for index, env in enumerate(local):
            time_step = env.step(actions[index])
            assert np.array_equal(batch.observation[index], time_step.observation)
            assert np.array_equal(batch.frame[index], env.frame)
            assert batch.reward[index] == time_step.reward and batch.discount[index] == time_step.discount
            assert batch.last[index] == time_step.last() and batch.info[index] == env.info
        for index in np.flatnonzero(batch.last):  # one at a time: the subset path returns copied rows
            resets += 1
            first = pool.reset([index])
            assert first.observation.shape == (1, *pool.observation_spec().shape)
            assert np.array_equal(first.observation[0], local[index].reset().observation)
            assert np.array_equal(pool.observation[index], first.observation[0])
    assert resets == 2


def test_distinct_seeds_give_distinct_observations(pool):
    batch = pool.reset()
    assert not np.array_equal(batch.observation[0], batch.observation[1])


def test_reset_state_round_trip(pool):
    pool.reset()
    state = pool.get_reset_state(0)
    first = pool.reset([0]).observation[0].copy()
    rng = np.random.default_rng(1)
    for _ in range(5):
        pool.step(_actions(rng, 1), indices=[0])
    pool.set_reset_state(0, state)
    assert np.array_equal(pool.reset([0]).observation[0], first)
    env = envs.make(TASK, seed=12345, **OPTIONS)  # the state is an in-process env's too
    envs.set_reset_state(env, state)
    assert np.array_equal(env.reset().observation, first)


def test_reset_state_into_a_fresh_composer_worker():
    """dm_control composer envs (reach_duplo) draw more on their first reset: a later reset's state, restored into a
    worker never reset, needs the warm-up reset that set_reset_state does."""
    env = envs.make("reach_duplo", seed=7)
    env.reset()
    state = envs.get_reset_state(env)
    second = env.reset().observation
    with EnvWorkers("reach_duplo", seeds=[0], timeout=30.0, start_timeout=START_TIMEOUT) as workers:
        workers.set_reset_state(0, state)
        assert np.array_equal(workers.reset().observation[0], second)


def test_killed_worker_stops_the_caller():
    workers = EnvWorkers(TASK, seeds=SEEDS, options=OPTIONS, timeout=30.0, start_timeout=START_TIMEOUT)
    rng = np.random.default_rng(2)
    workers.reset()
    for _ in range(3):
        workers.step(_actions(rng, 2))
    start = time.monotonic()
    workers.step_async(_actions(rng, 2))
    os.kill(workers.processes[1].pid, signal.SIGKILL)
    with pytest.raises(WorkerError) as caught:
        workers.step_wait()  # the step may have come back before the kill: then the next one finds the worker dead
        workers.step(_actions(rng, 2))
    assert time.monotonic() - start < 30.0
    message = str(caught.value)
    assert "env worker 1" in message and TASK in message and f"seed {SEEDS[1]}" in message
    assert "SIGKILL" in message and "-9" in message
    assert not any(process.is_alive() for process in workers.processes)  # the fault closed the other one too
    workers.close()


def test_startup_errors_come_back_with_their_type(tmp_path):
    with pytest.raises(ValueError, match=r"env worker 0 \(cartpole_balance, mode no_such_mode, seed 0\).*Unknown mode"):
        EnvWorkers(TASK, "no_such_mode", seeds=[0], options=OPTIONS, start_timeout=START_TIMEOUT)
    missing = tmp_path / "no_dmcgb_data"
    with pytest.raises(FileNotFoundError, match="no_dmcgb_data") as caught:
        EnvWorkers(TASK, "color_easy", seeds=[0], options={**OPTIONS, "dmcgb_dir": str(missing)},
                   start_timeout=START_TIMEOUT)
    assert "\n" not in str(caught.value)  # one line; the child's traceback is the cause
    assert "Traceback" in str(caught.value.__cause__) and "data_dir" in str(caught.value.__cause__)


def test_hung_worker_times_out_and_close_is_idempotent():
    workers = EnvWorkers(TASK, seeds=[0], options=OPTIONS, timeout=30.0, start_timeout=START_TIMEOUT,
                         close_timeout=1.0)
    name = workers._memory[0].name
    workers.reset()
    os.kill(workers.processes[0].pid, signal.SIGSTOP)  # hangs without dying: only the deadline can catch it
    start = time.monotonic()
    workers.step_async(np.zeros((1, 1), np.float32))
    with pytest.raises(WorkerError, match=r"env worker 0 .*no answer within 1 s"):
        workers.step_wait(timeout=1.0)
    assert time.monotonic() - start < 15.0  # wait, then close: join, terminate (ignored while stopped), kill
    workers.close()
    workers.close()
    assert not any(process.is_alive() for process in workers.processes)
    with pytest.raises(FileNotFoundError):
        SharedMemory(name)  # unlinked
    with pytest.raises(WorkerError, match="closed"):
        workers.reset()
