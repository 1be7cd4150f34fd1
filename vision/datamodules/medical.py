"""Medical segmentation datamodules: Decathlon-layout 3-D volumes (MONAI) and 2-D image/mask folders
(albumentations), split by patient. Readers, datasets, transforms and the synthetic offline sets live in
:mod:`.readers`, :mod:`.datasets`, :mod:`.transforms` and :mod:`.synthetic`; MedMNIST (a classification set)
in :mod:`.classification`.

Segmentation batches are dictionaries ``{"image": [B, C, *spatial], "label": [B, 1, *spatial], "case": [...]}``
(MONAI's convention) for both the 3-D and the 2-D datamodule, so one task trains on either.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L

from .classification import MedMNISTDataModule  # noqa: F401  (re-exported: its former home)
from .datasets import BadSamples, MaskFolderDataset, SeededVolumes, collate_skip_none, collate_volumes
from .loaders import SplitLoaders
from .readers import (  # noqa: F401  (re-exported)
    InvalidCaseError,
    check_case,
    read_decathlon,
    read_mask_folder,
    read_medmnist,
    split_cases,
)
from .synthetic import write_synthetic_decathlon, write_synthetic_masks
from .transforms import load_case_transform, mask_transforms, volume_transforms  # noqa: F401  (re-exported)


def _raise_case_error(err: BaseException) -> None:
    """MONAI wraps transform errors in ``RuntimeError("applying transform ...")``: surface ours."""
    cause: BaseException | None = err
    while cause is not None:
        if isinstance(cause, InvalidCaseError):
            raise cause from None
        cause = cause.__cause__
    raise err


class _CaseDataModule(SplitLoaders, L.LightningDataModule):
    """What both medical datamodules share: cases under ``root`` split by patient, a bad-sample policy, and a
    synthetic set written by :attr:`write_synthetic` when ``synthetic`` is set."""

    SPATIAL_DIMS = 3
    write_synthetic = staticmethod(write_synthetic_decathlon)

    def _init_cases(self, root: str, num_classes: int, in_channels: int, patch_size, on_bad_sample: str) -> None:
        self.root = Path(root).expanduser()
        self.num_classes, self.in_channels = num_classes, in_channels
        if len(patch_size) != self.SPATIAL_DIMS:
            raise ValueError(f"data.patch_size={list(patch_size)}: expected {self.SPATIAL_DIMS} sizes for "
                             f"{self.SPATIAL_DIMS}-D {'volumes' if self.SPATIAL_DIMS == 3 else 'images'}")
        self.bad_samples = BadSamples(on_bad_sample)
        self.train_set = self.val_set = self.test_set = None

    def prepare_data(self) -> None:
        if self.hparams.synthetic:
            self.write_synthetic(self.root, **self.hparams.synthetic)


class DecathlonDataModule(_CaseDataModule):
    """3-D volumes in the Medical Segmentation Decathlon layout, through MONAI dictionary transforms.

    The labelled cases of ``dataset.json`` are split by patient into train/val/test (``split_seed``), so
    the test split is held out. Training draws ``num_samples`` patches of ``patch_size`` per volume
    (``pos``:``neg`` foreground/background centres); validation and test yield whole volumes (batch 1)
    for sliding-window inference. Deterministic transforms are cached (``cache_rate``).

    ``synthetic`` (``{num_cases, size, num_classes, seed}``) first writes MONAI synthetic volumes into
    ``root`` (once; :func:`write_synthetic_decathlon`), the offline default.

    ``on_bad_sample``: ``error`` (default: an unusable case stops setup with its name) or ``skip``: every case
    is read and checked once at setup and the unusable ones are dropped (warned, counted in :attr:`skipped`).
    Training patches are reseeded per (seed, epoch, case), so a run resumed mid-epoch draws the same patches.
    """

    collate_fn = staticmethod(collate_volumes)
    eval_batch_size = 1  # whole volumes, of different sizes

    def __init__(
        self,
        root: str,
        num_classes: int,
        in_channels: int = 1,
        patch_size: tuple[int, int, int] = (96, 96, 96),
        pixdim: tuple[float, float, float] | None = None,
        intensity_range: tuple[float, float] | None = None,
        crop_foreground: bool = True,
        num_samples: int = 4,
        pos: float = 1.0,
        neg: float = 1.0,
        batch_size: int = 2,
        num_workers: int = 4,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        cache_rate: float = 1.0,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        split_seed: int = 0,
        patient_pattern: str | None = None,
        synthetic: dict | None = None,
        on_bad_sample: str = "error",
    ):
        super().__init__()
        self.save_hyperparameters(logger=False)
        self._init_cases(root, num_classes, in_channels, patch_size, on_bad_sample)

    def _transforms(self, train: bool):
        hp = self.hparams
        return volume_transforms(train, hp.in_channels, hp.num_classes, hp.patch_size, hp.pixdim, hp.intensity_range,
                                 hp.crop_foreground, hp.num_samples, hp.pos, hp.neg)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        from monai.data import CacheDataset

        self.prepare_data()  # idempotent; lets the datamodule be used without a Trainer
        hp = self.hparams
        cases = read_decathlon(self.root, hp.num_classes, hp.in_channels)
        if self.bad_samples.policy == "skip":
            load = load_case_transform(hp.in_channels, hp.num_classes)
            cases = [case for case in cases if self.bad_samples.read(load, dict(case)) is not None]
        splits = split_cases(cases, hp.val_fraction, hp.test_fraction, hp.split_seed, hp.patient_pattern)
        self.cases = dict(zip(("train", "val", "test"), splits))
        try:
            train_set, self.val_set, self.test_set = (
                CacheDataset(split, self._transforms(train), cache_rate=hp.cache_rate,
                             num_workers=max(1, self.num_workers), progress=False)
                for split, train in zip(splits, (True, False, False))
            )
        except RuntimeError as err:
            _raise_case_error(err)
        self.train_set = SeededVolumes(train_set)


class MaskFolderDataModule(_CaseDataModule):
    """2-D segmentation from ``root/images`` + ``root/masks`` (Kvasir-SEG, ISIC), split by case with a fixed
    seed into train/val/test. Images are resized (eval) or randomly cropped (train) to ``patch_size``.

    ``synthetic`` (``{num_images, size, seed}``) first writes MONAI's synthetic 2-D images as PNG folders
    into ``root`` (:func:`write_synthetic_masks`), the offline default.

    ``on_bad_sample``: ``error`` (default: an unreadable image, a mask of another size or with values outside
    the classes stops with the case named) or ``skip`` (dropped from its batch, warned, counted in :attr:`skipped`).
    """

    collate_fn = staticmethod(collate_skip_none)
    SPATIAL_DIMS = 2
    write_synthetic = staticmethod(write_synthetic_masks)

    def __init__(
        self,
        root: str,
        num_classes: int = 2,
        in_channels: int = 3,
        patch_size: tuple[int, int] = (256, 256),
        binary_masks: bool = True,
        mean: tuple[float, ...] = (0.485, 0.456, 0.406),
        std: tuple[float, ...] = (0.229, 0.224, 0.225),
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 4,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        split_seed: int = 0,
        synthetic: dict | None = None,
        on_bad_sample: str = "error",
    ):
        super().__init__()
        self.save_hyperparameters(logger=False)
        self._init_cases(root, num_classes, in_channels, patch_size, on_bad_sample)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        self.prepare_data()
        hp = self.hparams
        mean, std = tuple(hp.mean), tuple(hp.std)
        if len(mean) != hp.in_channels:  # e.g. ImageNet RGB statistics for grayscale images
            mean, std = (sum(mean) / len(mean),) * hp.in_channels, (sum(std) / len(std),) * hp.in_channels
        splits = split_cases(read_mask_folder(self.root), hp.val_fraction, hp.test_fraction, hp.split_seed)
        self.cases = dict(zip(("train", "val", "test"), splits))
        self.train_set, self.val_set, self.test_set = (
            MaskFolderDataset(split, mask_transforms(train, hp.patch_size, mean, std), hp.num_classes,
                              hp.in_channels, hp.binary_masks, self.bad_samples)
            for split, train in zip(splits, (True, False, False))
        )
        self.check_train_split()

    def predict_transform(self):
        """What ``predict.py`` applies to an ``HWC`` uint8 image: the evaluation transform."""
        hp = self.hparams
        mean, std = tuple(hp.mean), tuple(hp.std)
        if len(mean) != hp.in_channels:
            mean, std = (sum(mean) / len(mean),) * hp.in_channels, (sum(std) / len(std),) * hp.in_channels
        return mask_transforms(False, hp.patch_size, mean, std)
