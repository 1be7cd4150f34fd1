"""Argument checks shared by the functional attention ops."""

from __future__ import annotations

import torch


def pair(value) -> tuple[int, int]:
    """An int or a ``(height, width)`` pair, as a pair."""
    return (value, value) if isinstance(value, int) else tuple(value)


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str) -> None:
    """q, k, v share one ``[B, H, W, heads, D]`` shape, and the backend exists."""
    if q.ndim != 5 or q.shape != k.shape or k.shape != v.shape:
        raise ValueError(f"q, k, v must share one [B, H, W, heads, D] shape; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if backend not in ("auto", "torch"):
        raise ValueError(f"backend={backend!r}: only 'auto' and 'torch' are available")
