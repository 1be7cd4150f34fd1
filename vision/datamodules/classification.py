"""Classification LightningDataModules: ImageNet-style folders and the embedded Fashion-MNIST."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import Dataset

from .classes import FASHION_MNIST_CLASSES
from .datasets import (
    ArrayDataset,
    BadSamples,
    ImageFolderDataset,
    bad_sample_policy,
    class_folders,
    collate_skip_none,
    read_idx,
    unwrap_subset,
)
from .loaders import SplitLoaders
from .readers import read_medmnist
from .transforms import backbone_eval_config, build_transforms


class ClassificationDataModule(SplitLoaders, L.LightningDataModule):
    """Shared loaders and transforms; subclasses build the train/val/test datasets.

    Preprocessing follows the backbone's timm ``pretrained_cfg`` (mean, std, crop_pct,
    interpolation) unless given explicitly. ``randaugment`` = ``{magnitude: 9, num_ops: 2}``.
    ``on_bad_sample``: ``error`` (default) or ``skip`` unreadable images (warned, counted in :attr:`skipped`);
    ``skip_corrupt`` is its deprecated boolean spelling. The training loader resumes mid-epoch
    (:class:`~vision.datamodules.loaders.ResumableLoader`); its order and augmentations are a function of
    (seed, epoch) on any number of processes and workers.
    """

    collate_fn = staticmethod(collate_skip_none)  # drops bad samples skipped under on_bad_sample=skip

    @property
    def train_seed(self) -> int:
        return self.seed  # set in setup, also seeds the main-process transform

    def __init__(
        self,
        root: str,
        num_classes: int,
        in_chans: int = 3,
        image_size: int = 224,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int | None = None,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        backbone: str | None = None,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        crop_pct: float | None = None,
        interpolation: str | None = None,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        randaugment: dict | None = None,
        on_bad_sample: str = "error",
        skip_corrupt: bool | None = None,
        allow_empty_classes: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.bad_samples = BadSamples(bad_sample_policy(on_bad_sample, skip_corrupt))
        self.root = Path(root).expanduser()
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.eval_config = backbone_eval_config(
            backbone, in_chans, mean=mean, std=std, crop_pct=crop_pct, interpolation=interpolation
        )
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self.seed = 0
        self._class_names: list[str] | None = None

    @property
    def class_names(self) -> list[str] | None:
        """The class names in label order (saved in checkpoints for ``predict.py``); known after ``setup``."""
        return self._class_names

    def predict_transform(self):
        """What ``predict.py`` applies to an ``HWC`` uint8 image: the evaluation transform."""
        return self.transforms(train=False)

    def transforms(self, train: bool):
        hp = self.hparams
        return build_transforms(train, hp.image_size, self.eval_config, scale=hp.scale, ratio=hp.ratio,
                                hflip=hp.hflip, randaugment=hp.randaugment)

    def build_datasets(self) -> tuple[Dataset, Dataset, Dataset]:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set, self.val_set, self.test_set = self.build_datasets()
            self.seed = torch.initial_seed() % 2**31  # seed_everything's: the same on every rank
            self.check_train_split()

    @property
    def train_transform(self):
        return unwrap_subset(self.train_set).transform


class ImageFolderDataModule(ClassificationDataModule):
    """ImageNet layout: ``root/train/<class>/*`` and ``root/val/<class>/*`` (``root/test`` if present,
    else the val split is also the test split)."""

    def build_datasets(self):
        if not (self.root / "train").is_dir() or not (self.root / "val").is_dir():
            raise FileNotFoundError(
                f"data.root={self.root} must contain train/<class>/<image> and val/<class>/<image> "
                "(the ImageNet layout; for ImageNet-1k, extract ILSVRC2012_img_train.tar into train/ and sort "
                "the validation images into per-class folders under val/)"
            )
        kw = dict(in_chans=self.in_chans, bad_samples=self.bad_samples,
                  allow_empty_classes=self.hparams.allow_empty_classes)
        classes = class_folders(self.root / "train")
        train = ImageFolderDataset(self.root / "train", self.transforms(train=True), classes=classes, **kw)
        if len(classes) != self.num_classes:
            raise ValueError(
                f"{self.root / 'train'} has {len(classes)} class folders ({_names(classes)}) but "
                f"data.num_classes={self.num_classes}"
            )
        splits = {"val": self.root / "val"}
        if (self.root / "test").is_dir():
            splits["test"] = self.root / "test"
        for split, folder in splits.items():  # a label must mean the same class in every split
            other = class_folders(folder)
            missing, extra = sorted(set(classes) - set(other)), sorted(set(other) - set(classes))
            if missing or extra:
                raise ValueError(
                    f"{folder} and {self.root / 'train'} have different class folders: "
                    + "; ".join(f"{what} {split}/: {_names(names)}" for what, names in
                                (("missing from", missing), ("only in", extra)) if names))
        evaluation = dict(kw, allow_empty_classes=True)  # a class may have no images in a small val split
        val = ImageFolderDataset(splits["val"], self.transforms(train=False), classes=classes, **evaluation)
        test_root = splits.get("test", splits["val"])
        test = ImageFolderDataset(test_root, self.transforms(train=False), classes=classes, **evaluation)
        self._class_names = list(classes)
        return train, val, test


def _names(names: list[str], limit: int = 10) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


class FashionMNISTDataModule(ClassificationDataModule):
    """Fashion-MNIST from its original idx files in ``root`` (embedded in ``data/fashion-mnist``).

    The last ``val_size`` images of a fixed permutation of the 60k training set are held out for
    validation; the 10k official test set is the test split. ``train_subset`` trains on fewer images.
    """

    FILES = {
        "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
        "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
    }
    CLASSES = FASHION_MNIST_CLASSES

    def __init__(self, root: str, val_size: int = 5000, train_subset: int | None = None, split_seed: int = 0,
                 **kwargs):
        kwargs.setdefault("num_classes", 10)
        kwargs.setdefault("in_chans", 1)
        super().__init__(root, **kwargs)
        if self.num_classes != 10 or self.in_chans != 1:
            raise ValueError("Fashion-MNIST has 10 classes of grayscale images: num_classes=10, in_chans=1")
        self.val_size, self.train_subset, self.split_seed = val_size, train_subset, split_seed

    def _read(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        paths = [self.root / name for name in self.FILES[split]]
        missing = [str(p) for p in paths if not p.exists()]
        if missing:
            raise FileNotFoundError(
                f"Fashion-MNIST files not found: {', '.join(missing)}. The repository embeds them in "
                "data/fashion-mnist; otherwise take the four *-ubyte.gz files from Debian's "
                "dataset-fashion-mnist package (/usr/share/datasets/fashion-mnist) and set data.root to their folder."
            )
        images, labels = (read_idx(p) for p in paths)
        return images, labels

    def build_datasets(self):
        images, labels = self._read("train")
        order = np.random.default_rng(self.split_seed).permutation(len(labels))
        train_idx, val_idx = order[: len(order) - self.val_size], order[len(order) - self.val_size:]
        if self.train_subset:
            train_idx = train_idx[: self.train_subset]
        kw = dict(bad_samples=self.bad_samples)
        train = ArrayDataset(images[train_idx], labels[train_idx], self.transforms(train=True), **kw)
        val = ArrayDataset(images[val_idx], labels[val_idx], self.transforms(train=False), **kw)
        test = ArrayDataset(*self._read("test"), transform=self.transforms(train=False), **kw)
        self._class_names = list(self.CLASSES)
        return train, val, test


class MedMNISTDataModule(ClassificationDataModule):
    """MedMNIST ``root/<flag>[_<size>].npz`` with its own train/val/test splits, for ClassificationModule.

    3-D sets (``organmnist3d`` ...) give their ``D`` slices as channels (``in_chans = D``), so any 2-D
    backbone classifies them. ``train_subset`` trains on the first images only.
    """

    def __init__(self, root: str, flag: str, size: int | None = None, train_subset: int | None = None, **kwargs):
        super().__init__(root, **kwargs)
        self.flag, self.size, self.train_subset = flag, size, train_subset
        self.path = self.root / (f"{flag}.npz" if size in (None, 28) else f"{flag}_{size}.npz")

    def build_datasets(self):
        splits = read_medmnist(self.path)
        images, labels = splits["train"]
        channels = images.shape[-1] if images.ndim == 4 else 1
        if channels != self.in_chans:
            raise ValueError(f"{self.path}: images have {channels} channels (slices for 3-D sets) but "
                             f"data.in_chans={self.in_chans}")
        for split, (_, y) in splits.items():
            if y.min() < 0 or y.max() >= self.num_classes:
                raise ValueError(f"{self.path}: {split}_labels span {y.min()}..{y.max()} but "
                                 f"data.num_classes={self.num_classes}")
        if self.train_subset:
            images, labels = images[: self.train_subset], labels[: self.train_subset]
        return (ArrayDataset(images, labels, self.transforms(train=True)),
                ArrayDataset(*splits["val"], transform=self.transforms(train=False)),
                ArrayDataset(*splits["test"], transform=self.transforms(train=False)))
