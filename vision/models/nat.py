"""NAT and DiNAT: Neighborhood (and Dilated Neighborhood) Attention Transformers.

Papers: "Neighborhood Attention Transformer" (CVPR 2023, https://arxiv.org/abs/2204.07143) and
"Dilated Neighborhood Attention Transformer" (https://arxiv.org/abs/2209.15001).
Architecture as in SHI-Labs/Neighborhood-Attention-Transformer (classification/nat.py, dinat.py):
a two-conv tokenizer (stride 4), four stages of neighborhood-attention blocks (kernel 7; DiNAT
alternates dilations per block), conv 3x3/s2 downsampling, final LayerNorm, mean pool, linear head.

Our layout follows timm: ``stem`` -> ``stages[i]`` (downsample of the previous stage, then blocks)
-> ``norm`` -> ``head``. Official checkpoints (``levels[i]`` with the downsample at the end of a
level) load through :func:`checkpoint_filter_fn`.
"""

from __future__ import annotations

import re

import torch
from timm.layers import DropPath, LayerScale, Mlp
from timm.models import generate_default_cfgs, register_model
from torch import nn

from ..attention import NeighborhoodAttention2D
from ._pyramid import PyramidBackbone, Stage, build_pyramid, drop_path_rates, imagenet_cfg

__all__ = ["NAT"]

# Parameter counts as the papers print them (rounded) (papers' tables, millions), checked by the model battery.
PUBLISHED_PARAMS = {
    "nat_mini": "20M", "nat_tiny": "28M", "nat_small": "51M", "nat_base": "90M",
    "dinat_mini": "20M", "dinat_tiny": "28M", "dinat_small": "51M", "dinat_base": "90M",
}


class ConvTokenizer(nn.Module):
    """Two 3x3 stride-2 convolutions (no activation between them), then LayerNorm: NCHW -> NHWC."""

    def __init__(self, in_chans: int, embed_dim: int, norm_layer=nn.LayerNorm):
        super().__init__()
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, embed_dim // 2, 3, stride=2, padding=1),
            nn.Conv2d(embed_dim // 2, embed_dim, 3, stride=2, padding=1),
        )
        self.norm = norm_layer(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class ConvDownsample(nn.Module):
    """3x3 stride-2 convolution doubling the channels (no bias), then LayerNorm, on NHWC."""

    def __init__(self, dim: int, out_dim: int, norm_layer=nn.LayerNorm):
        super().__init__()
        self.reduction = nn.Conv2d(dim, out_dim, 3, stride=2, padding=1, bias=False)
        self.norm = norm_layer(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.reduction(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


class NATBlock(nn.Module):
    """Pre-norm transformer block: x + NA(LN(x)), then x + MLP(LN(x)), optional layer scale."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        kernel_size: int = 7,
        dilation: int = 1,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        layer_scale: float | None = None,
        norm_layer=nn.LayerNorm,
        dilation_policy: str = "error",
    ):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = NeighborhoodAttention2D(
            dim, num_heads, kernel_size, dilation, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop,
            dilation_policy=dilation_policy,
        )
        self.ls1 = LayerScale(dim, layer_scale) if layer_scale else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop)
        self.ls2 = LayerScale(dim, layer_scale) if layer_scale else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class NAT(PyramidBackbone):
    """NAT / DiNAT backbone (DiNAT = NAT with per-block dilations).

    Args:
        embed_dim: stage-1 width; stage ``i`` has ``embed_dim * 2**i`` channels.
        depths, num_heads: per stage.
        dilations: per stage, a list with one dilation per block (None: all 1, plain NAT).
        kernel_size: neighborhood size (7 in every released model).
        layer_scale: initial LayerScale value, or None for none.
        dilation_policy: ``"error"`` or ``"reduce"`` when an input is too small for a dilation
            (official behaviour pads the input up to ``kernel_size * dilation``; see the attention module).
    """

    channels_last = True

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dim: int = 64,
        depths: tuple[int, ...] = (3, 4, 6, 5),
        num_heads: tuple[int, ...] = (2, 4, 8, 16),
        dilations: list[list[int]] | None = None,
        kernel_size: int = 7,
        mlp_ratio: float = 3.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.2,
        layer_scale: float | None = None,
        norm_layer=nn.LayerNorm,
        dilation_policy: str = "error",
    ):
        super().__init__()
        dims = [int(embed_dim * 2**i) for i in range(len(depths))]
        dilations = dilations or [[1] * d for d in depths]
        if [len(d) for d in dilations] != list(depths):
            raise ValueError(f"dilations {dilations} must list one dilation per block of depths {depths}")

        self.stem = ConvTokenizer(in_chans, embed_dim, norm_layer)
        dpr = drop_path_rates(drop_path_rate, depths)
        self.stages = nn.Sequential(*[
            Stage(
                ConvDownsample(dims[i - 1], dims[i], norm_layer) if i > 0 else nn.Identity(),
                [
                    NATBlock(
                        dims[i], num_heads[i], kernel_size, dilations[i][j], mlp_ratio, qkv_bias, proj_drop_rate,
                        attn_drop_rate, dpr[i][j], layer_scale, norm_layer, dilation_policy,
                    )
                    for j in range(depths[i])
                ],
            )
            for i in range(len(depths))
        ])
        self.feature_info = [dict(num_chs=dims[i], reduction=4 * 2**i, module=f"stages.{i}") for i in range(len(depths))]
        self.norm = norm_layer(dims[-1])
        self.init_head(dims[-1], num_classes, global_pool, drop_rate)
        self.apply(self.init_linear)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {name for name, _ in self.named_parameters() if name.endswith(".rpb")}


def checkpoint_filter_fn(state_dict: dict, model: NAT) -> dict:
    """Official NAT/DiNAT keys -> ours.

    ``levels.i.blocks.j`` -> ``stages.i.blocks.j``; ``levels.i.downsample`` -> ``stages.(i+1).downsample``;
    ``patch_embed`` -> ``stem``; ``gamma1/2`` -> ``ls1/2.gamma``; NATTEN <= 0.14 named the bias ``attn.rpb``
    as well, so no rename is needed there.
    """
    state_dict = state_dict.get("state_dict", state_dict.get("model", state_dict))
    if any(k.startswith("stages.") for k in state_dict):
        return state_dict  # already ours
    out = {}
    for key, value in state_dict.items():
        key = key.replace("patch_embed.", "stem.")
        key = re.sub(r"^levels\.(\d+)\.downsample\.", lambda m: f"stages.{int(m.group(1)) + 1}.downsample.", key)
        key = re.sub(r"^levels\.(\d+)\.blocks\.", r"stages.\1.blocks.", key)
        key = re.sub(r"\.gamma([12])$", r".ls\1.gamma", key)
        out[key] = value
    return out


def _cfg(**kwargs) -> dict:
    return imagenet_cfg(first_conv="stem.proj.0", license="mit", **kwargs)


# Official ImageNet-1k releases, as linked from the official classification/NAT.md and DiNAT.md
# (timm's transforms: ImageNet mean/std, bicubic, crop 0.875).
_NAT_URL = "https://shi-labs.com/projects/nat/checkpoints/CLS/{}.pth"
_DINAT_URL = "https://shi-labs.com/projects/dinat/checkpoints/imagenet1k/{}_in1k_224.pth"
default_cfgs = generate_default_cfgs({
    **{f"nat_{s}.in1k": _cfg(url=_NAT_URL.format(f"nat_{s}"), paper_ids="arXiv:2204.07143")
       for s in ("mini", "tiny", "small", "base")},
    **{f"dinat_{s}.in1k": _cfg(url=_DINAT_URL.format(f"dinat_{s}"), paper_ids="arXiv:2209.15001")
       for s in ("mini", "tiny", "small", "base")},
})


def _create_nat(variant: str, pretrained: bool = False, **kwargs) -> NAT:
    return build_pyramid(NAT, variant, pretrained, checkpoint_filter_fn, **kwargs)


# DiNAT's dilations per stage at 224 px: stage grids 56, 28, 14, 7 with kernel 7.
_DINAT_DILATIONS = {
    (3, 4, 6, 5): [[1, 8, 1], [1, 4, 1, 4], [1, 2] * 3, [1] * 5],
    (3, 4, 18, 5): [[1, 8, 1], [1, 4, 1, 4], [1, 2] * 9, [1] * 5],
}
_ARCHS = {
    "mini": dict(embed_dim=64, depths=(3, 4, 6, 5), num_heads=(2, 4, 8, 16), mlp_ratio=3, drop_path_rate=0.2),
    "tiny": dict(embed_dim=64, depths=(3, 4, 18, 5), num_heads=(2, 4, 8, 16), mlp_ratio=3, drop_path_rate=0.2),
    "small": dict(embed_dim=96, depths=(3, 4, 18, 5), num_heads=(3, 6, 12, 24), mlp_ratio=2, drop_path_rate=0.3),
    "base": dict(embed_dim=128, depths=(3, 4, 18, 5), num_heads=(4, 8, 16, 32), mlp_ratio=2, drop_path_rate=0.5),
}


def _nat(size: str, dilated: bool, layer_scale: float | None, pretrained: bool, kwargs: dict) -> NAT:
    args = dict(_ARCHS[size], layer_scale=layer_scale)
    if dilated:
        args["dilations"] = _DINAT_DILATIONS[args["depths"]]
    return _create_nat(f"{'dinat' if dilated else 'nat'}_{size}", pretrained, **dict(args, **kwargs))


@register_model
def nat_mini(pretrained: bool = False, **kwargs) -> NAT:
    return _nat("mini", False, None, pretrained, kwargs)


@register_model
def nat_tiny(pretrained: bool = False, **kwargs) -> NAT:
    return _nat("tiny", False, None, pretrained, kwargs)


@register_model
def nat_small(pretrained: bool = False, **kwargs) -> NAT:
    return _nat("small", False, 1e-5, pretrained, kwargs)


@register_model
def nat_base(pretrained: bool = False, **kwargs) -> NAT:
    return _nat("base", False, 1e-5, pretrained, kwargs)


@register_model
def dinat_mini(pretrained: bool = False, **kwargs) -> NAT:
    return _nat("mini", True, None, pretrained, kwargs)


@register_model
def dinat_tiny(pretrained: bool = False, **kwargs) -> NAT:
    return _nat("tiny", True, None, pretrained, kwargs)


@register_model
def dinat_small(pretrained: bool = False, **kwargs) -> NAT:
    return _nat("small", True, None, pretrained, kwargs)


@register_model
def dinat_base(pretrained: bool = False, **kwargs) -> NAT:
    return _nat("base", True, 1e-5, pretrained, kwargs)
