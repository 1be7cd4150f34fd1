"""Lightning callbacks."""

from .attention_maps import AttentionMaps
from .detection_preview import DetectionPreview
from .keep_rate import KeepRateSchedule

__all__ = ["AttentionMaps", "DetectionPreview", "KeepRateSchedule"]
