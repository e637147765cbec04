"""The paper in one command: plan an experiment's runs and their cost, run what is missing, then evaluate.

``run`` trains every run of an experiment (``lightning_pieg.experiments``) as a subprocess
``python -m lightning_pieg.train`` and evaluates its final checkpoint with the paper's protocol
(``generalization.evaluate_checkpoint``: 100 episodes per mode, mean actions, environment seed = training seed +
42, per-observation BatchNorm). The MLflow store is the record of what is done: every run is tagged with its
experiment, method, variant, task and seed, and its evaluation leaves ``final/<mode>/*`` metrics and a
``reproduce.evaluated`` tag. Running the command again skips evaluated runs, evaluates trained ones, resumes
interrupted ones from their checkpoint folder (``resume=last``, into the same MLflow run) and starts the rest, so
a cluster job can be restarted blindly. SIGINT/SIGTERM reach the training run once: it writes a resumable
checkpoint and the command exits with 130/143.
"""
from __future__ import annotations

import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from lightning_pieg import experiments as ex
from lightning_pieg import tracking
from lightning_pieg.config import CONF_DIR
from lightning_pieg.console import UserError, say

EXPERIMENT_PREFIX = "reproduce_"  # MLflow experiment of each reproduced experiment: reproduce_table1, ...
EVALUATED_TAG = "reproduce.evaluated"  # the modes whose final evaluation is logged, comma separated
MISSING_TAG = "reproduce.missing"      # what the run was trained without (weights, overlay images)
EPISODES_TAG = "reproduce.eval_episodes"
# Keys this command sets itself: a user override of one would break the bookkeeping (or has a flag instead).
RESERVED = {"task": "", "seed": "--seeds", "method": "--methods", "agent": "--methods", "checkpoint_dir": "--root",
            "resume": "", "frames": "--frames", "mlflow.experiment": "", "mlflow.run_name": "", "mlflow.tags": "",
            "mlflow.enabled": "", "hydra.run.dir": "--root", "encoder.weights": "--weights",
            "augment.overlay": "--overlay", "eval.dmcgb_dir": "--dmcgb-dir", "env.blanket_path": "--blanket"}
DMCGB_MODES = ("color_easy", "color_hard", "video_easy", "video_hard")
STOP_STATUS = {signal.SIGINT: 130, signal.SIGTERM: 143}


@dataclass(frozen=True)
class Inputs:
    """The data the paper's setup needs, as given (flags, else environment variables)."""

    weights: str = "imagenet"      # imagenet | a state-dict file | none
    overlay: str | None = None     # the overlay image folder (Places365)
    dmcgb_dir: str | None = None
    blanket: str | None = None     # Drawer World's blanket.png
    allow_missing: bool = False

    @classmethod
    def resolve(cls, weights: str, overlay: str | None, dmcgb_dir: str | None, blanket: str | None,
                allow_missing: bool) -> Inputs:
        return cls(weights, overlay, dmcgb_dir or os.environ.get("DMCGB_DIR") or None,
                   blanket or os.environ.get("DRAWERWORLD_BLANKET") or None, allow_missing)


@dataclass(frozen=True)
class Settings:
    """Everything about a ``run`` request besides the runs themselves."""

    root: Path
    uri: str
    inputs: Inputs
    overrides: tuple[str, ...] = ()       # the user's training overrides
    eval_overrides: tuple[str, ...] = ()  # the user's evaluation overrides (conf/evaluate.yaml)
    episodes: int = 100
    missing: tuple[str, ...] = ()


# ------------------------------------------------------------------------------------------- the request
def split_overrides(overrides: list[str]) -> tuple[str | None, tuple[str, ...]]:
    """(``mlflow.tracking_uri`` if given, the other overrides); a reserved key is a UserError naming its flag."""
    uri, rest = None, []
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key == "mlflow.tracking_uri":
            uri = override.split("=", 1)[1]
            continue
        for reserved, flag in RESERVED.items():
            if key == reserved or key.startswith(f"{reserved}."):
                raise UserError(f"override {override!r}: {reserved} is set by this command for each run"
                                f"{f'; use {flag}' if flag else ''}.")
        rest.append(override)
    return uri, tuple(rest)


