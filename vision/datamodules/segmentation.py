"""Semantic segmentation datamodules: image/mask pairs in the ADE20K, Pascal VOC, Cityscapes and folder layouts.

Every layout reduces to a list of ``(image path, mask path)`` pairs (:func:`~vision.datamodules.readers.pair_folder`,
:func:`~vision.datamodules.readers.pair_list`) read by one :class:`~vision.datamodules.datasets.SegmentationDataset`;
every check on a sample lives in :func:`~vision.datamodules.readers.read_sample`. The augmentations are
:func:`~vision.datamodules.transforms.build_segmentation_transforms` (mmsegmentation's training pipeline).
"""

from __future__ import annotations

from pathlib import Path

import albumentations as A
import lightning as L
from torch.utils.data import Dataset, Subset

from .classes import (  # noqa: F401  (re-exported: the tables' former home)
    ADE20K_CLASSES,
    CITYSCAPES_CLASSES,
    CITYSCAPES_TRAIN_IDS,
    IGNORE_INDEX,
    SCENE_CLASSES,
    VOC_CLASSES,
)
from .datasets import BadSamples, SegmentationDataset, collate_segmentation
from .loaders import SplitLoaders
from .readers import (  # noqa: F401  (re-exported)
    SegmentationDataError,
    label_lookup,
    pair_folder,
    pair_list,
    read_sample,
)
from .synthetic import make_fashion_scenes
from .transforms import (  # noqa: F401  (re-exported)
    CatMaxRatioCrop,
    RandomRescale,
    backbone_eval_config,
    build_segmentation_transforms,
    fit_scale,
    photometric_distortion,
)


class SegmentationDataModule(SplitLoaders, L.LightningDataModule):
    """Shared loaders and transforms; subclasses list the ``(image, mask)`` pairs of each split.

    Args:
        root: the dataset folder. num_classes, in_chans: the dataset's. class_names: for the per-class table.
        crop_size, scale, ratio_range, cat_max_ratio, hflip, photometric: training augmentation (see
            :func:`build_segmentation_transforms`); ``scale: null`` skips the random rescale.
        eval_scale: evaluation images are rescaled to fit it; masks keep their original size. null: no resize.
        mean, std: normalisation; default the backbone's pretrained_cfg (``backbone``) or ImageNet's.
        reduce_zero_label: label 0 is "unlabelled" (ADE20K): it is ignored and the other ids shift down.
        label_map: stored id -> class id, applied first; unlisted ids are ignored (Cityscapes ``labelIds``).
        train_subset: train on the first N training pairs only.
        on_bad_sample: ``error`` (default: a bad sample stops with its file named) or ``skip`` (dropped, counted
            in :attr:`skipped`, logged as ``data/skipped``), the project-wide policy.
    """

    collate_fn = staticmethod(collate_segmentation)

    CLASS_NAMES: tuple[str, ...] = ()

    def __init__(
        self,
        root: str,
        num_classes: int,
        in_chans: int = 3,
        class_names: list[str] | None = None,
        crop_size: tuple[int, int] = (512, 512),
        scale: tuple[int, int] | None = (2048, 512),
        ratio_range: tuple[float, float] = (0.5, 2.0),
        cat_max_ratio: float = 0.75,
        hflip: float = 0.5,
        photometric: bool = True,
        eval_scale: tuple[int, int] | None = (2048, 512),
        reduce_zero_label: bool = False,
        label_map: dict[int, int] | None = None,
        ignore_index: int = IGNORE_INDEX,
        backbone: str | None = None,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        batch_size: int = 16,
        eval_batch_size: int | None = 1,
        num_workers: int = 4,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        train_subset: int | None = None,
        on_bad_sample: str = "error",
    ):
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.root = Path(root).expanduser()
        self.bad_samples = BadSamples(on_bad_sample)
        self.num_classes, self.in_chans, self.ignore_index = num_classes, in_chans, ignore_index
        names = tuple(class_names or self.CLASS_NAMES)
        self.class_names = (
            names if len(names) == num_classes else tuple(f"class_{i}" for i in range(num_classes))
        )
        config = backbone_eval_config(backbone, in_chans, mean=mean, std=std)
        self.mean, self.std = config.mean, config.std
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    def samples(self, split: str) -> list[tuple[Path, Path]]:
        """The ``(image, mask)`` pairs of ``split`` (``train``, ``val`` or ``test``)."""
        raise NotImplementedError

    def transforms(self, train: bool) -> A.Compose:
        hp = self.hparams
        return build_segmentation_transforms(
            train,
            self.mean,
            self.std,
            crop_size=tuple(hp.crop_size),
            scale=hp.scale and tuple(hp.scale),
            ratio_range=tuple(hp.ratio_range),
            cat_max_ratio=hp.cat_max_ratio,
            hflip=hp.hflip,
            photometric=hp.photometric,
            eval_scale=hp.eval_scale and tuple(hp.eval_scale),
            ignore_index=self.ignore_index,
        )

    def _dataset(self, split: str, train: bool) -> SegmentationDataset:
        return SegmentationDataset(
            self.samples(split),
            self.num_classes,
            self.transforms(train),
            self.in_chans,
            self.hparams.reduce_zero_label,
            self.ignore_index,
            self.bad_samples,
            self.hparams.label_map,
        )

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        self.train_set = self._dataset("train", train=True)
        if self.hparams.train_subset:
            self.train_set = Subset(
                self.train_set, range(min(self.hparams.train_subset, len(self.train_set)))
            )
        self.val_set = self._dataset("val", train=False)
        self.test_set = self._dataset("test", train=False)
        self.check_train_split()


