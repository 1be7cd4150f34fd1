"""Efficient vision attention backbones (timm-registered) and Lightning tasks.

Importing ``vision`` registers every backbone family with timm, so
``timm.create_model("nat_mini")`` works after ``import vision``.
"""

from . import models  # noqa: F401  (registers the model families with timm)
from .models import create_model, list_models

__all__ = ["create_model", "list_models"]
__version__ = "0.1.0"
