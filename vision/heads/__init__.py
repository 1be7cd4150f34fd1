"""Task heads on timm backbones: the segmentation decoders and DToP (a segmenter on a plain ViT)."""

from .dtop import VARIANTS as DTOP_VARIANTS
from .dtop import DToP, create_dtop
from .segmentation import HEADS, DToPSegmenter, FCNHead, SegmentationModel, create_segmentation_model

__all__ = ["DTOP_VARIANTS", "HEADS", "DToP", "DToPSegmenter", "FCNHead", "SegmentationModel", "create_dtop",
           "create_segmentation_model"]
