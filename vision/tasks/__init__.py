"""LightningModules. They ask timm for backbones by name and never import a model class."""

from .classification import ClassificationModule

__all__ = ["ClassificationModule"]
