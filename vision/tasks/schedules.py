"""The per-iteration learning-rate schedules of every task, and the optimizer/scheduler pair Lightning expects.

Each schedule is a multiplier of the base learning rate as a function of the optimizer step, wrapped in a
``LambdaLR`` stepped every iteration (:func:`per_step`), so warmups shorter than an epoch work and a resumed
run continues the curve from its step count.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """Linear warmup from ~0 to 1 over ``warmup_steps``, then cosine down to ``min_ratio`` (classification,
    medical)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_schedule(step: int, total: int, warmup: int, schedule: str, milestones: list[int], gamma: float,
                    min_ratio: float) -> float:
    """Linear warmup from 0.001 to 1, then step decay (by ``gamma`` at each milestone step) or cosine to
    ``min_ratio`` (detection, mmdet's recipes)."""
    if step < warmup:
        return 0.001 + (1 - 0.001) * step / warmup
    if schedule == "step":
        return gamma ** sum(step >= m for m in milestones)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def poly_warmup(
    step: int, total_steps: int, warmup_steps: int, warmup_ratio: float, power: float, min_ratio: float
) -> float:
    """Linear from ``warmup_ratio`` to 1 over ``warmup_steps``, then polynomial decay ``(1 - t)^power`` to
    ``min_ratio`` (segmentation, mmseg's LinearLR + PolyLR)."""
    if step < warmup_steps:
        return warmup_ratio + (1 - warmup_ratio) * step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * (1 - progress) ** power


def training_steps(trainer: Any) -> tuple[int, int]:
    """``(total optimizer steps, steps per epoch)`` of the trainer's fit."""
    total = int(trainer.estimated_stepping_batches)
    return total, max(1, total // max(1, trainer.max_epochs or 1))


def per_step(optimizer: torch.optim.Optimizer, multiplier: Callable[[int], float]) -> dict[str, Any]:
    """``configure_optimizers``'s answer: ``optimizer`` with ``multiplier(step)`` applied every iteration."""
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