class SegmentationFolderDataModule(SegmentationDataModule):
    """Images in ``root/<image_dir>/<split>/...`` and masks at the same relative paths under
    ``root/<mask_dir>/<split>/`` (the image's name, ``image_suffix`` or extension replaced by
    ``mask_suffix``).
    ``splits`` maps train/val/test to folder names; a missing test folder falls back to the val split."""

    def __init__(
        self,
        root: str,
        image_dir: str = "images",
        mask_dir: str = "masks",
        splits: dict[str, str] | None = None,
        image_suffix: str | None = None,
        mask_suffix: str = ".png",
        **kwargs,
    ):
        super().__init__(root, **kwargs)
        self.image_dir, self.mask_dir, self.image_suffix, self.mask_suffix = (
            image_dir,
            mask_dir,
            image_suffix,
            mask_suffix,
        )
        self.splits = {"train": "train", "val": "val", "test": "test", **(splits or {})}

    def samples(self, split: str) -> list[tuple[Path, Path]]:
        name = self.splits[split]
        if split == "test" and not (self.root / self.image_dir / name).is_dir():
            name = self.splits["val"]
        return pair_folder(
            self.root / self.image_dir / name,
            self.root / self.mask_dir / name,
            self.image_suffix,
            self.mask_suffix,
        )


class ADE20KDataModule(SegmentationFolderDataModule):
    """ADEChallengeData2016: ``images/{training,validation}/*.jpg``,
    ``annotations/{training,validation}/*.png``
    (0 = other, ignored; 150 classes). The validation split is also the test split."""

    CLASS_NAMES = ADE20K_CLASSES

    def __init__(self, root: str, **kwargs):
        kwargs.setdefault("num_classes", 150)
        kwargs.setdefault("reduce_zero_label", True)
        super().__init__(
            root,
            image_dir="images",
            mask_dir="annotations",
            splits={"train": "training", "val": "validation", "test": "validation"},
            **kwargs,
        )

    def samples(self, split: str) -> list[tuple[Path, Path]]:
        if not (self.root / "images" / "training").is_dir():
            raise FileNotFoundError(
                f"data.root={self.root} is not the ADE20K (ADEChallengeData2016) folder: expected "
                "images/{training,validation}/*.jpg and annotations/{training,validation}/*.png. Download "
                "ADEChallengeData2016.zip from the MIT Scene Parsing benchmark (http://sceneparsing.csail.mit.edu), "
                "unzip it and set data.root to the ADEChallengeData2016 folder (data/README.md)")
        return super().samples(split)


