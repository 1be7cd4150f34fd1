"""EViT: DeiT that keeps only the attentive tokens.

Paper: "Not All Patches are What You Need: Expediting Vision Transformers via Token Reorganizations"
(ICLR 2022, https://arxiv.org/abs/2202.07800). Architecture as in youweiliang/evit (evit.py,
``deit_*_patch16_shrink_base``): a DeiT whose blocks at ``pruning_loc`` (3, 6, 9) keep the
``ceil(keep_rate * tokens)`` patch tokens the class token attends to most and fuse the rest into one token
(:mod:`vision.attention.pruning`). Pruning adds no parameters, so the counts are DeiT's.

Training: ``train_keep_rate`` (set each step by :class:`vision.callbacks.KeepRateSchedule`, the published
schedule) overrides the keep rate of the pruning blocks in training mode; evaluation uses ``keep_rate``.
``forward_features`` returns the normed tokens that remain (``output_tokens(H*W)`` patch tokens after the
class token); ``forward_intermediates`` scatters each block's tokens back to their grid positions (pruned
positions zero, the fused token left out), so ``features_only`` gives NCHW maps. Any input size runs (the
position embedding is resized bicubically, as the official code does).
"""

from __future__ import annotations

import math

import torch
from timm.layers import DropPath, Mlp
from timm.models import generate_default_cfgs, register_model
from torch import nn

from ..attention import ClassScoredAttention, keep_attentive_tokens
from ._vit import ClassTokenViT, build_vit, resize_pos_embed, vit_cfg

__all__ = ["EViT"]

# DeiT's parameter counts as the EViT paper prints them (pruning adds none); checked by the model battery.
PUBLISHED_PARAMS = {"evit_deit_tiny": "5.7M", "evit_deit_small": "22.1M", "evit_deit_base": "86.6M"}


def kept_tokens(rate: float, tokens: int) -> int:
    """Patch tokens a pruning block keeps out of ``tokens`` (the official ``ceil``)."""
    return math.ceil(rate * tokens)


class Block(nn.Module):
    """Pre-norm ViT block; with ``keep_rate < 1`` it prunes between the attention and the MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 proj_drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0, keep_rate: float = 1.0,
                 fuse_token: bool = True):
        super().__init__()
        if not 0 < keep_rate <= 1:
            raise ValueError(f"keep_rate={keep_rate}: expected 0 < keep_rate <= 1")
        self.keep_rate, self.fuse_token = keep_rate, fuse_token
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = ClassScoredAttention(dim, num_heads, qkv_bias, attn_drop, proj_drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop)

    def forward(self, x: torch.Tensor, keep_rate: float | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Tokens after the block, and the kept indices into the incoming patch tokens (None: all kept)."""
        out, cls_attn = self.attn(self.norm1(x))
        x = x + self.drop_path(out)
        rate = self.keep_rate if keep_rate is None else keep_rate
        idx = None
        if self.keep_rate < 1 and rate < 1:  # only the configured pruning blocks, as officially
            keep = kept_tokens(rate, x.shape[1] - 1)
            if keep < x.shape[1] - 1:
                x, idx = keep_attentive_tokens(x, cls_attn, keep, self.fuse_token)
        return x + self.drop_path(self.mlp(self.norm2(x))), idx


class EViT(ClassTokenViT):
    """EViT on a DeiT.

    Args:
        keep_rate: fraction of patch tokens kept at each pruning block (evaluation, and the end of the
            training schedule).
        pruning_loc: indices of the pruning blocks.
        fuse_token: fuse the pruned tokens into one extra token (the published models do).
        embed_dim, depth, num_heads: ViT width, blocks, heads. Other arguments as in timm's ViT.
    """

    pos_embed_mode = "bicubic"

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
        keep_rate: float = 0.7,
        pruning_loc: tuple[int, ...] = (3, 6, 9),
        fuse_token: bool = True,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ):
        super().__init__(img_size, patch_size, in_chans, num_classes, global_pool, embed_dim, depth, drop_rate,
                         pos_drop_rate)
        if any(not 0 <= i < depth for i in pruning_loc):
            raise ValueError(f"pruning_loc={tuple(pruning_loc)} must index the {depth} blocks")
        self.keep_rate, self.fuse_token = keep_rate, fuse_token
        self.train_keep_rate: float | None = None
        dpr = [drop_path_rate * i / max(1, depth - 1) for i in range(depth)]
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, proj_drop_rate, attn_drop_rate, dpr[i],
                  keep_rate if i in pruning_loc else 1.0, fuse_token)
            for i in range(depth)
        ])
        self.init_weights()

    def output_tokens(self, num_patches: int) -> int:
        """Tokens after the class token that ``forward_features`` returns for ``num_patches`` patches."""
        n = num_patches
        for block in self.blocks:
            if block.keep_rate < 1 and kept_tokens(block.keep_rate, n) < n:
                n = kept_tokens(block.keep_rate, n) + int(self.fuse_token)
        return n

    def _step(self, block: Block, x: torch.Tensor, size: tuple[int, int]):
        return self._call(block, x, self.train_keep_rate if self.training else None)

    @torch.no_grad()
    def attention_maps(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, pruning blocks, H, W]``: 1 where a patch token is still kept after each pruning block."""
        indices = [i for i, block in enumerate(self.blocks) if block.keep_rate < 1]
        maps = self.forward_intermediates(x, indices=indices, intermediates_only=True)
        return torch.stack([(m.abs().sum(1) > 0).to(x.dtype) for m in maps], dim=1)


def checkpoint_filter_fn(state_dict: dict, model: EViT) -> dict:
    """Official EViT (and DeiT) checkpoints load by name; a position embedding for another grid is resized."""
    state_dict = dict(state_dict.get("model", state_dict))
    if "pos_embed" in state_dict:
        state_dict["pos_embed"] = resize_pos_embed(state_dict["pos_embed"], model.grid, model.pos_embed_mode)
    return state_dict


def _cfg(**kwargs) -> dict:
    return vit_cfg(paper_ids="arXiv:2202.07800", **kwargs)


# Official ImageNet-1k releases (keep rate 0.7; no download here: pass pretrained_cfg_overlay=dict(file=path)).
default_cfgs = generate_default_cfgs({
    "evit_deit_tiny.in1k": _cfg(),
    "evit_deit_small.in1k": _cfg(),
    "evit_deit_base.in1k": _cfg(),
})


def _create_evit(variant: str, pretrained: bool = False, **kwargs) -> EViT:
    return build_vit(EViT, variant, pretrained, checkpoint_filter_fn, **kwargs)


@register_model
def evit_deit_tiny(pretrained: bool = False, **kwargs) -> EViT:
    return _create_evit("evit_deit_tiny", pretrained, **dict(dict(embed_dim=192, depth=12, num_heads=3), **kwargs))


@register_model
def evit_deit_small(pretrained: bool = False, **kwargs) -> EViT:
    return _create_evit("evit_deit_small", pretrained, **dict(dict(embed_dim=384, depth=12, num_heads=6), **kwargs))


@register_model
def evit_deit_base(pretrained: bool = False, **kwargs) -> EViT:
    return _create_evit("evit_deit_base", pretrained, **dict(dict(embed_dim=768, depth=12, num_heads=12), **kwargs))
