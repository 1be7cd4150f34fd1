"""Neighborhood attention module (NAT / DiNAT), on the ``[B, H, W, C]`` grid interface."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn

from kernels import fit_dilation, neighborhood_attention, neighborhood_indices
from kernels.neighborhood import _per_axis

from ._maps import probe_points


class _NeighborhoodAttention(nn.Module):
    """Multi-head neighborhood attention over an ``n``-D token grid ``[B, *spatial, C]`` (``n`` = ``RANK``).

    Parameter names follow NATTEN's modules (``qkv``, ``rpb``, ``proj``), so official NAT/DiNAT weights load
    unchanged. ``kernel_size``, ``stride``, ``dilation`` and ``is_causal`` are one value or one per axis
    (semantics of :func:`kernels.neighborhood_attention`); ``rel_pos_bias`` adds NAT's learned bias
    ``[heads, 2k-1, ...]``. Inputs smaller than ``kernel_size * dilation`` are zero-padded at the end of each
    axis before the projection and cropped after, as the official models do; with
    ``dilation_policy="reduce"`` the dilation is lowered instead where the input is too small for it.
    """

    RANK = 2
    backend: str | None = None  # kernel backend override for this module; None follows kernels.use_backend

    def __init__(
        self,
        dim: int,
        num_heads: int,
        kernel_size=7,
        dilation=1,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        rel_pos_bias: bool = True,
        dilation_policy: str = "error",
        *,
        stride=1,
        is_causal=False,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        n = self.RANK
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.kernel_size, self.dilation, self.stride, self.is_causal = kernel_size, dilation, stride, is_causal
        self._kernel = _per_axis(kernel_size, n, "kernel_size")
        self._dilation = _per_axis(dilation, n, "dilation")
        self.scale = qk_scale or self.head_dim**-0.5
        self.dilation_policy = dilation_policy
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.rpb = nn.Parameter(torch.zeros(num_heads, *[2 * k - 1 for k in self._kernel])) if rel_pos_bias else None
        if self.rpb is not None:
            trunc_normal_(self.rpb, std=0.02, mean=0.0, a=-2.0, b=2.0)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """q, k, v ``[B, *spatial', heads, d]`` of ``x`` padded to the smallest grid this layer runs on as
        configured (the policy may lower the dilation instead)."""
        if x.ndim != self.RANK + 2:
            raise ValueError(f"{type(self).__name__} expects [B, {self.RANK} spatial axes, C]; got {tuple(x.shape)}")
        B, *size, C = x.shape
        keep = self.dilation_policy == "error"
        # sym_max, and always padding for symbolic sizes (torch.export, dynamic H/W): one graph for every size
        pads = [torch.sym_max(0, k * (d if keep else 1) - s) for s, k, d in zip(size, self._kernel, self._dilation)]
        if not all(isinstance(p, int) for p in pads) or any(pads):
            x = F.pad(x, [0, 0, *[p for pad in reversed(pads) for p in (0, pad)]])
        return self.qkv(x).view(B, *x.shape[1:-1], 3, self.num_heads, self.head_dim).unbind(-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, *size, C = x.shape
        q, k, v = self._qkv(x)
        x = neighborhood_attention(
            q, k, v, self.kernel_size, self.stride, self.dilation, self.is_causal, self.scale, rpb=self.rpb,
            backend=self.backend, dilation_policy=self.dilation_policy,
            dropout_p=self.attn_drop if self.training else 0.0,
        )
        x = x.reshape(B, *q.shape[1:-2], C)[(slice(None), *[slice(0, s) for s in size])]
        return self.proj_drop(self.proj(x))

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"dilation={self.dilation}, is_causal={self.is_causal}, rel_pos_bias={self.rpb is not None}, "
                f"backend={self.backend!r}")


class NeighborhoodAttention1D(_NeighborhoodAttention):
    """Neighborhood attention over a sequence ``[B, L, C]`` (see :class:`NeighborhoodAttention2D`)."""

    RANK = 1


class NeighborhoodAttention3D(_NeighborhoodAttention):
    """Neighborhood attention over a volume ``[B, D, H, W, C]`` (see :class:`NeighborhoodAttention2D`)."""

    RANK = 3


class NeighborhoodAttention2D(_NeighborhoodAttention):
    __doc__ = _NeighborhoodAttention.__doc__.replace("an ``n``-D token grid ``[B, *spatial, C]`` (``n`` = ``RANK``)",
                                                     "the ``[B, H, W, C]`` grid (NAT / DiNAT)")
    RANK = 2

    @torch.no_grad()
    def attention_maps(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]``: each probe query's attention over its window (mean over heads), zero elsewhere."""
        if any(_per_axis(self.is_causal, 2, "is_causal", bool)):
            raise ValueError("attention_maps draws non-causal windows; this layer has is_causal="
                             f"{self.is_causal}")
        B, H, W, C = x.shape
        q, k, _ = self._qkv(x)
        Hp, Wp = q.shape[1], q.shape[2]
        (kh, kw), (sh, sw) = self._kernel, _per_axis(self.stride, 2, "stride")
        dh, dw = fit_dilation((Hp, Wp), self._kernel, self.dilation, self.dilation_policy)
        rows = neighborhood_indices(Hp, kh, dh, x.device, stride=sh)
        cols = neighborhood_indices(Wp, kw, dw, x.device, stride=sw)
        maps = x.new_zeros(B, 3, Hp, Wp)
        for n, (i, j) in enumerate(probe_points(H, W)):
            r, c = rows[i], cols[j]
            logits = torch.einsum("bhd,bxyhd->bhxy", q[:, i, j] * self.scale, k[:, r[:, None], c[None, :]])
            if self.rpb is not None:
                logits = logits + self.rpb[:, ((r - i) // dh + kh - 1)[:, None], ((c - j) // dw + kw - 1)[None, :]]
            attn = logits.flatten(2).softmax(-1).view_as(logits).mean(1)
            maps[:, n, r[:, None], c[None, :]] = attn
        return maps[:, :, :H, :W]
