"""LITv2: Fast Vision Transformers with HiLo Attention.

Paper: "Fast Vision Transformers with HiLo Attention" (NeurIPS 2022, https://arxiv.org/abs/2205.13213).
Architecture as in ziplab/LITv2 (classification/models): 4x4 patch embedding + LayerNorm; stages 1-2
are attention-free (``x + DWMlp(LN(x))``, DWMlp = fc1 -> depthwise 3x3 -> GELU -> fc2); stage 3 uses
HiLo with 2x2 windows, stage 4 HiLo with window 1 (plain global attention); deformable token merging
(2x2/s2 deformable conv + BatchNorm + GELU, through ``torchvision.ops.deform_conv2d``) between stages;
final LayerNorm, mean pool, head.

Our layout follows timm: ``stem`` -> ``stages[i]`` (``downsample`` for i > 0, then ``blocks``) ->
``norm`` -> ``head``; official checkpoints load through :func:`checkpoint_filter_fn`.
"""

from __future__ import annotations

import re

import torch
from timm.layers import DropPath
from timm.models import generate_default_cfgs, register_model
from torch import nn
from torchvision.ops import deform_conv2d

from ..attention import HiLoAttention
from ._pyramid import PyramidBackbone, Stage, build_pyramid, drop_path_rates, imagenet_cfg

__all__ = ["LITv2"]

# Parameter counts as the papers print them (rounded) (paper, Table 2), checked by the model battery.
PUBLISHED_PARAMS = {"litv2_small": "28M", "litv2_medium": "49M", "litv2_base": "87M"}


class DWMlp(nn.Module):
    """fc1 -> depthwise 3x3 conv -> GELU -> fc2, on NHWC."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dwconv(self.fc1(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.drop(self.fc2(self.drop(self.act(x))))


class LITBlock(nn.Module):
    """``x + HiLo(LN(x))`` (when the stage has attention), then ``x + DWMlp(LN(x))``. NHWC."""

    def __init__(self, dim: int, num_heads: int, window_size: int | None, alpha: float, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        if window_size:
            self.norm1 = nn.LayerNorm(dim)
            self.attn = HiLoAttention(dim, num_heads, window_size, alpha, qkv_bias=qkv_bias)
        else:
            self.norm1 = self.attn = None  # attention-free early stages
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = DWMlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.attn is not None:
            x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class DeformableTokenMerging(nn.Module):
    """2x2 stride-2 deformable conv (offsets from a plain 2x2/s2 conv, zero-initialised) + BN + GELU. NHWC."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_dim, dim, 2, 2))
        self.bias = nn.Parameter(torch.zeros(out_dim))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)
        self.conv_offset = nn.Conv2d(dim, 2 * 2 * 2, 2, stride=2)  # (dy, dx) per kernel tap
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)
        self.norm = nn.BatchNorm2d(out_dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 3, 1, 2)
        offset = self.conv_offset(x)
        # torchvision's deformable conv has no bf16 kernel on CPU: half types merge in fp32 (also under
        # autocast), fp32/fp64 in their own precision; the result goes back to the input's dtype
        dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
        with torch.autocast(x.device.type, enabled=False):
            out = deform_conv2d(x.to(dtype), offset.to(dtype), self.weight.to(dtype), self.bias.to(dtype), stride=2)
        return self.act(self.norm(out.to(x.dtype))).permute(0, 2, 3, 1)