def store_uri(configured: str | None) -> str:
    """The tracking store as ``train`` resolves it, with a sqlite path made absolute (the runs share it)."""
    uri = tracking.tracking_uri(configured)
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{Path(uri[len('sqlite:///'):]).resolve()}"
    return uri


def mlflow_experiment(name: str) -> str:
    return f"{EXPERIMENT_PREFIX}{name}"


def weights_available(inputs: Inputs, arch: str, fetch: bool) -> bool:
    """Whether ImageNet weights can be had: a file, torchvision's cache, or (``fetch``) a download into it."""
    import torch

    from lightning_pieg.encoders import ARCHS, load_weights

    if inputs.weights == "none":
        return False
    if arch not in ARCHS:
        raise UserError(f"encoder.arch={arch} is not one of {', '.join(ARCHS)}.")
    if inputs.weights != "imagenet":
        if not Path(inputs.weights).expanduser().is_file():
            raise UserError(f"--weights {inputs.weights}: no such file; pass the ResNet state-dict file, or "
                            f"--weights imagenet (torchvision's cache).")
        return True
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(ARCHS[arch][1].url).name
    if cached.is_file() or not fetch:
        return cached.is_file()
    try:
        load_weights(arch, "imagenet")
    except UserError as error:
        say(f"ImageNet weights: {error}")
        return False
    return True


def missing_inputs(runs: list[ex.Run], inputs: Inputs, fetch: bool, overrides: tuple[str, ...] = ()) -> list[str]:
    """What the paper's setup needs for these runs and is not there (weights, overlay images), as table notes."""
    methods = {run.method for run in runs}
    missing = []
    arch = ([o.split("=", 1)[1] for o in overrides if o.lstrip("+").startswith("encoder.arch=")] or ["resnet18"])[-1]
    if any(ex.METHODS[m].imagenet for m in methods) and not weights_available(inputs, arch, fetch):
        missing.append("ImageNet weights (PIE-G trained on a RANDOMLY initialised frozen ResNet)")
    if any(ex.METHODS[m].overlay for m in methods):
        if inputs.overlay is None:
            missing.append("overlay images (PIE-G/SVEA trained WITHOUT the Places365 overlay augmentation)")
        else:
            from lightning_pieg.overlay import check_images

            try:
                check_images(inputs.overlay, 8)
            except (OSError, ValueError) as error:
                raise UserError(f"--overlay {inputs.overlay}: {error}") from None
    return missing


def check_data(runs: list[ex.Run], inputs: Inputs) -> None:
    """The evaluation modes' data (DMC-GB's files) and the tasks' packages, before anything runs."""
    from lightning_pieg import envs
    from lightning_pieg.envs import dmcgb

    for task, mode in dict.fromkeys((run.task, mode) for run in runs for mode in run.modes):
        try:
            envs.check(task, mode)
        except (ValueError, ImportError) as error:
            raise UserError(f"{task} {mode}: {error}") from None
    modes = {mode for run in runs for mode in run.modes if mode in DMCGB_MODES}
    if not modes:
        return
    hint = "pass --dmcgb-dir <dir> (or set DMCGB_DIR), or evaluate without those modes (--modes train ...)"
    try:
        directory = dmcgb.data_dir({"dmcgb_dir": inputs.dmcgb_dir})
    except FileNotFoundError:
        raise UserError(f"modes {', '.join(sorted(modes))} need DMC-GB's data and none is configured: {hint}. Get "
                        f"it with: python -m lightning_pieg.dmcgb_data fetch --dir <dir>") from None
    for mode in sorted(modes):
        files = [directory / dmcgb.COLOR_FILES[mode]] if mode in dmcgb.COLOR_FILES else dmcgb.video_paths(directory,
                                                                                                          mode)
        absent = [path for path in files if not path.is_file()]
        if absent:
            raise UserError(f"mode {mode} needs {absent[0]} ({len(absent)} file(s) missing in {directory}); {hint}.")


