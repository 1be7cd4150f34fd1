"""Task networks beyond timm backbones: the segmentation decoders, WAU (window-attention upsampling), DToP (a
segmenter on a plain ViT), NATUNet3D (a 3-D neighborhood-attention U-Net for volumes) and AttentionUNet3D (an
attention-gated 3-D U-Net); :mod:`.nat_unet3d` and :mod:`.attention_unet3d` are imported where used."""

from .dtop import VARIANTS as DTOP_VARIANTS
from .dtop import DToP, create_dtop
from .segmentation import HEADS, DToPSegmenter, FCNHead, SegmentationModel, create_segmentation_model
from .wau import WAUDecoder, WAUNet, create_wau_unet

__all__ = ["DTOP_VARIANTS", "HEADS", "DToP", "DToPSegmenter", "FCNHead", "SegmentationModel", "create_dtop",
           "create_segmentation_model", "WAUDecoder", "WAUNet", "create_wau_unet"]
