"""Checks and adjustments of a composed config before anything is built (used by train/eval/predict)."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger("vision")


def command_line_overrides() -> list[str]:
    """The ``key=value`` overrides of this run's command line (none outside a Hydra app)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return list(HydraConfig.get().overrides.task)


def apply_overrides(cfg: DictConfig, overrides: list[str]) -> None:
    """Apply command-line style ``key=value`` / ``+key=value`` / ``~key`` overrides to ``cfg`` in place."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    with open_dict(cfg):
        for override in OverridesParser.create().parse_overrides(overrides):
            key = override.key_or_group
            if override.is_delete():
                parent, _, leaf = key.rpartition(".")
                node = OmegaConf.select(cfg, parent) if parent else cfg
                if node is not None and leaf in node:
                    del node[leaf]
            else:
                OmegaConf.update(cfg, key, override.value(), merge=False, force_add=True)


def reconcile_backbone(cfg: DictConfig, overrides: list[str]) -> None:
    """``model.backbone.name=<name>`` on the command line picks another backbone than the config files did;
    the ``kwargs`` those files wrote (e.g. a ResNet's ``channels``) belong to their backbone, so only the
    kwargs given on the command line are kept."""
    keys = [o.split("=", 1)[0].lstrip("+~") for o in overrides if "=" in o]
    if "model.backbone.name" not in keys or OmegaConf.select(cfg, "model.backbone.kwargs") is None:
        return
    kwargs = cfg.model.backbone.kwargs
    if "model.backbone.kwargs" in keys:
        return  # the whole kwargs mapping came from the command line
    given = {k.split(".")[3] for k in keys if k.startswith("model.backbone.kwargs.")}
    dropped = [k for k in kwargs if k not in given]
    if dropped:
        log.info("model.backbone.name=%s: leaving out the config files' backbone kwargs %s (written for "
                 "another backbone; set them with model.backbone.kwargs.<key>=...)", cfg.model.backbone.name, dropped)
        with open_dict(cfg):
            for key in dropped:
                del kwargs[key]


def _int(minimum: int) -> Callable[[object], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= minimum


def _number(minimum: float) -> Callable[[object], bool]:
    return lambda v: isinstance(v, int | float) and not isinstance(v, bool) and v >= minimum


# key -> (check, what it must be); absent or null keys are not checked (null means "default" where allowed)
CHECKS: dict[str, tuple[Callable[[object], bool], str]] = {
    "data.batch_size": (_int(1), "a positive integer"),
    "data.eval_batch_size": (_int(1), "a positive integer or null"),
    "data.num_workers": (_int(0), "an integer >= 0, or null (as many as the machine has, up to 8)"),
    "data.image_size": (_int(1), "a positive integer"),
    "data.num_classes": (_int(1), "a positive integer"),
    "data.in_chans": (_int(1), "a positive integer"),
    "trainer.max_epochs": (_int(-1), "an integer (-1: no limit)"),
    "trainer.max_steps": (_int(-1), "an integer (-1: no limit)"),
    "trainer.accumulate_grad_batches": (_int(1), "a positive integer"),
    "model.lr": (_number(0.0), "a number >= 0"),
    "model.weight_decay": (_number(0.0), "a number >= 0"),
    "seed": (_int(0), "an integer >= 0 or null"),
}


def validate_config(cfg: DictConfig) -> None:
    """Typed values for the common keys: a clear error naming the key instead of a ``TypeError`` deep inside."""
    problems = []
    for key, (ok, expected) in CHECKS.items():
        value = OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
        if value is not None and not ok(value):
            problems.append(f"{key}={value!r} must be {expected}")
    if problems:
        raise ValueError("invalid config: " + "; ".join(problems))


def use_available_accelerator(cfg: DictConfig) -> None:
    """A GPU trainer config (the real-data experiments' ``trainer=gpu``, ``ddp``, ``fsdp``) on a machine
    without CUDA runs on one CPU process instead, with a warning, rather than failing before any data check."""
    trainer = cfg.get("trainer")
    if trainer is None or str(trainer.get("accelerator", "auto")) not in ("gpu", "cuda") or torch.cuda.is_available():
        return
    precision = str(trainer.get("precision", "32-true"))
    warnings.warn(
        f"trainer.accelerator={trainer.accelerator} but no CUDA GPU is available: running on 1 CPU process "
        f"(slow for this experiment); pass trainer=cpu to choose the CPU explicitly", stacklevel=2)
    with open_dict(cfg):
        trainer.accelerator, trainer.devices, trainer.num_nodes = "cpu", 1, 1
        if not isinstance(trainer.get("strategy", "auto"), str) or trainer.get("strategy") not in (None, "auto"):
            trainer.strategy = "auto"
        if "sync_batchnorm" in trainer:
            trainer.sync_batchnorm = False
        if precision.startswith("16"):  # fp16 autocast is GPU-only
            trainer.precision = "bf16-mixed"