def refuse_missing(missing: list[str], inputs: Inputs) -> None:
    if missing and not inputs.allow_missing:
        raise UserError(f"missing {'; '.join(missing)}: pass --weights <file>/--overlay <image folder> (see README, "
                        f"Reproducing the paper), or --allow-missing to go on anyway (every table then says so).")


# --------------------------------------------------------------------------------------------- one run
def train_overrides(run: ex.Run, settings: Settings) -> list[str]:
    """The run's ``python -m lightning_pieg.train`` overrides: method, task, seed, variant, the user's overrides,
    then what the bookkeeping needs (folder, store, tags), which no user override may change."""
    method = ex.METHODS[run.method]
    inputs = settings.inputs
    out = [f"method={run.method}", f"task={run.task}", f"seed={run.seed}", *run.variant.overrides,
           "eval.modes=[train]"]  # the learning curves; the user's overrides may add modes
    if run.frames is not None:
        out.append(f"frames={run.frames}")
    if method.imagenet:
        out.append(f"encoder.weights={inputs.weights}")
    if method.overlay and inputs.overlay:
        out.append(f"augment.overlay={inputs.overlay}")
    if inputs.dmcgb_dir:
        out.append(f"eval.dmcgb_dir={inputs.dmcgb_dir}")
    if inputs.blanket and run.task == "drawer_close":
        out.append(f"env.blanket_path={inputs.blanket}")
    return [*out, *settings.overrides, f"checkpoint_dir={run.checkpoint_dir.resolve()}",
            f"mlflow.tracking_uri={settings.uri}", f"mlflow.experiment={mlflow_experiment(run.experiment)}",
            f"mlflow.run_name={run.name}", *(f"+mlflow.tags.{key}='{value}'" for key, value in run.tags.items()),
            f"hydra.run.dir={(run.checkpoint_dir / 'train').resolve()}"]


def records(uri: str, experiment: str) -> dict[tuple[str, ...], list]:
    """The MLflow runs of ``experiment`` by run key, newest first (none in a sqlite store not made yet: creating
    its tables takes seconds)."""
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        return {}
    store = tracking.client(uri)
    found = store.get_experiment_by_name(mlflow_experiment(experiment))
    if found is None:
        return {}
    out: dict[tuple[str, ...], list] = {}
    for record in store.search_runs([found.experiment_id], "tags.reproduce = 'run'", max_results=50_000,
                                    order_by=["attributes.start_time DESC"]):
        key = tuple(record.data.tags.get(k, "") for k in ex.TAG_KEYS)
        out.setdefault(key, []).append(record)
    return out


def evaluated_modes(record) -> set[str]:
    return {m for m in record.data.tags.get(EVALUATED_TAG, "").split(",") if m}


def is_done(run: ex.Run, record) -> bool:
    return record.info.status == "FINISHED" and set(run.modes) <= evaluated_modes(record)


@dataclass
class State:
    """What a run needs next: ``done``, ``evaluate`` (trained), ``resume`` (interrupted) or ``train``."""

    action: str
    record: object | None = None
    checkpoint: str | None = None  # what to evaluate: the final checkpoint file, or the MLflow run id


def _quiet(message: str) -> None:
    """Damaged sidecars are reported by the training run itself."""


def state_of(run: ex.Run, found: dict[tuple[str, ...], list]) -> State:
    from lightning_pieg import checkpoints

    candidates = found.get(run.key, [])
    done = [r for r in candidates if is_done(run, r)]
    if done:
        return State("done", done[0])
    final = checkpoints.finished_run(run.checkpoint_dir, _quiet) if run.checkpoint_dir.is_dir() else None
    if final is not None:
        record = next((r for r in candidates if r.info.run_id == final[1].get("mlflow_run_id")), None)
        return State("evaluate", record, str(final[0]))
    if run.checkpoint_dir.is_dir() and checkpoints.newest_resumable(run.checkpoint_dir, _quiet) is not None:
        return State("resume")
    finished = [r for r in candidates if r.info.status == "FINISHED"]
    if finished:  # trained, its checkpoint folder gone (scratch space): evaluate the run's uploaded checkpoint
        return State("evaluate", finished[0], finished[0].info.run_id)
    return State("train")


