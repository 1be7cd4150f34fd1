"""Lightning callbacks."""

from .attention_maps import AttentionMaps
from .keep_rate import KeepRateSchedule
from .reliability import BadSampleCount, NonFiniteGuard, Preemption, ResumeState

__all__ = ["AttentionMaps", "BadSampleCount", "KeepRateSchedule", "NonFiniteGuard", "Preemption", "ResumeState"]
