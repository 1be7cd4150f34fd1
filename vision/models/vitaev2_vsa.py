"""ViTAEv2 with varied-size window attention: the VSA paper's own classification backbone.

Paper: "VSA: Learning Varied-Size Window Attention in Vision Transformers" (ECCV 2022,
https://arxiv.org/abs/2204.08446), on ViTAEv2 ("ViTAEv2: Vision Transformer Advanced by Exploring
Inductive Bias for Image Recognition and Beyond", https://arxiv.org/abs/2202.10108). Reference code:
ViTAE-Transformer/ViTAE-VSA ``Image-Classification/vitaev2_vsa`` (``ViTAEv2_VSA_S``,
``ViTAEv2_VSA_widePCM_48M``), checked against its golden outputs (tests/models/test_vitaev2_vsa.py).

Four stages, each a reduction cell followed by normal cells, all on ``[B, H, W, C]``:

- **ReductionCell** (downsamples by 4, then 2, 2, 2): the pyramid reduction module (one strided conv + GELU
  per dilation, concatenated) gives multi-scale tokens; a depth-wise 7x7 convolutional position encoding is
  added to them; VSA maps them to the stage width. There is *no identity path*: the output is
  ``VSA(LN(tokens)) + PCM(input)`` (PCM: the parallel strided convolution branch), then ``+ MLP(LN(.))``
  with MLP ratio 1. Its LayerNorms use eps 1e-5.
- **NormalCell**: ``x + VSA(LN(x + CPE(x))) + PCM(x)``, then ``+ MLP(LN(.))``: the CPE feeds only the
  attention branch. LayerNorm eps 1e-6 (the model's norm layer).
- The head takes the mean over tokens; there is no final norm.

Differences from the reference code, none of which changes a computation it can run:

- Any input size. The official model fixes ``img_size`` at construction (asserted in every cell, square
  only). Its pyramid-reduction padding adds one pixel when the *constructed* size is not a multiple of the
  stride, which only lines the branches up for the first stage; here the convolution's own padding is
  kept and the bottom/right border is padded so that every dilation branch yields ``ceil(H / stride)``
  rows, as the parallel convolutions do. At sizes the official model accepts the two are identical.
- Keys follow timm (``stages.{i}.downsample`` / ``stages.{i}.blocks.{j}``, lower-case module names);
  :func:`checkpoint_filter_fn` converts the official ``layers.{i}.RC`` / ``layers.{i}.NC.{j}`` layout.
- The official stochastic-depth slice for stage ``i`` starts at the *previous stage's depth* rather than
  the cumulative depth (``dpr[depth[i-1] : depth[i-1] + depth[i]]``); kept, since it is what the
  published models were trained with.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp
from timm.models import generate_default_cfgs, register_model
from torch import nn

from ..attention import VSAWindowAttention
from ..attention.vsa import official_vsa_to_ours
from ._pyramid import PyramidBackbone, Stage, build_pyramid, imagenet_cfg

__all__ = ["ViTAEv2VSA"]

# The official architecture's exact counts (ViTAE-VSA@75dc986 built as ViTAEv2_VSA_S and
# ViTAEv2_VSA_widePCM_48M at 1000 classes: 19,773,300 and 51,089,119); the README's result table names the
# variants "ViTAEv2*-VSA-S" and "-48M" without parameter counts.
PUBLISHED_PARAMS = {"vitaev2_vsa_s": "19.77M", "vitaev2_vsa_48m": "51.09M"}


def _nchw(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 3, 1, 2)


def _nhwc(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 2, 3, 1)


class PyramidReduction(nn.Module):
    """One ``kernel x kernel`` convolution (stride ``stride``) + GELU per dilation, concatenated along
    channels (dilation-major): ``[B, C, H, W] -> [B, len(dilations) * embed_dim, ceil(H/s), ceil(W/s)]``."""

    def __init__(self, in_chans: int, embed_dim: int, kernel_size: int, stride: int, dilations) -> None:
        super().__init__()
        self.kernel_size, self.stride, self.dilations = kernel_size, stride, tuple(dilations)
        self.convs = nn.ModuleList(
            nn.Sequential(nn.Conv2d(in_chans, embed_dim, kernel_size, stride, dilation=d), nn.GELU())
            for d in self.dilations
        )
        self.out_chans = embed_dim * len(self.dilations)

    def _pad(self, size: int, dilation: int) -> tuple[int, int]:
        """(before, after) zero padding: the official symmetric padding before, and after whatever lines the
        last window up with ``ceil(size / stride)`` outputs."""
        span = (self.kernel_size - 1) * dilation + 1
        before = math.ceil((span - self.stride) / 2)
        needed = (math.ceil(size / self.stride) - 1) * self.stride + span - size
        return before, max(needed - before, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        outs = []
        for conv, d in zip(self.convs, self.dilations):
            (top, bottom), (left, right) = self._pad(H, d), self._pad(W, d)
            outs.append(conv(F.pad(x, (left, right, top, bottom))))
        return torch.cat(outs, dim=1)


class ReductionCell(nn.Module):
    """``[B, H, W, in_chans] -> [B, ceil(H/r), ceil(W/r), token_dim]`` (no identity path)."""

    def __init__(
        self,
        in_chans: int,
        embed_dim: int,
        token_dim: int,
        downsample: int,
        kernel_size: int,
        dilations,
        num_heads: int,
        groups: int,
        wide_pcm: bool = False,
        window_size: int = 7,
        cpe: bool = True,
        zero_init_sampling: bool = False,
    ) -> None:
        super().__init__()
        self.prm = PyramidReduction(in_chans, embed_dim, kernel_size, downsample, dilations)
        dim = self.prm.out_chans
        # strides of the three PCM convs: 2 for each factor of 2 in ``downsample``, then 1
        strides = [2 if downsample >> (i + 1) else 1 for i in range(3)]
        hidden = 2 * token_dim if wide_pcm else embed_dim
        self.pcm = nn.Sequential(
            nn.Conv2d(in_chans, hidden, 3, strides[0], 1, groups=groups),
            nn.BatchNorm2d(hidden),
            nn.SiLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, strides[1], 1, groups=groups),
            nn.BatchNorm2d(hidden),
            nn.SiLU(inplace=True),
            nn.Conv2d(hidden, token_dim, 3, strides[2], 1, groups=groups),
        )
        self.pos = nn.Conv2d(dim, dim, 7, 1, 3, groups=dim) if cpe else None
        self.norm1 = nn.LayerNorm(dim)
        self.attn = VSAWindowAttention(
            dim, num_heads, out_dim=token_dim, window_size=window_size, zero_init_sampling=zero_init_sampling
        )
        self.norm2 = nn.LayerNorm(token_dim)
        self.mlp = Mlp(token_dim, token_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _nchw(x)
        tokens = self.prm(x)
        if self.pos is not None:
            tokens = tokens + self.pos(tokens)
        out = self.attn(self.norm1(_nhwc(tokens))) + _nhwc(self.pcm(x))
        return out + self.mlp(self.norm2(out))


class NormalCell(nn.Module):
    """``x + VSA(LN(x + CPE(x))) + PCM(x)``, then ``+ MLP(LN(.))``, on ``[B, H, W, dim]``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        groups: int,
        mlp_ratio: float = 4.0,
        window_size: int = 7,
        cpe: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        zero_init_sampling: bool = False,
    ) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.pos = nn.Conv2d(dim, dim, 7, 1, 3, groups=dim) if cpe else None
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = VSAWindowAttention(
            dim,
            num_heads,
            window_size=window_size,
            attn_drop=attn_drop,
            proj_drop=proj_drop,
            zero_init_sampling=zero_init_sampling,
        )
        self.pcm = nn.Sequential(
            nn.Conv2d(dim, hidden, 3, 1, 1, groups=groups),
            nn.BatchNorm2d(hidden),
            nn.SiLU(inplace=True),
            nn.Conv2d(hidden, dim, 3, 1, 1, groups=groups),
            nn.BatchNorm2d(dim),
            nn.SiLU(inplace=True),
            nn.Conv2d(dim, dim, 3, 1, 1, groups=groups),
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, hidden, drop=proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x if self.pos is None else x + _nhwc(self.pos(_nchw(x)))
        x = x + self.drop_path(self.attn(self.norm1(t))) + self.drop_path(_nhwc(self.pcm(_nchw(x))))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ViTAEv2VSA(PyramidBackbone):
    """ViTAEv2 with VSA in every cell.

    Args:
        embed_dims: per-stage width of each pyramid-reduction branch.
        token_dims: per-stage token width (the stage's output channels).
        depths: normal cells per stage.
        num_heads / rc_heads: heads of the normal / reduction cells' VSA.
        groups / rc_groups: convolution groups of the normal / reduction cells' PCM.
        wide_pcm: reduction-cell PCM of width ``2 * token_dim`` instead of ``embed_dim``.
        zero_init_sampling: start every VSA window at its default place and size (False: PyTorch's default
            init of the offset / scale predictors, as the official code leaves them).
    """

    channels_last = True

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dims: tuple[int, ...] = (64, 64, 128, 256),
        token_dims: tuple[int, ...] = (64, 128, 256, 512),
        depths: tuple[int, ...] = (2, 2, 8, 2),
        num_heads: tuple[int, ...] = (2, 4, 8, 16),
        rc_heads: tuple[int, ...] = (2, 2, 4, 8),
        groups: tuple[int, ...] = (1, 32, 64, 128),
        rc_groups: tuple[int, ...] = (1, 16, 32, 64),
        downsample: tuple[int, ...] = (4, 2, 2, 2),
        kernel_sizes: tuple[int, ...] = (7, 3, 3, 3),
        dilations: tuple[tuple[int, ...], ...] = ((1, 2, 3, 4), (1, 2, 3), (1, 2), (1, 2)),
        wide_pcm: bool = False,
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        cpe: bool = True,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        zero_init_sampling: bool = False,
    ) -> None:
        super().__init__()
        num_stages = len(depths)
        rates = [drop_path_rate * i / max(sum(depths) - 1, 1) for i in range(sum(depths))]  # linspace
        self.stem = nn.Identity()
        stages, reduction, chans = [], 1, in_chans
        for i in range(num_stages):
            start = depths[i - 1] if i > 0 else 0  # the official (non-cumulative) slice, see the module doc
            stage_rates = rates[start : start + depths[i]]
            reduction *= downsample[i]
            stages.append(
                Stage(
                    ReductionCell(
                        chans, embed_dims[i], token_dims[i], downsample[i], kernel_sizes[i], dilations[i],
                        rc_heads[i], rc_groups[i], wide_pcm, window_size, cpe, zero_init_sampling,
                    ),
                    [
                        NormalCell(
                            token_dims[i], num_heads[i], groups[i], mlp_ratio, window_size, cpe,
                            proj_drop_rate, attn_drop_rate, stage_rates[j], zero_init_sampling,
                        )
                        for j in range(depths[i])
                    ],
                )
            )
            chans = token_dims[i]
        self.stages = nn.Sequential(*stages)
        self.feature_info = [
            dict(num_chs=token_dims[i], reduction=math.prod(downsample[: i + 1]), module=f"stages.{i}")
            for i in range(num_stages)
        ]
        self.norm = nn.Identity()  # the official model has no final norm
        self.init_head(token_dims[-1], num_classes, global_pool, drop_rate)
        # The official init touches nn.Linear only; VSA's projections are 1x1 convs there (PyTorch's default
        # init, which nn.Linear's own default equals), so they are left alone.
        vsa_linears = {id(m) for a in self.modules() if isinstance(a, VSAWindowAttention) for m in a.modules()}
        for module in self.modules():
            if isinstance(module, nn.Linear) and id(module) not in vsa_linears:
                self.init_linear(module)

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return _nhwc(x)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {n for n, _ in self.named_parameters() if "relative_position_bias_table" in n}


