"""Bi-level routing attention (BiFormer), on the ``[B, H, W, C]`` grid interface.

Reproduces the official legacy BRA (``ops/bra_legacy.py``) that the released checkpoints use:

1. the map is cut into ``n_win x n_win`` regions (a region *count* per side, not a region size);
2. region-level routing: mean-pooled q and k per region, logits ``(q_r * scale) @ k_r^T`` with
   ``scale = qk_dim ** -0.5`` (the full qk width, on purpose), top-k regions per query region,
   shared by all heads and computed without gradient;
3. token-level attention of every query in a region to all tokens of its routed regions;
4. LePE: a depthwise conv on v laid out as the whole map, added before the output projection.

Sizes not divisible by ``n_win`` are zero-padded at the bottom/right *before* the projection and
cropped after, as the official ``auto_pad`` does (padded tokens are ordinary, unmasked keys whose
q/k/v equal the projection bias); ``mask_padding=True`` instead keeps padded tokens out of the keys.

The token-level step is :func:`kernels.bilevel_routing_attention`: with ``backend="torch"`` it gathers the
routed keys and values of a bounded chunk of query regions at a time; the fused Triton kernels (picked by
``"auto"`` for CUDA tensors) read routed regions in place and never copy K/V.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels import bilevel_routing_attention

from ._maps import probe_points


def _to_regions(x: torch.Tensor, n: int) -> torch.Tensor:
    """``[B, H, W, C] -> [B, n*n, (H/n)*(W/n), C]``: regions row-major, pixels row-major inside."""
    B, H, W, C = x.shape
    x = x.view(B, n, H // n, n, W // n, C).transpose(2, 3)
    return x.reshape(B, n * n, (H // n) * (W // n), C)


class BiLevelRoutingAttention(nn.Module):
    """Bi-level routing attention (the official legacy variant with identity kv downsampling).

    Args:
        dim: channels of the input and of v.
        num_heads: heads of the token-level attention (each a contiguous channel slice).
        n_win: regions per side.
        qk_dim: width of q and k (default ``dim``).
        qk_scale: logit scale, default ``qk_dim ** -0.5``.
        topk: routed regions per query region (clamped to the number of regions).
        side_dwconv: LePE kernel size (0 disables LePE).
        mask_padding: mask padded tokens out of the keys instead of the official unmasked padding.
        max_chunk_elements: torch backend: bound on the gathered K/V and attention-matrix elements held at once
            (sets the chunk size).
    """

    backend: str | None = None  # kernel backend override for this module; None follows kernels.use_backend

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        n_win: int = 7,
        qk_dim: int | None = None,
        qk_scale: float | None = None,
        topk: int = 4,
        side_dwconv: int = 5,
        mask_padding: bool = False,
        max_chunk_elements: int = 2**24,
    ):
        super().__init__()
        self.dim, self.num_heads, self.n_win, self.topk = dim, num_heads, n_win, topk
        self.qk_dim = qk_dim or dim
        if self.qk_dim % num_heads or dim % num_heads:
            raise ValueError(f"qk_dim {self.qk_dim} and dim {dim} must be divisible by num_heads {num_heads}")
        self.scale = qk_scale or self.qk_dim**-0.5
        self.mask_padding, self.max_chunk_elements = mask_padding, max_chunk_elements
        self.qkv = nn.Linear(dim, 2 * self.qk_dim + dim)
        self.lepe = nn.Conv2d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim) if side_dwconv else None
        self.proj = nn.Linear(dim, dim)

    def route(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Top-k region indices ``[B, n², topk]`` (descending routing logit) from region-mean q and k."""
        with torch.no_grad():
            logits = (q.mean(2) * self.scale) @ k.mean(2).transpose(-1, -2)
            return logits.topk(min(self.topk, logits.shape[-1]), dim=-1).indices

    @torch.no_grad()
    def attention_maps(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]``: the regions routed to each probe query's region (1), others 0."""
        B, H, W, C = x.shape
        n = self.n_win
        x = F.pad(x, (0, 0, 0, -W % n, 0, -H % n))
        Hp, Wp = x.shape[1:3]
        q, k, _ = self.qkv(x).split([self.qk_dim, self.qk_dim, self.dim], dim=-1)
        index = self.route(_to_regions(q, n), _to_regions(k, n))  # [B, n², topk]
        maps = x.new_zeros(B, 3, n * n)
        for p, (i, j) in enumerate(probe_points(H, W)):
            maps[:, p].scatter_(1, index[:, (i // (Hp // n)) * n + j // (Wp // n)], 1.0)
        return F.interpolate(maps.view(B, 3, n, n), size=(Hp, Wp), mode="nearest")[:, :, :H, :W]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        n = self.n_win
        pad_h, pad_w = -H % n, -W % n
        if not (isinstance(H, int) and isinstance(W, int)) or pad_h or pad_w:  # symbolic (export): always pad
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        q, k, v = self.qkv(x).split([self.qk_dim, self.qk_dim, self.dim], dim=-1)
        index = self.route(_to_regions(q, n), _to_regions(k, n))

        heads = lambda t: t.unflatten(-1, (self.num_heads, -1))  # [B, Hp, Wp, heads, d]: views, no copy
        if self.mask_padding:  # the op sees the real tokens only and keeps the padding it adds out of the keys
            q, k, v_attn = (t[:, :H, :W] for t in (q, k, v))
        else:  # the official padding: padded tokens are ordinary keys carrying the projection bias
            v_attn = v
        out = bilevel_routing_attention(heads(q), heads(k), heads(v_attn), index, n, self.scale, self.mask_padding,
                                        self.backend, self.max_chunk_elements)
        out = out.flatten(-2)[:, :H, :W]
        if self.lepe is not None:  # LePE sees the padded map, as the official code does
            out = out + self.lepe(v.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)[:, :H, :W]
        return self.proj(out)


class AttentionLePE(nn.Module):
    """Global multi-head attention plus a depthwise-conv LePE of the *input* (BiFormer's last stage).

    As the official block builds it: ``num_heads`` 8, no qkv bias, scale ``(dim / num_heads) ** -0.5``.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, side_dwconv: int = 5):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.lepe = nn.Conv2d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        q, k, v = self.qkv(x).view(B, H * W, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale).transpose(1, 2).reshape(B, H, W, C)
        return self.proj(out + self.lepe(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))
