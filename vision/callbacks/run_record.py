"""What a checkpoint needs to be used alone: the run's model and data configs, the class names, and whether
the run finished (so ``ckpt_path=last`` of a finished run has nothing to do)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint


def last_checkpoint_callback(trainer: L.Trainer) -> ModelCheckpoint | None:
    """The ``save_last`` ModelCheckpoint (``callbacks.last_checkpoint``), if the run has one."""
    return next((c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint) and c.save_last), None)


class RunRecord(Callback):
    """Adds ``checkpoint["run_record"] = {config, class_names, finished}`` to every checkpoint.

    ``config`` is ``{"model": ..., "data": ...}`` (resolved, plain containers: loadable with
    ``weights_only=True``); ``class_names`` comes from the datamodule's ``class_names`` when it has them.
    When fitting ends normally (not interrupted, not ``fast_dev_run``) and the run keeps a ``last.ckpt``, the
    final ``last.ckpt`` has a ``finished`` entry: the epoch, step, limits, best checkpoint and the metrics at the
    end of fitting. The pipeline adds this callback to every run.
    """

    def __init__(self, config: dict[str, Any] | None = None):
        self.config = config or {}
        self._finished: dict[str, Any] | None = None

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        names = getattr(trainer.datamodule, "class_names", None) if trainer.datamodule is not None else None
        checkpoint["run_record"] = {
            "config": self.config,
            "class_names": [str(n) for n in names] if names else None,
            "finished": self._finished,
        }

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finished = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        last = last_checkpoint_callback(trainer)
        if last is None or trainer.fast_dev_run:
            return
        best = getattr(trainer.checkpoint_callback, "best_model_path", "") or ""
        self._finished = {
            "epoch": int(trainer.current_epoch), "global_step": int(trainer.global_step),
            "max_epochs": trainer.max_epochs, "max_steps": trainer.max_steps, "best": best,
            "metrics": {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1},
        }
        # Lightning's ModelCheckpoint writes last.ckpt after this hook (it runs after other callbacks) unless it
        # saved one at this very step: then that file is rewritten here, so the last checkpoint says finished
        if getattr(last, "_last_checkpoint_saved", True):
            path = str(Path(last.dirpath or trainer.default_root_dir) / f"{last.CHECKPOINT_NAME_LAST}.ckpt")
            last.last_model_path = path
            trainer.save_checkpoint(path)
