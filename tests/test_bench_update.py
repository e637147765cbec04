"""scripts/bench_update.py on tiny networks: the overlay term runs, the precision comparison starts from identical
states, every measurement is filled in and the three tables print."""
from __future__ import annotations

import argparse
import copy
import math

import pytest
import torch
from conftest import load_script

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def bench():
    return load_script("bench_update")


@pytest.fixture
def tiny(bench, monkeypatch):
    """The script with small observations and narrow networks (the ResNet-18 trunk stays, on 32x32 frames)."""
    monkeypatch.setattr(bench, "OBS", (9, 32, 32))
    monkeypatch.setattr(bench, "FEATURE_DIM", {"pieg": 8, "drqv2": 8})
    monkeypatch.setattr(bench, "HIDDEN_DIM", 16)
    monkeypatch.setattr(bench, "ENCODER", {**bench.ENCODER, "head_dim": 32})
    return bench


def test_fixed_images_are_the_same_images_in_unit_range(tiny):
    images = tiny.FixedImages(8, CPU)
    first, again = images.sample(8), images.sample(8)
    assert first.shape == (8, 3, 32, 32) and first.dtype == torch.float32
    assert 0.0 <= first.min() and first.max() <= 1.0
    assert torch.equal(first, again) and torch.equal(images.sample(4), first[:4])
    with pytest.raises(ValueError):
        images.sample(9)


@pytest.mark.parametrize("agent", ["pieg", "drqv2"])
def test_update_runs_the_overlay_term(tiny, agent, monkeypatch):
    module = tiny.attach_optimisers(tiny.build_module(agent, 8, CPU))
    calls = []
    sample = module.overlay_images.sample
    monkeypatch.setattr(module.overlay_images, "sample", lambda b: calls.append(b) or sample(b))
    metrics = tiny.update(module, tiny.make_batch(8, CPU), "fp32")
    assert calls == [8]
    assert math.isfinite(metrics["train/critic_loss"])


def test_identical_copies_and_seed_give_identical_first_losses(tiny):
    """The premise of the fp32 / bf16 comparison: copies made before any update, reseeded, agree exactly in fp32."""
    batch = tiny.make_batch(8, CPU)
    base = tiny.build_module("pieg", 8, CPU)
    twin = copy.deepcopy(base)
    losses = []
    for module in (base, twin):
        tiny.attach_optimisers(module)
        torch.manual_seed(5)
        losses.append(tiny.update(module, batch, "fp32")["train/critic_loss"])
    assert losses[0] == losses[1]
    assert base.optimizers() is not twin.optimizers()  # each copy steps its own parameters


def test_measure_batch_fills_every_configuration(tiny):
    results = tiny.measure_batch(8, argparse.Namespace(repeats=1, warmup=0), CPU)
    assert set(results) == {(agent, precision) for agent in ("pieg", "drqv2") for precision in ("fp32", "bf16")}
    for (agent, precision), result in results.items():
        assert result["seconds"] > 0 and math.isfinite(result["critic_loss"])
        if precision == "fp32":
            assert result["flops"] > 0
        else:
            assert result["same_noise"]  # 8 x 6 = 48 draws: torch's CPU generator fills both dtypes alike
            fp32 = results[agent, "fp32"]["critic_loss"]
            assert result["critic_loss"] != fp32 and abs(result["critic_loss"] - fp32) < 0.2 * abs(fp32)
    assert results["pieg", "fp32"]["flops"] > results["drqv2", "fp32"]["flops"]  # the ResNet trunk, three passes


def test_memory_probe_reads_a_peak_that_does_not_fall(tiny):
    before, peak, source = tiny.memory_probe("drqv2", "fp32", 4, "cpu", torch.get_num_threads(), False)
    assert 0 < before <= peak
    assert "VmHWM" in source  # Linux: the per-process-image peak, not ru_maxrss inherited over fork + exec


def test_tables_print(bench, capsys):
    results, memory = {}, {}
    for agent in ("pieg", "drqv2"):
        results[agent, 32, "fp32"] = {"seconds": 0.2, "flops": 4e9, "critic_loss": 1.0, "actor_loss": -0.1}
        results[agent, 32, "bf16"] = {"seconds": 0.1, "critic_loss": 1.01, "actor_loss": -0.12, "same_noise": True}
        for precision in ("fp32", "bf16"):
            memory[agent, 32, precision] = (100.0, 150.0, "VmHWM of /proc/self/status")
    args = argparse.Namespace(repeats=3, warmup=1, matmul_size=4096)
    bench.print_tables(results, memory, 40.0, args, CPU)
    out = capsys.readouterr().out
    assert "**1. fp32 update" in out and "**2. fp32 against bf16" in out and "**3. Peak CPU memory" in out
    assert "| pieg | 32 | 0.2000 | 4.0 | 20.0 | 0.500 |" in out  # 4 GFLOP in 0.2 s, against 40 GFLOP/s
    assert "| 2.00 | 1 | 1.01 | +1.00e-02 |" in out
    assert "| pieg | 32 | bf16 | 100 | 150 | 50 |" in out
