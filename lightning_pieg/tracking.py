"""MLflow glue: one run per training job (attached to ``MLFLOW_RUN_ID`` under ``mlflow run``), params, tags."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import MLFlowLogger

DEFAULT_STORE = "sqlite:///mlflow.db"


def tracking_uri(configured: str | None) -> str:
    """``mlflow.tracking_uri`` from the config, else ``$MLFLOW_TRACKING_URI``, else ``mlflow.db`` (sqlite) here."""
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def make_logger(cfg: DictConfig, resume_run_id: str | None = None) -> MLFlowLogger:
    """Attach to the run ``mlflow run`` opened, else to the run being resumed, else open a new run."""
    run_id = os.environ.get("MLFLOW_RUN_ID") or resume_run_id
    name = cfg.mlflow.run_name or f"{cfg.task}-{cfg.agent}-s{cfg.seed}"
    return MLFlowLogger(experiment_name=cfg.mlflow.experiment, tracking_uri=tracking_uri(cfg.mlflow.tracking_uri),
                        run_name=None if run_id else name, run_id=run_id)


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def log_config(logger: MLFlowLogger, cfg: DictConfig) -> None:
    """Resolved config as params; a key that ``mlflow run`` already logged with another value goes under
    ``resolved.<key>`` (MLflow refuses to change a param)."""
    client, run_id = logger.experiment, logger.run_id
    existing = client.get_run(run_id).data.params
    params = {}
    for key, value in flatten(OmegaConf.to_container(cfg, resolve=True)).items():
        text = "none" if value is None else str(value)
        if key in existing:
            if existing[key] != text:
                params[f"resolved.{key}"] = text
        else:
            params[key] = text
    from mlflow.entities import Param

    items = [Param(k, v[:6000]) for k, v in params.items()]
    for start in range(0, len(items), 100):
        client.log_batch(run_id, params=items[start:start + 100])


def log_tags(logger: MLFlowLogger) -> None:
    import dm_control
    import mujoco
    import pytorch_lightning
    import torch
    import torchvision

    tags = {"torch": torch.__version__, "torchvision": torchvision.__version__, "mujoco": mujoco.__version__,
            "dm_control": getattr(dm_control, "__version__", _dist_version("dm_control")),
            "pytorch_lightning": pytorch_lightning.__version__, "renderer": os.environ.get("MUJOCO_GL", ""),
            "git_commit": _git_commit()}
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
