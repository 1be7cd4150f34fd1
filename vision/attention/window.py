"""Window attention module (Swin-style windows), on the ``[B, H, W, C]`` grid interface."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn

from kernels import swin_table_to_rpb, window_attention2d


class WindowAttention(nn.Module):
    """Multi-head attention inside non-overlapping (optionally shifted) windows.

    As the official Swin-family code does, sizes that are not multiples of the window are zero-padded
    at the bottom/right *before* the qkv projection (padded tokens are unmasked keys carrying the bias)
    and cropped after. ``rel_pos_bias`` adds Swin's learned table (``relative_position_bias_table``).
    """

    backend: str | None = None  # kernel backend override for this module; None follows kernels.use_backend

    def __init__(self, dim: int, num_heads: int, window_size: int = 7, shift_size: int = 0,
                 qkv_bias: bool = True, rel_pos_bias: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.window_size, self.shift_size = window_size, shift_size
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = None
        if rel_pos_bias:
            self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
            trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        pad_h, pad_w = -H % self.window_size, -W % self.window_size
        if pad_h or pad_w:
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        q, k, v = self.qkv(x).view(B, H + pad_h, W + pad_w, 3, self.num_heads, self.head_dim).unbind(3)
        table = self.relative_position_bias_table
        rpb = swin_table_to_rpb(table, self.window_size) if table is not None else None
        out = window_attention2d(q, k, v, self.window_size, self.shift_size, rpb=rpb, backend=self.backend)
        return self.proj(out.reshape(B, H + pad_h, W + pad_w, C)[:, :H, :W])
