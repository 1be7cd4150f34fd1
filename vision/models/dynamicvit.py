"""DynamicViT: DeiT with learnt, input-dependent token sparsification.

Paper: "DynamicViT: Efficient Vision Transformers with Dynamic Token Sparsification" (NeurIPS 2021,
https://arxiv.org/abs/2106.02034). Architecture as in raoyongming/DynamicViT (``models/dyvit.py``,
``VisionTransformerDiffPruning``; ``main.py`` for ``deit-s`` / ``deit-b``): a DeiT with a prediction module
(:class:`~vision.attention.pruning.KeepPredictor`) before each block in ``pruning_loc`` (3, 6, 9). Stage ``s``
keeps the fraction ``keep_rate ** (s + 1)`` of the patch tokens (0.7, 0.49, 0.343 for the published 0.7).

- Training keeps every token: hard Gumbel-softmax decisions mask the dropped tokens out of the other tokens'
  attention (from the pruning block on), and the model exposes its auxiliary loss after the forward
  (``aux_losses``, see below).
- Inference removes tokens: each stage keeps the ``int(keep_ratio * H*W)`` patch tokens (official ``int``,
  counted from the input's patch count, at least 1) with the highest keep score, in score order.
  ``forward_features`` returns the class token and those tokens (``output_tokens(H*W)``);
  ``forward_intermediates`` scatters each block's tokens back to their grid positions (pruned ones zero).

Auxiliary-loss interface (read by :class:`vision.tasks.ClassificationModule` after every training forward):
``aux_losses`` maps names to weighted scalar losses, here ``{"ratio": ratio_weight * ratio loss}`` with
:func:`~vision.attention.pruning.keep_ratio_loss`, and ``token_keep_mask [B, H*W]`` (the final 0/1 decisions,
detached) restricts the task's token distillation to kept tokens, as officially. Both are empty/None after an
evaluation forward. Parameter names are the official ones (``score_predictor.{s}``); a plain DeiT checkpoint
loads too (the predictors then keep their initialisation), as the official fine-tuning starts from one.
"""

from __future__ import annotations

import torch
from timm.layers import DropPath, Mlp
from timm.models import generate_default_cfgs, register_model
from torch import nn

from ..attention.pruning import (
    KeepPredictor,
    PolicyAttention,
    hard_keep_decision,
    keep_ratio_loss,
    select_tokens,
)
from ._vit import ClassTokenViT, build_vit, resize_pos_embed, vit_cfg

__all__ = ["DynamicViT"]

# The official architecture's counts (DeiT + three predictors: 22,774,414 and 89,452,846), as the paper's
# "22.8M" / "89.5M" round them; checked by the model battery.
PUBLISHED_PARAMS = {"dynamicvit_deit_small": "22.8M", "dynamicvit_deit_base": "89.5M"}


def kept_tokens(ratio: float, num_patches: int) -> int:
    """Patch tokens a stage keeps at inference out of the input's ``num_patches`` (the official ``int``; at
    least one, where the official code would keep none)."""
    return max(1, int(num_patches * ratio))


def prune_by_score(x: torch.Tensor, log_probs: torch.Tensor, ratio: float, num_patches: int):
    """Inference pruning of one stage: :func:`select_tokens` with the stage's kept count, or ``(x, None)`` when
    that keeps every token. Its branch depends on the input size, so FX keeps it as one call (``_trace``)."""
    keep = kept_tokens(ratio, num_patches)
    if keep < x.shape[1] - 1:
        return select_tokens(x, log_probs, keep)
    return x, None


