"""L²ViT: linear global attention with local concentration, alternating with local window attention.

Paper: "The Linear Attention Resurrection in Vision Transformer" (https://arxiv.org/abs/2501.16182).
Architecture as in ChuanyangZheng/L2ViT (classification/models/l2vit.py, block type
``mix_local_enhanced_vit``): conv stem (conv3x3/s2 + BN + ReLU + conv3x3/s2 + BN, then LayerNorm);
inside every stage even blocks are LWA (CPE, 7x7 window attention without bias or shift, CPE, MLP) and
odd blocks are LGA (CPE, linear attention, local concentration module, MLP); downsampling is LayerNorm
then a 2x2/s2 conv (inputs zero-padded to even sides); final LayerNorm, mean pool, head.

Our layout follows timm: ``stem`` -> ``stages[i]`` (``downsample`` for i > 0, then ``blocks``) ->
``norm`` -> ``head``; official checkpoints load through :func:`checkpoint_filter_fn`.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, trunc_normal_
from timm.models import generate_default_cfgs, register_model
from torch import nn

from ..attention import LinearAttention, WindowAttention
from ._pyramid import PyramidBackbone, Stage, build_pyramid, drop_path_rates, imagenet_cfg

__all__ = ["L2ViT"]

# Parameter counts as the papers print them (rounded) (paper), checked by the model battery.
PUBLISHED_PARAMS = {"l2vit_tiny": "29M", "l2vit_small": "50M", "l2vit_base": "89M"}


def _conv_nhwc(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class CPE(nn.Module):
    """Conditional position encoding: ``x + DWConv3x3(x)`` on NHWC."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + _conv_nhwc(self.proj, x)


class LocalConcentration(nn.Module):
    """LCM: depthwise 7x7 -> GELU -> BatchNorm -> depthwise 7x7, on NHWC."""

    def __init__(self, dim: int, kernel_size: int = 7):
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.act = nn.GELU()
        self.bn = nn.BatchNorm2d(dim)
        self.conv2 = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.bn(self.act(self.conv1(x.permute(0, 3, 1, 2))))).permute(0, 2, 3, 1)


