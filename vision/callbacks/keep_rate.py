"""EViT's keep-rate schedule, driven by the training loop."""

from __future__ import annotations

import math

import lightning as L


def keep_rate_at(step: int, steps_per_epoch: int, base: float, start_epoch: int = 10, shrink_epochs: int = 100) -> float:
    """The published schedule: every token is kept for ``start_epoch`` epochs, then the rate follows a
    cosine (per step) from 1 down to ``base`` over ``shrink_epochs`` epochs, and stays there."""
    start, length = start_epoch * steps_per_epoch, shrink_epochs * steps_per_epoch
    if step < start:
        return 1.0
    if step >= start + length:
        return base
    return base + (1 - base) * 0.5 * (1 + math.cos(math.pi * (step - start) / length))


class KeepRateSchedule(L.Callback):
    """Sets ``train_keep_rate`` of every token-pruning model in the module before each training step
    (evaluation keeps the model's own ``keep_rate``). The current rate is logged as ``train/keep_rate``."""

    def __init__(self, start_epoch: int = 10, shrink_epochs: int = 100):
        self.start_epoch, self.shrink_epochs = start_epoch, shrink_epochs

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        models = [m for m in pl_module.modules() if hasattr(m, "train_keep_rate") and hasattr(m, "keep_rate")]
        if not models:
            raise ValueError("KeepRateSchedule: the model has no token-pruning backbone (no `train_keep_rate`)")
        steps_per_epoch = max(1, int(trainer.num_training_batches))
        step = trainer.current_epoch * steps_per_epoch + batch_idx
        for model in models:
            model.train_keep_rate = keep_rate_at(step, steps_per_epoch, model.keep_rate, self.start_epoch,
                                                 self.shrink_epochs)
        pl_module.log("train/keep_rate", models[0].train_keep_rate, on_step=True, on_epoch=False)
