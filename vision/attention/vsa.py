"""Varied-size window attention (VSA, Zhang et al. 2022), on the ``[B, H, W, C]`` grid interface.

Queries stay in the default ``ws x ws`` windows. For every window and head, a window regression module
(average pool over the window -> LeakyReLU -> linear) predicts an offset and a scale (x, y); keys and
values are resampled with ``grid_sample`` (bilinear, zeros outside, ``align_corners=True``) at

    centre + rel * (1 + scale) + offset      (in grid_sample units over the zero-padded map)

where ``rel`` are the window's token positions around its centre. Then ordinary window attention with
a Swin relative position bias table runs on (q, sampled k, sampled v) through
:func:`kernels.window_attention2d`, and the output is cropped and projected.

Conventions of the official classification code (ViTAE-VSA ``vitaev2_vsa/vsa.py``), kept here: the map
is zero-padded bottom/right to multiples of ``ws``; the offset predictor sees the padded input; q, k, v
come from the unpadded input and are zero-padded (padded keys/values are 0, not the bias); the x offset
is divided by ``W // ws`` and the y offset by ``H // ws`` with the *unpadded* sizes; the logit scale is
``(dim // num_heads) ** -0.5`` from the input width even when ``out_dim`` differs. Differences: any H x W
(the official layer fixes its size at construction and keeps CUDA-only coordinate tensors; here they
are computed per call on the input's device), a map narrower than one window divides its offset by 1
instead of 0, and the offset / scale predictors start at zero (default windows at initialisation, as the
paper intends; the official ``_reset_parameters`` is never called) unless ``zero_init_sampling=False``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn

from kernels import swin_table_to_rpb, window_attention2d

__all__ = ["VSAWindowAttention"]


def _axis_coords(length: int, padded: int, ws: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Window centres ``[n]`` and centred in-window offsets ``[ws]`` along one axis, in grid_sample
    units (align_corners=True) of a padded axis of ``padded`` pixels."""
    centres = torch.linspace(-1, 1, padded, device=device, dtype=dtype).view(-1, ws).mean(-1)
    rel = torch.arange(ws, device=device, dtype=dtype) * 2 / max(padded - 1, 1)
    return centres, rel - rel.mean()


