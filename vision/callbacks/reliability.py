"""Task-agnostic reliability callbacks: non-finite losses and gradients, preemption, exact resume, bad samples.

Each works with any LightningModule/DataModule: none reads a task's attributes.
"""

from __future__ import annotations

import random
import signal
import threading
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from .run_record import last_checkpoint_callback


class NonFiniteGuard(Callback):
    """Stops training on a NaN/Inf loss or gradient, or (``action="skip"``) skips that optimizer step.

    The check runs after backward and before the optimizer step (gradients are then all-reduced, and the
    decision is reduced over ranks, so every rank stops or skips together). ``error`` raises
    ``FloatingPointError`` naming the epoch, step and batch before the weights change, so the last
    checkpoint on disk stays the last good one. ``skip`` drops the gradients: the optimizer leaves every
    parameter (and its state) untouched; skipped steps are counted in ``train/nonfinite_skipped``.
    Under fp16 AMP (``16-mixed``) the gradient scaler already skips inf/NaN steps, so only the loss is checked.
    """

    def __init__(self, action: str = "error"):
        if action not in ("error", "skip"):
            raise ValueError(f"NonFiniteGuard(action={action!r}): expected 'error' or 'skip'")
        self.action = action
        self.skipped = 0
        self._loss: float | None = None  # the first non-finite loss since the last optimizer step
        self._batch_idx = 0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int):
        self._batch_idx = batch_idx

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        if self._loss is None and not torch.isfinite(loss.detach()).all():
            self._loss = float(loss.detach().float().sum())

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        bad_grads = bool(grads) and scaler is None and not bool(
            torch.isfinite(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])).all())
        bad = trainer.strategy.reduce_boolean_decision(self._loss is not None or bad_grads, all=False)
        loss, self._loss = self._loss, None
        if not bad:
            return
        what = f"non-finite training loss {loss}" if loss is not None else "non-finite gradients"
        where = f"at epoch {trainer.current_epoch}, step {trainer.global_step} (batch {self._batch_idx})"
        if self.action == "error":
            lr = optimizer.param_groups[0].get("lr", float("nan"))
            raise FloatingPointError(
                f"{what} {where}, lr {lr:.3g}: lower model.lr, raise the warmup, set trainer.gradient_clip_val "
                "or use fp32 precision; or skip such steps with callbacks.nonfinite.action=skip")
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None  # torch optimizers leave parameters without a gradient unchanged
        self.skipped += 1
        rank_zero_warn(f"skipping the optimizer step: {what} {where}")
        pl_module.log("train/nonfinite_skipped", float(self.skipped), on_step=True, on_epoch=False,
                      rank_zero_only=True)

    def state_dict(self) -> dict[str, int]:
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.skipped = state_dict["skipped"]


class Preemption(Callback):
    """On SIGINT (Ctrl-C), SIGTERM (or SIGUSR1 outside SLURM): save ``last.ckpt`` at the end of the running batch
    and exit cleanly (status 0). A second SIGINT aborts at once.

    Lightning turns SIGTERM into a ``SIGTERMException`` at the end of the running batch, on every rank; this
    routes SIGINT (and SIGUSR1) to the same handler and saves the checkpoint then, next to the ``save_last``
    ModelCheckpoint's, so ``ckpt_path=last`` resumes it. DataLoader workers ignore both signals (a signal sent to
    the whole process group, as job schedulers and Ctrl-C do, reaches them too): the main process decides.
    Under SLURM with auto-requeue, SIGUSR1 stays Lightning's: it saves ``hpc_ckpt_<n>.ckpt`` and requeues.
    """

    def __init__(self, dirpath: str | Path | None = None, filename: str = "last"):
        self.dirpath, self.filename = dirpath, filename
        self._previous: dict[int, Any] = {}
        self._received: str | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        term = signal.getsignal(signal.SIGTERM)  # Lightning's: marks the trainer as signalled
        if not callable(term) or threading.current_thread() is not threading.main_thread():
            return
        env = trainer._accelerator_connector.cluster_environment
        slurm_requeue = isinstance(env, SLURMEnvironment) and env.auto_requeue
        signals = [signal.SIGINT] + ([signal.SIGUSR1] if not slurm_requeue and hasattr(signal, "SIGUSR1") else [])

        def stop(signum: int, frame: Any) -> None:
            if signum == signal.SIGINT and self._received is not None:
                raise KeyboardInterrupt  # Ctrl-C twice: stop now, without a checkpoint
            self._received = self._received or signal.Signals(signum).name
            rank_zero_info(f"{signal.Signals(signum).name}: stopping after the running batch and saving last.ckpt"
                           + (" (Ctrl-C again to abort at once)" if signum == signal.SIGINT else ""))
            term(signum, frame)

        def on_term(signum: int, frame: Any) -> None:
            self._received = self._received or "SIGTERM"
            term(signum, frame)

        self._previous = {s: signal.signal(s, stop) for s in signals}
        self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, on_term)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_signals()

    def _restore_signals(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_signals()
        if not isinstance(exception, SIGTERMException):
            return  # other failures keep the last good checkpoint untouched
        last = last_checkpoint_callback(trainer)
        dirpath = self.dirpath or (last.dirpath if last is not None else None) or trainer.default_root_dir
        path = str(Path(dirpath) / f"{self.filename}.ckpt")
        if last is not None:
            last.last_model_path = path  # its state in the checkpoint names this file as the last one
        trainer.save_checkpoint(path)
        received, self._received = self._received or "a stop signal", None
        rank_zero_info(f"preempted at epoch {trainer.current_epoch}, step {trainer.global_step}: saved {path} "
                       f"({received}); resume with the same command plus ckpt_path=last")


class ResumeState(Callback):
    """Completes Lightning's resume so that a resumed run continues exactly where the checkpoint was taken.

    - RNG: the torch (CPU and CUDA), numpy and Python RNG states go into checkpoints and are restored at the
      first training batch after a resume, so dropout, drop-path and Mixup draw what an uninterrupted run would.
    - Data position: Lightning saves a stateful training loader's ``state_dict()`` (e.g.
      :class:`~vision.datamodules.ResumableLoader`), but when ``configure_optimizers`` reads
      ``trainer.estimated_stepping_batches`` the loader is built before the checkpoint is restored and the
      saved state is never handed back (Lightning 2.6); this hands it back before the first batch.
    """

    def __init__(self):
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        np_state = np.random.get_state()
        return {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
            "python": random.getstate(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict  # restored at the first batch: sanity checks and loader setup come between

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.fit_loop._load_combined_loader_states()  # no-op unless restarting mid-epoch with saved states

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int):
        if self._pending is None:
            return
        state, self._pending = self._pending, None
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
        name, keys, *rest = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
        random.setstate(state["python"])


class BadSampleCount(Callback):
    """Logs ``data/skipped``, the samples the datamodule dropped under ``data.on_bad_sample=skip``, summed over
    ranks, at the end of every training and validation epoch. Reads ``trainer.datamodule.skipped`` (an int)."""

    def _log(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        skipped = getattr(trainer.datamodule, "skipped", None)
        if skipped is not None:
            pl_module.log("data/skipped", float(skipped), reduce_fx="sum", sync_dist=True)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._log(trainer, pl_module)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log(trainer, pl_module)
