"""NAT-UNet 3-D: volumetric segmentation with a 3-D neighborhood-attention encoder under a U-Net decoder.

A whole segmentation network (like MONAI's UNet / SwinUNETR), not a timm backbone: the medical task builds it
by name (``model.network=nat_unet3d``). The encoder is NAT's recipe in 3-D: a strided conv stem, stages of
pre-norm blocks (3-D neighborhood attention with NAT's relative position bias, then an MLP) on the channels-last
volume ``[B, D, H, W, C]``, strided convs between stages; dilations alternate per block as in DiNAT, lowered
where a stage's volume is too small for them. The decoder upsamples with transposed convs and fuses each
encoder stage (and a full-resolution conv of the input) through conv-norm-activation blocks, as U-Net does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp
from torch import nn

from ..attention import NeighborhoodAttention3D

__all__ = ["NATUNet3D"]


class _NABlock(nn.Module):
    def __init__(self, dim, heads, kernel_size, dilation, mlp_ratio, drop_path):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = NeighborhoodAttention3D(dim, heads, kernel_size, dilation, dilation_policy="reduce")
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path else nn.Identity()

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def _conv_block(cin, cout):
    return nn.Sequential(nn.Conv3d(cin, cout, 3, padding=1, bias=False), nn.InstanceNorm3d(cout, affine=True),
                         nn.LeakyReLU(0.01, inplace=True))


class NATUNet3D(nn.Module):
    """Logits ``[B, out_channels, X, Y, Z]`` of a volume ``[B, in_channels, X, Y, Z]`` (any size: padded to a
    multiple of ``2 ** len(depths)`` and cropped back).

    Args:
        embed_dim: channels of the first stage (doubled per stage).
        depths, num_heads: blocks and heads per stage (stage ``i`` at ``1 / 2**(i+1)`` resolution).
        kernel_size: neighborhood size, one int or one per axis.
        dilations: per stage, the dilation of each block in turn (cycled), e.g. ``((1, 2), (1, 2), (1,))``.
        mlp_ratio, drop_path_rate: as NAT.
    """

    def __init__(self, in_channels: int, out_channels: int, embed_dim: int = 24, depths=(2, 2, 2),
                 num_heads=(2, 4, 8), kernel_size=3, dilations=((1, 2), (1, 2), (1,)), mlp_ratio: float = 2.0,
                 drop_path_rate: float = 0.0):
        super().__init__()
        if not len(depths) == len(num_heads) == len(dilations):
            raise ValueError(f"depths {depths}, num_heads {num_heads} and dilations {dilations} need one entry "
                             "per stage")
        dims = [embed_dim * 2**i for i in range(len(depths))]
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.levels = len(depths)
        self.stem = nn.Conv3d(in_channels, dims[0], 3, stride=2, padding=1)
        self.downs = nn.ModuleList([nn.Identity()] + [nn.Conv3d(dims[i - 1], dims[i], 3, stride=2, padding=1,
                                                                bias=False) for i in range(1, len(dims))])
        self.norms = nn.ModuleList([nn.LayerNorm(d) for d in dims])
        self.stages = nn.ModuleList()
        for i, (dim, depth, heads) in enumerate(zip(dims, depths, num_heads)):
            blocks = [_NABlock(dim, heads, kernel_size, dilations[i][j % len(dilations[i])], mlp_ratio,
                               rates[sum(depths[:i]) + j]) for j in range(depth)]
            self.stages.append(nn.Sequential(*blocks))
        self.full_res = _conv_block(in_channels, dims[0] // 2)
        self.ups = nn.ModuleList()
        self.fuse = nn.ModuleList()
        skips = [dims[0] // 2] + dims[:-1]  # what each decoder level concatenates
        for i in reversed(range(len(dims))):
            self.ups.append(nn.ConvTranspose3d(dims[i], skips[i], 2, stride=2))
            self.fuse.append(_conv_block(2 * skips[i], skips[i]))
        self.head = nn.Conv3d(skips[0], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[2:]
        m = 2**self.levels
        pad = [p for s in reversed(size) for p in (0, -s % m)]
        x = F.pad(x, pad) if any(pad) else x
        feats = [self.full_res(x)]
        y = self.stem(x)
        for down, stage, norm in zip(self.downs, self.stages, self.norms):
            y = down(y).permute(0, 2, 3, 4, 1)  # channels-last for the attention blocks
            y = norm(stage(y)).permute(0, 4, 1, 2, 3)
            feats.append(y)
        y = feats.pop()
        for up, fuse in zip(self.ups, self.fuse):
            y = fuse(torch.cat([up(y), feats.pop()], 1))
        return self.head(y)[(slice(None), slice(None), *[slice(0, s) for s in size])]
