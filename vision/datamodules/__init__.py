"""LightningDataModules, dataset readers and albumentations transforms."""

from .classification import ClassificationDataModule, FashionMNISTDataModule, ImageFolderDataModule
from .datasets import ArrayDataset, CorruptImageError, ImageFolderDataset, read_idx
from .detection import (
    AnnotationError,
    CocoDetection,
    CocoDetectionDataModule,
    FashionScenesDetectionDataModule,
    collate_detection,
    read_coco,
)
from .scenes import make_fashion_scenes
from .transforms import EvalConfig, backbone_eval_config, build_transforms

__all__ = [
    "AnnotationError",
    "ArrayDataset",
    "ClassificationDataModule",
    "CocoDetection",
    "CocoDetectionDataModule",
    "CorruptImageError",
    "EvalConfig",
    "FashionMNISTDataModule",
    "FashionScenesDetectionDataModule",
    "ImageFolderDataModule",
    "ImageFolderDataset",
    "backbone_eval_config",
    "build_transforms",
    "collate_detection",
    "make_fashion_scenes",
    "read_coco",
    "read_idx",
]