class Stopper:
    """SIGINT/SIGTERM while a training subprocess runs: pass the signal on once (it then writes a resumable
    checkpoint) and stop after it; outside a subprocess: stop at once. The child has its own session, so a
    terminal's Ctrl-C or a job's group signal reaches it once, through here."""

    def __init__(self):
        self.child: subprocess.Popen | None = None
        self.signal: int | None = None
        self._previous = {}

    def __enter__(self) -> Stopper:
        for signum in STOP_STATUS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame) -> None:
        first = self.signal is None
        self.signal = signum
        if self.child is not None and self.child.poll() is None:
            if first:
                say(f"{signal.Signals(signum).name}: passed to the training run, which writes a resumable checkpoint "
                    f"at its next episode start; run the same command again to resume")
                self.child.send_signal(signum)
            return
        raise KeyboardInterrupt

    def train(self, command: list[str]) -> int:
        # under `mlflow run` the command's own run is in the environment: each training run opens its own
        env = {key: value for key, value in os.environ.items() if key not in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID")}
        self.child = subprocess.Popen(command, start_new_session=True, env=env)
        say(f"training run (pid {self.child.pid}): {' '.join(command[1:])}")
        try:
            return self.child.wait()
        finally:
            self.child = None


def evaluate(run: ex.Run, state: State, settings: Settings) -> str:
    """Evaluate the run's final checkpoint in ``run.modes`` (those not logged yet) with the paper's protocol; log
    ``final/<mode>/*`` and the bookkeeping tags into its MLflow run. Returns the run id."""
    from hydra import compose, initialize_config_dir

    from lightning_pieg.generalization import evaluate_checkpoint

    done = evaluated_modes(state.record) if state.record is not None else set()
    modes = [mode for mode in run.modes if mode not in done]
    overrides = [f"checkpoint={state.checkpoint}", f"eval.modes=[{','.join(modes)}]", f"episodes={settings.episodes}",
                 f"mlflow.tracking_uri={settings.uri}", "video=false",
                 *([f"eval.dmcgb_dir={settings.inputs.dmcgb_dir}"] if settings.inputs.dmcgb_dir else []),
                 *settings.eval_overrides]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("evaluate", overrides=overrides)
    output = run.checkpoint_dir / "evaluation"
    result = evaluate_checkpoint(cfg, output)
    run_id = result["run_id"]
    metrics = {}
    for row in result["rows"]:
        metrics[f"final/{row['mode']}/episode_reward"] = float(row["mean"])
        metrics[f"final/{row['mode']}/episode_reward_std"] = float(row["std"])
        if row["success_rate"] != "":
            metrics[f"final/{row['mode']}/success_rate"] = float(row["success_rate"])
    frame = int(result["rows"][0]["frame"]) if result["rows"] else 0
    tracking.log_step_metrics(settings.uri, run_id, metrics, frame)
    store = tracking.client(settings.uri)
    if store.get_run(run_id).info.status != "FINISHED":  # killed between its final checkpoint and the run's end
        store.set_terminated(run_id, "FINISHED")
    for key, value in {**run.tags, EVALUATED_TAG: ",".join(sorted(done | {r["mode"] for r in result["rows"]})),
                       EPISODES_TAG: str(settings.episodes), MISSING_TAG: "; ".join(settings.missing)}.items():
        store.set_tag(run_id, key, value)
    return run_id


# ----------------------------------------------------------------------------------------------- commands
@dataclass
class Outcome:
    done: list[str] = field(default_factory=list)
    started: list[str] = field(default_factory=list)
    resumed: list[str] = field(default_factory=list)
    evaluated: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


def run_experiment(exp: ex.Experiment, runs: list[ex.Run], settings: Settings) -> Outcome:
    """Run what is missing of ``runs``, in order; a failed run is reported and the others go on. SIGINT/SIGTERM
    stop the command (exit status 130/143) once the training run it reached has written its checkpoint."""
    outcome = Outcome()
    found = records(settings.uri, exp.name)
    with Stopper() as stopper:
        try:
            for index, run in enumerate(runs, 1):
                _one(f"[{index}/{len(runs)}] {exp.name} {run.name}", run, state_of(run, found), settings, stopper,
                     outcome)
        except KeyboardInterrupt:
            say("stopped before the evaluation ended; run the same command again to evaluate it")
            sys.exit(STOP_STATUS.get(stopper.signal, 130))
    return outcome


def _one(where: str, run: ex.Run, state: State, settings: Settings, stopper: Stopper, outcome: Outcome) -> None:
    if state.action == "done":
        say(f"{where}: done (MLflow run {state.record.info.run_id}), skipped")
        outcome.done.append(run.name)
        return
    if state.action in ("train", "resume"):
        resume = state.action == "resume"
        say(f"{where}: {'resuming from its checkpoints in' if resume else 'training into'} {run.checkpoint_dir}")
        command = [sys.executable, "-m", "lightning_pieg.train", *train_overrides(run, settings),
                   *(["resume=last"] if resume else [])]
        started = time.perf_counter()
        status = stopper.train(command)
        if stopper.signal is not None or status in STOP_STATUS.values():
            say(f"{where}: stopped (exit status {status}); run the same command again to resume it")
            sys.exit(STOP_STATUS.get(stopper.signal, status))
        if status != 0:
            say(f"{where}: FAILED, training exited with status {status}; going on with the other runs")
            outcome.failed.append(run.name)
            return
        (outcome.resumed if resume else outcome.started).append(run.name)
        say(f"{where}: trained in {(time.perf_counter() - started) / 60:.1f} min")
        state = state_of(run, records(settings.uri, run.experiment))
        if state.action != "evaluate":
            say(f"{where}: FAILED, training left no final checkpoint in {run.checkpoint_dir}")
            outcome.failed.append(run.name)
            return
    say(f"{where}: evaluating {state.checkpoint} in {', '.join(run.modes)} ({settings.episodes} episodes each)")
    try:
        run_id = evaluate(run, state, settings)
    except UserError as error:
        say(f"{where}: FAILED, evaluation: {' '.join(str(error).split())}")
        outcome.failed.append(run.name)
        return
    outcome.evaluated.append(run.name)
    say(f"{where}: evaluated into MLflow run {run_id}")


def machine() -> str:
    try:
        models = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")]
        return f"{models[0]}, {len(models)} logical CPUs" if models else platform.processor()
    except OSError:
        return platform.processor() or platform.machine()


# ------------------------------------------------------------------------------------------------- the plan
def compose_train(requests: list[list[str]]) -> list:
    """The training configs that lists of a run's overrides give (Hydra's compose, as ``train`` would; ``frames``
    applied)."""
    from hydra import compose, initialize_config_dir

    configs = []
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        for overrides in requests:
            cfg = compose("config", overrides=[o for o in overrides if not o.startswith("hydra.")])
            if cfg.get("frames") not in (None, "preset"):
                cfg.num_train_frames = int(cfg.frames)
            configs.append(cfg)
    return configs


@dataclass
class PlannedRun:
    run: ex.Run
    state: str
    frames: int
    batch: int
    cost: object  # costs.RunCost


def plan(exp: ex.Experiment, runs: list[ex.Run], settings: Settings, timings: dict | None = None
         ) -> list[PlannedRun]:
    """Each run with its state in the store and its cost, from a short timing of its update, act and environment
    step on this machine (kept in ``timings`` for the next experiment of the same command); prints the list and
    the totals."""
    from lightning_pieg import costs

    timings = {} if timings is None else timings
    started = time.perf_counter()
    found = records(settings.uri, exp.name)
    shapes: dict[tuple[str, str, str], ex.Run] = {}
    for run in runs:
        shapes.setdefault((run.method, run.variant.name, run.task), run)
    configs = dict(zip(shapes, compose_train([train_overrides(run, settings) for run in shapes.values()])))
    phases = {"configs": time.perf_counter() - started}
    steps, updates, acts = (timings.setdefault(kind, {}) for kind in ("steps", "updates", "acts"))
    for (method, variant, task), cfg in configs.items():
        if task not in steps:
            say(f"timing: {task} environment step")
            steps[task] = costs.time_env_step(cfg)
    phases["environments"] = time.perf_counter() - started - sum(phases.values())
    for (method, variant, task), cfg in configs.items():
        if (method, variant) in updates:
            continue
        say(f"timing: {ex.METHODS[method].label}{'' if variant == ex.DEFAULT_VARIANT else ' ' + variant} update")
        module = costs.build_module(cfg, steps[task][1])
        updates[method, variant] = costs.time_update(module, cfg, steps[task][1])
        acts[method, variant] = costs.time_act(module, cfg)
        del module
    phases["updates"] = time.perf_counter() - started - sum(phases.values())
    planned = []
    for run in runs:
        cfg = configs[run.method, run.variant.name, run.task]
        step, _, shortened = steps[run.task]
        episode_steps = shortened or ex.episode_frames(run.task) // cfg.action_repeat
        update = updates[run.method, run.variant.name]
        encoder = "resnet" if ex.METHODS[run.method].imagenet else "conv"
        # the H200 figures are of the paper's configuration: an ablation's scaled by its CPU ratio to that one
        base = next((u for (m, v), u in updates.items() if m == run.method and v in ex.REFERENCE_VARIANTS), update)
        gpu_update = costs.h200_update_s(encoder, cfg.batch_size) * update.at(cfg.batch_size) / base.at(cfg.batch_size)
        curve_modes = len(cfg.eval.modes) if not isinstance(cfg.eval.modes, str) else 1
        cost = costs.run_cost(cfg, curve_modes, len(run.modes), settings.episodes, episode_steps, update,
                              acts[run.method, run.variant.name], step, gpu_update)
        planned.append(PlannedRun(run, state_of(run, found).action, cfg.num_train_frames, cfg.batch_size, cost))
    used = {(r.method, r.variant.name) for r in runs}
    print_plan(exp, planned, settings, {k: u for k, u in updates.items() if k in used},
               {t: s for t, s in steps.items() if t in {r.task for r in runs}}, phases)
    return planned


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:,.2f}" if seconds >= 36 else f"{seconds:.0f} s"


