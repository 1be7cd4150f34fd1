"""HiLo attention (LITv2), on the ``[B, H, W, C]`` grid interface.

Heads are split by ``alpha``: ``int(num_heads * alpha)`` Lo-Fi heads attend globally to keys and values
computed from the ``s x s`` average-pooled map; the other (Hi-Fi) heads attend inside non-overlapping
``s x s`` windows. Each branch has its own output projection and the outputs are concatenated as
``[Hi-Fi | Lo-Fi]`` channels. ``window_size == 1`` makes every head Lo-Fi (plain global attention).
Any H x W: the map is zero-padded bottom/right to multiples of ``s`` before both branches and cropped
after, as the official detection backbone does (padded tokens are unmasked).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels import window_attention2d


class HiLoAttention(nn.Module):
    backend: str | None = None  # kernel backend override for this module; None follows kernels.use_backend

    def __init__(self, dim: int, num_heads: int = 8, window_size: int = 2, alpha: float = 0.9,
                 qkv_bias: bool = True, qk_scale: float | None = None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.head_dim = dim // num_heads
        self.window_size = window_size
        self.l_heads = num_heads if window_size == 1 else int(num_heads * alpha)
        self.h_heads = num_heads - self.l_heads
        self.l_dim, self.h_dim = self.l_heads * self.head_dim, self.h_heads * self.head_dim
        self.scale = qk_scale or self.head_dim**-0.5
        if self.l_heads:
            self.l_q = nn.Linear(dim, self.l_dim, bias=qkv_bias)
            self.l_kv = nn.Linear(dim, 2 * self.l_dim, bias=qkv_bias)
            self.l_proj = nn.Linear(self.l_dim, self.l_dim)
        if self.h_heads:
            self.h_qkv = nn.Linear(dim, 3 * self.h_dim, bias=qkv_bias)
            self.h_proj = nn.Linear(self.h_dim, self.h_dim)

    def hifi(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, _ = x.shape
        q, k, v = self.h_qkv(x).view(B, H, W, 3, self.h_heads, self.head_dim).unbind(3)
        out = window_attention2d(q, k, v, self.window_size, scale=self.scale, backend=self.backend)
        return self.h_proj(out.reshape(B, H, W, self.h_dim))

    def lofi(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        q = self.l_q(x).view(B, H * W, self.l_heads, self.head_dim).transpose(1, 2)
        pooled = x
        if self.window_size > 1:
            pooled = F.avg_pool2d(x.permute(0, 3, 1, 2), self.window_size).permute(0, 2, 3, 1)
        k, v = self.l_kv(pooled).view(B, -1, 2, self.l_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.l_proj(out.transpose(1, 2).reshape(B, H, W, self.l_dim))

    @torch.no_grad()
    def attention_maps(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, branches, H, W]``: the per-token output norm of the Hi-Fi (local windows) and Lo-Fi
        (pooled global) branches, in that order (a branch with no heads is left out)."""
        _, H, W, _ = x.shape
        s = self.window_size
        x = F.pad(x, (0, 0, 0, -W % s, 0, -H % s))
        branches = ([self.hifi(x)] if self.h_heads else []) + ([self.lofi(x)] if self.l_heads else [])
        return torch.stack([b.norm(dim=-1) for b in branches], dim=1)[:, :, :H, :W]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, H, W, _ = x.shape
        s = self.window_size
        pad_h, pad_w = -H % s, -W % s
        if pad_h or pad_w:
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        branches = ([self.hifi(x)] if self.h_heads else []) + ([self.lofi(x)] if self.l_heads else [])
        return torch.cat(branches, dim=-1)[:, :H, :W]
