"""scripts/bench_authors.py without the authors' checkout: their config copied without the submitit launcher, the
child's shims and timing run for real against a tiny fake checkout written here, and the errors are one line."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import load_script
from omegaconf import OmegaConf

pytestmark = pytest.mark.usefixtures("one_thread")

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_authors.py"

MAIN_CONFIG = """\
defaults:
  - _self_
  - task@_global_: quadruped_walk
  - override hydra/launcher: submitit_local

# task settings
frame_stack: 3
action_repeat: 2
num_seed_frames: 4000
eval_every_frames: 10000
save_snapshot: true
replay_buffer_num_workers: 2
nstep: 3
batch_size: 256
seed: 7
device: cuda:0
save_video: false
save_train_video: false
use_tb: true
use_wandb: true
name: fake

agent:
  _target_: pieg.PIEGAgent
  device: ${device}
  update_every_steps: 2
  stddev_schedule: ${stddev_schedule}

hydra:
  run:
    dir: ./exp_local/${now:%Y.%m.%d}/${name}
  launcher:
    timeout_min: 4300
    mem_gb: 160
    submitit_folder: ./exp/${name}/.slurm
  sweep:
    subdir: ${hydra.job.num}
"""

TASKS = {
    "quadruped_walk.yaml": "defaults:\n  - easy\n  - _self_\n\ntask_name: quadruped_walk\nnstep: 3\n",
    "walker_walk.yaml": "defaults:\n  - easy\n  - _self_\n\ntask_name: walker_walk\nnstep: 1\nbatch_size: 512\n",
    "easy.yaml": "num_train_frames: 1100000\nstddev_schedule: 'linear(1.0,0.1,100000)'\n",
}

# A stand-in for their utils.py: load_config reads a hard-coded path that does not exist, as theirs does.
UTILS = """\
import json
import os


def load_config(key=None):
    with open(os.path.join('TO/YOUR/PATH', 'config.cfg')) as f:
        data = json.load(f)
    return data[key] if key is not None else data


class Until:
    def __init__(self, until, action_repeat=1):
        self.steps = None if until is None else until // action_repeat

    def __call__(self, step):
        return self.steps is None or step < self.steps


class Every:
    def __init__(self, every, action_repeat=1):
        self.steps = None if every is None else every // action_repeat

    def __call__(self, step):
        return self.steps is not None and step % self.steps == 0
"""

# Their imports that need the shims, and an update that uses the overlay folder, Tensor.cuda and random.seed.
PIEG = """\
import random
import time
from pathlib import Path

import numpy as np
import torch
from torchvision.models import resnet18

import utils


class PIEGAgent:
    def __init__(self, device, update_every_steps, stddev_schedule):
        assert device == 'cpu', device
        self.encoder = resnet18(pretrained=True)  # would download ImageNet weights
        self.update_every_steps = update_every_steps

    def update(self, replay_iter, step):
        if step % self.update_every_steps != 0:
            return {}
        images = list(Path(utils.load_config('datasets')[0]).glob('*/*.png'))
        assert images, 'no overlay images'
        random.seed(np.random.get_state()[1][0] + 1)  # a numpy.uint32, as their replay worker_init_fn
        assert torch.zeros(2).cuda().device.type == 'cpu'
        time.sleep(0.01)
        return {}
"""

PIEGTRAIN = """\
import json
from pathlib import Path

import hydra
import numpy as np
import torch
import wandb
from dm_control.suite.wrappers import action_scale
from dm_env import specs
from termcolor import colored
from torch.utils.tensorboard import SummaryWriter

import utils


class Float32Actions:
    def action_spec(self):
        return specs.BoundedArray((2,), np.float32, -2.0, 2.0, 'action')


class Workspace:
    def __init__(self, cfg):
        self.work_dir = Path.cwd()
        self.cfg = cfg
        wandb.init(project='fake', name=colored('x', 'yellow'))
        SummaryWriter(str(self.work_dir / 'tb')).add_scalar('train/x', 1.0, 0)
        (self.work_dir / 'buffer').mkdir(exist_ok=True)
        self.agent = hydra.utils.instantiate(cfg.agent)
        assert action_scale.Wrapper(Float32Actions(), minimum=-1.0, maximum=+1.0).action_spec().dtype == np.float32
        self._global_step = 0
        seen = {key: cfg[key] for key in ('batch_size', 'nstep', 'num_seed_frames', 'num_train_frames',
                                          'eval_every_frames', 'device', 'use_tb', 'use_wandb', 'save_snapshot',
                                          'replay_buffer_num_workers', 'seed', 'task_name', 'stddev_schedule')}
        seen['buffer'] = sorted(path.name for path in (self.work_dir / 'buffer').iterdir())
        (self.work_dir / 'seen.json').write_text(json.dumps(seen))
        FAIL

    @property
    def global_frame(self):
        return self._global_step * self.cfg.action_repeat

    def train(self):
        train_until = utils.Until(self.cfg.num_train_frames, self.cfg.action_repeat)
        seed_until = utils.Until(self.cfg.num_seed_frames, self.cfg.action_repeat)
        evaluate = utils.Every(self.cfg.eval_every_frames, self.cfg.action_repeat)
        while train_until(self._global_step):
            if evaluate(self._global_step):
                raise RuntimeError('evaluated although eval_every_frames=null')
            if not seed_until(self._global_step):
                self.agent.update(iter(()), self._global_step)
            self._global_step += 1
