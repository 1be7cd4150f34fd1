"""Agent-PVT: Pyramid Vision Transformer with agent attention.

Paper: "Agent Attention: On the Integration of Softmax and Linear Attention" (ECCV 2024,
https://arxiv.org/abs/2312.08874). Architecture as in LeapLabTHU/Agent-Attention
(agent_transformer/models/agent_pvt.py, cfgs/agent_pvt_{t,s,m,b}.yaml): PVT-v1 with every block's
spatial-reduction attention replaced by agent attention over the whole map (released configs: no
spatial reduction, ``agent_sr_ratios = 1111``; agents 9-16-49-49). Each stage starts with a patch
embedding (conv 4x4/s4, then 2x2/s2; LayerNorm) and adds its learnt position embedding (resized
bilinearly when the grid differs from the training one). Blocks use LayerNorm eps 1e-6; there is no
final norm: logits = head(mean over tokens).

Our layout follows timm: ``stem`` (stage-1 patch embedding) -> ``stages[i]`` (patch embedding for
i > 0, then blocks) -> ``head``; official checkpoints load through :func:`checkpoint_filter_fn`. As in
the official code, a side that is not a multiple of a patch size is floored by the strided conv.
"""

from __future__ import annotations

import re
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, to_2tuple, trunc_normal_
from timm.models import generate_default_cfgs, register_model
from torch import nn

from ..attention import AgentAttention
from ._pyramid import PyramidBackbone, Stage, build_pyramid, drop_path_rates, imagenet_cfg

__all__ = ["AgentPVT"]

# Parameter counts as the paper prints them (Agent-Attention README), checked by the model battery.
PUBLISHED_PARAMS = {
    "agent_pvt_tiny": "11.6M",
    "agent_pvt_small": "20.6M",
    "agent_pvt_medium": "35.9M",
    "agent_pvt_large": "48.7M",
}


class PatchEmbed(nn.Module):
    """Strided conv + LayerNorm, plus the stage's position embedding: NCHW or NHWC -> NHWC."""

    def __init__(
        self, in_chans: int, embed_dim: int, patch_size: int, grid: tuple[int, int], channels_last: bool
    ):
        super().__init__()
        self.channels_last = channels_last
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)
        self.grid = grid
        self.pos_embed = nn.Parameter(torch.zeros(1, grid[0] * grid[1], embed_dim))
        trunc_normal_(self.pos_embed, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.proj(x.permute(0, 3, 1, 2) if self.channels_last else x).permute(0, 2, 3, 1))
        size = x.shape[1:3]
        pos = self.pos_embed.view(1, *self.grid, -1)
        # a symbolic size (torch.export, dynamic H/W) always resamples: the identity at the trained grid
        if not all(isinstance(s, int) for s in size) or tuple(size) != self.grid:
            pos = F.interpolate(pos.permute(0, 3, 1, 2), size=size, mode="bilinear").permute(0, 2, 3, 1)
        return x + pos


