"""BiFormer: Vision Transformer with Bi-Level Routing Attention.

Paper: "BiFormer: Vision Transformer with Bi-Level Routing Attention" (CVPR 2023,
https://arxiv.org/abs/2303.08810). Architecture as in rayleizhu/BiFormer (models/biformer.py with the
legacy BRA the released checkpoints use): conv stem (stride 4), four stages of blocks
``x + DWConv3x3(x)``, ``x + BRA(LN(x))``, ``x + MLP(LN(x))`` (LayerNorm eps 1e-6, MLP ratio 3),
conv 3x3/s2 + BN downsampling, ``AttentionLePE`` (global attention) in stage 4, BatchNorm + mean pool.

Our layout follows timm: ``stem`` -> ``stages[i]`` (``downsample`` for i > 0, then ``blocks``) ->
``norm`` -> ``head``; official checkpoints load through :func:`checkpoint_filter_fn`.
"""

from __future__ import annotations

import re

import torch
from timm.layers import DropPath, Mlp
from timm.models import generate_default_cfgs, register_model
from torch import nn

from ..attention import AttentionLePE, BiLevelRoutingAttention
from ._pyramid import PyramidBackbone, Stage, build_pyramid, drop_path_rates, imagenet_cfg

__all__ = ["BiFormer"]

# Parameter counts as the papers print them (rounded) (paper, Table 1), checked by the model battery.
PUBLISHED_PARAMS = {"biformer_tiny": "13.1M", "biformer_small": "25.5M", "biformer_base": "56.8M"}


