"""LightningDataModules, dataset readers and albumentations transforms."""

from .classification import ClassificationDataModule, FashionMNISTDataModule, ImageFolderDataModule
from .datasets import ArrayDataset, CorruptImageError, ImageFolderDataset, read_idx
from .scenes import make_fashion_scenes
from .medical import (
    DecathlonDataModule,
    InvalidCaseError,
    MaskFolderDataModule,
    MedMNISTDataModule,
    write_synthetic_decathlon,
    write_synthetic_masks,
)
from .transforms import EvalConfig, backbone_eval_config, build_transforms

__all__ = [
    "ArrayDataset",
    "ClassificationDataModule",
    "CorruptImageError",
    "DecathlonDataModule",
    "EvalConfig",
    "FashionMNISTDataModule",
    "ImageFolderDataModule",
    "ImageFolderDataset",
    "InvalidCaseError",
    "MaskFolderDataModule",
    "MedMNISTDataModule",
    "backbone_eval_config",
    "build_transforms",
    "make_fashion_scenes",
    "read_idx",
    "write_synthetic_decathlon",
    "write_synthetic_masks",
]
