"""Training loaders whose order is a function of (seed, epoch) and that resume mid-epoch.

Lightning saves the ``state_dict()`` of a training loader that has one into every checkpoint and calls
``load_state_dict()`` before iterating it again on resume; :class:`ResumableLoader` uses that to skip the
batches the interrupted run had already trained on, so a resumed run sees exactly the batches (and, with
``sample_seeds``, the augmentations) the uninterrupted run would have.
"""

from __future__ import annotations

import os
import signal
import warnings
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, default_collate

from .datasets import sample_seed, seed_worker_transform, unwrap_subset


def available_cpus() -> int:
    """CPU cores this process may use (its affinity mask, e.g. a job scheduler's allocation)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_num_workers(limit: int = 8) -> int:
    """``data.num_workers: null``: one loader worker per available core but one, at most ``limit``."""
    return max(0, min(limit, available_cpus() - 1))


def init_worker(worker_id: int) -> None:
    """DataLoader workers ignore SIGINT and SIGTERM: Ctrl-C and a scheduler's SIGTERM reach the whole process
    group, and the main process (:class:`~vision.callbacks.Preemption`) saves a checkpoint and shuts them down
    itself. Each worker also gets its own augmentation RNG stream."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    seed_worker_transform(worker_id)


class ResumableSampler(DistributedSampler):
    """``DistributedSampler``'s order (a permutation seeded by ``seed + epoch``, split across ranks) that can
    start part-way into an epoch.

    Being a ``DistributedSampler``, Lightning keeps it under DDP instead of injecting its own; with one
    process (``num_replicas=1``) it is a plain seeded shuffle. With ``sample_seeds`` it yields
    ``(index, seed)`` pairs: datasets whose ``sample_seeds`` is true reseed their transform from them, so
    augmentations do not depend on workers, ranks or resumes.
    """

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = False, sample_seeds: bool = False):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self.sample_seeds = sample_seeds
        self.start = 0  # indices of this epoch to leave out (already trained on)
        self._resume: tuple[int, int] | None = None

    def resume(self, epoch: int, start: int) -> None:
        """Begin the next pass over ``epoch`` at its ``start``-th index (dropped if another epoch comes first)."""
        self.epoch, self._resume = epoch, (epoch, start)

    def begin_pass(self) -> int:
        """Called before each pass: how many indices of this epoch it skips."""
        resume, self._resume = self._resume, None
        self.start = resume[1] if resume is not None and resume[0] == self.epoch else 0
        return self.start

    def __iter__(self):
        indices = list(super().__iter__())[self.start:]
        if self.sample_seeds:
            return iter([(i, sample_seed(self.seed, self.epoch, i)) for i in indices])
        return iter(indices)


class ResumableLoader(DataLoader):
    """A training ``DataLoader`` over a :class:`ResumableSampler` with Lightning's stateful-loader interface.

    ``state_dict()`` is the epoch and the number of batches handed out in it; ``load_state_dict()`` makes
    the next pass over that epoch skip them. Lightning fetches sized loaders without prefetching, so the
    batches handed out are the batches trained on.
    """

    def __init__(self, dataset: Dataset, sampler: ResumableSampler, batch_size: int, drop_last: bool = True,
                 **kwargs: Any):
        if not isinstance(sampler, ResumableSampler):
            raise TypeError(f"ResumableLoader needs a ResumableSampler, got {type(sampler).__name__}")
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last, **kwargs)
        self._batches = 0

    def __iter__(self):
        # a generator: the pass (and the sampler's start) begins at the first batch, after Lightning has
        # called set_epoch, whatever the order of iter() and set_epoch
        self._batches = self.sampler.begin_pass() // self.batch_size
        for batch in super().__iter__():
            self._batches += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.sampler.epoch, "batches": self._batches, "seed": self.sampler.seed,
                "num_replicas": self.sampler.num_replicas, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        same = (state["seed"], state["num_replicas"], state["batch_size"]) == (
            self.sampler.seed, self.sampler.num_replicas, self.batch_size)
        if not same:
            warnings.warn(
                "resuming with a different seed, process count or batch size than the checkpoint's "
                f"({state}): the interrupted epoch's data order is not reproduced", stacklevel=2)
        self.sampler.resume(state["epoch"], state["batches"] * self.batch_size if same else 0)


def resumable_train_loader(dataset: Dataset, batch_size: int, seed: int, trainer: Any = None,
                           **kwargs: Any) -> ResumableLoader:
    """Every task's training loader: this rank's share (Lightning's split when distributed) of a (seed, epoch)
    permutation, full batches only, resumable mid-epoch. Datasets that take per-sample augmentation seeds
    (``sample_seeds = True``; see :func:`~vision.datamodules.datasets.split_key`) get them, so their
    augmentations resume too."""
    ranks = (trainer.distributed_sampler_kwargs if trainer is not None else None) or {}
    sampler = ResumableSampler(dataset, seed=seed, **ranks, sample_seeds=getattr(dataset, "sample_seeds", False))
    return ResumableLoader(dataset, sampler, batch_size=batch_size, drop_last=True, **kwargs)


class SplitLoaders:
    """The loaders of a LightningDataModule whose ``setup`` builds ``train_set``, ``val_set`` and ``test_set``:
    :func:`resumable_train_loader` for training, in-order loaders for evaluation, from the hyper-parameters
    ``batch_size``, ``eval_batch_size``, ``num_workers``, ``pin_memory`` and ``persistent_workers``. A datamodule
    sets :attr:`collate_fn`; one with its own loader class overrides :meth:`_loader`. One that keeps a shared
    :class:`~vision.datamodules.datasets.BadSamples` as ``bad_samples`` reports its count as :attr:`skipped`."""

    collate_fn = staticmethod(default_collate)

    @property
    def skipped(self) -> int:
        """Bad samples dropped so far under ``on_bad_sample=skip``, over all splits and workers."""
        return self.bad_samples.count

    @property
    def eval_batch_size(self) -> int:
        return self.hparams.get("eval_batch_size") or self.hparams.batch_size

    @property
    def train_seed(self) -> int:
        return torch.initial_seed() % 2**31  # seed_everything's: the same on every rank

    @property
    def num_workers(self) -> int:
        """``num_workers`` (null: :func:`default_num_workers`, what the machine has)."""
        workers = self.hparams.get("num_workers")
        return default_num_workers() if workers is None else workers

    def check_train_split(self) -> None:
        """End of every ``setup``: refuse a training split smaller than one batch (``drop_last`` would leave no
        batch), and seed the training transform for main-process loading (workers reseed their own copy)."""
        if len(self.train_set) < self.hparams.batch_size:
            raise ValueError(
                f"the training split has {len(self.train_set)} images, fewer than data.batch_size="
                f"{self.hparams.batch_size}; lower data.batch_size"
            )
        transform = getattr(unwrap_subset(self.train_set), "transform", None)
        if hasattr(transform, "set_random_seed"):
            transform.set_random_seed(self.train_seed)

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        hp = self.hparams
        workers = self.num_workers
        common = dict(
            num_workers=workers,
            pin_memory=hp.pin_memory and torch.cuda.is_available(),
            persistent_workers=hp.persistent_workers and workers > 0,
            worker_init_fn=init_worker,
            collate_fn=self.collate_fn,
        )
        if train:
            return resumable_train_loader(dataset, hp.batch_size, self.train_seed, self.trainer, **common)
        return DataLoader(dataset, batch_size=self.eval_batch_size, shuffle=False, **common)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False)
