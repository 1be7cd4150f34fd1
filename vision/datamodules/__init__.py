"""Data, by concern: ``readers`` (files -> checked arrays, layouts), ``datasets`` (samples through seeded
transforms, collate functions), ``transforms`` (augmentation pipelines), ``synthetic`` (the offline sets),
``classes`` (label tables), ``loaders`` (resumable loaders shared by every datamodule), and one datamodule file
per task (``classification``, ``detection``, ``segmentation``, ``medical``)."""

from .classification import (
    ClassificationDataModule,
    FashionMNISTDataModule,
    ImageFolderDataModule,
    MedMNISTDataModule,
)
from .datasets import ArrayDataset, BadSamples, ImageFolderDataset, SegmentationDataset, TransformedDataset
from .detection import (
    AnnotationError,
    CocoDetection,
    CocoDetectionDataModule,
    FashionScenesDetectionDataModule,
    collate_detection,
    read_coco,
)
from .loaders import ResumableLoader, ResumableSampler
from .medical import DecathlonDataModule, MaskFolderDataModule
from .readers import (
    BadSampleError,
    CorruptImageError,
    InvalidCaseError,
    SegmentationDataError,
    check_boxes,
    check_mask,
    read_idx,
    read_image,
)
from .segmentation import (
    ADE20KDataModule,
    CityscapesDataModule,
    FashionScenesSegmentationDataModule,
    SegmentationDataModule,
    SegmentationFolderDataModule,
    VOCDataModule,
)
from .synthetic import make_fashion_scenes, write_synthetic_decathlon, write_synthetic_masks
from .transforms import EvalConfig, backbone_eval_config, build_transforms

__all__ = [
    "ADE20KDataModule",
    "AnnotationError",
    "ArrayDataset",
    "BadSampleError",
    "BadSamples",
    "CityscapesDataModule",
    "ClassificationDataModule",
    "CocoDetection",
    "CocoDetectionDataModule",
    "CorruptImageError",
    "DecathlonDataModule",
    "EvalConfig",
    "FashionMNISTDataModule",
    "FashionScenesDetectionDataModule",
    "FashionScenesSegmentationDataModule",
    "ImageFolderDataModule",
    "ImageFolderDataset",
    "InvalidCaseError",
    "MaskFolderDataModule",
    "MedMNISTDataModule",
    "ResumableLoader",
    "ResumableSampler",
    "SegmentationDataError",
    "SegmentationDataModule",
    "SegmentationDataset",
    "SegmentationFolderDataModule",
    "TransformedDataset",
    "VOCDataModule",
    "backbone_eval_config",
    "build_transforms",
    "check_boxes",
    "check_mask",
    "collate_detection",
    "make_fashion_scenes",
    "read_coco",
    "read_idx",
    "read_image",
    "write_synthetic_decathlon",
    "write_synthetic_masks",
]
