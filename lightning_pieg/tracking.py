"""Everything MLflow: the store, one run per training job (attached to ``MLFLOW_RUN_ID`` under ``mlflow run``),
params, tags, metrics, artifacts, and the evaluation command's access to training runs."""
from __future__ import annotations

import fcntl
import importlib.util
import os
import re
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import MLFlowLogger

from lightning_pieg.console import UserError

DEFAULT_STORE = "sqlite:///mlflow.db"
RUN_ID = re.compile(r"^[0-9a-f]{32}$")
PARAM_BATCH = 100
PARAM_CHARS = 6000
FIGURES_EXPERIMENT = "figures"  # the figure scripts' runs


class TrackingError(UserError):
    """A run or store that cannot be used; the message names it and the fix."""


def tracking_uri(configured: str | None) -> str:
    """``mlflow.tracking_uri`` from the config, else ``$MLFLOW_TRACKING_URI``, else ``mlflow.db`` (sqlite) here."""
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


@contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """For a sqlite store: an exclusive lock beside the database file, so that runs starting together do not race
    to create its tables (``duplicate column name``) or the same experiment (a unique-name error)."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    database = Path(uri[len("sqlite:///"):])
    database.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{database}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def ensure_experiment(uri: str, name: str) -> str:
    """Create the store's tables and the experiment ``name`` if they are missing (safely, several processes at
    once); returns the experiment id."""
    with _store_lock(uri):
        store = client(uri)
        found = store.get_experiment_by_name(name)
        return found.experiment_id if found else store.create_experiment(name)


class FrameLogger(MLFlowLogger):
    """MLflow's Lightning logger whose metrics skip every step at or below ``skip_through``.

    A resumed run sets it to the newest step the interrupted run had logged: the frames between the checkpoint and
    the interruption are then not logged a second time, so each curve stays one clean line.
    """

    def __init__(self, *args, skip_through: int = -1, **kwargs):
        super().__init__(*args, **kwargs)
        self.skip_through = skip_through

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if step is not None and step <= self.skip_through:
            return
        super().log_metrics(metrics, step)

    def log_hyperparams(self, params) -> None:
        """Nothing: the run's params are the resolved config (``log_config``), logged once; Lightning's own call
        would log the module's hyperparameters again and clash with a resumed run's changed values."""


def last_logged_step(uri: str, run_id: str) -> int:
    """The largest step of any metric of the run (-1 if it has none)."""
    store = client(uri)
    keys = store.get_run(run_id).data.metrics
    return max((metric.step for key in keys for metric in store.get_metric_history(run_id, key)), default=-1)


def make_logger(cfg: DictConfig, resume_run_id: str | None = None, output_dir: Path | None = None):
    """Attach to the run ``mlflow run`` opened, else to the run being resumed, else open a new run; with
    ``mlflow.enabled=false``, Lightning's CSV logger in ``output_dir`` instead."""
    if not cfg.mlflow.enabled:
        from pytorch_lightning.loggers import CSVLogger

        return CSVLogger(save_dir=str(output_dir or "."), name="metrics", version="")
    if importlib.util.find_spec("mlflow") is None:
        raise TrackingError("MLflow is not installed here; install it (pip install mlflow), or train with "
                            "mlflow.enabled=false (metrics to a CSV file in the run's output folder).")
    uri = tracking_uri(cfg.mlflow.tracking_uri)
    ensure_experiment(uri, cfg.mlflow.experiment)
    run_id = os.environ.get("MLFLOW_RUN_ID") or resume_run_id
    skip_through = -1
    if run_id is not None:
        try:
            skip_through = last_logged_step(uri, run_id)
        except Exception:  # noqa: BLE001 - MlflowException for an unknown run: say which, and the fix
            raise TrackingError(f"MLflow run {run_id} is not in the tracking store {uri}; pass "
                                f"mlflow.tracking_uri=<the store the run logged to>.") from None
        client(uri).update_run(run_id, status="RUNNING")
    name = cfg.mlflow.run_name or f"{cfg.task}-{cfg.method}-s{cfg.seed}"  # agent=pieg's name: method=pieg
    return FrameLogger(experiment_name=cfg.mlflow.experiment, tracking_uri=uri, run_name=None if run_id else name,
                       run_id=run_id, skip_through=skip_through)


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _log_params(logger: MLFlowLogger, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(key, value[:PARAM_CHARS]) for key, value in params.items()]
    for start in range(0, len(items), PARAM_BATCH):
        logger.experiment.log_batch(logger.run_id, params=items[start:start + PARAM_BATCH])


def log_config(logger: MLFlowLogger, cfg: DictConfig) -> None:
    """Resolved config as params; a key that ``mlflow run`` already logged with another value goes under
    ``resolved.<key>`` (MLflow refuses to change a param)."""
    if not isinstance(logger, MLFlowLogger):
        return
    existing = logger.experiment.get_run(logger.run_id).data.params
    params = {}
    for key, value in flatten(OmegaConf.to_container(cfg, resolve=True)).items():
        text = "none" if value is None else str(value)
        if key in existing:
            if existing[key] != text:
                params[f"resolved.{key}"] = text
        else:
            params[key] = text
    _log_params(logger, params)


