"""Task heads on timm backbones: the segmentation decoders, WAU (window-attention upsampling) and DToP (a segmenter on a plain ViT)."""

from .dtop import VARIANTS as DTOP_VARIANTS
from .dtop import DToP, create_dtop
from .segmentation import HEADS, DToPSegmenter, FCNHead, SegmentationModel, create_segmentation_model
from .wau import WAUDecoder, WAUNet, create_wau_unet

__all__ = ["DTOP_VARIANTS", "HEADS", "DToP", "DToPSegmenter", "FCNHead", "SegmentationModel", "create_dtop",
           "create_segmentation_model", "WAUDecoder", "WAUNet", "create_wau_unet"]