_CELL_RENAMES = {"PRM.": "prm.", "PCM.": "pcm."}


def checkpoint_filter_fn(state_dict: dict, model: ViTAEv2VSA) -> dict:
    """Official ``ViTAE_VSA_basic`` keys (``layers.{i}.RC`` / ``layers.{i}.NC.{j}``, 1x1-conv VSA) -> ours;
    our own state dicts pass through. Accepts checkpoints nested under ``state_dict`` / ``model``."""
    state_dict = state_dict.get("state_dict", state_dict.get("model", state_dict))
    if not any(k.startswith("layers.") for k in state_dict):
        return state_dict
    out = {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        if key.startswith("layers."):
            _, stage, cell, rest = key.split(".", 3)
            if cell == "RC":
                key = f"stages.{stage}.downsample.{rest}"
            else:  # NC.{j}.rest
                block, rest = rest.split(".", 1)
                key = f"stages.{stage}.blocks.{block}.{rest}"
            for old, new in _CELL_RENAMES.items():
                key = key.replace(old, new)
        out[key] = value
    for prefix in {k.rsplit("attn.", 1)[0] + "attn." for k in out if ".attn." in k}:
        out = official_vsa_to_ours(out, prefix)
    return out


def _cfg(**kwargs) -> dict:
    # official eval transform: crop_pct 0.9, bicubic, ImageNet mean/std
    first_convs = tuple(f"stages.0.downsample.prm.convs.{i}.0" for i in range(4)) + ("stages.0.downsample.pcm.0",)
    return imagenet_cfg(first_conv=first_convs, crop_pct=0.9, paper_ids="arXiv:2204.08446", **kwargs)


# The official release links no downloadable ViTAEv2-VSA weights (empty links in its README).
default_cfgs = generate_default_cfgs(
    {
        "vitaev2_vsa_s.untrained": _cfg(),
        "vitaev2_vsa_48m.untrained": _cfg(),
    }
)


def _create_vitaev2_vsa(variant: str, pretrained: bool = False, **kwargs) -> ViTAEv2VSA:
    return build_pyramid(ViTAEv2VSA, variant, pretrained, checkpoint_filter_fn, **kwargs)


@register_model
def vitaev2_vsa_s(pretrained: bool = False, **kwargs) -> ViTAEv2VSA:
    """ViTAEv2-S + VSA (official ``ViTAEv2_VSA_S``)."""
    args = dict(
        embed_dims=(64, 64, 128, 256), token_dims=(64, 128, 256, 512), depths=(2, 2, 8, 2),
        num_heads=(2, 4, 8, 16), rc_heads=(2, 2, 4, 8), wide_pcm=False,
    )
    return _create_vitaev2_vsa("vitaev2_vsa_s", pretrained, **dict(args, **kwargs))


@register_model
def vitaev2_vsa_48m(pretrained: bool = False, **kwargs) -> ViTAEv2VSA:
    """ViTAEv2-48M + VSA (official ``ViTAEv2_VSA_widePCM_48M``, trained with drop path 0.25)."""
    args = dict(
        embed_dims=(96, 96, 192, 384), token_dims=(96, 192, 384, 768), depths=(2, 2, 11, 2),
        num_heads=(3, 6, 12, 24), rc_heads=(3, 6, 12, 24), wide_pcm=True,
    )
    return _create_vitaev2_vsa("vitaev2_vsa_48m", pretrained, **dict(args, **kwargs))