def log_resume(logger: MLFlowLogger, frame: int, changes: dict[str, tuple[Any, Any]]) -> None:
    """What a resumed run changed, as ``resumed_at_<frame>.<key>`` params beside the original ones (the second
    resume from the same frame: ``resumed_at_<frame>_2.<key>``, and so on; MLflow never changes a param)."""
    if not isinstance(logger, MLFlowLogger):
        return
    existing = logger.experiment.get_run(logger.run_id).data.params
    prefix, count = f"resumed_at_{frame}", 1
    while any(key.startswith(f"{prefix}.") for key in existing):
        count += 1
        prefix = f"resumed_at_{frame}_{count}"
    _log_params(logger, {f"{prefix}.{key}": "none" if new is None else str(new) for key, (_, new) in changes.items()})


def log_tags(logger: MLFlowLogger, renderer: str = "", extra: dict | None = None) -> None:
    """The run's software versions, renderer and commit, and ``extra`` (``mlflow.tags``; set again on resume)."""
    if not isinstance(logger, MLFlowLogger):
        return
    import dm_control
    import mujoco
    import pytorch_lightning
    import torch
    import torchvision

    tags = {"torch": torch.__version__, "torchvision": torchvision.__version__, "mujoco": mujoco.__version__,
            "dm_control": getattr(dm_control, "__version__", _dist_version("dm_control")),
            "pytorch_lightning": pytorch_lightning.__version__, "renderer": os.environ.get("MUJOCO_GL", ""),
            "gl_renderer": renderer,
            "git_commit": _git_commit(), **{str(key): str(value) for key, value in (extra or {}).items()}}
    for key, value in tags.items():
        logger.experiment.set_tag(logger.run_id, key, value)


def _dist_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def log_artifact(logger, path: str | Path, folder: str | None = None) -> None:
    """Upload a file to the run (no-op for loggers that are not MLflow's)."""
    if isinstance(logger, MLFlowLogger):
        logger.experiment.log_artifact(logger.run_id, str(path), folder)


def mark_killed(logger) -> None:
    """An interrupted run ends KILLED (Lightning's teardown marked it FINISHED)."""
    if isinstance(logger, MLFlowLogger):
        logger.experiment.set_terminated(logger.run_id, "KILLED")


# --------------------------------------------------------------------------------- runs read by other commands
def check_run(uri: str, run_id: str):
    """The MLflow run ``run_id``; TrackingError naming the store if it is not there."""
    from mlflow.exceptions import MlflowException

    try:
        return client(uri).get_run(run_id)
    except MlflowException:
        raise TrackingError(f"MLflow run {run_id} is not in the tracking store {uri}; pass "
                            f"mlflow.tracking_uri=<the store the training logged to>, or a checkpoint path.") from None


def download_final_checkpoint(uri: str, run_id: str, directory: Path) -> Path:
    """The run's newest ``checkpoints/frame_*.ckpt`` artifact (training uploads the final one) and its sidecar."""
    from mlflow.artifacts import download_artifacts

    names = sorted(item.path for item in client(uri).list_artifacts(run_id, "checkpoints")
                   if item.path.endswith(".ckpt"))
    if not names:
        raise TrackingError(f"MLflow run {run_id} has no checkpoints/*.ckpt artifact (training uploads it when it "
                            f"ends); pass checkpoint=<path to a frame_*.ckpt> instead.")
    directory.mkdir(parents=True, exist_ok=True)
    local = [Path(download_artifacts(run_id=run_id, artifact_path=name, dst_path=str(directory), tracking_uri=uri))
             for name in (names[-1], names[-1][:-len(".ckpt")] + ".json")]
    return local[0]


def open_run(uri: str, run_id: str | None, experiment: str, run_name: str) -> tuple[str, bool]:
    """(run id, created): ``run_id`` itself, or a new run in ``experiment`` when it is None."""
    if run_id is not None:
        return run_id, False
    experiment_id = ensure_experiment(uri, experiment)
    return client(uri).create_run(experiment_id, run_name=run_name).info.run_id, True


def log_step_metrics(uri: str, run_id: str, metrics: dict[str, float], step: int) -> None:
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    client(uri).log_batch(run_id, metrics=[Metric(key, value, now, step) for key, value in metrics.items()])


def upload(uri: str, run_id: str, path: str | Path, folder: str | None = None) -> None:
    client(uri).log_artifact(run_id, str(path), folder)


def log_figure_run(uri: str, run_name: str, params: dict, metrics: dict[str, float], artifacts: Sequence[Path],
                   experiment: str = FIGURES_EXPERIMENT) -> str:
    """One finished MLflow run of a figure script: its params, metrics and files; returns the run id."""
    from mlflow.entities import Param

    run_id, _ = open_run(uri, None, experiment, run_name)
    client(uri).log_batch(run_id, params=[Param(key, str(value)[:PARAM_CHARS]) for key, value in params.items()])
    log_step_metrics(uri, run_id, metrics, 0)
    for path in artifacts:
        upload(uri, run_id, path)
    client(uri).set_terminated(run_id)
    return run_id
