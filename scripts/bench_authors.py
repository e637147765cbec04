"""End-to-end training frames/s of the PIE-G authors' own training loop and of this package, side by side in one run.

    python scripts/bench_authors.py --authors /path/to/PIE-G                 # walker_walk, batch 32, CPU
    python scripts/bench_authors.py --authors /path/to/PIE-G --ours 0:32-true 2:32-true 0:bf16-mixed --repeats 3

What is measured: walker_walk at one batch size, on the CPU, frames/s after the seed phase, i.e. the environment
frames collected from the end of the first update to the end of training over the wall time they took (the first
update, which starts the data-loading workers, is left out on both sides). Both sides update every 2 agent steps,
overlay the same folder of synthetic images, use a random-init ResNet-18 and do not evaluate. Theirs saves nothing;
ours writes a final checkpoint after its clock stops (``bench_train``'s clock runs to the end of the last update).

The authors' side runs their ``piegtrain.py`` (``Workspace(cfg).train()``) unchanged, from the checkout given by
``--authors``, in a child process started in a temporary folder (their workspace writes ``buffer/`` and CSV logs to
the working directory). Their config is composed with Hydra's compose API from a temporary copy of their ``cfgs/``
from which only ``override hydra/launcher: submitit_local`` and the ``hydra.launcher`` block that configures that
plugin are removed (the plugin is not installed, and the default launcher rejects its keys); the overrides are
``task@_global_=walker_walk batch_size=B num_seed_frames=S num_train_frames=F eval_every_frames=null use_tb=false
use_wandb=false save_snapshot=false save_video=false save_train_video=false device=cpu seed=1``; everything else
(nstep and stddev_schedule of their walker_walk task file, their 4 replay workers, their overlay loader's 8 workers)
is as they ship it. Shims installed in the child before their code is imported:

* stub modules ``wandb`` and ``torch.utils.tensorboard`` (a ``SummaryWriter`` that ignores everything), and
  ``termcolor`` and ``cv2`` where they are not installed (``cv2`` only records train videos, which are off);
* ``torch.Tensor.cuda`` is the identity (their overlay calls ``imgs.cuda()``; everything runs on the CPU);
* ``torchvision.models.resnet18`` builds with ``weights=None`` whatever it is asked (no ImageNet download; this
  package's side runs with ``encoder.weights=none`` too);
* ``utils.load_config`` returns ``[the synthetic images folder]`` (theirs reads a hard-coded 'TO/YOUR/PATH');
* ``random.seed`` accepts numpy integers, as Python < 3.11 did (their replay ``_worker_init_fn`` seeds ``random``
  with a ``numpy.uint32``, which Python 3.11 rejects);
* with numpy >= 2, dm_control's ``action_scale.Wrapper`` keeps the wrapped float32 action dtype, as it did with
  numpy 1 (numpy 2's promotion makes the spec float64, and their replay storage's dtype assertion then rejects the
  agent's float32 actions).

Their replay loader's 4 workers each sample only episodes of their own (episode index modulo 4) and fail on an empty
list, so their first update needs 4 episodes in their replay folder, i.e. 4,000 seed frames, which on a CPU is many
minutes of their acting. By default the episodes that ``--seed-frames`` leaves missing are written into their replay
folder (``buffer/``, in their file format; zero observations) before the run, so both sides have the same seed phase;
the content of an episode does not change what sampling it costs. ``--no-prefill`` instead lengthens their seed
phase to enough finished episodes, and their ``num_train_frames`` by as much, so that both sides still measure the
same number of frames after the seed phase.

This package's side is ``scripts/bench_train.py``'s ``run`` (a ``lightning_pieg.train`` run in this process) for each
``--ours`` configuration ``envs:precision`` (0: the environment in this process; N: N worker processes).

Only figures from one run compare: this machine's speed drifts by up to 2x within a day. Repeats alternate the order
(the authors first, then ours; reversed on the next repeat) so that drift hits both alike; the table gives medians.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
TASK = "walker_walk"
CONFIG_NAME = "piegconfig"
EPISODE_FRAMES = 1000  # a DMC episode: 1,000 frames (500 agent steps at action repeat 2)
WALKER_ACTIONS = 6
RESULT_MARK = "BENCH_AUTHORS_RESULT "

# The child: shims, their Workspace, the timing. argv[1] is a JSON spec: authors, config (a YAML file), images.
CHILD = r'''
import importlib.util, json, numbers, os, random, sys, time, types

spec = json.loads(sys.argv[1])
shims = []


def stub(name, **attributes):
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    sys.modules[name] = module
    shims.append(f"{name} (stub)")
    return module


def ignore(*args, **kwargs):
    return None


class Ignore:
    """Accepts any construction and any method call, and does nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return ignore


