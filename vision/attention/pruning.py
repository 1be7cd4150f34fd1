"""Token pruning by class attention (EViT), on ``[B, N, C]`` token sequences with the class token first.

EViT ("Not All Patches are What You Need", ICLR 2022; youweiliang/evit): in a pruning block the attention
also reports how much the class token attends to every other token (mean over heads); after the attention
residual only the ``ceil(rate * (N - 1))`` most attended tokens are kept, in descending attention order, and
the others are fused into one extra token, their attention-weighted sum (not renormalised), appended last.
The MLP then runs on the shorter sequence.
"""

from __future__ import annotations

import torch
from torch import nn


class ClassScoredAttention(nn.Module):
    """Multi-head self-attention that also returns the class token's attention to the other tokens
    ``[B, N - 1]`` (mean over heads). Names as timm's ``Attention`` (``qkv``, ``proj``)."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.scale = num_heads, (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(-1)
        out = (self.attn_drop(attn) @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(out)), attn[:, :, 0, 1:].mean(1)


def keep_attentive_tokens(x: torch.Tensor, cls_attn: torch.Tensor, keep: int, fuse: bool):
    """``[cls, the keep most attended tokens (descending), fused rest?]`` and the kept indices ``[B, keep]``
    into ``x[:, 1:]``."""
    idx = cls_attn.topk(keep, dim=1, largest=True, sorted=True).indices
    patches = x[:, 1:]
    parts = [x[:, :1], patches.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))]
    if fuse:
        weights = cls_attn.scatter(1, idx, 0.0)  # the inattentive tokens' attention, zero where kept
        parts.append((patches * weights[..., None]).sum(1, keepdim=True))
    return torch.cat(parts, dim=1), idx
