"""A training job for tests/test_ddp.py: ``python tests/ddp_job.py <folder> <overrides...>``.

It trains with the ``TINY`` config plus the overrides through ``lightning_pieg.train.train`` and, on every process,
writes ``<folder>/rank<r>.pt``: the trainable and frozen parameters and BatchNorm buffers at the start and at the
end, the updates this process ran, its first and last frame, and its replay's observations. Lightning's DDP
launcher runs this same script for the other processes.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytorch_lightning as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import CONF_DIR, TINY  # noqa: E402

from lightning_pieg.train import train  # noqa: E402


class Dump(pl.Callback):
    """Records what the DDP test compares across processes."""

    def __init__(self, folder: Path):
        self.folder, self.updates, self.state = folder, 0, {}

    @staticmethod
    def _tensors(module) -> dict:
        return {"trainable": {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad},
                "frozen": {n: p.detach().clone() for n, p in module.named_parameters() if not p.requires_grad},
                "buffers": {n: b.detach().clone() for n, b in module.named_buffers()}}

    def on_train_start(self, trainer, pl_module) -> None:
        self.state["start"] = self._tensors(pl_module)
        self.state["start_frame"] = trainer.datamodule.collector.frame

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if outputs:
            self.updates += 1
            if os.environ.get("DDP_JOB_STALL_RANK") == str(trainer.global_rank) and self.updates == 3:
                time.sleep(600)  # this process falls out of step: the others wait in a collective

    def on_train_end(self, trainer, pl_module) -> None:
        replay = trainer.datamodule.replay
        self.state.update(end=self._tensors(pl_module), updates=self.updates, rank=trainer.global_rank,
                          world_size=trainer.world_size, end_frame=trainer.datamodule.collector.frame,
                          replay=[stream.arrays() for stream in replay.streams])
        torch.save(self.state, self.folder / f"rank{trainer.global_rank}.pt")


def main() -> None:
    from hydra import compose, initialize_config_dir

    folder, overrides = Path(sys.argv[1]), sys.argv[2:]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[*TINY, f"checkpoint_dir={folder / 'checkpoints'}",
                                           f"mlflow.tracking_uri=sqlite:///{folder / 'mlflow.db'}", *overrides])
    from lightning_pieg.console import run_cli

    run_cli(lambda: train(cfg, extra_callbacks=[Dump(folder)], output_dir=folder / "out"))


if __name__ == "__main__":
    main()
