"""LightningModules. They ask timm for backbones by name and never import a model class."""

from .classification import ClassificationModule
from .detection import DetectionModule

__all__ = ["ClassificationModule", "DetectionModule"]
