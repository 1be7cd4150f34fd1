"""Measured speed and memory of a run, logged like any metric: training and inference throughput (img/s)
and peak memory, so a comparison of mechanisms reads them from the same logs as the accuracy."""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback


def _batch_size(batch) -> int:
    """Images in a batch: the first dimension of its first tensor ((x, y) tuples, dicts, lists)."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    items = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else ()
    for item in items:
        n = _batch_size(item)
        if n:
            return n
    return 0


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: runs of a Hydra multirun share one process, so each run resets it (Linux: writing
    5 to ``/proc/self/clear_refs`` resets the peak resident set, VmHWM)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:  # not Linux: the process's lifetime peak is what there is
        pass


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: peak allocated tensor memory; CPU: the process's peak resident set since the last reset (weights,
    interpreter and data included, so compare CPU runs with each other only)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**10  # kB
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


class Throughput(Callback):
    """Logs ``perf/train_img_s`` (forward + backward + optimizer step, per training epoch), ``perf/infer_img_s``
    (test forward passes) and ``perf/peak_mem_mb``. The first ``warmup`` batches of each loop are not
    timed (allocator and kernel warm-up); data loading is never timed."""

    def __init__(self, warmup: int = 2):
        self.warmup = warmup
        self._start = 0.0
        self._seen = {"train": 0, "test": 0}
        self._total = {"train": [0.0, 0], "test": [0.0, 0]}  # seconds, images

    def _sync(self, pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def _begin(self, pl_module) -> None:
        self._sync(pl_module)
        self._start = time.perf_counter()

    def _end(self, stage: str, pl_module, batch) -> None:
        self._sync(pl_module)
        self._seen[stage] += 1
        if self._seen[stage] > self.warmup:
            self._total[stage][0] += time.perf_counter() - self._start
            self._total[stage][1] += _batch_size(batch)

    def _log(self, stage: str, key: str, pl_module) -> None:
        seconds, images = self._total[stage]
        if seconds > 0:
            pl_module.log(key, images / seconds, on_step=False, on_epoch=True)
        pl_module.log("perf/peak_mem_mb", peak_memory_mb(pl_module.device), on_step=False, on_epoch=True)

    def on_fit_start(self, trainer, pl_module) -> None:
        reset_peak_memory(pl_module.device)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._seen["train"], self._total["train"] = 0, [0.0, 0]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._begin(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._end("train", pl_module, batch)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._log("train", "perf/train_img_s", pl_module)

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self._seen["test"], self._total["test"] = 0, [0.0, 0]

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._begin(pl_module)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._end("test", pl_module, batch)

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._log("test", "perf/infer_img_s", pl_module)
