"""The DeiT skeleton shared by the class-token ViT families (Agent-DeiT, EViT, DynamicViT).

Patch embedding (``patch_embed.proj``, the image zero-padded to a multiple of the patch), class token,
learnt position embedding resized to any grid, final LayerNorm (eps 1e-6) and a class-token head, with
timm's model contract (``forward_features``, ``forward_intermediates``, classifier reset, parameter groups,
grad checkpointing, intermediate-layer pruning). A family adds its ``blocks`` (then calls :meth:`init_weights`)
and :meth:`ClassTokenViT._step`, which runs one block and, for token pruning, says which tokens it kept (a
family whose blocks share state over the forward, like DynamicViT's keep decisions, overrides
:meth:`ClassTokenViT._run` instead).
Parameter names are DeiT's, so official checkpoints load by name.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import to_2tuple, trunc_normal_
from timm.models import checkpoint
from timm.models._features import feature_take_indices
from torch import nn

from ._pyramid import build_pyramid, imagenet_cfg


def vit_cfg(**kwargs) -> dict:
    """:func:`imagenet_cfg` for a patch-16 ViT (token features: no pool size)."""
    return imagenet_cfg(pool_size=None, first_conv="patch_embed.proj", **kwargs)


def build_vit(model_cls, variant: str, pretrained: bool, filter_fn, **kwargs) -> nn.Module:
    """:func:`build_pyramid` with timm's ViT default for ``features_only``: the last three blocks."""
    kwargs.setdefault("out_indices", 3)
    return build_pyramid(model_cls, variant, pretrained, filter_fn, **kwargs)


def resize_pos_embed(pos_embed: torch.Tensor, new_grid: tuple[int, int], mode: str,
                     old_grid: tuple[int, int] | None = None) -> torch.Tensor:
    """``[1, 1 + h*w, C]`` -> ``[1, 1 + H*W, C]``; the class-token entry is kept (square ``old_grid`` when
    not given, as in official checkpoints). A symbolic ``new_grid`` (``torch.export`` with dynamic sizes) is
    always resampled: at equal size that is the identity, and the exported graph then holds for every size."""
    cls_pos, pos = pos_embed[:, :1], pos_embed[:, 1:]
    old_grid = old_grid or (math.isqrt(pos.shape[1]),) * 2
    if all(isinstance(s, int) for s in new_grid) and tuple(old_grid) == tuple(new_grid):
        return pos_embed
    pos = pos.reshape(1, *old_grid, -1).permute(0, 3, 1, 2)
    pos = F.interpolate(pos, size=new_grid, mode=mode, align_corners=False).flatten(2).transpose(1, 2)
    return torch.cat([cls_pos, pos], dim=1)