def module_getattr(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return ignore


wandb = stub("wandb", init=ignore, log=ignore, finish=ignore, Image=Ignore, Video=Ignore)
wandb.__getattr__ = module_getattr
import torch
import torch.utils
torch.utils.tensorboard = stub("torch.utils.tensorboard", SummaryWriter=Ignore)
if importlib.util.find_spec("termcolor") is None:
    stub("termcolor", colored=lambda text, *args, **kwargs: str(text), cprint=lambda text, *args, **kwargs: print(text))
if importlib.util.find_spec("cv2") is None:
    def resize(*args, **kwargs):
        raise RuntimeError("cv2 is a stub here (it only records train videos, which the benchmark turns off)")
    stub("cv2", resize=resize, INTER_CUBIC=2, INTER_LINEAR=1, INTER_AREA=3)

torch.Tensor.cuda = lambda self, *args, **kwargs: self
shims.append("torch.Tensor.cuda (identity)")

import torchvision.models
_resnet18 = torchvision.models.resnet18


def resnet18(*args, pretrained=None, weights=None, **kwargs):
    return _resnet18(weights=None, **kwargs)


torchvision.models.resnet18 = resnet18
shims.append("torchvision.models.resnet18 (weights=None)")

_seed = random.seed


def seed(a=None, version=2):
    return _seed(int(a) if isinstance(a, numbers.Integral) and not isinstance(a, int) else a, version)


random.seed = seed
shims.append("random.seed (numpy integers)")

os.environ["MUJOCO_GL"] = "egl"  # as their piegtrain.py sets it; before dm_control is imported here
import numpy as np
if int(np.__version__.split(".")[0]) >= 2 and importlib.util.find_spec("dm_control") is not None:
    from dm_control.suite.wrappers import action_scale
    _scale_init = action_scale.Wrapper.__init__

    def scale_init(self, env, minimum, maximum):
        """numpy < 2 promoted scalar bounds with a float32 spec to float32; numpy 2 gives float64, and their
        replay storage then rejects the agent's float32 actions."""
        _scale_init(self, env, minimum, maximum)
        wrapped = env.action_spec().dtype
        if np.ndim(minimum) == 0 and np.ndim(maximum) == 0 and np.issubdtype(wrapped, np.floating):
            self._action_spec = self._action_spec.replace(dtype=wrapped)

    action_scale.Wrapper.__init__ = scale_init
    shims.append("dm_control action_scale.Wrapper (the wrapped float dtype, as with numpy < 2)")

sys.path.insert(0, spec["authors"])
import utils
utils.load_config = lambda key=None: [spec["images"]] if key == "datasets" else {"datasets": [spec["images"]]}
shims.append("utils.load_config (the images folder)")

from omegaconf import OmegaConf
cfg = OmegaConf.load(spec["config"])
OmegaConf.set_struct(cfg, True)  # as Hydra hands it to their main
from piegtrain import Workspace

workspace = Workspace(cfg)
agent = workspace.agent
update = agent.update
state = {"calls": 0, "updates": 0, "start": None, "frame": None}


def timed_update(replay_iter, step):
    metrics = update(replay_iter, step)
    state["calls"] += 1
    if step % agent.update_every_steps == 0:
        state["updates"] += 1
        if state["start"] is None:  # the end of the first update: the seed phase and the workers' start are over
            state["start"], state["frame"] = time.perf_counter(), workspace.global_frame
    return metrics


agent.update = timed_update
workspace.train()
end = time.perf_counter()
if state["start"] is None:
    sys.exit("no update ran: num_train_frames <= num_seed_frames")
frames, seconds = workspace.global_frame - state["frame"], end - state["start"]
print("BENCH_AUTHORS_RESULT " + json.dumps({
    "fps": frames / seconds, "frames": frames, "seconds": seconds, "updates": state["updates"],
    "timed_updates": state["updates"] - 1, "update_calls": state["calls"], "first_update_frame": state["frame"],
    "end_frame": workspace.global_frame, "cwd": os.getcwd(), "shims": shims}), flush=True)
'''


class BenchError(SystemExit):
    """A one-line reason to stop (printed to stderr, exit status 1)."""


def check_checkout(authors: Path) -> Path:
    authors = Path(authors).expanduser().resolve()
    for needed in ("piegtrain.py", f"cfgs/{CONFIG_NAME}.yaml"):
        if not (authors / needed).is_file():
            raise BenchError(f"bench_authors: {authors} is not a PIE-G checkout (no {needed})")
    return authors


def drop_launcher(text: str) -> str:
    """Their main config without ``- override hydra/launcher: ...`` and the ``launcher:`` block under ``hydra:``."""
    out: list[str] = []
    in_hydra, child_indent, skip_deeper_than = False, None, None
    for line in text.splitlines(keepends=True):
        stripped, indent = line.strip(), len(line) - len(line.lstrip())
        if skip_deeper_than is not None:
            if not stripped or indent > skip_deeper_than:
                continue
            skip_deeper_than = None
        if re.match(r"-\s*override\s+hydra/launcher\s*:", stripped):
            continue
        if stripped and not stripped.startswith("#") and indent == 0:
            in_hydra, child_indent = stripped.split(":")[0].strip() == "hydra", None
        elif in_hydra and stripped and not stripped.startswith("#"):
            child_indent = indent if child_indent is None else child_indent
            if indent == child_indent and re.match(r"launcher\s*:", stripped):
                skip_deeper_than = indent
                continue
        out.append(line)
    return "".join(out)


def copy_config(authors: Path, dest: Path) -> Path:
    """A copy of their ``cfgs/`` in ``dest`` that Hydra composes without the submitit launcher plugin."""
    shutil.copytree(authors / "cfgs", dest)
    main = dest / f"{CONFIG_NAME}.yaml"
    main.write_text(drop_launcher(main.read_text()))
    return dest


def authors_overrides(batch: int, seed_frames: int, frames: int) -> list[str]:
    return [f"task@_global_={TASK}", f"batch_size={batch}", f"num_seed_frames={seed_frames}",
            f"num_train_frames={frames}", "eval_every_frames=null", "use_tb=false", "use_wandb=false",
            "save_snapshot=false", "save_video=false", "save_train_video=false", "device=cpu", "seed=1"]


def authors_config(config_dir: Path, overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(config_dir), version_base=None):  # their @hydra.main has none
        return compose(CONFIG_NAME, overrides=overrides)


def seed_plan(workers: int, seed_frames: int, frames: int, prefill: bool) -> tuple[int, int, int]:
    """(their num_seed_frames, their num_train_frames, episodes to prefill their replay folder with).

    Each of their replay workers samples only its own episodes (episode index modulo the workers) and fails on none,
    so every worker needs an episode at the first update. ``prefill``: write the missing ones before the run;
    otherwise raise their seed phase to enough finished episodes, and their num_train_frames by as much, so that the
    frames after the seed phase stay ``frames - seed_frames``."""
    workers = max(1, workers)
    missing = max(0, workers - seed_frames // EPISODE_FRAMES)
    if prefill:
        return seed_frames, frames, missing
    seed = seed_frames + missing * EPISODE_FRAMES
    return seed, frames + seed - seed_frames, 0


def prefill(buffer: Path, episodes: int, channels: int) -> list[Path]:
    """``episodes`` walker episodes (500 transitions, zero observations) in their replay storage's file format."""
    buffer.mkdir(parents=True, exist_ok=True)
    import numpy as np

    steps = EPISODE_FRAMES // 2 + 1  # action repeat 2; plus the first, dummy transition
    episode = {"observation": np.zeros((steps, channels, 84, 84), np.uint8),
               "action": np.zeros((steps, WALKER_ACTIONS), np.float32),
               "reward": np.zeros((steps, 1), np.float32), "discount": np.ones((steps, 1), np.float32)}
    files = []
    for index in range(episodes):  # named as theirs (time_index_length), older than any episode the run writes
        files.append(buffer / f"20000101T000000_{index}_{steps - 1}.npz")
        np.savez_compressed(files[-1], **episode)
    return files


def run_child(authors: Path, config_file: Path, images: Path, work: Path, timeout: float) -> dict:
    """Their ``Workspace(cfg).train()`` in a child process in ``work``; the child's JSON result."""
    spec = json.dumps({"authors": str(authors), "config": str(config_file), "images": str(images)})
    env = {**os.environ, "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")}
    work.mkdir(parents=True, exist_ok=True)
    with open(work / "child.out", "w+") as out, open(work / "child.err", "w+") as err:
        process = subprocess.Popen([sys.executable, "-c", CHILD, spec], cwd=work, stdout=out, stderr=err,
                                   env=env, start_new_session=True)  # its own group, with its loaders' workers
        try:
            process.wait(timeout=timeout)
            reason = f"exit status {process.returncode}"
        except subprocess.TimeoutExpired:
            reason = f"still running after {timeout:g} s"
        finally:  # a timeout, Ctrl-C or SIGTERM here: stop the child's group (not yet reaped, so still its own)
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    results = [line[len(RESULT_MARK):] for line in stdout.splitlines() if line.startswith(RESULT_MARK)]
    if not results or reason.startswith("still"):
        tail = "\n".join(stderr.strip().splitlines()[-30:]) or "(no stderr)"
        print(f"--- the authors' run, last lines of stderr ---\n{tail}\n---", file=sys.stderr, flush=True)
        raise BenchError(f"bench_authors: the authors' training loop failed ({reason}; stderr above)")
    if process.returncode != 0:
        print(f"bench_authors: warning: the authors' run exited with status {process.returncode} after "
              "reporting its result", file=sys.stderr, flush=True)
    return json.loads(results[-1])


def run_authors(authors: Path, args, images: Path, work: Path) -> dict:
    cfg_dir = copy_config(authors, work / "cfgs")
    probe = authors_config(cfg_dir, authors_overrides(args.batch, args.seed_frames, args.frames))
    workers = int(probe.replay_buffer_num_workers)
    seed, frames, missing = seed_plan(workers, args.seed_frames, args.frames, args.prefill)
    cfg = authors_config(cfg_dir, authors_overrides(args.batch, seed, frames))
    from omegaconf import OmegaConf

    config_file = work / "config.yaml"
    OmegaConf.save(cfg, config_file)
    prefill(work / "run" / "buffer", missing, 3 * int(cfg.frame_stack))  # their work dir is work/run
    result = run_child(authors, config_file, images, work / "run", args.timeout)
    return {**result, "seed_frames": seed, "train_frames": frames, "prefilled": missing, "replay_workers": workers,
            "nstep": cfg.get("nstep"), "stddev_schedule": cfg.get("stddev_schedule")}


def parse_ours(items: list[str]) -> list[tuple[int, str]]:
    configs = []
    for item in items:
        envs, sep, precision = item.partition(":")
        if not sep or not envs.isdigit() or not precision:
            raise BenchError(f"bench_authors: --ours {item!r}: expected envs:precision, e.g. 0:32-true or 2:bf16-mixed")
        configs.append((int(envs), precision))
    return configs


def order(configs: list, repeat: int) -> list:
    """The authors first then ours on even repeats, reversed on odd ones."""
    return configs if repeat % 2 == 0 else configs[::-1]


def load_script(name: str):
    """``scripts/<name>.py`` beside this one, as a module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def collector(envs: int) -> str:
    return "in process" if envs == 0 else f"{envs} worker{'s' if envs > 1 else ''}"


def table(results: dict[tuple, list[dict]], batch: int) -> list[str]:
    """The markdown table: one row per (code, envs, precision), in order, the median frames/s of its runs and its
    ratio to the first row's (the authors' loop)."""
    medians = {config: statistics.median(run["fps"] for run in runs) for config, runs in results.items()}
    baseline = next(iter(medians.values()))
    lines = ["| code | collector | precision | batch | frames/s | ratio to the authors' loop |",
             "|---|---|---|---:|---:|---:|"]
    for (code, envs, precision), fps in medians.items():
        name = "PIE-G authors (piegtrain.py)" if code == "authors" else "lightning_pieg"
        lines.append(f"| {name} | {collector(envs)} | {precision} | {batch} | {fps:.{2 if fps < 10 else 1}f} | "
                     f"{fps / baseline:.2f} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--authors", required=True, help="a checkout of github.com/gemcollector/PIE-G")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--frames", type=int, default=1400)
    parser.add_argument("--seed-frames", type=int, default=1000)
    parser.add_argument("--ours", nargs="+", default=["0:32-true", "2:32-true", "0:bf16-mixed"],
                        help="envs:precision (envs 0: in process; N: N workers)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=3600, help="seconds for one run of the authors' loop")
    parser.add_argument("--prefill", action=argparse.BooleanOptionalAction, default=True,
                        help="their replay workers need an episode each at the first update: prefill their replay "
                             "folder with the missing ones (default), or (--no-prefill) lengthen their seed phase")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # run the clean-ups on a kill
    authors = check_checkout(args.authors)
    ours = parse_ours(args.ours)
    if args.frames <= args.seed_frames:
        raise BenchError("bench_authors: --frames must exceed --seed-frames")
    if args.repeats < 1:
        raise BenchError("bench_authors: --repeats must be at least 1")
    os.environ.setdefault("MUJOCO_GL", "egl")

    import torch

    bench_train = load_script("bench_train")
    ours_args = SimpleNamespace(task=TASK, batch=args.batch, frames=args.frames, seed_frames=args.seed_frames,
                                accelerator="cpu")
    machine = load_script("bench_update").machine(torch.device("cpu"))
    print(f"machine: {machine}\ntorch {torch.__version__}\nthe authors' checkout: {authors}", flush=True)
    configs = [("authors", 0, "32-true"), *(("ours", envs, precision) for envs, precision in ours)]
    results: dict[tuple, list[dict]] = {config: [] for config in configs}
    with tempfile.TemporaryDirectory(prefix="bench_authors_") as tmp:
        images = Path(tmp) / "images"  # ImageFolder layout for theirs; ours reads the files under it recursively
        bench_train.synthetic_images(images / "synthetic", count=max(64, 2 * args.batch))
        for repeat in range(args.repeats):
            for index, config in enumerate(order(configs, repeat)):
                work = Path(tmp) / f"r{repeat}_{index}_{config[0]}"
                started = time.perf_counter()
                if config[0] == "authors":
                    result = run_authors(authors, args, images, work)
                else:
                    result = bench_train.run(ours_args, "pieg", config[1], config[2], images, work)
                results[config].append(result)
                print(f"repeat {repeat + 1}/{args.repeats}: {config[0]} {collector(config[1])} {config[2]}: "
                      f"{result['fps']:.2f} frames/s ({time.perf_counter() - started:.0f} s in all)", flush=True)
    theirs = results[configs[0]]
    seeding = (f"their replay folder prefilled with {theirs[0]['prefilled']} zero episodes"
               if theirs[0]["prefilled"] else f"their seed phase {theirs[0]['seed_frames']:,} frames")
    print(f"\n{TASK}, batch {args.batch}, CPU, median of {args.repeats}; frames/s over the "
          f"{args.frames - args.seed_frames:,} frames after the seed phase ({args.seed_frames:,} seed frames; "
          f"{seeding}, as their {theirs[0]['replay_workers']} replay workers need an episode each at the first "
          f"update); their nstep {theirs[0]['nstep']}, stddev_schedule {theirs[0]['stddev_schedule']}\n")
    print("\n".join(table(results, args.batch)))
    runs = "; ".join(f"{run['frames']} frames and {run['timed_updates']} updates in {run['seconds']:.1f} s"
                     for run in theirs)
    print(f"\nthe authors' runs (timed from the end of their first update): {runs}\n"
          f"shims in their process: {', '.join(theirs[0]['shims'])}")


if __name__ == "__main__":
    main()
