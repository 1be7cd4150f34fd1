"""Lightning callbacks."""

from .attention_maps import AttentionMaps
from .detection_preview import DetectionPreview
from .keep_rate import KeepRateSchedule
from .reliability import BadSampleCount, NonFiniteGuard, Preemption, ResumeState
from .run_record import RunRecord
from .segmentation_preview import SegmentationPreview
from .throughput import Throughput

__all__ = ["AttentionMaps", "BadSampleCount", "DetectionPreview", "KeepRateSchedule", "NonFiniteGuard", "Preemption",
           "ResumeState", "RunRecord", "SegmentationPreview", "Throughput"]
