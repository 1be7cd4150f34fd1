"""L²ViT linear global attention, on the ``[B, H, W, C]`` grid interface.

Per head, with ReLU feature maps: ``out = (q @ (k^T v * temperature)) / clamp(q . sum_n k_n, min=100)``,
then the output projection. The clamp is an absolute floor of 100, as in the official code, and the
learnable per-head ``temperature`` (initialised to head_dim^-0.5) scales only the numerator. Sums over
all tokens grow with the grid, so the attention is computed in fp32 even under autocast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LinearAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, denominator_min: float = 100.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.full((num_heads, 1, 1), (dim // num_heads) ** -0.5))
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.denominator_min = denominator_min

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        q, k, v = self.qkv(x).view(B, H * W, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        with torch.autocast(x.device.type, enabled=False):
            q, k, v = F.relu(q.float()), F.relu(k.float()), v.float()
            denominator = (q @ k.sum(dim=2, keepdim=True).transpose(-1, -2)).clamp(min=self.denominator_min)
            out = (q @ (k.transpose(-1, -2) @ v * self.temperature.float())) / denominator
        return self.proj(out.to(x.dtype).transpose(1, 2).reshape(B, H, W, C))