class VSAWindowAttention(nn.Module):
    """VSA: ``[B, H, W, dim] -> [B, H, W, out_dim]``.

    Args:
        dim: input channels; out_dim: output channels (default ``dim``), split into ``num_heads`` heads.
        window_size: the default window ``ws`` (square).
        zero_init_sampling: start the offset / scale predictors at zero (False: PyTorch's default init,
            the official behaviour).
    """

    backend: str | None = None  # kernel backend override for this module; None follows kernels.use_backend

    def __init__(
        self,
        dim: int,
        num_heads: int,
        out_dim: int | None = None,
        window_size: int = 7,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        zero_init_sampling: bool = True,
    ):
        super().__init__()
        out_dim = out_dim or dim
        if out_dim % num_heads:
            raise ValueError(f"out_dim {out_dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim, self.out_dim = num_heads, out_dim // num_heads, out_dim
        self.window_size = window_size
        self.scale = qk_scale or (dim // num_heads) ** -0.5  # official: from the input width
        self.sampling_offsets = nn.Linear(dim, 2 * num_heads)
        self.sampling_scales = nn.Linear(dim, 2 * num_heads)
        self.qkv = nn.Linear(dim, 3 * out_dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(out_dim, out_dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        trunc_normal_(self.relative_position_bias_table, std=0.02)
        if zero_init_sampling:
            self.reset_sampling()

    def reset_sampling(self) -> None:
        """Zero offsets and scales: every head starts on the default windows."""
        for layer in (self.sampling_offsets, self.sampling_scales):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def sampling_grid(self, x: torch.Tensor) -> torch.Tensor:
        """Key/value sampling locations ``[B * heads, Hp, Wp, 2]`` (x, y) for the padded map of ``x``."""
        B, H, W, _ = x.shape
        ws, heads = self.window_size, self.num_heads
        pad_h, pad_w = -H % ws, -W % ws
        Hp, Wp = H + pad_h, W + pad_w
        pooled = F.avg_pool2d(F.pad(x.permute(0, 3, 1, 2), (0, pad_w, 0, pad_h)), ws)
        pooled = F.leaky_relu(pooled.permute(0, 2, 3, 1))  # [B, nh, nw, C]
        offsets = self.sampling_offsets(pooled).unflatten(-1, (heads, 2))  # [B, nh, nw, heads, (x, y)]
        scales = self.sampling_scales(pooled).unflatten(-1, (heads, 2))
        ox = offsets[..., 0] / max(W // ws, 1)
        oy = offsets[..., 1] / max(H // ws, 1)

        cy, ry = _axis_coords(H, Hp, ws, x.device, x.dtype)
        cx, rx = _axis_coords(W, Wp, ws, x.device, x.dtype)
        # [B, nh, nw, heads, ty, tx]: window centre + position in the window, rescaled, + offset
        gx = cx[None, None, :, None, None, None] + rx + rx * scales[..., 0, None, None] + ox[..., None, None]
        gy = cy[None, :, None, None, None, None] + ry[:, None] + ry[:, None] * scales[..., 1, None, None]
        gy = gy + oy[..., None, None]
        grid = torch.stack(torch.broadcast_tensors(gx, gy), dim=-1)
        # -> [B, heads, nh, ty, nw, tx, 2] -> [B * heads, Hp, Wp, 2]
        return grid.permute(0, 3, 1, 4, 2, 5, 6).reshape(B * heads, Hp, Wp, 2)

    @torch.no_grad()
    def attention_maps(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 1, H, W]``: how often the learned windows sample each position (all heads; the default
        windows sample every position once per head)."""
        B, H, W, _ = x.shape
        grid = self.sampling_grid(x).view(B, -1, 2)  # align_corners=True coordinates over the padded map
        Hp, Wp = H + -H % self.window_size, W + -W % self.window_size
        px = ((grid[..., 0] + 1) / 2 * (Wp - 1)).round().long()
        py = ((grid[..., 1] + 1) / 2 * (Hp - 1)).round().long()
        inside = (px >= 0) & (px < Wp) & (py >= 0) & (py < Hp)
        counts = x.new_zeros(B, Hp * Wp)
        counts.scatter_add_(1, (py * Wp + px).clamp(0, Hp * Wp - 1), inside.to(x.dtype))
        return counts.view(B, 1, Hp, Wp)[:, :, :H, :W]

    def forward(self, x: torch.Tensor, return_grid: bool = False):
        B, H, W, _ = x.shape
        ws, heads, d = self.window_size, self.num_heads, self.head_dim
        pad_h, pad_w = -H % ws, -W % ws
        Hp, Wp = H + pad_h, W + pad_w
        grid = self.sampling_grid(x)

        q, k, v = self.qkv(x).view(B, H, W, 3, heads, d).unbind(3)
        q = F.pad(q, (0, 0, 0, 0, 0, pad_w, 0, pad_h))
        kv = torch.cat([k, v], dim=-1).permute(0, 3, 4, 1, 2).reshape(B * heads, 2 * d, H, W)
        kv = F.pad(kv, (0, pad_w, 0, pad_h))  # padded keys and values are exactly zero
        kv = F.grid_sample(kv, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        k, v = kv.view(B, heads, 2 * d, Hp, Wp).permute(0, 3, 4, 1, 2).split(d, dim=-1)

        rpb = swin_table_to_rpb(self.relative_position_bias_table, ws)
        out = window_attention2d(
            q,
            k.contiguous(),
            v.contiguous(),
            ws,
            rpb=rpb,
            scale=self.scale,
            backend=self.backend,
            dropout_p=self.attn_drop if self.training else 0.0,
        )
        out = self.proj_drop(self.proj(out[:, :H, :W].reshape(B, H, W, self.out_dim)))
        return (out, grid) if return_grid else out


def official_vsa_to_ours(state_dict: dict, prefix: str = "") -> dict:
    """Official ``VSAWindowAttention`` keys (1x1 convs, NCHW) under ``prefix`` -> ours (linears):
    ``sampling_offsets.2`` / ``sampling_scales.2`` -> ``sampling_offsets`` / ``sampling_scales``; 1x1 conv
    weights flattened; the constant ``relative_position_index`` dropped."""
    out = {}
    for key, value in state_dict.items():
        if not key.startswith(prefix):
            out[key] = value
            continue
        name = key[len(prefix) :]
        if name == "relative_position_index":
            continue
        name = name.replace("sampling_offsets.2.", "sampling_offsets.").replace(
            "sampling_scales.2.", "sampling_scales."
        )
        if name.endswith("weight") and value.ndim == 4:
            value = value.flatten(1)
        out[prefix + name] = value
    return out