def print_plan(exp: ex.Experiment, planned: list[PlannedRun], settings: Settings, updates: dict, steps: dict,
               phases: dict[str, float]) -> None:
    from lightning_pieg import costs

    runs = [p.run for p in planned]
    print(f"\n## {exp.title}\n")
    print(f"{len(runs)} runs ({', '.join(dict.fromkeys(r.label for r in runs))}; {len({r.task for r in runs})} "
          f"task(s); seeds {', '.join(map(str, sorted({r.seed for r in runs})))}); MLflow experiment "
          f"{mlflow_experiment(exp.name)} in {settings.uri}; checkpoints under {settings.root / exp.name}")
    if settings.missing:
        print(f"MISSING: {'; '.join(settings.missing)}")
    print("\n| # | run | frames | batch | updates | eval agent steps | modes | state | CPU h | GPU h |")
    print("|---:|---|---:|---:|---:|---:|---|---|---:|---:|")
    for index, p in enumerate(planned, 1):
        print(f"| {index} | {p.run.name} | {p.frames:,} | {p.batch} | {p.cost.updates:,} | {p.cost.eval_steps:,} | "
              f"{' '.join(p.run.modes)} | {p.state} | {_hours(p.cost.cpu_s)} | {_hours(p.cost.gpu_s)} |")
    todo = [p for p in planned if p.state != "done"]
    cpu, gpu = sum(p.cost.cpu_s for p in todo) / 3600, sum(p.cost.gpu_s for p in todo) / 3600
    timing = "; ".join(f"{ex.METHODS[m].label}{'' if v == ex.DEFAULT_VARIANT else ' ' + v} "
                       + ", ".join(f"{t:.3f} s at {b}" for b, t in sorted(u.measured.items()))
                       + f" (fit {u.fixed:+.3f} s + {u.per_sample * 1000:.2f} ms x batch)"
                       for (m, v), u in updates.items())
    env = "; ".join(f"{task} {s[0].seconds * 1000:.0f} ms ({s[0].source})" for task, s in steps.items())
    print(f"\nCost of the {len(todo)} run(s) not done yet: **{cpu:,.1f} CPU-hours** on this machine "
          f"({machine()}, {os.cpu_count()} cores, one run at a time; {time.strftime('%Y-%m-%d %H:%M')}) and "
          f"**{gpu:,.1f} GPU-hours** on one H200.")
    print(f"- update, timed here (after one untimed; the fastest of two where quick, on {torch_threads()} threads or "
          f"one) at batch {', '.join(map(str, costs.TIMING_BATCHES))} and, where "
          f"quick, {' or '.join(map(str, costs.LARGE_BATCHES))}; a line through the two largest, read at each run's "
          f"batch: {timing}")
    print(f"- agent step of the training environment (physics and one render), timed here: {env}; evaluation "
          f"modes are costed as train")
    print(f"- GPU: the update of {costs.H200_MEASURED} (ablation variants scaled by their CPU ratio), plus the "
          f"environment step timed here (CPU rendering; a GPU host's EGL rendering is likely faster); acting on "
          f"the GPU left out")
    load = os.getloadavg()[0]
    busy = (f"; the machine was shared (load average {load:.1f} on {os.cpu_count()} cores), so the CPU figures are "
            f"pessimistic" if load > (os.cpu_count() or 1) + 0.5 else f"; load average {load:.1f}")
    spent = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in phases.items())
    print(f"(planned in {sum(phases.values()):.0f} s: {spent}{busy})")


