"""Neighborhood attention module (NAT / DiNAT), on the ``[B, H, W, C]`` grid interface."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn

from kernels import neighborhood_attention2d


class NeighborhoodAttention2D(nn.Module):
    """Multi-head neighborhood attention with a learned relative position bias.

    Parameter names follow NATTEN's module (``qkv``, ``rpb``, ``proj``), so official NAT/DiNAT
    weights load unchanged. Inputs smaller than ``kernel_size * dilation`` are zero-padded at the
    bottom/right before the projection and cropped after, as the official models do; with
    ``dilation_policy="reduce"`` the dilation is lowered instead where the input is too small for it.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        kernel_size: int = 7,
        dilation: int = 1,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        rel_pos_bias: bool = True,
        dilation_policy: str = "error",
        backend: str = "auto",
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.kernel_size, self.dilation = kernel_size, dilation
        self.scale = qk_scale or self.head_dim**-0.5
        self.dilation_policy, self.backend = dilation_policy, backend
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.rpb = nn.Parameter(torch.zeros(num_heads, 2 * kernel_size - 1, 2 * kernel_size - 1)) if rel_pos_bias else None
        if self.rpb is not None:
            trunc_normal_(self.rpb, std=0.02, mean=0.0, a=-2.0, b=2.0)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        # the smallest grid this layer runs on as configured (the policy may lower the dilation instead)
        min_side = self.kernel_size * (self.dilation if self.dilation_policy == "error" else 1)
        pad_h, pad_w = max(0, min_side - H), max(0, min_side - W)
        if pad_h or pad_w:
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        q, k, v = self.qkv(x).view(B, H + pad_h, W + pad_w, 3, self.num_heads, self.head_dim).unbind(3)
        x = neighborhood_attention2d(
            q, k, v, self.kernel_size, self.dilation, rpb=self.rpb, scale=self.scale, backend=self.backend,
            dilation_policy=self.dilation_policy, dropout_p=self.attn_drop if self.training else 0.0,
        )
        x = x.reshape(B, H + pad_h, W + pad_w, C)[:, :H, :W]
        return self.proj_drop(self.proj(x))

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, kernel_size={self.kernel_size}, dilation={self.dilation}, "
                f"rel_pos_bias={self.rpb is not None}, backend={self.backend!r}")
