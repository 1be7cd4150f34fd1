"""Agent-DeiT: DeiT with agent attention.

Paper: "Agent Attention: On the Integration of Softmax and Linear Attention" (ECCV 2024,
https://arxiv.org/abs/2312.08874). Architecture as in LeapLabTHU/Agent-Attention
(agent_transformer/models/agent_deit.py, cfgs/agent_deit_{t,s,b}.yaml): a DeiT (patch 16, class token,
learnt position embedding, pre-norm blocks with LayerNorm eps 1e-6, class-token head) whose first
``agent_layer`` blocks (all by default; 4 in Agent-DeiT-B) use agent attention with the class token
kept out of the pooling; the rest use plain multi-head attention. Agents per block follow the official
four-group rule (blocks 0-1, 2-3, 4-9, 10-11 take ``agent_num[0..3]``); the releases use 49 (81 for B).

Like timm's ViTs, ``forward_features`` returns the normed token sequence ``[B, 1 + H*W, C]`` and
``forward_intermediates`` NCHW patch-token maps. Any input size runs: the image is zero-padded to a
multiple of the patch, and the position embedding and agent biases are resized bilinearly to the grid.
"""

from __future__ import annotations

import torch
from timm.layers import Attention, DropPath, Mlp
from timm.models import generate_default_cfgs, register_model
from torch import nn

from ..attention import ClassAgentAttention
from ..attention.agent import split_official_qkv
from ._vit import ClassTokenViT, build_vit, resize_pos_embed, vit_cfg

__all__ = ["AgentDeiT"]

# Parameter counts as the paper prints them (Agent-Attention README), checked by the model battery.
PUBLISHED_PARAMS = {"agent_deit_tiny": "6.0M", "agent_deit_small": "22.7M", "agent_deit_base": "87.2M"}

# official rule: block i takes agent_num[_AGENT_GROUP[i // 2]]
_AGENT_GROUP = {0: 0, 1: 1, 2: 2, 3: 2, 4: 2, 5: 3}


class Block(nn.Module):
    """Pre-norm ViT block whose attention is agent attention (with the grid size) or plain MHSA."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        agent_num: int | None,
        bias_size: tuple[int, int],
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.agent = agent_num is not None
        if self.agent:
            self.attn = ClassAgentAttention(
                dim, num_heads, agent_num, bias_size, qkv_bias, attn_drop, proj_drop
            )
        else:
            self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        y = self.norm1(x)
        x = x + self.drop_path(self.attn(y, size) if self.agent else self.attn(y))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class AgentDeiT(ClassTokenViT):
    """Agent-DeiT.

    Args:
        img_size: training resolution (sets the position-embedding and agent-bias grids; any size runs).
        embed_dim, depth, num_heads: ViT width, blocks, heads.
        agent_num: agents per block group (4 values, or one int); strings accepted as in the official configs.
        agent_layer: the first ``agent_layer`` blocks use agent attention (``<= 0``: all).
        global_pool: ``"token"`` (class token, official), ``"avg"`` (mean of patch tokens) or ``""``.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "token",
        embed_dim: int = 192,
        depth: int = 12,
        num_heads: int = 3,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        agent_num: int | str | tuple[int | str, ...] = 49,
        agent_layer: int = -1,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ):
        super().__init__(img_size, patch_size, in_chans, num_classes, global_pool, embed_dim, depth, drop_rate,
                         pos_drop_rate)
        agent_num = [agent_num] * 4 if isinstance(agent_num, (int, str)) else list(agent_num)
        agent_layer = agent_layer if agent_layer > 0 else depth
        dpr = [drop_path_rate * i / max(1, depth - 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            [
                Block(
                    embed_dim,
                    num_heads,
                    int(agent_num[_AGENT_GROUP[min(i // 2, 5)]]) if i < agent_layer else None,
                    self.grid,
                    mlp_ratio,
                    qkv_bias,
                    proj_drop_rate,
                    attn_drop_rate,
                    dpr[i],
                )
                for i in range(depth)
            ]
        )
        self.init_weights()

    def _step(self, block: nn.Module, x: torch.Tensor, size: tuple[int, int]):
        return self._call(block, x, size), None


def checkpoint_filter_fn(state_dict: dict, model: AgentDeiT) -> dict:
    """Official Agent-DeiT keys -> ours: agent attention's fused ``qkv`` -> ``q`` + ``kv`` (other names
    are the same); a position embedding for another grid is resized bilinearly."""
    state_dict = state_dict.get("state_dict", state_dict.get("model", state_dict))
    out = dict(state_dict)
    for i, block in enumerate(model.blocks):
        if block.agent:
            out = split_official_qkv(out, f"blocks.{i}.attn.")
    if "pos_embed" in out:
        out["pos_embed"] = resize_pos_embed(out["pos_embed"], model.grid, model.pos_embed_mode)
    return out


def _cfg(**kwargs) -> dict:
    return vit_cfg(paper_ids="arXiv:2312.08874", **kwargs)


# Official ImageNet-1k releases (no download here: pass pretrained_cfg_overlay=dict(file=path)).
default_cfgs = generate_default_cfgs(
    {
        "agent_deit_tiny.in1k": _cfg(),
        "agent_deit_small.in1k": _cfg(),
        "agent_deit_base.in1k": _cfg(),
    }
)


def _create_agent_deit(variant: str, pretrained: bool = False, **kwargs) -> AgentDeiT:
    return build_vit(AgentDeiT, variant, pretrained, checkpoint_filter_fn, **kwargs)


@register_model
def agent_deit_tiny(pretrained: bool = False, **kwargs) -> AgentDeiT:
    args = dict(embed_dim=192, depth=12, num_heads=3, agent_num=49)
    return _create_agent_deit("agent_deit_tiny", pretrained, **dict(args, **kwargs))


@register_model
def agent_deit_small(pretrained: bool = False, **kwargs) -> AgentDeiT:
    args = dict(embed_dim=384, depth=12, num_heads=6, agent_num=49)
    return _create_agent_deit("agent_deit_small", pretrained, **dict(args, **kwargs))


@register_model
def agent_deit_base(pretrained: bool = False, **kwargs) -> AgentDeiT:
    args = dict(embed_dim=768, depth=12, num_heads=12, agent_num=81, agent_layer=4)
    return _create_agent_deit("agent_deit_base", pretrained, **dict(args, **kwargs))
