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
from omegaconf import DictConfig, OmegaConf, open_dict

from .checkpoint import AtomicCheckpointIO, load_checkpoint_file, resolve_ckpt_path
from .config import (
    apply_overrides,
    command_line_overrides,
    reconcile_backbone,
    use_available_accelerator,
    validate_config,
)

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


def prepare_config(cfg: DictConfig) -> DictConfig:
    """The checks and adjustments every entry point makes before building anything: typed values for the
    common keys, a backbone named on the command line without the config files' kwargs for another one, and
    a CPU fallback for GPU trainer configs on a machine without one."""
    reconcile_backbone(cfg, command_line_overrides())
    validate_config(cfg)
    use_available_accelerator(cfg)
    return cfg


def _build(cfg: DictConfig) -> tuple[L.LightningDataModule, L.LightningModule, L.Trainer, list[Logger]]:
    from ..callbacks.run_record import RunRecord

    datamodule = hydra.utils.instantiate(cfg.data)
    model = hydra.utils.instantiate(cfg.model)
    # every checkpoint carries the model and data configs and the class names (eval.py / predict.py need
    # nothing else) and whether the run finished (ckpt_path=last then has nothing to do)
    record = RunRecord({key: OmegaConf.to_container(cfg[key], resolve=True) for key in ("model", "data")})
    callbacks = [*instantiate_group(cfg.get("callbacks")), record]
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
    Console().print(table)
    for key, value in outputs.items():  # plain lines: a piped log keeps whole paths (a table cuts them to fit)
        print(f"{key}: {value}", flush=True)


@finish_run
def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Fit, then test the best checkpoint. Returns the final metrics and the built objects."""
    prepare_config(cfg)
    # ckpt_path=last: this run directory's newest last*.ckpt / hpc_ckpt_*.ckpt, or a fresh start
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), cfg.paths.output_dir) if cfg.get("train", True) else None
    finished = finished_run(ckpt_path, cfg) if ckpt_path else None
    if finished is not None:
        _summary(f"{cfg.get('task_name', 'train')}: nothing to do", finished["metrics"], {
            "complete": f"the run in {cfg.paths.output_dir} finished (epoch {finished['epoch']}, step "
                        f"{finished['global_step']}); raise trainer.max_epochs / max_steps to train further",
            "checkpoint": str(ckpt_path), **({"best checkpoint": finished["best"]} if finished.get("best") else {})})
        return finished["metrics"], {"best_ckpt": finished.get("best") or "", "complete": True}
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    datamodule, model, trainer, loggers = _build(cfg)
    log_hyperparameters(cfg, model, loggers)

    if cfg.get("train", True):
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
    """Test the checkpoint ``cfg.ckpt_path``: with the model and data configs saved in it (command-line
    ``model.*``/``data.*`` overrides and a ``data=`` choice still apply), else with the composed ones."""
    ckpt = checkpoint_file(cfg)
    restore_run_config(cfg, ckpt)
    prepare_config(cfg)
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


def checkpoint_file(cfg: DictConfig) -> Path:
    ckpt = Path(str(resolve_ckpt_path(cfg.get("ckpt_path"), cfg.paths.output_dir) or "")).expanduser()
    if not ckpt.is_file():
        raise FileNotFoundError(f"ckpt_path={cfg.get('ckpt_path')!r} is not a checkpoint file; pass ckpt_path=/path/to.ckpt")
    return ckpt


def run_record(ckpt: str | Path) -> dict[str, Any]:
    """What :class:`~vision.callbacks.RunRecord` saved in a checkpoint (``{}`` for older checkpoints)."""
    return load_checkpoint_file(ckpt).get("run_record") or {}


def restore_run_config(cfg: DictConfig, ckpt: str | Path, record: dict[str, Any] | None = None) -> dict[str, Any]:
    """Replace ``cfg.model`` and ``cfg.data`` by the ones saved in ``ckpt``, then re-apply the command line's
    ``model.*`` / ``data.*`` overrides; a ``data=<name>`` choice on the command line keeps the composed data
    (evaluating on another dataset). Returns the checkpoint's record."""
    record = run_record(ckpt) if record is None else record
    saved = record.get("config") or {}
    if not saved:
        log.warning("%s holds no run config (written before checkpoints saved theirs): using the composed "
                    "model and data configs; pass the training overrides (model=..., data=...)", ckpt)
        return record
    overrides = command_line_overrides()
    chosen = {o.split("=", 1)[0].lstrip("+~") for o in overrides if "=" in o}
    with open_dict(cfg):
        cfg.model = OmegaConf.create(saved["model"])
        if "data" not in chosen:
            cfg.data = OmegaConf.create(saved["data"])
    apply_overrides(cfg, [o for o in overrides if o.lstrip("+~").startswith(("model.", "data."))])
    log.info("model and data configs restored from %s", ckpt)
    return record


def finished_run(ckpt_path: str | Path, cfg: DictConfig) -> dict[str, Any] | None:
    """The record of a run that completed in ``ckpt_path`` (``ckpt_path=last`` of a finished run), unless
    the configured ``trainer.max_epochs`` / ``max_steps`` reach further than the finished run's."""
    record = run_record(ckpt_path).get("finished")
    if not record:
        return None

    def reach(value) -> float:
        return float("inf") if value is None or value < 0 else value

    extended = (reach(cfg.trainer.get("max_epochs")) > reach(record["max_epochs"])
                or reach(cfg.trainer.get("max_steps")) > reach(record["max_steps"]))
    return None if extended else record