class BiFormerBlock(nn.Module):
    """``x + DWConv(x)``, then pre-norm attention and MLP residuals. NCHW in and out."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        topk: int,
        n_win: int = 7,
        qk_dim: int | None = None,
        mlp_ratio: float = 3.0,
        side_dwconv: int = 5,
        drop_path: float = 0.0,
        mask_padding: bool = False,
    ):
        super().__init__()
        self.pos_embed = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        if topk > 0:
            self.attn = BiLevelRoutingAttention(
                dim, num_heads, n_win, qk_dim, topk=topk, side_dwconv=side_dwconv, mask_padding=mask_padding
            )
        elif topk == -2:  # the official block builds it from dim and side_dwconv only: 8 heads, no qkv bias
            self.attn = AttentionLePE(dim, side_dwconv=side_dwconv)
        else:
            raise ValueError(f"topk={topk}: expected a positive region count or -2 (global attention + LePE)")
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(mlp_ratio * dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x + self.pos_embed(x)).permute(0, 2, 3, 1)
        x = x + self.drop_path(self.attn(self.norm1(x)))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x.permute(0, 3, 1, 2)


class BiFormer(PyramidBackbone):
    """BiFormer backbone.

    Args:
        depths, embed_dims, qk_dims: per stage.
        head_dim: BRA heads per stage are ``qk_dims[i] // head_dim``.
        topks: routed regions per stage; -2 selects global attention with LePE (stage 4).
        n_win: regions per side in every BRA stage.
        mlp_ratio: MLP expansion.
        side_dwconv: LePE kernel size.
        mask_padding: mask padded keys in BRA instead of the official unmasked zero padding.
    """

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        depths: tuple[int, ...] = (2, 2, 8, 2),
        embed_dims: tuple[int, ...] = (64, 128, 256, 512),
        qk_dims: tuple[int, ...] | None = None,
        head_dim: int = 32,
        topks: tuple[int, ...] = (1, 4, 16, -2),
        n_win: int = 7,
        mlp_ratio: float = 3.0,
        side_dwconv: int = 5,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        mask_padding: bool = False,
    ):
        super().__init__()
        qk_dims = qk_dims or embed_dims
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, embed_dims[0] // 2, 3, stride=2, padding=1),
            nn.BatchNorm2d(embed_dims[0] // 2),
            nn.GELU(),
            nn.Conv2d(embed_dims[0] // 2, embed_dims[0], 3, stride=2, padding=1),
            nn.BatchNorm2d(embed_dims[0]),
        )
        dpr = drop_path_rates(drop_path_rate, depths)
        self.stages = nn.Sequential(*[
            Stage(
                nn.Sequential(nn.Conv2d(embed_dims[i - 1], embed_dims[i], 3, stride=2, padding=1),
                              nn.BatchNorm2d(embed_dims[i])) if i > 0 else nn.Identity(),
                [
                    BiFormerBlock(
                        embed_dims[i], qk_dims[i] // head_dim, topks[i], n_win, qk_dims[i], mlp_ratio, side_dwconv,
                        dpr[i][j], mask_padding,
                    )
                    for j in range(depths[i])
                ],
            )
            for i in range(len(depths))
        ])
        self.feature_info = [
            dict(num_chs=embed_dims[i], reduction=4 * 2**i, module=f"stages.{i}") for i in range(len(depths))
        ]
        self.norm = nn.BatchNorm2d(embed_dims[-1])
        self.init_head(embed_dims[-1], num_classes, global_pool, drop_rate)
        self.apply(self.init_linear)


def checkpoint_filter_fn(state_dict: dict, model: BiFormer) -> dict:
    """Official BiFormer keys -> ours.

    ``downsample_layers.0`` -> ``stem``; ``downsample_layers.i`` -> ``stages.i.downsample``;
    ``stages.i.j`` -> ``stages.i.blocks.j``; BRA's ``qkv.qkv``/``wo`` -> ``qkv``/``proj``;
    the MLP's ``mlp.0``/``mlp.3`` -> ``mlp.fc1``/``mlp.fc2``.
    """
    state_dict = state_dict.get("state_dict", state_dict.get("model", state_dict))
    if any(k.startswith("stem.") for k in state_dict):
        return state_dict  # already ours
    out = {}
    for key, value in state_dict.items():
        key = re.sub(r"^downsample_layers\.0\.", "stem.", key)
        key = re.sub(r"^downsample_layers\.(\d+)\.", r"stages.\1.downsample.", key)
        key = re.sub(r"^stages\.(\d+)\.(\d+)\.", r"stages.\1.blocks.\2.", key)
        key = key.replace(".attn.qkv.qkv.", ".attn.qkv.").replace(".attn.wo.", ".attn.proj.")
        key = key.replace(".mlp.0.", ".mlp.fc1.").replace(".mlp.3.", ".mlp.fc2.")
        out[key] = value
    return out


def _cfg(**kwargs) -> dict:
    return imagenet_cfg(first_conv="stem.0", license="mit", paper_ids="arXiv:2303.08810", **kwargs)


# Official ImageNet-1k releases (no download here: pass pretrained_cfg_overlay=dict(file=path)).
default_cfgs = generate_default_cfgs({
    "biformer_tiny.in1k": _cfg(),
    "biformer_small.in1k": _cfg(),
    "biformer_base.in1k": _cfg(),
})


def _create_biformer(variant: str, pretrained: bool = False, **kwargs) -> BiFormer:
    return build_pyramid(BiFormer, variant, pretrained, checkpoint_filter_fn, **kwargs)


@register_model
def biformer_tiny(pretrained: bool = False, **kwargs) -> BiFormer:
    args = dict(depths=(2, 2, 8, 2), embed_dims=(64, 128, 256, 512), head_dim=32, topks=(1, 4, 16, -2))
    return _create_biformer("biformer_tiny", pretrained, **dict(args, **kwargs))


@register_model
def biformer_small(pretrained: bool = False, **kwargs) -> BiFormer:
    args = dict(depths=(4, 4, 18, 4), embed_dims=(64, 128, 256, 512), head_dim=32, topks=(1, 4, 16, -2))
    return _create_biformer("biformer_small", pretrained, **dict(args, **kwargs))


@register_model
def biformer_base(pretrained: bool = False, **kwargs) -> BiFormer:
    args = dict(depths=(4, 4, 18, 4), embed_dims=(96, 192, 384, 768), head_dim=32, topks=(1, 4, 16, -2))
    return _create_biformer("biformer_base", pretrained, **dict(args, **kwargs))
