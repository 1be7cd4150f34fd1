"""Attention-gated 3-D U-Net with multi-scale input and deep supervision (AGUNet's ingredients).

AGUNet (Bouget et al., "Meningioma segmentation in T1-weighted MRI leveraging global context and attention
mechanisms", 2021) puts Oktay et al.'s attention gates (Attention U-Net, 2018) on the skip connections of a
3-D U-Net, feeds the input at every encoder scale (multi-scale input) and supervises every decoder scale.

Why not MONAI's ``AttentionUnet``: its gate is computed at the skip's resolution from the decoder feature
*after* upsampling (``W_g`` and ``W_x`` both 1x1 at one grid), while Oktay's gate takes the *coarser* gating
signal and brings the skip to it with a strided ``W_x`` (2x2x2, stride 2), resampling the coefficients back
up; and it has no deep supervision or multi-scale input, nor a place to hook them (its levels are nested
modules). This file follows the paper: additive gate ``a = sigmoid(psi(relu(W_x x + W_g g)))`` on the coarse
grid, trilinearly upsampled, ``x * a`` through a 1x1 conv + norm.

Training returns the full-resolution logits followed by each coarser decoder level's logits (upsampled to
the input size) when ``deep_supervision``; the task sums their losses with halving weights (normalised).
Evaluation returns the full-resolution logits only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _norm(channels: int) -> nn.Module:
    return nn.InstanceNorm3d(channels, affine=True)  # batches of one or two patches: no batch statistics


class ConvBlock(nn.Sequential):
    """Two 3x3x3 conv + instance norm + LeakyReLU."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            nn.Conv3d(in_channels, out_channels, 3, padding=1, bias=False), _norm(out_channels), nn.LeakyReLU(0.01),
            nn.Conv3d(out_channels, out_channels, 3, padding=1, bias=False), _norm(out_channels), nn.LeakyReLU(0.01),
        )


class AttentionGate(nn.Module):
    """Oktay et al.'s additive attention gate: skip ``x`` gated by the coarser decoder feature ``g``."""

    def __init__(self, skip_channels: int, gating_channels: int, inter_channels: int):
        super().__init__()
        self.theta = nn.Conv3d(skip_channels, inter_channels, 2, stride=2, bias=False)  # x onto g's grid
        self.phi = nn.Conv3d(gating_channels, inter_channels, 1)
        self.psi = nn.Conv3d(inter_channels, 1, 1)
        self.out = nn.Sequential(nn.Conv3d(skip_channels, skip_channels, 1, bias=False), _norm(skip_channels))

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(gated skip, coefficients [B, 1, *x.shape[2:]])``."""
        theta = self.theta(x)
        phi = F.interpolate(self.phi(g), size=theta.shape[2:], mode="trilinear", align_corners=False)
        alpha = torch.sigmoid(self.psi(F.relu(theta + phi)))
        alpha = F.interpolate(alpha, size=x.shape[2:], mode="trilinear", align_corners=False)
        return self.out(x * alpha), alpha


class AttentionUNet3D(nn.Module):
    """3-D U-Net, attention gates on its skips, optional multi-scale input and deep supervision.

    Args:
        in_channels, num_classes: modalities and classes (background included).
        channels: encoder widths, one per level (``len - 1`` poolings).
        multiscale_input: the input, average-pooled to each level's grid, is concatenated to that level's input.
        deep_supervision: in training, also return logits of the coarser decoder levels (see module docstring).
    """

    def __init__(self, in_channels: int, num_classes: int, channels: Sequence[int] = (16, 32, 64, 128, 256),
                 multiscale_input: bool = True, deep_supervision: bool = True):
        super().__init__()
        channels = list(channels)
        if len(channels) < 2:
            raise ValueError(f"channels={channels}: an attention U-Net needs at least two levels")
        self.multiscale_input, self.deep_supervision = multiscale_input, deep_supervision
        extra = in_channels if multiscale_input else 0
        self.encoder = nn.ModuleList(
            ConvBlock(in_channels if i == 0 else channels[i - 1] + extra, c) for i, c in enumerate(channels))
        # decoder levels, coarse to fine: gate the skip of level i with the decoder feature of level i+1
        self.gates = nn.ModuleList(
            AttentionGate(channels[i], channels[i + 1], max(channels[i] // 2, 1)) for i in reversed(range(len(channels) - 1)))
        self.decoder = nn.ModuleList(
            ConvBlock(channels[i] + channels[i + 1], channels[i]) for i in reversed(range(len(channels) - 1)))
        self.heads = nn.ModuleList(nn.Conv3d(channels[i], num_classes, 1) for i in reversed(range(len(channels) - 1)))
        self.attention: list[torch.Tensor] = []  # the gates' coefficients of the last forward, coarse to fine

    def forward(self, image: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        skips, x = [], image
        for i, block in enumerate(self.encoder):
            if i:
                x = F.max_pool3d(x, 2, ceil_mode=True)
                if self.multiscale_input:
                    x = torch.cat([x, F.adaptive_avg_pool3d(image, x.shape[2:])], 1)
            x = block(x)
            skips.append(x)
        outputs, self.attention = [], []
        for gate, block, head, skip in zip(self.gates, self.decoder, self.heads, reversed(skips[:-1])):
            gated, alpha = gate(skip, x)
            self.attention.append(alpha.detach())
            up = F.interpolate(x, size=skip.shape[2:], mode="trilinear", align_corners=False)
            x = block(torch.cat([gated, up], 1))
            outputs.append(head(x))
        if not (self.training and self.deep_supervision):
            return outputs[-1]
        size = image.shape[2:]
        return [outputs[-1]] + [F.interpolate(o, size=size, mode="trilinear", align_corners=False)
                                for o in reversed(outputs[:-1])]