# ------------------------------------------------------------------------------------------------- the command
def main(command: str, exps: list[ex.Experiment], *, root: Path, seeds: tuple[int, ...], frames: int | None,
         tasks: list[str] | None, methods: list[str] | None, modes: list[str] | None, episodes: int,
         inputs: Inputs, overrides: list[str], eval_overrides: list[str]) -> None:
    """``plan``, ``run`` or ``aggregate`` each experiment; exits 1 if a run failed."""
    configured, user = split_overrides(overrides)
    uri = store_uri(configured)
    failed, timings = [], {}
    for exp in exps:
        if command == "aggregate":
            from lightning_pieg import report

            report.aggregate(exp, uri, root / exp.name / "results")
            continue
        runs = ex.runs(exp, root, seeds, frames, tasks=tasks, methods=methods, modes=modes,
                       blanket=inputs.blanket is not None)
        if command == "plan":
            problems, missing = [], []
            try:
                check_data(runs, inputs)
            except UserError as error:
                problems.append(str(error))
            try:
                missing = missing_inputs(runs, inputs, fetch=False, overrides=user)
            except UserError as error:
                problems.append(str(error))
            settings = Settings(root, uri, inputs, user, tuple(eval_overrides), episodes, tuple(missing))
            plan(exp, runs, settings, timings)
            if missing and not inputs.allow_missing:
                problems.append(f"run would refuse to start: missing {'; '.join(missing)} (--allow-missing goes on)")
            for problem in problems:
                print(f"NOTE: {problem}")
            continue
        check_data(runs, inputs)
        missing = missing_inputs(runs, inputs, fetch=True, overrides=user)
        refuse_missing(missing, inputs)
        for item in missing:
            say(f"WARNING: going on without {item}; every table of {exp.name} will say so")
        settings = Settings(root, uri, inputs, user, tuple(eval_overrides), episodes, tuple(missing))
        outcome = run_experiment(exp, runs, settings)
        say(f"{exp.name}: {len(outcome.done)} already done, {len(outcome.started)} trained, {len(outcome.resumed)} "
            f"resumed, {len(outcome.evaluated)} evaluated, {len(outcome.failed)} failed"
            + (f" ({', '.join(outcome.failed)})" if outcome.failed else "")
            + f". Tables and plots: python scripts/reproduce.py aggregate {exp.name}")
        failed.extend(outcome.failed)
    if failed:
        sys.exit(1)
