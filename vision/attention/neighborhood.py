"""Neighborhood attention module (NAT / DiNAT), on the ``[B, H, W, C]`` grid interface."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn

from kernels import fit_dilation, neighborhood_attention2d, neighborhood_indices

from ._maps import probe_points


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

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """q, k, v ``[B, H', W', heads, d]`` of ``x`` padded to the smallest grid this layer runs on as
        configured (the policy may lower the dilation instead)."""
        B, H, W, C = x.shape
        min_side = self.kernel_size * (self.dilation if self.dilation_policy == "error" else 1)
        # sym_max, and always padding for symbolic sizes: one torch.export graph serves every input size
        pad_h, pad_w = torch.sym_max(0, min_side - H), torch.sym_max(0, min_side - W)
        if not (isinstance(pad_h, int) and isinstance(pad_w, int)) or pad_h or pad_w:
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        return self.qkv(x).view(B, H + pad_h, W + pad_w, 3, self.num_heads, self.head_dim).unbind(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        q, k, v = self._qkv(x)
        x = neighborhood_attention2d(
            q, k, v, self.kernel_size, self.dilation, rpb=self.rpb, scale=self.scale, backend=self.backend,
            dilation_policy=self.dilation_policy, dropout_p=self.attn_drop if self.training else 0.0,
        )
        x = x.reshape(B, *q.shape[1:3], C)[:, :H, :W]
        return self.proj_drop(self.proj(x))

    @torch.no_grad()
    def attention_maps(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]``: each probe query's attention over its window (mean over heads), zero elsewhere."""
        B, H, W, C = x.shape
        q, k, _ = self._qkv(x)
        Hp, Wp, ks = q.shape[1], q.shape[2], self.kernel_size
        dh, dw = fit_dilation((Hp, Wp), ks, self.dilation, self.dilation_policy)
        rows, cols = neighborhood_indices(Hp, ks, dh, x.device), neighborhood_indices(Wp, ks, dw, x.device)
        maps = x.new_zeros(B, 3, Hp, Wp)
        for n, (i, j) in enumerate(probe_points(H, W)):
            r, c = rows[i], cols[j]
            logits = torch.einsum("bhd,bxyhd->bhxy", q[:, i, j] * self.scale, k[:, r[:, None], c[None, :]])
            if self.rpb is not None:
                logits = logits + self.rpb[:, ((r - i) // dh + ks - 1)[:, None], ((c - j) // dw + ks - 1)[None, :]]
            attn = logits.flatten(2).softmax(-1).view_as(logits).mean(1)
            maps[:, n, r[:, None], c[None, :]] = attn
        return maps[:, :, :H, :W]

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, kernel_size={self.kernel_size}, dilation={self.dilation}, "
                f"rel_pos_bias={self.rpb is not None}, backend={self.backend!r}")