"""


@pytest.fixture(scope="module")
def bench():
    return load_script("bench_authors")


def fake_checkout(folder: Path, fail: bool = False) -> Path:
    (folder / "cfgs" / "task").mkdir(parents=True)
    (folder / "cfgs" / "piegconfig.yaml").write_text(MAIN_CONFIG)
    for name, text in TASKS.items():
        (folder / "cfgs" / "task" / name).write_text(text)
    (folder / "utils.py").write_text(UTILS)
    (folder / "pieg.py").write_text(PIEG)
    failure = "raise RuntimeError('their workspace broke')" if fail else "pass"
    (folder / "piegtrain.py").write_text(PIEGTRAIN.replace("FAIL", failure))
    return folder


def images(folder: Path) -> Path:
    from PIL import Image

    (folder / "synthetic").mkdir(parents=True)
    for index in range(2):
        Image.new("RGB", (16, 16), (index * 100, 0, 0)).save(folder / "synthetic" / f"{index}.png")
    return folder


def test_config_copy_drops_the_launcher_and_keeps_everything_else(bench, tmp_path):
    authors = fake_checkout(tmp_path / "PIE-G")
    copy = bench.copy_config(authors, tmp_path / "cfgs")
    assert sorted(p.name for p in (copy / "task").iterdir()) == sorted(TASKS)
    original, copied = OmegaConf.load(authors / "cfgs" / "piegconfig.yaml"), OmegaConf.load(copy / "piegconfig.yaml")
    assert "launcher" in original.hydra and "launcher" not in copied.hydra
    defaults = OmegaConf.to_container(original.defaults)
    assert OmegaConf.to_container(copied.defaults) == [
        entry for entry in defaults if not (isinstance(entry, dict) and "override hydra/launcher" in entry)]
    del original.hydra.launcher
    original.defaults = copied.defaults
    assert OmegaConf.to_container(copied) == OmegaConf.to_container(original)  # interpolations unresolved, as written

    cfg = bench.authors_config(copy, bench.authors_overrides(batch=8, seed_frames=100, frames=160))
    assert (cfg.task_name, cfg.nstep, cfg.stddev_schedule) == ("walker_walk", 1, "linear(1.0,0.1,100000)")
    assert (cfg.batch_size, cfg.num_seed_frames, cfg.num_train_frames, cfg.eval_every_frames) == (8, 100, 160, None)
    assert (cfg.device, cfg.agent.device, cfg.seed, cfg.use_tb, cfg.use_wandb) == ("cpu", "cpu", 1, False, False)
    assert cfg.replay_buffer_num_workers == 2 and cfg.frame_stack == 3


def test_drop_launcher_leaves_other_launcher_words_alone(bench):
    text = "defaults:\n  - override hydra/launcher: submitit_local\n  - launcher: x\nlauncher:\n  a: 1\n" \
           "hydra:\n  launcher:\n    a: 1\n\n    b: 2\n  run:\n    launcher: 3\n"
    assert bench.drop_launcher(text) == "defaults:\n  - launcher: x\nlauncher:\n  a: 1\nhydra:\n  run:\n    launcher: 3\n"


@pytest.mark.parametrize("prefill", [True, False], ids=["prefill", "longer-seed"])
def test_the_child_runs_a_fake_checkout_with_the_shims_and_times_after_the_first_update(bench, tmp_path, prefill):
    authors = fake_checkout(tmp_path / "PIE-G")
    args = SimpleNamespace(batch=8, seed_frames=100, frames=160, timeout=60, prefill=prefill)
    result = bench.run_authors(authors, args, images(tmp_path / "images"), tmp_path / "work")

    seed = 100 if prefill else 2100  # 2 replay workers: 2 episodes written, or 2 x 1,000 more seed frames
    seen = OmegaConf.load(tmp_path / "work" / "run" / "seen.json")  # their cwd: the run folder
    assert (tmp_path / "work" / "run" / "buffer").is_dir() and Path(result["cwd"]) == tmp_path / "work" / "run"
    assert seen.buffer == (["20000101T000000_0_500.npz", "20000101T000000_1_500.npz"] if prefill else [])
    assert (seen.batch_size, seen.nstep, seen.eval_every_frames, seen.device) == (8, 1, None, "cpu")
    assert (seen.num_seed_frames, seen.num_train_frames, seen.replay_buffer_num_workers) == (seed, seed + 60, 2)
    assert (seen.use_tb, seen.use_wandb, seen.save_snapshot, seen.seed) == (False, False, False, 1)
    # Updates on the even agent steps from the end of the seed phase: 15, the clock started after the first.
    assert (result["first_update_frame"], result["end_frame"], result["frames"]) == (seed, seed + 60, 60)
    assert (result["updates"], result["timed_updates"], result["update_calls"]) == (15, 14, 30)
    assert result["seconds"] >= 14 * 0.01
    assert result["fps"] == pytest.approx(60 / result["seconds"])
    assert (result["seed_frames"], result["train_frames"], result["prefilled"]) == (seed, seed + 60, 2 * prefill)
    numpy2 = ("dm_control action_scale",) if int(np.__version__.split(".")[0]) >= 2 else ()
    for shim in ("wandb", "torch.utils.tensorboard", "torch.Tensor.cuda", "torchvision.models.resnet18",
                 "random.seed", "utils.load_config", *numpy2):
        assert any(entry.startswith(shim) for entry in result["shims"]), (shim, result["shims"])


def test_prefilled_episodes_are_in_their_replay_format(bench, tmp_path):
    files = bench.prefill(tmp_path / "buffer", 2, channels=9)
    assert [f.name for f in files] == ["20000101T000000_0_500.npz", "20000101T000000_1_500.npz"]
    episode = np.load(files[1])
    assert episode["observation"].shape == (501, 9, 84, 84) and episode["observation"].dtype == np.uint8
    assert episode["action"].shape == (501, 6) and episode["action"].dtype == np.float32
    assert episode["reward"].shape == episode["discount"].shape == (501, 1)


def test_seed_plan(bench):
    # (workers, seed frames, frames, prefill) -> (their seed frames, their train frames, episodes prefilled)
    assert bench.seed_plan(4, 1000, 1400, True) == (1000, 1400, 3)
    assert bench.seed_plan(4, 1000, 1400, False) == (4000, 4400, 0)
    assert bench.seed_plan(4, 4000, 4400, True) == bench.seed_plan(4, 4000, 4400, False) == (4000, 4400, 0)
    assert bench.seed_plan(4, 1500, 1900, False) == (4500, 4900, 0)
    assert bench.seed_plan(0, 500, 900, True) == (500, 900, 1)


def test_a_failing_authors_run_shows_its_stderr_and_stops_with_one_line(bench, tmp_path, capsys):
    authors = fake_checkout(tmp_path / "PIE-G", fail=True)
    args = SimpleNamespace(batch=8, seed_frames=100, frames=160, timeout=60, prefill=True)
    with pytest.raises(SystemExit) as stop:
        bench.run_authors(authors, args, images(tmp_path / "images"), tmp_path / "work")
    message = str(stop.value.code)
    assert "\n" not in message and "the authors' training loop failed (exit status 1" in message
    assert "RuntimeError: their workspace broke" in capsys.readouterr().err


def test_not_a_checkout_is_one_line(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--authors", str(tmp_path)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.strip() == f"bench_authors: {tmp_path.resolve()} is not a PIE-G checkout (no piegtrain.py)"


def test_ours_configurations_and_the_alternating_order(bench):
    assert bench.parse_ours(["0:32-true", "2:bf16-mixed"]) == [(0, "32-true"), (2, "bf16-mixed")]
    for bad in ("32-true", "x:32-true", "1:"):
        with pytest.raises(SystemExit, match="expected envs:precision"):
            bench.parse_ours([bad])
    configs = ["authors", "ours 0", "ours 2"]
    assert bench.order(configs, 0) == configs and bench.order(configs, 1) == configs[::-1]
    assert bench.order(configs, 2) == configs


def test_the_table_gives_medians_and_ratios_to_the_authors_loop(bench):
    results = {("authors", 0, "32-true"): [{"fps": 4.0}, {"fps": 9.0}, {"fps": 5.0}],
               ("ours", 2, "bf16-mixed"): [{"fps": 20.0}, {"fps": 10.0}, {"fps": 12.5}]}
    assert bench.table(results, 32) == [
        "| code | collector | precision | batch | frames/s | ratio to the authors' loop |",
        "|---|---|---|---:|---:|---:|",
        "| PIE-G authors (piegtrain.py) | in process | 32-true | 32 | 5.00 | 1.00 |",
        "| lightning_pieg | 2 workers | bf16-mixed | 32 | 12.5 | 2.50 |"]


def test_drop_launcher_of_a_dedented_text_block(bench):
    text = textwrap.dedent("""\
        hydra:
          launcher:
            nodes: 1
        agent:
          lr: 1
        """)
    assert bench.drop_launcher(text) == "hydra:\nagent:\n  lr: 1\n"
