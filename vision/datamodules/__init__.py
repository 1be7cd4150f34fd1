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
from .medical import (
    DecathlonDataModule,
    InvalidCaseError,
    MaskFolderDataModule,
    MedMNISTDataModule,
    write_synthetic_decathlon,
    write_synthetic_masks,
)
from .scenes import make_fashion_scenes
from .transforms import EvalConfig, backbone_eval_config, build_transforms

__all__ = [
    "ArrayDataset",
    "BadSampleError",
    "BadSamples",
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
    "ResumableLoader",
    "ResumableSampler",
    "TransformedDataset",
    "backbone_eval_config",
    "build_transforms",
    "check_boxes",
    "check_mask",
    "make_fashion_scenes",
    "read_idx",
    "read_image",
    "write_synthetic_decathlon",
    "write_synthetic_masks",
]