class CityscapesDataModule(SegmentationFolderDataModule):
    """Cityscapes: ``leftImg8bit/<split>/<city>/*_leftImg8bit.png`` with ``gtFine/<split>/<city>/`` masks.
    ``labels="trainIds"`` reads ``*_gtFine_labelTrainIds.png`` (19 train ids, 255 ignored; made by
    cityscapesscripts' createTrainIdLabelImgs); ``labels="labelIds"`` reads the archive's own
    ``*_gtFine_labelIds.png`` and maps them to the train ids on the fly (:data:`CITYSCAPES_TRAIN_IDS`).
    The val split is also the test split (test labels are not public)."""

    CLASS_NAMES = CITYSCAPES_CLASSES
    MASK_SUFFIXES = {"trainIds": "_gtFine_labelTrainIds.png", "labelIds": "_gtFine_labelIds.png"}

    def __init__(self, root: str, labels: str = "trainIds", **kwargs):
        if labels not in self.MASK_SUFFIXES:
            raise ValueError(f"data.labels={labels!r}: expected one of {list(self.MASK_SUFFIXES)}")
        kwargs.setdefault("num_classes", 19)
        if labels == "labelIds":
            kwargs["label_map"] = CITYSCAPES_TRAIN_IDS
        super().__init__(
            root,
            image_dir="leftImg8bit",
            mask_dir="gtFine",
            splits={"train": "train", "val": "val", "test": "val"},
            image_suffix="_leftImg8bit.png",
            mask_suffix=self.MASK_SUFFIXES[labels],
            **kwargs,
        )


class VOCDataModule(SegmentationDataModule):
    """Pascal VOC 2012: ``JPEGImages/<id>.jpg``, masks ``<mask_dir>/<id>.png`` (palette PNGs read as ids;
    255 = object boundary, ignored), split lists ``ImageSets/Segmentation/<split>.txt``. With SBD's extra
    annotations converted into ``SegmentationClassAug`` set ``mask_dir: SegmentationClassAug`` and
    ``splits.train: trainaug`` (the usual 10,582-image set)."""

    CLASS_NAMES = VOC_CLASSES

    def __init__(
        self,
        root: str,
        mask_dir: str = "SegmentationClass",
        splits: dict[str, str] | None = None,
        list_dir: str = "ImageSets/Segmentation",
        **kwargs,
    ):
        kwargs.setdefault("num_classes", 21)
        super().__init__(root, **kwargs)
        self.mask_dir, self.list_dir = mask_dir, list_dir
        self.splits = {"train": "train", "val": "val", "test": "val", **(splits or {})}

    def samples(self, split: str) -> list[tuple[Path, Path]]:
        return pair_list(
            self.root / self.list_dir / f"{self.splits[split]}.txt",
            self.root / "JPEGImages",
            self.root / self.mask_dir,
        )


class FashionScenesSegmentationDataModule(SegmentationFolderDataModule):
    """The embedded default: Fashion-MNIST scenes (:func:`make_fashion_scenes`, 0 background + 10 garment
    classes), generated once into ``root`` by ``prepare_data`` from the idx files in ``fashion_root``."""

    CLASS_NAMES = SCENE_CLASSES

    def __init__(
        self,
        root: str,
        fashion_root: str,
        scene_splits: dict[str, int] | None = None,
        canvas: int = 128,
        items: tuple[int, int] = (2, 5),
        size: tuple[int, int] = (28, 64),
        seed: int = 0,
        max_box_iou: float = 0.5,
        max_hidden: float = 0.4,
        **kwargs,
    ):
        kwargs.setdefault("num_classes", len(SCENE_CLASSES))
        super().__init__(root, **kwargs)
        if self.num_classes != len(SCENE_CLASSES):
            raise ValueError(
                f"Fashion-MNIST scenes have {len(SCENE_CLASSES)} classes (background + 10); "
                f"got num_classes={self.num_classes}"
            )
        self.scene_args = dict(
            fashion_root=Path(fashion_root).expanduser(),
            splits=dict(scene_splits or {"train": 2000, "val": 200, "test": 200}),
            canvas=canvas,
            items=tuple(items),
            size=tuple(size),
            seed=seed,
            max_box_iou=max_box_iou,
            max_hidden=max_hidden,
        )

    def prepare_data(self) -> None:
        make_fashion_scenes(self.root, **self.scene_args)

    def setup(self, stage: str | None = None) -> None:
        self.prepare_data()  # idempotent (a cache keyed by the parameters); covers setup without prepare_data
        super().setup(stage)
