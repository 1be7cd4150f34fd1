"""LightningDataModules, dataset readers and albumentations transforms."""

from .classification import ClassificationDataModule, FashionMNISTDataModule, ImageFolderDataModule
from .datasets import (
    ArrayDataset,
    BadSampleError,
    BadSamples,
    CorruptImageError,
    ImageFolderDataset,
    TransformedDataset,
    check_boxes,
    check_mask,
    read_idx,
    read_image,
)
from .loaders import ResumableLoader, ResumableSampler
from .transforms import EvalConfig, backbone_eval_config, build_transforms

__all__ = [
    "ArrayDataset",
    "BadSampleError",
    "BadSamples",
    "ClassificationDataModule",
    "CorruptImageError",
    "EvalConfig",
    "FashionMNISTDataModule",
    "ImageFolderDataModule",
    "ImageFolderDataset",
    "ResumableLoader",
    "ResumableSampler",
    "TransformedDataset",
    "backbone_eval_config",
    "build_transforms",
    "check_boxes",
    "check_mask",
    "read_idx",
    "read_image",
]
