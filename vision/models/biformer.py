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
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, Mlp, trunc_normal_
from timm.models import build_model_with_cfg, checkpoint, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import nn

from ..attention import AttentionLePE, BiLevelRoutingAttention

__all__ = ["BiFormer"]

# Parameter counts of the official releases (paper, Table 1), checked by the model battery.
PUBLISHED_PARAMS = {"biformer_tiny": 13.1e6, "biformer_small": 25.5e6, "biformer_base": 56.8e6}


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


class BiFormerStage(nn.Module):
    def __init__(self, in_dim: int, dim: int, depth: int, downsample: bool, drop_path: list[float], **block_kwargs):
        super().__init__()
        self.downsample = (
            nn.Sequential(nn.Conv2d(in_dim, dim, 3, stride=2, padding=1), nn.BatchNorm2d(dim)) if downsample
            else nn.Identity()
        )
        self.blocks = nn.Sequential(*[BiFormerBlock(dim, drop_path=drop_path[i], **block_kwargs) for i in range(depth)])
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            for block in self.blocks:
                x = checkpoint(block, x)
            return x
        return self.blocks(x)


class BiFormer(nn.Module):
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
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool={global_pool!r}; BiFormer supports 'avg' or ''")
        self.num_classes, self.global_pool = num_classes, global_pool
        qk_dims = qk_dims or embed_dims
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.grad_checkpointing = False

        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, embed_dims[0] // 2, 3, stride=2, padding=1),
            nn.BatchNorm2d(embed_dims[0] // 2),
            nn.GELU(),
            nn.Conv2d(embed_dims[0] // 2, embed_dims[0], 3, stride=2, padding=1),
            nn.BatchNorm2d(embed_dims[0]),
        )
        rates = [drop_path_rate * i / max(1, sum(depths) - 1) for i in range(sum(depths))]  # linear in depth
        self.stages = nn.Sequential(*[
            BiFormerStage(
                embed_dims[max(i - 1, 0)], embed_dims[i], depths[i], downsample=i > 0,
                drop_path=rates[sum(depths[:i]): sum(depths[: i + 1])],
                num_heads=qk_dims[i] // head_dim, topk=topks[i], n_win=n_win, qk_dim=qk_dims[i],
                mlp_ratio=mlp_ratio, side_dwconv=side_dwconv, mask_padding=mask_padding,
            )
            for i in range(len(depths))
        ])
        self.feature_info = [
            dict(num_chs=embed_dims[i], reduction=4 * 2**i, module=f"stages.{i}") for i in range(len(depths))
        ]
        self.norm = nn.BatchNorm2d(self.num_features)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return set()  # no position tables; norms and biases are excluded by the optimizer factory

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(
            stem=r"^stem",
            blocks=r"^stages\.(\d+)" if coarse else [
                (r"^stages\.(\d+)\.downsample", (0,)),
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                (r"^norm", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool not in ("avg", ""):
                raise ValueError(f"global_pool={global_pool!r}; BiFormer supports 'avg' or ''")
            self.global_pool = global_pool
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Stage outputs (``indices`` into the stages) and the final normed features."""
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt={output_fmt!r}; expected 'NCHW' or 'NHWC'")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        last = len(self.stages) - 1
        stages = self.stages if not stop_early else self.stages[: max_index + 1]
        intermediates = []
        x = self.stem(x)
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                y = self.norm(x) if norm and i == last else x
                intermediates.append(y.permute(0, 2, 3, 1) if output_fmt == "NHWC" else y)
        if intermediates_only:
            return intermediates
        if len(stages) == len(self.stages):
            x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[: max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.stages(self.stem(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=(2, 3))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


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
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.0",
        "classifier": "head",
        "license": "mit",
        "paper_ids": "arXiv:2303.08810",
        **kwargs,
    }


# Official ImageNet-1k releases (no download here: pass pretrained_cfg_overlay=dict(file=path)).
default_cfgs = generate_default_cfgs({
    "biformer_tiny.in1k": _cfg(),
    "biformer_small.in1k": _cfg(),
    "biformer_base.in1k": _cfg(),
})


def _create_biformer(variant: str, pretrained: bool = False, **kwargs) -> BiFormer:
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))
    return build_model_with_cfg(
        BiFormer, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(feature_cls="getter", out_indices=out_indices),
        **kwargs,
    )


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