class Block(nn.Module):
    """Pre-norm ViT block; with a ``policy [B, N, 1]`` the attention ignores the dropped tokens."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 proj_drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = PolicyAttention(dim, num_heads, qkv_bias, attn_drop, proj_drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop)

    def forward(self, x: torch.Tensor, policy: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), policy))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class DynamicViT(ClassTokenViT):
    """DynamicViT on a DeiT.

    Args:
        keep_rate: the base keep rate rho; stage ``s`` keeps ``rho ** (s + 1)`` of the patch tokens.
        pruning_loc: indices of the blocks that a prediction module precedes.
        ratio_weight: weight of the ratio loss in ``aux_losses`` (official: 2.0 for DeiT-S, 5.0 for DeiT-B).
        embed_dim, depth, num_heads: ViT width, blocks, heads. Other arguments as in timm's ViT.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "token",
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        keep_rate: float = 0.7,
        pruning_loc: tuple[int, ...] = (3, 6, 9),
        ratio_weight: float = 2.0,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ):
        super().__init__(img_size, patch_size, in_chans, num_classes, global_pool, embed_dim, depth, drop_rate,
                         pos_drop_rate)
        if not 0 < keep_rate <= 1:
            raise ValueError(f"keep_rate={keep_rate}: expected 0 < keep_rate <= 1")
        pruning_loc = tuple(pruning_loc)
        if any(not 0 <= i < depth for i in pruning_loc) or list(pruning_loc) != sorted(set(pruning_loc)):
            raise ValueError(f"pruning_loc={pruning_loc} must be increasing indices into the {depth} blocks")
        self.keep_rate, self.pruning_loc, self.ratio_weight = keep_rate, pruning_loc, ratio_weight
        dpr = [drop_path_rate * i / max(1, depth - 1) for i in range(depth)]
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, proj_drop_rate, attn_drop_rate, dpr[i])
            for i in range(depth)
        ])
        self.score_predictor = nn.ModuleList([KeepPredictor(embed_dim) for _ in pruning_loc])
        self.aux_losses: dict[str, torch.Tensor] = {}
        self.token_keep_mask: torch.Tensor | None = None
        self.init_weights()

    @property
    def keep_ratios(self) -> list[float]:
        """The fraction of the input's patch tokens each stage keeps (computed as officially: ``rho ** k``)."""
        return [self.keep_rate ** (s + 1) for s in range(len(self.pruning_loc))]

    def output_tokens(self, num_patches: int) -> int:
        """Patch tokens ``forward_features`` returns at inference for ``num_patches`` input patches."""
        n = num_patches
        for ratio in self.keep_ratios:
            n = min(n, kept_tokens(ratio, num_patches))
        return n

    def _run(self, x: torch.Tensor, size: tuple[int, int], blocks):
        num_patches = size[0] * size[1]
        self.aux_losses, self.token_keep_mask = {}, None
        # training: keep decisions [B, 1 + N, 1] (class token always 1), in every block's attention
        policy = x.new_ones(x.shape[0], x.shape[1], 1) if self.training else None
        decisions = []
        for i, block in enumerate(blocks):
            kept = None
            if i in self.pruning_loc:
                stage = self.pruning_loc.index(i)
                predictor = self.score_predictor[stage]
                if self.training:
                    keep = hard_keep_decision(predictor(x[:, 1:], policy[:, 1:]), policy[:, 1:])
                    policy = torch.cat([policy[:, :1], keep], dim=1)
                    decisions.append(keep[..., 0])
                else:
                    pruned = prune_by_score(x, predictor(x[:, 1:]), self.keep_ratios[stage], num_patches)
                    x, kept = pruned[0], pruned[1]  # indexed: one traced value under FX
            x = self._call(block, x, policy)
            yield x, kept
        if decisions:
            ratio = keep_ratio_loss(decisions, self.keep_ratios, stages=len(self.pruning_loc))
            self.aux_losses = {"ratio": self.ratio_weight * ratio}
            self.token_keep_mask = policy[:, 1:, 0].detach()

    @torch.no_grad()
    def attention_maps(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, stages, H, W]``: 1 where a patch token is still kept at each pruning block (inference)."""
        maps = self.forward_intermediates(x, indices=list(self.pruning_loc), intermediates_only=True)
        return torch.stack([(m.abs().sum(1) > 0).to(x.dtype) for m in maps], dim=1)


def checkpoint_filter_fn(state_dict: dict, model: DynamicViT) -> dict:
    """Official DynamicViT checkpoints load by name; a DeiT checkpoint gets the model's own (initial)
    predictors; a position embedding for another grid is resized."""
    state_dict = dict(state_dict.get("model", state_dict))
    if "pos_embed" in state_dict:
        state_dict["pos_embed"] = resize_pos_embed(state_dict["pos_embed"], model.grid, model.pos_embed_mode)
    for key, value in model.state_dict().items():
        if key.startswith("score_predictor.") and key not in state_dict:
            state_dict[key] = value
    return state_dict


def _cfg(**kwargs) -> dict:
    return vit_cfg(paper_ids="arXiv:2106.02034", **kwargs)


# Official ImageNet-1k releases (rho 0.7; no download here: pass pretrained_cfg_overlay=dict(file=path)).
default_cfgs = generate_default_cfgs({
    "dynamicvit_deit_small.in1k": _cfg(),
    "dynamicvit_deit_base.in1k": _cfg(),
})


def _create(variant: str, pretrained: bool = False, **kwargs) -> DynamicViT:
    return build_vit(DynamicViT, variant, pretrained, checkpoint_filter_fn, **kwargs)


@register_model
def dynamicvit_deit_small(pretrained: bool = False, **kwargs) -> DynamicViT:
    """DynamicViT-DeiT-S/0.7 (official ``--model deit-s``; ratio weight 2.0, the main.py default)."""
    args = dict(embed_dim=384, depth=12, num_heads=6, keep_rate=0.7, pruning_loc=(3, 6, 9), ratio_weight=2.0)
    return _create("dynamicvit_deit_small", pretrained, **dict(args, **kwargs))


@register_model
def dynamicvit_deit_base(pretrained: bool = False, **kwargs) -> DynamicViT:
    """DynamicViT-DeiT-B/0.7 (official ``--model deit-b``; ratio weight 5.0 as in its README command)."""
    args = dict(embed_dim=768, depth=12, num_heads=12, keep_rate=0.7, pruning_loc=(3, 6, 9), ratio_weight=5.0)
    return _create("dynamicvit_deit_base", pretrained, **dict(args, **kwargs))
