"""Zero-shot generalization of a trained agent, evaluated as in the paper (see ``generalization.py``)::

    python -m lightning_pieg.evaluate checkpoint=checkpoints/walker_walk_pieg_s1/frame_001100000.ckpt \\
        eval.modes=[train,color_hard,video_easy,video_hard] eval.dmcgb_dir=/data/dmcgb

``checkpoint`` is a ``frame_*.ckpt`` (with the ``frame_*.json`` training wrote beside it) or an MLflow run id.
"""
from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

import lightning_pieg  # noqa: F401  (torch/torchvision before dm_control: see lightning_pieg/__init__.py)
from lightning_pieg.config import CONF_DIR, hydra_output_dir
from lightning_pieg.console import UserError as EvaluateError  # noqa: F401  (the name this command's errors had)
from lightning_pieg.console import run_cli
from lightning_pieg.generalization import evaluate_checkpoint


def evaluate(cfg: DictConfig, output_dir: Path | None = None) -> dict:
    """Evaluate the checkpoint ``cfg`` names; returns the run id, the result rows and the written files."""
    return evaluate_checkpoint(cfg, Path(output_dir) if output_dir is not None else hydra_output_dir("evaluate"))


@hydra.main(config_path=CONF_DIR, config_name="evaluate", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    run_cli(lambda: evaluate(cfg))


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
