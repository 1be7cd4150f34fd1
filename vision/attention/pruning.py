"""Token pruning by class attention (EViT), on ``[B, N, C]`` token sequences with the class token first.

EViT ("Not All Patches are What You Need", ICLR 2022; youweiliang/evit): in a pruning block the attention
also reports how much the class token attends to every other token (mean over heads); after the attention
residual only the ``ceil(rate * (N - 1))`` most attended tokens are kept, in descending attention order, and
the others are fused into one extra token, their attention-weighted sum (not renormalised), appended last.
The MLP then runs on the shorter sequence.

DynamicViT ("Efficient Vision Transformers with Dynamic Token Sparsification", NeurIPS 2021;
raoyongming/DynamicViT ``models/dyvit.py``, ``losses.py``): before a pruning block a prediction module
scores every patch token (keep / drop log-probabilities from its own feature and the mean feature of the
tokens still kept). Training keeps the sequence whole: hard Gumbel-softmax decisions (straight-through
gradients) mask the dropped tokens out of every other token's attention (:func:`policy_softmax`), and
:func:`keep_ratio_loss` pulls the kept fraction towards the target. Inference really removes them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _Attention(nn.Module):
    """The parameters of timm's ``Attention`` (``qkv``, ``proj``), so DeiT checkpoints load by name."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.scale = num_heads, (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)


class ClassScoredAttention(_Attention):
    """Multi-head self-attention that also returns the class token's attention to the other tokens
    ``[B, N - 1]`` (mean over heads), or None with ``cls_scores=False``. Names as timm's ``Attention``
    (``qkv``, ``proj``)."""

    def forward(self, x: torch.Tensor, cls_scores: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        # fused attention keeps no N x N matrix; the class token's row alone is recomputed when asked for
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0,
                                             scale=self.scale)
        out = self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, C)))
        if not cls_scores:
            return out, None
        cls_attn = ((q[:, :, :1] * self.scale) @ k.transpose(-2, -1)).softmax(-1)  # [B, heads, 1, N], pre-dropout
        return out, cls_attn[:, :, 0, 1:].mean(1)


def keep_attentive_tokens(x: torch.Tensor, cls_attn: torch.Tensor, keep: int, fuse: bool):
    """``[cls, the keep most attended tokens (descending), fused rest?]`` and the kept indices ``[B, keep]``
    into ``x[:, 1:]``."""
    idx = cls_attn.topk(keep, dim=1, largest=True, sorted=True).indices
    patches = x[:, 1:]
    parts = [x[:, :1], patches.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))]
    if fuse:
        weights = cls_attn.scatter(1, idx, 0.0)  # the inattentive tokens' attention, zero where kept
        parts.append((patches * weights[..., None]).sum(1, keepdim=True))
    return torch.cat(parts, dim=1), idx


def policy_softmax(logits: torch.Tensor, policy: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """DynamicViT's masked softmax over the keys of ``logits [B, heads, N, N]``: key ``j`` counts with its
    keep decision ``policy [B, N, 1]`` (0/1), except that every token still attends to itself. As officially
    in fp32 and smoothed, ``(e + eps/N) / (sum e + eps)`` with ``e = exp(l - max l) * mask`` (the max over all
    keys), so a dropped key gets weight ``eps/N / (sum e + eps)`` instead of exactly zero."""
    B, _, N, _ = logits.shape
    keep = policy.reshape(B, 1, 1, N).float()
    eye = torch.eye(N, dtype=keep.dtype, device=keep.device)
    mask = keep + (1 - keep) * eye
    top = logits.max(dim=-1, keepdim=True)[0]
    weights = (logits - top).float().exp() * mask
    return ((weights + eps / N) / (weights.sum(-1, keepdim=True) + eps)).type_as(logits)


class PolicyAttention(_Attention):
    """Multi-head self-attention whose softmax honours keep decisions (:func:`policy_softmax`) when given a
    ``policy [B, N, 1]``; a plain softmax otherwise. Names as timm's ``Attention`` (``qkv``, ``proj``)."""

    def forward(self, x: torch.Tensor, policy: torch.Tensor | None = None) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        logits = (q @ k.transpose(-2, -1)) * self.scale
        attn = logits.softmax(-1) if policy is None else policy_softmax(logits, policy)
        out = (self.attn_drop(attn) @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(out))


class KeepPredictor(nn.Module):
    """DynamicViT's prediction module (``PredictorLG``): ``[B, N, C]`` patch tokens -> log-probabilities
    ``[B, N, 2]`` of (keep, drop). Half of each projected token's channels stay local, the other half is
    replaced by its mean over the tokens still kept (``policy [B, N, 1]``; all when None)."""

    def __init__(self, dim: int):
        super().__init__()
        self.in_conv = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())
        self.out_conv = nn.Sequential(
            nn.Linear(dim, dim // 2), nn.GELU(), nn.Linear(dim // 2, dim // 4), nn.GELU(),
            nn.Linear(dim // 4, 2), nn.LogSoftmax(dim=-1),
        )

    def forward(self, x: torch.Tensor, policy: torch.Tensor | None = None) -> torch.Tensor:
        x = self.in_conv(x)
        half = x.shape[-1] // 2
        local, rest = x[..., :half], x[..., half:]
        if policy is None:
            pooled = rest.mean(1, keepdim=True)
        else:  # the clamp only matters when every token was dropped (then the sum is 0 as well)
            pooled = (rest * policy).sum(1, keepdim=True) / policy.sum(1, keepdim=True).clamp_min(1e-6)
        return self.out_conv(torch.cat([local, pooled.expand_as(rest)], dim=-1))


def hard_keep_decision(log_probs: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """Training-time decisions ``[B, N, 1]``: a hard (0/1) Gumbel-softmax sample of "keep" with
    straight-through gradients, and a token dropped earlier stays dropped (``previous``)."""
    return F.gumbel_softmax(log_probs, hard=True)[..., :1] * previous


def keep_ratio_loss(decisions: list[torch.Tensor], ratios: list[float], stages: int | None = None) -> torch.Tensor:
    """DynamicViT's ratio loss: ``sum_s mean_b (mean_n D_s[b, n] - ratios[s])^2 / stages`` over the stages'
    decisions ``D_s [B, N]`` (``stages`` defaults to their number; the official code divides by the number of
    pruning locations)."""
    loss = sum(((d.mean(1) - r) ** 2).mean() for d, r in zip(decisions, ratios))
    return loss / (stages or len(decisions))


def select_tokens(x: torch.Tensor, log_probs: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inference-time pruning: ``[cls, the keep patch tokens with the highest keep log-probability
    (descending)]`` and their indices ``[B, keep]`` into ``x[:, 1:]``."""
    idx = log_probs[..., 0].argsort(dim=1, descending=True)[:, :keep]
    kept = x[:, 1:].gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))
    return torch.cat([x[:, :1], kept], dim=1), idx
