"""The timm model contract, written once for the four-stage pyramid backbones of this package.

The shared parts (Swin-style :class:`PatchEmbed` and :class:`PatchMerging`, :class:`Stage`) live here, not in a
sibling family. A family builds ``stem``, ``stages`` (each a :class:`Stage`), ``norm`` and ``feature_info``, then calls
:meth:`PyramidBackbone.init_head`; this base supplies ``forward_features``, ``forward_head``,
``forward_intermediates``, ``reset_classifier``, grad checkpointing, layer-decay groups and pruning.
``channels_last = True`` marks families whose stages run on ``[B, H, W, C]`` (their outputs are
permuted to NCHW at the edges).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import trunc_normal_
from timm.models import build_model_with_cfg, checkpoint
from timm.models._features import feature_take_indices
from torch import nn


def imagenet_cfg(**kwargs) -> dict:
    """A timm pretrained-cfg entry for a 224-px ImageNet-1k release with a stride-32 pyramid.

    No URL: weights load only from a local file (``pretrained_cfg_overlay=dict(file=path)``).
    """
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "classifier": "head",
        **kwargs,
    }


def build_pyramid(model_cls, variant: str, pretrained: bool, filter_fn, **kwargs) -> nn.Module:
    """``build_model_with_cfg`` with the family's checkpoint filter; ``features_only`` goes through
    ``forward_intermediates`` (timm's ``getter`` feature wrapper)."""
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))
    return build_model_with_cfg(
        model_cls, variant, pretrained,
        pretrained_filter_fn=filter_fn,
        feature_cfg=dict(feature_cls="getter", out_indices=out_indices),
        **kwargs,
    )


def drop_path_rates(rate: float, depths) -> list[list[float]]:
    """Stochastic depth rising linearly from 0 to ``rate`` over all blocks, split per stage."""
    total = sum(depths)
    rates = [rate * i / max(1, total - 1) for i in range(total)]
    return [rates[sum(depths[:i]): sum(depths[: i + 1])] for i in range(len(depths))]


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch x patch`` conv (input zero-padded to a multiple), then LayerNorm: NCHW -> NHWC."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int = 4):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        x = F.pad(x, (0, -x.shape[-1] % p, 0, -x.shape[-2] % p))
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class PatchMerging(nn.Module):
    """Swin patch merging on NHWC: concatenate each 2x2 neighbourhood (official order (0,0), (1,0),
    (0,1), (1,1)), LayerNorm, linear 4C -> 2C without bias. Odd sides are zero-padded."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (0, 0, 0, x.shape[2] % 2, 0, x.shape[1] % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


class Stage(nn.Module):
    """A downsampling layer (or Identity) followed by blocks, with optional per-block checkpointing."""

    def __init__(self, downsample: nn.Module, blocks: list[nn.Module]):
        super().__init__()
        self.downsample = downsample
        self.blocks = nn.Sequential(*blocks)
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            for block in self.blocks:
                x = checkpoint(block, x)
            return x
        return self.blocks(x)


class PyramidBackbone(nn.Module):
    channels_last: bool = False

    def init_head(self, num_features: int, num_classes: int, global_pool: str, drop_rate: float) -> None:
        self._check_pool(global_pool)
        self.num_classes, self.global_pool = num_classes, global_pool
        self.num_features = self.head_hidden_size = num_features
        self.grad_checkpointing = False
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(num_features, num_classes) if num_classes > 0 else nn.Identity()

    def _check_pool(self, global_pool: str) -> None:
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool={global_pool!r}; {type(self).__name__} supports 'avg' or ''")

    @staticmethod
    def init_linear(m: nn.Module) -> None:
        """The official initialisation shared by these families: trunc-normal(0.02) linears, zero bias."""
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def _nchw(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 3, 1, 2) if self.channels_last else x

    def _fmt(self, x: torch.Tensor, output_fmt: str) -> torch.Tensor:
        x = self._nchw(x)
        return x.permute(0, 2, 3, 1) if output_fmt == "NHWC" else x

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.stem(x)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return set()  # norms and biases are excluded by timm's optimizer factory

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
            self._check_pool(global_pool)
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
        """Stage outputs (``indices`` into the stages) and, unless ``intermediates_only``, the final
        normed features (NCHW) as ``forward_features`` gives them."""
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt={output_fmt!r}; expected 'NCHW' or 'NHWC'")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        last = len(self.stages) - 1
        stages = self.stages if not stop_early else self.stages[: max_index + 1]
        intermediates = []
        x = self.forward_stem(x)
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                intermediates.append(self._fmt(self.norm(x) if norm and i == last else x, output_fmt))
        if intermediates_only:
            return intermediates
        if len(stages) == len(self.stages):
            x = self.norm(x)
        return self._nchw(x), intermediates

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
        """Normed final-stage features, NCHW."""
        return self._nchw(self.norm(self.stages(self.forward_stem(x))))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=(2, 3))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
