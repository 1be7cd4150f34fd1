"""Shared pieces of the modules' ``attention_maps`` (what the attention-map callback draws)."""

from __future__ import annotations


def probe_points(H: int, W: int) -> list[tuple[int, int]]:
    """Query positions whose attention is drawn: the centre, the top-left corner, the middle of the right edge
    (borders are where neighborhoods shift and windows pad)."""
    return [(H // 2, W // 2), (0, 0), (H // 2, W - 1)]
