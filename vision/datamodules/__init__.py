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
from .detection import (
    AnnotationError,
    CocoDetection,
    CocoDetectionDataModule,
    FashionScenesDetectionDataModule,
    collate_detection,
    read_coco,
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
from .segmentation import (
    ADE20KDataModule,
    CityscapesDataModule,
    FashionScenesSegmentationDataModule,
    SegmentationDataError,
    SegmentationDataModule,
    SegmentationDataset,
    SegmentationFolderDataModule,
    VOCDataModule,
)
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
