"""Lightning callbacks."""

from .attention_maps import AttentionMaps
from .keep_rate import KeepRateSchedule
from .segmentation_preview import SegmentationPreview

__all__ = ["AttentionMaps", "KeepRateSchedule"]
__all__ += ["SegmentationPreview"]