class AgentPVTBlock(nn.Module):
    """Pre-norm block: ``x + AgentAttention(LN(x))``, ``x + MLP(LN(x))`` (LayerNorm eps 1e-6)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        agent_num: int,
        bias_size: tuple[int, int],
        sr_ratio: int = 1,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
    ):
        super().__init__()
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.norm1 = norm(dim)
        self.attn = AgentAttention(
            dim, num_heads, agent_num, bias_size, sr_ratio, qkv_bias, attn_drop, proj_drop
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class AgentPVT(PyramidBackbone):
    """Agent-PVT backbone.

    Args:
        img_size: training resolution (sets the position-embedding and agent-bias grids; any size runs).
        embed_dims, depths, num_heads, mlp_ratios: per stage.
        agent_num: agents per stage (square numbers; strings accepted as in the official configs).
        agent_sr_ratios: key/value spatial reduction per stage (released models: 1).
    """

    channels_last = True

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dims: tuple[int, ...] = (64, 128, 320, 512),
        depths: tuple[int, ...] = (2, 2, 2, 2),
        num_heads: tuple[int, ...] = (1, 2, 5, 8),
        mlp_ratios: tuple[float, ...] = (8, 8, 4, 4),
        agent_num: tuple[int | str, ...] = (9, 16, 49, 49),
        agent_sr_ratios: tuple[int | str, ...] | str = (1, 1, 1, 1),
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        num_stages = len(depths)
        grid = [s // patch_size for s in to_2tuple(img_size)]
        grids = [(grid[0] // 2**i, grid[1] // 2**i) for i in range(num_stages)]
        dpr = drop_path_rates(drop_path_rate, depths)
        self.stem = PatchEmbed(in_chans, embed_dims[0], patch_size, grids[0], channels_last=False)
        self.stages = nn.Sequential(
            *[
                Stage(
                    PatchEmbed(embed_dims[i - 1], embed_dims[i], 2, grids[i], channels_last=True)
                    if i > 0
                    else nn.Identity(),
                    [
                        AgentPVTBlock(
                            embed_dims[i],
                            num_heads[i],
                            int(agent_num[i]),
                            grids[i],
                            int(agent_sr_ratios[i]),
                            mlp_ratios[i],
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
            dict(num_chs=embed_dims[i], reduction=patch_size * 2**i, module=f"stages.{i}")
            for i in range(num_stages)
        ]
        self.norm = nn.Identity()  # the official model has no final norm
        self.init_head(embed_dims[-1], num_classes, global_pool, drop_rate)
        self.apply(self.init_linear)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return set()  # the official recipe decays the position embeddings too


def checkpoint_filter_fn(state_dict: dict, model: AgentPVT) -> dict:
    """Official Agent-PVT keys -> ours.

    ``patch_embed1`` / ``pos_embed1`` -> ``stem`` / ``stem.pos_embed``; ``patch_embed{i+1}`` /
    ``pos_embed{i+1}`` -> ``stages.i.downsample``; ``block{i+1}.j`` -> ``stages.i.blocks.j``.
    """
    state_dict = state_dict.get("state_dict", state_dict.get("model", state_dict))
    if any(k.startswith("stem.") for k in state_dict):
        return state_dict
    out = {}
    for key, value in state_dict.items():
        key = re.sub(r"^pos_embed(\d+)$", r"patch_embed\1.pos_embed", key)
        key = re.sub(r"^patch_embed1\.", "stem.", key)
        key = re.sub(r"^patch_embed(\d+)\.", lambda m: f"stages.{int(m[1]) - 1}.downsample.", key)
        key = re.sub(r"^block(\d+)\.(\d+)\.", lambda m: f"stages.{int(m[1]) - 1}.blocks.{m[2]}.", key)
        out[key] = value
    return out


def _cfg(**kwargs) -> dict:
    return imagenet_cfg(first_conv="stem.proj", paper_ids="arXiv:2312.08874", **kwargs)


# Official ImageNet-1k releases (no download here: pass pretrained_cfg_overlay=dict(file=path)).
default_cfgs = generate_default_cfgs(
    {
        "agent_pvt_tiny.in1k": _cfg(),
        "agent_pvt_small.in1k": _cfg(),
        "agent_pvt_medium.in1k": _cfg(),
        "agent_pvt_large.in1k": _cfg(),
    }
)


def _create_agent_pvt(variant: str, pretrained: bool = False, **kwargs) -> AgentPVT:
    return build_pyramid(AgentPVT, variant, pretrained, checkpoint_filter_fn, **kwargs)


@register_model
def agent_pvt_tiny(pretrained: bool = False, **kwargs) -> AgentPVT:
    return _create_agent_pvt("agent_pvt_tiny", pretrained, **dict(dict(depths=(2, 2, 2, 2)), **kwargs))


@register_model
def agent_pvt_small(pretrained: bool = False, **kwargs) -> AgentPVT:
    return _create_agent_pvt("agent_pvt_small", pretrained, **dict(dict(depths=(3, 4, 6, 3)), **kwargs))


@register_model
def agent_pvt_medium(pretrained: bool = False, **kwargs) -> AgentPVT:
    return _create_agent_pvt("agent_pvt_medium", pretrained, **dict(dict(depths=(3, 4, 18, 3)), **kwargs))


@register_model
def agent_pvt_large(pretrained: bool = False, **kwargs) -> AgentPVT:
    return _create_agent_pvt("agent_pvt_large", pretrained, **dict(dict(depths=(3, 8, 27, 3)), **kwargs))
