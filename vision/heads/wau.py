"""Window Attention Upsample (WAU): a U-Net decoder whose upsampling steps are window cross-attention.

From "More than Encoder: Introducing Transformer Decoder to Upsample" (Li et al., BIBM 2022). Each decoder
step brings the coarser decoder feature to the lateral (encoder) feature's size by bilinear interpolation;
those upsampled features are the **queries** of a transformer decoder layer whose **keys/values** are the
lateral features, attention restricted to non-overlapping local windows (``kernels.window_attention2d``,
which pads sizes that are not multiples of the window and masks the padding, as the Swin family does).
The bilinear upsample is the residual around the attention, so the step starts as plain bilinear
upsampling and learns what to take from the encoder; an MLP (pre-norm, residual) follows.

Every operation outside the attention is per pixel (1x1 projections, LayerNorm, MLP), so a query sees
exactly the lateral features of its own window: the tests check that confinement.

The decoder takes smp-style encoder features ``[input, 1/2, 1/4, ..., 1/32]`` (the ``tu-`` timm encoders;
transformer backbones give an empty 1/2 level, which is skipped) and returns the features at the finest
lateral scale; :class:`WAUNet` adds a 1x1 classifier and a bilinear upsample to the input size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kernels import window_attention2d

from ..backbone import BackboneSpec
from ..models import forget_state_dict


class WAUStep(nn.Module):
    """One upsampling step: ``(decoder [B, Cd, h, w], lateral [B, Cl, H, W]) -> [B, C, H, W]``.

    ``q0 = W_q0 · bilinear(decoder)``, ``kv = W_kv · lateral`` (1x1 projections to ``C``);
    ``y = q0 + proj(WindowAttn(LN(q0), LN(kv)))``; ``out = y + MLP(LN(y))``. The attention carries a learned
    relative position bias (queries and keys share one grid).
    """

    def __init__(self, decoder_channels: int, lateral_channels: int, channels: int, num_heads: int,
                 window_size: int = 7, mlp_ratio: float = 2.0):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"WAU step: {channels} channels do not split into {num_heads} heads")
        self.num_heads, self.window_size = num_heads, window_size
        self.up_proj = nn.Linear(decoder_channels, channels)
        self.lateral_proj = nn.Linear(lateral_channels, channels)
        self.norm_q, self.norm_kv = nn.LayerNorm(channels), nn.LayerNorm(channels)
        self.q = nn.Linear(channels, channels)
        self.kv = nn.Linear(channels, 2 * channels)
        self.proj = nn.Linear(channels, channels)
        self.rpb = nn.Parameter(torch.zeros(num_heads, 2 * window_size - 1, 2 * window_size - 1))
        nn.init.trunc_normal_(self.rpb, std=0.02)
        self.norm_mlp = nn.LayerNorm(channels)
        hidden = int(channels * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.GELU(), nn.Linear(hidden, channels))

    def forward(self, decoder: torch.Tensor, lateral: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(decoder, size=lateral.shape[-2:], mode="bilinear", align_corners=False)
        q0 = self.up_proj(up.permute(0, 2, 3, 1))  # channels-last [B, H, W, C]
        kv = self.lateral_proj(lateral.permute(0, 2, 3, 1))
        B, H, W, C = q0.shape
        heads = self.num_heads
        q = self.q(self.norm_q(q0)).view(B, H, W, heads, C // heads)
        k, v = self.kv(self.norm_kv(kv)).view(B, H, W, 2, heads, C // heads).unbind(3)
        attn = window_attention2d(q, k, v, self.window_size, rpb=self.rpb).reshape(B, H, W, C)
        y = q0 + self.proj(attn)  # the bilinear upsample is the residual
        y = y + self.mlp(self.norm_mlp(y))
        return y.permute(0, 3, 1, 2)


def _per_step(value: int | Sequence[int], steps: int, what: str) -> list[int]:
    values = [value] * steps if isinstance(value, int) else list(value)
    if len(values) < steps:
        raise ValueError(f"WAU decoder: {what}={values} gives {len(values)} values for {steps} upsampling steps")
    return values[:steps]


class WAUDecoder(nn.Module):
    """U-Net decoder of WAU steps on smp-style encoder features (``encoder_channels`` as smp's
    ``encoder.out_channels``: input first, coarsest last; zero-channel levels are skipped).

    Args:
        decoder_channels: channels after each step, coarse to fine (one per lateral level; extra are ignored),
            or one int for every step.
        num_heads: attention heads, one int for every step or one per step.
        window_size: the local window (square) of every step.
        mlp_ratio: hidden width of each step's MLP.
    """

    def __init__(self, encoder_channels: Sequence[int], decoder_channels: int | Sequence[int] = (256, 128, 64, 32),
                 num_heads: int | Sequence[int] = (8, 4, 2, 1), window_size: int = 7, mlp_ratio: float = 2.0):
        super().__init__()
        self.levels = [i for i, c in enumerate(encoder_channels) if i > 0 and c > 0]  # feature indices used
        if len(self.levels) < 2:
            raise ValueError(f"WAU decoder needs at least two feature levels, got channels {list(encoder_channels)}")
        laterals = self.levels[-2::-1]  # fine levels, coarse to fine
        channels = _per_step(decoder_channels, len(laterals), "decoder_channels")
        heads = _per_step(num_heads, len(laterals), "num_heads")
        steps, previous = [], encoder_channels[self.levels[-1]]
        for level, c, h in zip(laterals, channels, heads):
            steps.append(WAUStep(previous, encoder_channels[level], c, h, window_size, mlp_ratio))
            previous = c
        self.steps = nn.ModuleList(steps)
        self.laterals = laterals
        self.out_channels = previous

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        x = features[self.levels[-1]]
        for step, level in zip(self.steps, self.laterals):
            x = step(x, features[level])
        return x


class WAUNet(nn.Module):
    """Encoder (smp ``tu-`` timm encoder) + :class:`WAUDecoder` + 1x1 classifier, logits at the input size.
    Any input size: the encoder strides round up, each step upsamples to its lateral's exact size."""

    def __init__(self, encoder: nn.Module, num_classes: int, **decoder_kwargs):
        super().__init__()
        self.encoder = encoder
        self.decoder = WAUDecoder(encoder.out_channels, **decoder_kwargs)
        self.classifier = nn.Conv2d(self.decoder.out_channels, num_classes, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.classifier(self.decoder(self.encoder(images)))
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)


def smp_encoder(backbone: BackboneSpec | dict, in_channels: int) -> nn.Module:
    """The smp ``tu-`` encoder of ``backbone`` (timm ``features_only``), as smp's Unet would build it."""
    import segmentation_models_pytorch as smp

    kwargs = BackboneSpec.parse(backbone).smp_encoder()
    encoder = smp.encoders.get_encoder(kwargs.pop("encoder_name"), in_channels=in_channels, depth=5,
                                       weights=kwargs.pop("encoder_weights"), **kwargs)
    forget_state_dict(encoder)
    return encoder


def create_wau_unet(backbone: BackboneSpec | dict, in_channels: int, num_classes: int, **decoder_kwargs) -> WAUNet:
    """A U-Net with WAU upsampling on ``backbone`` (``decoder_kwargs``: see :class:`WAUDecoder`)."""
    return WAUNet(smp_encoder(backbone, in_channels), num_classes, **decoder_kwargs)
