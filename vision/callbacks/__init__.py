"""Lightning callbacks."""

from .attention_maps import AttentionMaps
from .keep_rate import KeepRateSchedule

__all__ = ["AttentionMaps", "KeepRateSchedule"]
