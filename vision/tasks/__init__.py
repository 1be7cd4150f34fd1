"""LightningModules. They ask timm for backbones by name and never import a model class."""

from .classification import ClassificationModule
from .detection import DetectionModule
from .medical import MedicalSegmentationModule
from .segmentation import SegmentationModule, create_segmentation_model

__all__ = ["ClassificationModule", "DetectionModule", "MedicalSegmentationModule", "SegmentationModule",
           "create_segmentation_model"]