class LITv2(PyramidBackbone):
    """LITv2 backbone.

    Args:
        embed_dim: stage-1 width; stage ``i`` has ``embed_dim * 2**i`` channels.
        depths, num_heads: per stage.
        local_ws: HiLo window per stage; 0 means an attention-free stage.
        alpha: fraction of Lo-Fi heads.
    """

    channels_last = True

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dim: int = 96,
        depths: tuple[int, ...] = (2, 2, 6, 2),
        num_heads: tuple[int, ...] = (3, 6, 12, 24),
        local_ws: tuple[int, ...] = (0, 0, 2, 1),
        alpha: float = 0.9,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        drop_path_rate: float = 0.2,
    ):
        super().__init__()
        dims = [embed_dim * 2**i for i in range(len(depths))]
        self.stem = nn.Conv2d(in_chans, embed_dim, 4, stride=4)
        self.stem_norm = nn.LayerNorm(embed_dim)
        dpr = drop_path_rates(drop_path_rate, depths)
        self.stages = nn.Sequential(*[
            Stage(
                DeformableTokenMerging(dims[i - 1], dims[i]) if i > 0 else nn.Identity(),
                [
                    LITBlock(dims[i], num_heads[i], local_ws[i], alpha, mlp_ratio, qkv_bias, proj_drop_rate, dpr[i][j])
                    for j in range(depths[i])
                ],
            )
            for i in range(len(depths))
        ])
        self.feature_info = [dict(num_chs=dims[i], reduction=4 * 2**i, module=f"stages.{i}") for i in range(len(depths))]
        self.norm = nn.LayerNorm(dims[-1])
        self.init_head(dims[-1], num_classes, global_pool, drop_rate)
        self.apply(self.init_linear)

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.stem_norm(self.stem(x).permute(0, 2, 3, 1))


def checkpoint_filter_fn(state_dict: dict, model: LITv2) -> dict:
    """Official LITv2 keys -> ours.

    ``patch_embed.proj``/``patch_embed.norm`` -> ``stem``/``stem_norm``; ``layers.i.blocks`` ->
    ``stages.i.blocks``; ``layers.i.downsample`` (DTM, at the end of a level) -> ``stages.(i+1).downsample``
    with ``dconv.weight/bias`` -> ``weight/bias``, ``dconv.conv_offset`` -> ``conv_offset``,
    ``norm_layer`` -> ``norm``; the MLP's ``dwconv.dwconv`` -> ``dwconv``.
    """
    state_dict = state_dict.get("state_dict", state_dict.get("model", state_dict))
    if any(k.startswith("stages.") for k in state_dict):
        return state_dict  # already ours
    out = {}
    for key, value in state_dict.items():
        key = key.replace("patch_embed.proj.", "stem.").replace("patch_embed.norm.", "stem_norm.")
        key = re.sub(r"^layers\.(\d+)\.downsample\.", lambda m: f"stages.{int(m.group(1)) + 1}.downsample.", key)
        key = re.sub(r"^layers\.(\d+)\.blocks\.", r"stages.\1.blocks.", key)
        key = key.replace(".downsample.dconv.conv_offset.", ".downsample.conv_offset.")
        key = key.replace(".downsample.dconv.", ".downsample.").replace(".downsample.norm_layer.", ".downsample.norm.")
        key = key.replace(".mlp.dwconv.dwconv.", ".mlp.dwconv.")
        out[key] = value
    return out


def _cfg(**kwargs) -> dict:
    return imagenet_cfg(first_conv="stem", license="apache-2.0", paper_ids="arXiv:2205.13213", **kwargs)


# Official ImageNet-1k releases (GitHub release v1.0, linked from the official README; the official
# evaluation: ImageNet mean/std, bicubic resize to 256, centre crop 224).
_URL = "https://github.com/ziplab/LITv2/releases/download/v1.0/{}.pth"
default_cfgs = generate_default_cfgs({
    "litv2_small.in1k": _cfg(url=_URL.format("litv2_s")),
    "litv2_medium.in1k": _cfg(url=_URL.format("litv2_m")),
    "litv2_base.in1k": _cfg(url=_URL.format("litv2_b")),
})


def _create_litv2(variant: str, pretrained: bool = False, **kwargs) -> LITv2:
    return build_pyramid(LITv2, variant, pretrained, checkpoint_filter_fn, **kwargs)


@register_model
def litv2_small(pretrained: bool = False, **kwargs) -> LITv2:
    args = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.2)
    return _create_litv2("litv2_small", pretrained, **dict(args, **kwargs))


@register_model
def litv2_medium(pretrained: bool = False, **kwargs) -> LITv2:
    args = dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.3)
    return _create_litv2("litv2_medium", pretrained, **dict(args, **kwargs))


@register_model
def litv2_base(pretrained: bool = False, **kwargs) -> LITv2:
    args = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), drop_path_rate=0.5)
    return _create_litv2("litv2_base", pretrained, **dict(args, **kwargs))
