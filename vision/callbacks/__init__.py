"""Lightning callbacks."""

from .attention_maps import AttentionMaps

__all__ = ["AttentionMaps"]