class LWABlock(nn.Module):
    """Local window attention block: ``s = CPE(x)``; ``x = s + WA(LN(s))``; ``x = CPE(x)``; ``x + MLP(LN(x))``."""

    def __init__(self, dim: int, num_heads: int, window_size: int = 7, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop_path: float = 0.0):
        super().__init__()
        self.cpe = nn.ModuleList([CPE(dim), CPE(dim)])
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window_size, qkv_bias=qkv_bias)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.cpe[0](x)
        x = self.cpe[1](shortcut + self.drop_path(self.attn(self.norm1(shortcut))))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class LGABlock(nn.Module):
    """Linear global attention block: CPE; ``+ LinAttn(LN1)``; ``+ LCM(LN3)``; ``+ MLP(LN2)``."""

    def __init__(self, dim: int, num_heads: int, window_size: int = 7, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop_path: float = 0.0):
        super().__init__()
        self.cpe = nn.ModuleList([CPE(dim)])
        self.norm1 = nn.LayerNorm(dim)
        self.attn = LinearAttention(dim, num_heads, qkv_bias=qkv_bias)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm3 = nn.LayerNorm(dim)
        self.lcm = LocalConcentration(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cpe[0](x)
        x = x + self.drop_path(self.attn(self.norm1(x)))
        x = x + self.drop_path(self.lcm(self.norm3(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class Downsample(nn.Module):
    """LayerNorm, zero-pad to even sides, 2x2 stride-2 conv (no norm after). NHWC."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Conv2d(dim, out_dim, 2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x).permute(0, 3, 1, 2)
        x = F.pad(x, (0, x.shape[-1] % 2, 0, x.shape[-2] % 2))
        return self.proj(x).permute(0, 2, 3, 1)


class L2ViT(PyramidBackbone):
    """L²ViT backbone.

    Args:
        dims, depths, num_heads: per stage.
        window_size: LWA window (7; 12 for the 384-px model).
        mlp_ratio: MLP expansion.
    """

    channels_last = True

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        dims: tuple[int, ...] = (96, 192, 384, 768),
        depths: tuple[int, ...] = (2, 2, 6, 2),
        num_heads: tuple[int, ...] = (3, 6, 12, 24),
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, dims[0] // 2, 3, stride=2, padding=1),
            nn.BatchNorm2d(dims[0] // 2),
            nn.ReLU(),
            nn.Conv2d(dims[0] // 2, dims[0], 3, stride=2, padding=1),
            nn.BatchNorm2d(dims[0]),
        )
        self.stem_norm = nn.LayerNorm(dims[0])
        dpr = drop_path_rates(drop_path_rate, depths)
        self.stages = nn.Sequential(*[
            Stage(
                Downsample(dims[i - 1], dims[i]) if i > 0 else nn.Identity(),
                [
                    (LWABlock if j % 2 == 0 else LGABlock)(dims[i], num_heads[i], window_size, mlp_ratio, qkv_bias,
                                                          dpr[i][j])
                    for j in range(depths[i])
                ],
            )
            for i in range(len(depths))
        ])
        self.feature_info = [dict(num_chs=dims[i], reduction=4 * 2**i, module=f"stages.{i}") for i in range(len(depths))]
        self.norm = nn.LayerNorm(dims[-1])
        self.init_head(dims[-1], num_classes, global_pool, drop_rate)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Conv2d, nn.Linear)):  # the official init covers convolutions too
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {name for name, _ in self.named_parameters() if name.endswith("attn.temperature")}

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (0, -x.shape[-1] % 4, 0, -x.shape[-2] % 4))  # official: pad to a multiple of the stride
        return self.stem_norm(self.stem(x).permute(0, 2, 3, 1))


def checkpoint_filter_fn(state_dict: dict, model: L2ViT) -> dict:
    """Official L2ViT keys -> ours.

    ``downsample_layers.0.proj.proj`` / ``.norm`` -> ``stem`` / ``stem_norm``; ``downsample_layers.i`` ->
    ``stages.i.downsample``; ``stages.i.j`` -> ``stages.i.blocks.j``; ``local_mp`` -> ``lcm``.
    """
    # the released "best-ema" training checkpoints hold the EMA weights (the published accuracy) under model_ema
    state_dict = state_dict.get("state_dict", state_dict.get("model_ema", state_dict.get("model", state_dict)))
    if any(k.startswith("stem.") for k in state_dict):
        return state_dict  # already ours
    out = {}
    for key, value in state_dict.items():
        key = key.replace("downsample_layers.0.proj.proj.", "stem.").replace("downsample_layers.0.norm.", "stem_norm.")
        key = re.sub(r"^downsample_layers\.(\d+)\.", r"stages.\1.downsample.", key)
        key = re.sub(r"^stages\.(\d+)\.(\d+)\.", r"stages.\1.blocks.\2.", key)
        out[key.replace(".local_mp.", ".lcm.")] = value
    return out


def _cfg(**kwargs) -> dict:
    return imagenet_cfg(first_conv="stem.0", paper_ids="arXiv:2501.16182", **kwargs)


# Official ImageNet-1k releases (GitHub release v1.0, linked from the official readme: the EMA weights of the
# best epoch; the official evaluation: ImageNet mean/std, bicubic resize to 256, centre crop 224).
_URL = "https://github.com/ChuanyangZheng/L2ViT/releases/download/v1.0/L2ViT-{}-checkpoint-best-ema.pth"
default_cfgs = generate_default_cfgs({
    "l2vit_tiny.in1k": _cfg(url=_URL.format("Tiny")),
    "l2vit_small.in1k": _cfg(url=_URL.format("Small")),
    "l2vit_base.in1k": _cfg(url=_URL.format("Base")),
})


def _create_l2vit(variant: str, pretrained: bool = False, **kwargs) -> L2ViT:
    return build_pyramid(L2ViT, variant, pretrained, checkpoint_filter_fn, **kwargs)


@register_model
def l2vit_tiny(pretrained: bool = False, **kwargs) -> L2ViT:
    args = dict(dims=(96, 192, 384, 768), depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))
    return _create_l2vit("l2vit_tiny", pretrained, **dict(args, **kwargs))


@register_model
def l2vit_small(pretrained: bool = False, **kwargs) -> L2ViT:
    args = dict(dims=(96, 192, 384, 768), depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24))
    return _create_l2vit("l2vit_small", pretrained, **dict(args, **kwargs))


@register_model
def l2vit_base(pretrained: bool = False, **kwargs) -> L2ViT:
    args = dict(dims=(128, 256, 512, 1024), depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32))
    return _create_l2vit("l2vit_base", pretrained, **dict(args, **kwargs))
