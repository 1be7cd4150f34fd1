"""Agent-Swin: Swin Transformer with agent attention.

Paper: "Agent Attention: On the Integration of Softmax and Linear Attention" (ECCV 2024,
https://arxiv.org/abs/2312.08874). Architecture as in LeapLabTHU/Agent-Attention
(agent_transformer/models/agent_swin.py, cfgs/agent_swin_{t,s,b}.yaml): Swin's patch embedding, patch
merging and blocks, where each stage's blocks are 'A' (agent attention) or 'B' (Swin window attention
with relative position bias, window ``max(7, window_size // 8)``, shifted every other block). The
released ``window_size`` 56 covers the whole map of every stage at 224 px, so 'A' blocks attend
globally; here they always do (as the official detection backbone), with their biases resized to the
map. Block patterns per stage: Swin-T ``AAAB``, Swin-S ``AABB``, Swin-B ``AAMB2`` (``M2``: the first
two blocks of that stage 'A', the rest 'B').

Our layout follows timm: ``stem`` -> ``stages[i]`` (patch merging of the previous stage, then blocks)
-> ``norm`` -> ``head``; official checkpoints load through :func:`checkpoint_filter_fn`. Inputs of any
size are zero-padded bottom/right to the patch size, before patch merging and before 'B' windows
(the Swin detection convention).
"""

from __future__ import annotations

import re

import torch
from timm.layers import DropPath, Mlp, to_2tuple
from timm.models import generate_default_cfgs, register_model
from torch import nn

from ..attention import AgentAttention, WindowAttention
from ..attention.agent import split_official_qkv
from ._pyramid import (
    PatchEmbed,
    PatchMerging,
    PyramidBackbone,
    Stage,
    build_pyramid,
    drop_path_rates,
    imagenet_cfg,
)

__all__ = ["AgentSwinTransformer"]

# Parameter counts as the paper prints them (Agent-Attention README / paper Table), checked by the battery.
PUBLISHED_PARAMS = {"agent_swin_tiny": "29M", "agent_swin_small": "50M", "agent_swin_base": "88M"}


class AgentSwinBlock(nn.Module):
    """Pre-norm block: ``x + attn(LN(x))``, ``x + MLP(LN(x))``; ``attn`` is agent attention over the whole
    map ('A') or Swin window attention ('B')."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        attn_type: str = "A",
        agent_num: int = 49,
        bias_size: int | tuple[int, int] = 56,
        window_size: int = 7,
        shift_size: int = 0,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        if attn_type == "A":
            self.attn = AgentAttention(
                dim,
                num_heads,
                agent_num,
                bias_size,
                qkv_bias=qkv_bias,
                attn_drop=attn_drop,
                proj_drop=proj_drop,
            )
        elif attn_type == "B":
            self.attn = WindowAttention(
                dim, num_heads, window_size, shift_size, qkv_bias=qkv_bias, rel_pos_bias=True
            )
        else:
            raise ValueError(f"attn_type {attn_type!r}: expected 'A' (agent) or 'B' (window)")
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def stage_attn_types(attn_type: str, depths) -> list[list[str]]:
    """Per-block 'A'/'B' from the official pattern string: one letter per stage; 'M' followed (after the
    stage letters) by a number m makes that stage's first m blocks 'A' and the rest 'B'."""
    n = len(depths)
    split = int(attn_type[n:]) if len(attn_type) > n else 0
    return [
        [("A" if j < split else "B") if c == "M" else c for j in range(depth)]
        for c, depth in zip(attn_type[:n], depths)
    ]


