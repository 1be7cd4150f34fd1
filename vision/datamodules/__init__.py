"""LightningDataModules, dataset readers and albumentations transforms."""

from .classification import ClassificationDataModule, FashionMNISTDataModule, ImageFolderDataModule
from .datasets import ArrayDataset, CorruptImageError, ImageFolderDataset, read_idx
from .scenes import make_fashion_scenes
from .transforms import EvalConfig, backbone_eval_config, build_transforms

__all__ = [
    "ArrayDataset",
    "ClassificationDataModule",
    "CorruptImageError",
    "EvalConfig",
    "FashionMNISTDataModule",
    "ImageFolderDataModule",
    "ImageFolderDataset",
    "backbone_eval_config",
    "build_transforms",
    "make_fashion_scenes",
    "read_idx",
]
