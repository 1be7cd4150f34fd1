"""What ``train.py`` and ``eval.py`` do with a composed Hydra config (kept importable for tests)."""

from __future__ import annotations

import logging
import signal
import sys
import warnings
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from lightning.pytorch.loggers import Logger
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from .checkpoint import AtomicCheckpointIO, resolve_ckpt_path

log = logging.getLogger("vision")


def instantiate_group(cfg: DictConfig | None) -> list[Any]:
    """Instantiate every ``_target_`` entry of a callbacks/logger group (a missing group gives [])."""
    if not cfg:
        return []
    if not isinstance(cfg, DictConfig):
        raise TypeError(f"expected a mapping of named configs, got {type(cfg).__name__}")
    return [hydra.utils.instantiate(c) for c in cfg.values() if isinstance(c, DictConfig) and "_target_" in c]


def log_hyperparameters(cfg: DictConfig, model: L.LightningModule, loggers: list[Logger]) -> None:
    """Send the resolved config and parameter counts to every logger."""
    if not loggers:
        return
    params = OmegaConf.to_container(cfg, resolve=True)
    params["model/params/total"] = sum(p.numel() for p in model.parameters())
    params["model/params/trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    for logger in loggers:
        logger.log_hyperparams(params)


def finish_run(fn: Callable) -> Callable:
    """Close the W&B run even when the job fails, so sweeps and multiruns go on cleanly."""

    @wraps(fn)
    def wrapper(cfg: DictConfig):
        try:
            return fn(cfg)
        finally:
            if "wandb" in sys.modules:
                import wandb

                if wandb.run is not None:
                    wandb.finish()

    return wrapper


def apply_extras(cfg: DictConfig) -> None:
    """Optional conveniences from ``cfg.extras``: silence warnings, print the config tree."""
    extras = cfg.get("extras") or {}
    if extras.get("ignore_warnings"):
        warnings.filterwarnings("ignore")
    if extras.get("print_config"):
        from rich import print as rprint
        from rich.syntax import Syntax

        rprint(Syntax(OmegaConf.to_yaml(cfg, resolve=False), "yaml", theme="ansi_dark"))


def _metrics(trainer: L.Trainer) -> dict[str, float]:
    return {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}


def trainer_plugins(cfg: DictConfig) -> list[Any]:
    """Atomic, ``weights_only`` checkpoint files; under SLURM, requeue on SIGUSR1 (``trainer.plugins`` adds more)."""
    plugins: list[Any] = [AtomicCheckpointIO()]
    if SLURMEnvironment.detect():
        plugins.append(SLURMEnvironment(auto_requeue=True, requeue_signal=signal.SIGUSR1))
    extra = cfg.trainer.get("plugins") or []
    return plugins + [hydra.utils.instantiate(p) for p in extra]


def _build(cfg: DictConfig) -> tuple[L.LightningDataModule, L.LightningModule, L.Trainer, list[Logger]]:
    datamodule = hydra.utils.instantiate(cfg.data)
    model = hydra.utils.instantiate(cfg.model)
    callbacks = instantiate_group(cfg.get("callbacks"))
    loggers = instantiate_group(cfg.get("logger"))
    trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False,
                                      plugins=trainer_plugins(cfg))
    return datamodule, model, trainer, loggers


@rank_zero_only
def _summary(title: str, metrics: dict[str, float], outputs: dict[str, str]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in sorted(metrics):
        table.add_row(key, f"{metrics[key]:.4f}")
    for key, value in outputs.items():
        table.add_row(key, value)
    Console().print(table)


@finish_run
def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Fit, then test the best checkpoint. Returns the final metrics and the built objects."""
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    datamodule, model, trainer, loggers = _build(cfg)
    log_hyperparameters(cfg, model, loggers)

    if cfg.get("train", True):
        # ckpt_path=last: this run directory's newest last*.ckpt / hpc_ckpt_*.ckpt, or a fresh start
        ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), cfg.paths.output_dir)
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    metrics = _metrics(trainer)

    best = ""
    if cfg.get("test", True):
        best = getattr(trainer.checkpoint_callback, "best_model_path", "") or ""
        if not best:
            log.warning("no best checkpoint was saved (fast_dev_run or no checkpoint callback): testing current weights")
        trainer.test(model, datamodule=datamodule, ckpt_path=best or None, weights_only=True)
        metrics.update(_metrics(trainer))

    outputs = {"output dir": str(cfg.paths.output_dir)}
    if best:
        outputs["best checkpoint"] = best
    skipped = getattr(datamodule, "skipped", 0)  # data.on_bad_sample=skip (also logged as data/skipped)
    if skipped:
        outputs["bad samples skipped"] = str(skipped)
    _summary(f"{cfg.get('task_name', 'train')} finished", metrics, outputs)
    return metrics, {"datamodule": datamodule, "model": model, "trainer": trainer, "best_ckpt": best}


@finish_run
def evaluate(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Test the checkpoint ``cfg.ckpt_path`` with the configured data and task."""
    ckpt = Path(str(resolve_ckpt_path(cfg.get("ckpt_path"), cfg.paths.output_dir) or ""))
    if not ckpt.is_file():
        raise FileNotFoundError(f"ckpt_path={cfg.get('ckpt_path')!r} is not a checkpoint file; pass ckpt_path=/path/to.ckpt")
    datamodule, model, trainer, loggers = _build(cfg)
    log_hyperparameters(cfg, model, loggers)
    trainer.test(model, datamodule=datamodule, ckpt_path=str(ckpt), weights_only=True)
    metrics = _metrics(trainer)
    _summary(f"eval of {ckpt.name}", metrics, {"output dir": str(cfg.paths.output_dir)})
    return metrics, {"datamodule": datamodule, "model": model, "trainer": trainer}


def metric_value(metrics: dict[str, float], name: str | None) -> float | None:
    """The value Hydra sweepers optimise; a clear error when the metric was never logged."""
    if not name:
        return None
    if name not in metrics:
        raise KeyError(f"optimized_metric={name!r} was not logged; logged metrics: {sorted(metrics)}")
    return metrics[name]
