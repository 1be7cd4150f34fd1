"""LightningDataModules, dataset readers and albumentations transforms."""

from .classification import ClassificationDataModule, FashionMNISTDataModule, ImageFolderDataModule
from .datasets import ArrayDataset, CorruptImageError, ImageFolderDataset, read_idx
from .scenes import make_fashion_scenes
from .segmentation import (
    ADE20KDataModule,
    CityscapesDataModule,
    FashionScenesDataModule,
    SegmentationDataError,
    SegmentationDataModule,
    SegmentationDataset,
    SegmentationFolderDataModule,
    VOCDataModule,
)
from .transforms import EvalConfig, backbone_eval_config, build_transforms

__all__ = [
    "ADE20KDataModule",
    "ArrayDataset",
    "CityscapesDataModule",
    "ClassificationDataModule",
    "CorruptImageError",
    "EvalConfig",
    "FashionMNISTDataModule",
    "FashionScenesDataModule",
    "ImageFolderDataModule",
    "ImageFolderDataset",
    "SegmentationDataError",
    "SegmentationDataModule",
    "SegmentationDataset",
    "SegmentationFolderDataModule",
    "VOCDataModule",
    "backbone_eval_config",
    "build_transforms",
    "make_fashion_scenes",
    "read_idx",
]
