"""LightningModules. They ask timm for backbones by name and never import a model class."""

from .classification import ClassificationModule
from .medical import MedicalSegmentationModule

__all__ = ["ClassificationModule", "MedicalSegmentationModule"]