class AgentSwinTransformer(PyramidBackbone):
    """Agent-Swin backbone.

    Args:
        img_size: training resolution; sets the grids the agent biases are learnt on (any input size runs).
        embed_dim, depths, num_heads: Swin widths (doubling per stage), blocks and heads per stage.
        window_size: the official 'A' window (56 at 224 px: the whole map); 'B' blocks use max(7, window_size // 8).
        agent_num: agents per stage (square numbers; strings accepted as in the official configs).
        attn_type: block pattern, e.g. ``"AAAB"``, ``"AAMB2"``.
    """

    channels_last = True

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dim: int = 96,
        depths: tuple[int, ...] = (2, 2, 6, 2),
        num_heads: tuple[int, ...] = (3, 6, 12, 24),
        window_size: int = 56,
        agent_num: tuple[int | str, ...] = (9, 16, 49, 49),
        attn_type: str = "AAAB",
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
    ):
        super().__init__()
        num_stages = len(depths)
        dims = [embed_dim * 2**i for i in range(num_stages)]
        grid = [s // patch_size for s in to_2tuple(img_size)]
        self.stem = PatchEmbed(in_chans, embed_dim, patch_size)
        dpr = drop_path_rates(drop_path_rate, depths)
        types = stage_attn_types(attn_type, depths)
        stages = []
        for i in range(num_stages):
            res = (grid[0] // 2**i, grid[1] // 2**i)
            blocks = []
            for j in range(depths[i]):
                ws = window_size if types[i][j] == "A" else max(7, window_size // 8)
                shift = 0 if j % 2 == 0 else ws // 2
                if min(res) <= ws:  # official: a window as large as the map is the map, unshifted
                    ws, shift = min(res), 0
                blocks.append(
                    AgentSwinBlock(
                        dims[i],
                        num_heads[i],
                        types[i][j],
                        int(agent_num[i]),
                        bias_size=ws,
                        window_size=ws,
                        shift_size=shift,
                        mlp_ratio=mlp_ratio,
                        qkv_bias=qkv_bias,
                        proj_drop=proj_drop_rate,
                        attn_drop=attn_drop_rate,
                        drop_path=dpr[i][j],
                    )
                )
            stages.append(Stage(PatchMerging(dims[i - 1], dims[i]) if i > 0 else nn.Identity(), blocks))
        self.stages = nn.Sequential(*stages)
        self.feature_info = [
            dict(num_chs=dims[i], reduction=patch_size * 2**i, module=f"stages.{i}")
            for i in range(num_stages)
        ]
        self.norm = nn.LayerNorm(dims[-1])
        self.init_head(dims[-1], num_classes, global_pool, drop_rate)
        self.apply(self.init_linear)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        # the official recipe excludes relative position tables by keyword; norms and biases go by shape
        return {n for n, _ in self.named_parameters() if "relative_position_bias_table" in n}


def checkpoint_filter_fn(state_dict: dict, model: AgentSwinTransformer) -> dict:
    """Official Agent-Swin keys -> ours.

    ``patch_embed`` -> ``stem``; ``layers.i.blocks.j`` -> ``stages.i.blocks.j``; ``layers.i.downsample``
    (at the end of stage i) -> ``stages.{i+1}.downsample``; agent attention's fused ``qkv`` -> ``q`` + ``kv``;
    the constant ``relative_position_index`` / ``attn_mask`` buffers are dropped.
    """
    state_dict = state_dict.get("state_dict", state_dict.get("model", state_dict))
    if any(k.startswith("stem.") for k in state_dict):
        return state_dict
    out = {}
    for key, value in state_dict.items():
        if key.endswith(("relative_position_index", "attn_mask")):
            continue
        key = key.replace("patch_embed.", "stem.")
        key = re.sub(r"^layers\.(\d+)\.blocks\.", r"stages.\1.blocks.", key)
        key = re.sub(r"^layers\.(\d+)\.downsample\.", lambda m: f"stages.{int(m[1]) + 1}.downsample.", key)
        out[key] = value
    for name, module in model.named_modules():
        if isinstance(module, AgentAttention):
            out = split_official_qkv(out, f"{name}.")
    return out


def _cfg(**kwargs) -> dict:
    return imagenet_cfg(first_conv="stem.proj", paper_ids="arXiv:2312.08874", **kwargs)


# Official ImageNet-1k releases (no download here: pass pretrained_cfg_overlay=dict(file=path)).
default_cfgs = generate_default_cfgs(
    {
        "agent_swin_tiny.in1k": _cfg(),
        "agent_swin_small.in1k": _cfg(),
        "agent_swin_base.in1k": _cfg(),
    }
)


def _create_agent_swin(variant: str, pretrained: bool = False, **kwargs) -> AgentSwinTransformer:
    return build_pyramid(AgentSwinTransformer, variant, pretrained, checkpoint_filter_fn, **kwargs)


@register_model
def agent_swin_tiny(pretrained: bool = False, **kwargs) -> AgentSwinTransformer:
    args = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), attn_type="AAAB")
    return _create_agent_swin("agent_swin_tiny", pretrained, **dict(args, **kwargs))


@register_model
def agent_swin_small(pretrained: bool = False, **kwargs) -> AgentSwinTransformer:
    args = dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), attn_type="AABB")
    return _create_agent_swin("agent_swin_small", pretrained, **dict(args, **kwargs))


@register_model
def agent_swin_base(pretrained: bool = False, **kwargs) -> AgentSwinTransformer:
    args = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), attn_type="AAMB2")
    return _create_agent_swin("agent_swin_base", pretrained, **dict(args, **kwargs))
