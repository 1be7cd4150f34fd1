"""Task networks beyond timm backbones: the segmentation decoders, DToP (a segmenter on a plain ViT) and
NATUNet3D (a 3-D neighborhood-attention U-Net for volumes); :mod:`.nat_unet3d` is imported where used."""

from .dtop import VARIANTS as DTOP_VARIANTS
from .dtop import DToP, create_dtop
from .segmentation import HEADS, DToPSegmenter, FCNHead, SegmentationModel, create_segmentation_model

__all__ = ["DTOP_VARIANTS", "HEADS", "DToP", "DToPSegmenter", "FCNHead", "SegmentationModel", "create_dtop",
           "create_segmentation_model"]