class PatchEmbed(nn.Module):
    """The patch convolution (``proj``, DeiT's name) on the image zero-padded at the bottom/right to a
    multiple of the patch: ``[B, C, H, W]`` -> ``[B, D, ceil(H/p), ceil(W/p)]``."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        return self.proj(F.pad(x, (0, -x.shape[-1] % p, 0, -x.shape[-2] % p)))


class ClassTokenViT(nn.Module):
    """DeiT skeleton; ``pos_embed_mode`` is how the family's official code resizes the position embedding."""

    num_prefix_tokens = 1
    pos_embed_mode = "bilinear"

    def __init__(
        self,
        img_size: int | tuple[int, int],
        patch_size: int,
        in_chans: int,
        num_classes: int,
        global_pool: str,
        embed_dim: int,
        depth: int,
        drop_rate: float,
        pos_drop_rate: float,
    ):
        super().__init__()
        self._check_pool(global_pool)
        self.num_classes, self.global_pool = num_classes, global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.patch_size = patch_size
        self.grid = tuple(s // patch_size for s in to_2tuple(img_size))
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(in_chans, embed_dim, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid[0] * self.grid[1], embed_dim))
        self.pos_drop = nn.Dropout(pos_drop_rate)
        self.feature_info = [
            dict(num_chs=embed_dim, reduction=patch_size, module=f"blocks.{i}") for i in range(depth)
        ]
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def init_weights(self) -> None:
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def _check_pool(self, global_pool: str) -> None:
        if global_pool not in ("token", "avg", ""):
            raise ValueError(f"global_pool={global_pool!r}; {type(self).__name__} supports 'token', 'avg' or ''")

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(
            stem=r"^cls_token|pos_embed|patch_embed", blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))]
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self._check_pool(global_pool)
            self.global_pool = global_pool
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Tokens ``[B, 1 + H*W, C]`` with position embedding, and the patch grid ``(H, W)``."""
        x = self.patch_embed(x)
        size = x.shape[-2:]  # not tuple(): FX traces it as one value
        pos = resize_pos_embed(self.pos_embed, size, self.pos_embed_mode, self.grid)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x.flatten(2).transpose(1, 2)], dim=1)
        return self.pos_drop(x + pos), size

    def _step(self, block: nn.Module, x: torch.Tensor, size: tuple[int, int]):
        """Run one block: ``(tokens, kept)`` with ``kept`` the indices into the incoming patch tokens when
        the block pruned tokens (extra tokens it appended, like EViT's fused one, have no grid position),
        else None."""
        raise NotImplementedError

    def _run(self, x: torch.Tensor, size: tuple[int, int], blocks):
        """Run ``blocks`` in order, yielding ``(tokens, kept)`` after each one (as :meth:`_step` gives them)."""
        for block in blocks:
            step = self._step(block, x, size)
            x = step[0]  # indexed, not unpacked: under FX a leaf block's pair is one traced value
            yield step

    def _call(self, block: nn.Module, *args):
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint(block, *args)
        return block(*args)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normed tokens ``[B, 1 + patch tokens left, C]`` (class token first)."""
        x, size = self._embed(x)
        for step in self._run(x, size, self.blocks):
            x = step[0]
        return self.norm(x)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ):
        """Block outputs (``indices`` into the blocks) as NCHW patch maps (pruned positions zero) or ``NLC``
        tokens and, unless ``intermediates_only``, the final normed tokens as ``forward_features`` gives them."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt={output_fmt!r}; expected 'NCHW' or 'NLC'")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        blocks = self.blocks[: max_index + 1] if stop_early else self.blocks
        x, (H, W) = self._embed(x)
        B, P = x.shape[0], self.num_prefix_tokens
        where = None  # grid position of each patch token once some were pruned (H*W: none)
        intermediates = []
        for i, (out, kept) in enumerate(self._run(x, (H, W), blocks)):
            x = out
            if kept is not None:
                where = (torch.arange(H * W, device=x.device).expand(B, -1) if where is None else where).gather(1, kept)
                where = F.pad(where, (0, x.shape[1] - P - where.shape[1]), value=H * W)
            if i in take_indices:
                y = self.norm(x) if norm else x
                prefix, tokens = y[:, :P], y[:, P:]
                if output_fmt == "NCHW":
                    tokens = self._grid(tokens, where, H, W)
                intermediates.append((tokens, prefix) if return_prefix_tokens else tokens)
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    @staticmethod
    def _grid(tokens: torch.Tensor, where: torch.Tensor | None, H: int, W: int) -> torch.Tensor:
        """Patch tokens ``[B, L, C]`` at their grid positions ``[B, C, H, W]``."""
        B, _, C = tokens.shape
        if where is not None:  # scatter, with a spare slot for tokens without a position
            canvas = tokens.new_zeros(B, H * W + 1, C).scatter(1, where[..., None].expand(-1, -1, C), tokens)
            tokens = canvas[:, : H * W]
        return tokens.transpose(1, 2).reshape(B, C, H, W)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "token":
            x = x[:, 0]
        elif self.global_pool == "avg":
            x = x[:, self.num_prefix_tokens :].mean(dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[: max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices
