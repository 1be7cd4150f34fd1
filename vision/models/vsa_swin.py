"""VSA-Swin: Swin Transformer with varied-size window attention.

Paper: "VSA: Learning Varied-Size Window Attention in Vision Transformers" (ECCV 2022,
https://arxiv.org/abs/2204.08446), which reports Swin-T+VSA 82.24 and Swin-S+VSA 83.6 top-1 on
ImageNet-1k. The authors never released their Swin+VSA code (ViTAE-Transformer/ViTAE-VSA announces it as
"coming soon"), so this is Swin (patch 4, widths doubling from 96, patch merging, pre-norm blocks with
MLP ratio 4) with every window attention replaced by the released VSA module
(:class:`vision.attention.VSAWindowAttention`, window 7). VSA has no cyclic shift (its windows move and
overlap by themselves), so no block is shifted.

Our layout follows timm: ``stem`` -> ``stages[i]`` (patch merging of the previous stage, then blocks)
-> ``norm`` -> ``head``. Any input size runs (zero padding to the patch size, before patch merging and,
inside VSA, to the window).
"""

from __future__ import annotations

import torch
from timm.layers import DropPath, Mlp
from timm.models import generate_default_cfgs, register_model
from torch import nn

from ..attention import VSAWindowAttention
from ._pyramid import (
    PatchEmbed,
    PatchMerging,
    PyramidBackbone,
    Stage,
    build_pyramid,
    drop_path_rates,
    imagenet_cfg,
)

__all__ = ["VSASwinTransformer"]

# Parameter counts as the VSA paper prints them (ImageNet table, Swin-T/S + VSA), checked by the battery.
PUBLISHED_PARAMS = {"vsa_swin_tiny": "29M", "vsa_swin_small": "50M"}


class VSASwinBlock(nn.Module):
    """Pre-norm block: ``x + VSA(LN(x))``, ``x + MLP(LN(x))``, on NHWC."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = VSAWindowAttention(
            dim,
            num_heads,
            window_size=window_size,
            qkv_bias=qkv_bias,
            attn_drop=attn_drop,
            proj_drop=proj_drop,
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class VSASwinTransformer(PyramidBackbone):
    """Swin with VSA.

    Args:
        embed_dim, depths, num_heads: Swin widths (doubling per stage), blocks and heads per stage.
        window_size: VSA's default window.
        zero_init_sampling: start every window at its default place and size (False: PyTorch's default
            init of the offset / scale predictors, as the official code leaves them).
    """

    channels_last = True

    def __init__(
        self,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dim: int = 96,
        depths: tuple[int, ...] = (2, 2, 6, 2),
        num_heads: tuple[int, ...] = (3, 6, 12, 24),
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        zero_init_sampling: bool = True,
    ):
        super().__init__()
        num_stages = len(depths)
        dims = [embed_dim * 2**i for i in range(num_stages)]
        self.stem = PatchEmbed(in_chans, embed_dim, patch_size)
        dpr = drop_path_rates(drop_path_rate, depths)
        self.stages = nn.Sequential(
            *[
                Stage(
                    PatchMerging(dims[i - 1], dims[i]) if i > 0 else nn.Identity(),
                    [
                        VSASwinBlock(
                            dims[i],
                            num_heads[i],
                            window_size,
                            mlp_ratio,
                            qkv_bias,
                            proj_drop_rate,
                            attn_drop_rate,
                            dpr[i][j],
                        )
                        for j in range(depths[i])
                    ],
                )
                for i in range(num_stages)
            ]
        )
        self.feature_info = [
            dict(num_chs=dims[i], reduction=patch_size * 2**i, module=f"stages.{i}")
            for i in range(num_stages)
        ]
        self.norm = nn.LayerNorm(dims[-1])
        self.init_head(dims[-1], num_classes, global_pool, drop_rate)
        self.apply(self.init_linear)
        for module in self.modules():
            if isinstance(module, VSAWindowAttention):
                if zero_init_sampling:
                    module.reset_sampling()
                else:  # the official predictors are 1x1 convs, which the Swin init leaves at PyTorch's default
                    module.sampling_offsets.reset_parameters()
                    module.sampling_scales.reset_parameters()

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {n for n, _ in self.named_parameters() if "relative_position_bias_table" in n}


def checkpoint_filter_fn(state_dict: dict, model: VSASwinTransformer) -> dict:
    """No official checkpoint exists; accepts our own state dicts (optionally under ``state_dict``/``model``)."""
    return state_dict.get("state_dict", state_dict.get("model", state_dict))


def _cfg(**kwargs) -> dict:
    return imagenet_cfg(first_conv="stem.proj", paper_ids="arXiv:2204.08446", **kwargs)


# No official weights were released ("coming soon"); the tag only names the recipe.
default_cfgs = generate_default_cfgs(
    {
        "vsa_swin_tiny.untrained": _cfg(),
        "vsa_swin_small.untrained": _cfg(),
    }
)


def _create_vsa_swin(variant: str, pretrained: bool = False, **kwargs) -> VSASwinTransformer:
    return build_pyramid(VSASwinTransformer, variant, pretrained, checkpoint_filter_fn, **kwargs)


@register_model
def vsa_swin_tiny(pretrained: bool = False, **kwargs) -> VSASwinTransformer:
    args = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))
    return _create_vsa_swin("vsa_swin_tiny", pretrained, **dict(args, **kwargs))


@register_model
def vsa_swin_small(pretrained: bool = False, **kwargs) -> VSASwinTransformer:
    args = dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24))
    return _create_vsa_swin("vsa_swin_small", pretrained, **dict(args, **kwargs))
