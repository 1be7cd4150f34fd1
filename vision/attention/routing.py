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

The gathered keys and values of all query regions are never built in one piece: query regions are
processed in chunks of bounded size (each chunk checkpointed under autograd, so training memory is
bounded too); a fused kernel that reads routed regions in place is a separate piece of work.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ._maps import probe_points


def _to_regions(x: torch.Tensor, n: int) -> torch.Tensor:
    """``[B, H, W, C] -> [B, n*n, (H/n)*(W/n), C]``: regions row-major, pixels row-major inside."""
    B, H, W, C = x.shape
    x = x.view(B, n, H // n, n, W // n, C).transpose(2, 3)
    return x.reshape(B, n * n, (H // n) * (W // n), C)


def _from_regions(x: torch.Tensor, n: int, H: int, W: int) -> torch.Tensor:
    B, _, _, C = x.shape
    return x.view(B, n, n, H // n, W // n, C).transpose(2, 3).reshape(B, H, W, C)


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
        max_chunk_elements: bound on the gathered K/V elements held at once (sets the chunk size).
    """

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

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor,
                key_valid: torch.Tensor | None) -> torch.Tensor:
        """Token attention for a chunk of query regions: q ``[B, c, P, qk]``, index ``[B, c, topk]``."""
        B, c, P, _ = q.shape
        heads = self.num_heads
        batch = torch.arange(B, device=q.device)[:, None, None]
        ks = k[batch, index].flatten(2, 3)  # [B, c, topk*P, qk]: the routed regions' keys
        vs = v[batch, index].flatten(2, 3)
        split = lambda t: t.unflatten(-1, (heads, -1)).transpose(2, 3).flatten(0, 1)  # [B*c, heads, L, d]
        mask = None
        if key_valid is not None:
            mask = key_valid[index].flatten(-2)[:, :, None, None, :].flatten(0, 1)  # [B*c, 1, 1, topk*P]
        out = F.scaled_dot_product_attention(split(q), split(ks), split(vs), attn_mask=mask, scale=self.scale)
        return out.unflatten(0, (B, c)).transpose(2, 3).flatten(-2)  # [B, c, P, dim]

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
        if pad_h or pad_w:
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        Hp, Wp = H + pad_h, W + pad_w
        q, k, v = self.qkv(x).split([self.qk_dim, self.qk_dim, self.dim], dim=-1)
        qr, kr, vr = (_to_regions(t, n) for t in (q, k, v))
        index = self.route(qr, kr)

        key_valid = None
        if self.mask_padding and (pad_h or pad_w):
            valid = torch.zeros(1, Hp, Wp, 1, dtype=torch.bool, device=x.device)
            valid[:, :H, :W] = True
            key_valid = _to_regions(valid, n)[0, :, :, 0]  # [n², P]

        regions, P = qr.shape[1], qr.shape[2]
        per_region = B * index.shape[-1] * P * (self.qk_dim + self.dim)  # gathered K/V elements per query region
        chunk = max(1, min(regions, self.max_chunk_elements // max(1, per_region)))
        outs = []
        for start in range(0, regions, chunk):
            args = (qr[:, start:start + chunk], kr, vr, index[:, start:start + chunk], key_valid)
            if chunk < regions and torch.is_grad_enabled() and x.requires_grad:
                outs.append(checkpoint(self._attend, *args, use_reentrant=False))  # keep only this chunk's output
            else:
                outs.append(self._attend(*args))
        out = _from_regions(torch.cat(outs, dim=1), n, Hp, Wp)

        if self.lepe is not None:
            out = out + self.lepe(v.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.proj(out)[:, :H, :W]


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
