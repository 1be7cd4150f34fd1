"""Agent attention (Agent-Attention, Han et al. 2024), on the ``[B, H, W, C]`` grid interface.

``n`` agent tokens are the queries average-pooled to a ``sqrt(n) x sqrt(n)`` grid. Two softmax stages,
each with its own position bias, replace the ``N x N`` attention:

    agent_v = softmax(A k^T * scale + B1) v        (agents gather from the keys)
    out     = softmax(q A^T * scale + B2) agent_v  (queries read from the agents)

then a depthwise 3x3 conv of ``v`` (as an image) is added and the output projection applied. The
scale is always head_dim^-0.5. The position biases are learnt on the training grid (``bias_size``):
``B1 = an_bias`` (heads, n, 7, 7, resized to the key grid) ``+ ah_bias + aw_bias`` (one term per key
row / column), and ``B2`` likewise from ``na_bias``, ``ha_bias`` and ``wa_bias``. The official
classification code ties them to that grid; here they are resized bilinearly to the input grid (as the
official detection code does), so any H x W works, and ``agent_shape`` may differ from the trained
agent grid (the biases are then resized along the agent grid too). At the training grid nothing is
resized and the result is the official one.

``sr_ratio > 1`` (PVT): keys and values come from a strided conv + LayerNorm of the map, and ``v`` is
upsampled bilinearly back to H x W for the depthwise-conv term. :class:`ClassAgentAttention` (DeiT)
keeps a class token out of the pooling and gives it its own biases.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import to_2tuple, trunc_normal_
from torch import nn

__all__ = ["AgentAttention", "ClassAgentAttention", "split_official_qkv"]


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of the last two dims (align_corners=False, the F.interpolate default)."""
    if all(isinstance(s, int) for s in size) and tuple(x.shape[-2:]) == tuple(size):  # symbolic (export): resample
        return x
    lead = x.shape[:-2]
    return F.interpolate(x.reshape(-1, 1, *x.shape[-2:]), size=size, mode="bilinear").view(*lead, *size)


class AgentAttention(nn.Module):
    """Agent attention over the whole ``[B, H, W, C]`` map.

    Args:
        dim: channels; num_heads: heads (contiguous channel slices).
        agent_num: agents the biases were learnt for (a square number).
        bias_size: the query grid the biases were learnt on (the official window / map size).
        sr_ratio: spatial reduction of keys and values (PVT); 1 = none.
        agent_shape: agent grid used at run time, default ``sqrt(agent_num)`` square.
    """

    num_prefix_tokens = 0

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        agent_num: int = 49,
        bias_size: int | tuple[int, int] = 14,
        sr_ratio: int = 1,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        agent_shape: tuple[int, int] | None = None,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        pool = math.isqrt(agent_num)
        if pool * pool != agent_num:
            raise ValueError(f"agent_num {agent_num} is not a square number")
        self.num_heads, self.head_dim, self.agent_num = num_heads, dim // num_heads, agent_num
        self.scale = self.head_dim**-0.5
        self.trained_agent_shape = (pool, pool)
        self.agent_shape = tuple(agent_shape) if agent_shape is not None else (pool, pool)
        self.bias_size = to_2tuple(bias_size)
        self.sr_ratio = sr_ratio
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.dwc = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

        (bh, bw), (kh, kw) = self.bias_size, (self.bias_size[0] // sr_ratio, self.bias_size[1] // sr_ratio)
        self.an_bias = nn.Parameter(torch.zeros(num_heads, agent_num, 7, 7))
        self.na_bias = nn.Parameter(torch.zeros(num_heads, agent_num, 7, 7))
        self.ah_bias = nn.Parameter(torch.zeros(1, num_heads, agent_num, kh, 1))
        self.aw_bias = nn.Parameter(torch.zeros(1, num_heads, agent_num, 1, kw))
        self.ha_bias = nn.Parameter(torch.zeros(1, num_heads, bh, 1, agent_num))
        self.wa_bias = nn.Parameter(torch.zeros(1, num_heads, 1, bw, agent_num))
        for p in (self.an_bias, self.na_bias, self.ah_bias, self.aw_bias, self.ha_bias, self.wa_bias):
            trunc_normal_(p, std=0.02)

    def _resize_agents(self, bias: torch.Tensor) -> torch.Tensor:
        """``[heads, n_trained, L]`` -> ``[heads, n, L]``, resizing the agent grid when it changed."""
        if self.agent_shape == self.trained_agent_shape:
            return bias
        heads, _, length = bias.shape
        grid = bias.transpose(1, 2).reshape(heads, length, *self.trained_agent_shape)
        return _resize(grid, self.agent_shape).flatten(2).transpose(1, 2)

    def agent_to_key_bias(self, kh: int, kw: int) -> torch.Tensor:
        """B1, ``[heads, n, prefix + kh*kw]``."""
        bias = _resize(self.an_bias, (kh, kw)) + _resize((self.ah_bias + self.aw_bias)[0], (kh, kw))
        return self._resize_agents(self._with_prefix_keys(bias.flatten(2)))

    def query_to_agent_bias(self, h: int, w: int) -> torch.Tensor:
        """B2, ``[heads, prefix + h*w, n]``."""
        hw = (self.ha_bias + self.wa_bias)[0].permute(0, 3, 1, 2)  # [heads, n, bh, bw]
        bias = _resize(self.na_bias, (h, w)) + _resize(hw, (h, w))
        return self._resize_agents(self._with_prefix_queries(bias.flatten(2))).transpose(1, 2)

    def _with_prefix_keys(self, bias: torch.Tensor) -> torch.Tensor:
        return bias

    def _with_prefix_queries(self, bias: torch.Tensor) -> torch.Tensor:
        return bias

    def attend(self, tokens: torch.Tensor, H: int, W: int, return_attn: bool = False):
        """``tokens``: ``[B, prefix + H*W, C]`` (prefix tokens first, then the map row-major)."""
        B, N, C = tokens.shape
        P, heads, d = self.num_prefix_tokens, self.num_heads, self.head_dim
        q = self.q(tokens)
        kh, kw = H, W
        kv_in = tokens
        if self.sr_ratio > 1:
            grid = self.sr(tokens[:, P:].transpose(1, 2).reshape(B, C, H, W))
            kh, kw = grid.shape[-2:]
            kv_in = self.norm(grid.flatten(2).transpose(1, 2))
        k, v = self.kv(kv_in).view(B, -1, 2, heads, d).permute(2, 0, 3, 1, 4)  # [B, heads, Nk, d] each

        grid_q = q[:, P:].transpose(1, 2).reshape(B, C, H, W)
        agents = F.adaptive_avg_pool2d(grid_q, self.agent_shape).flatten(2).transpose(1, 2)
        agents = agents.reshape(B, -1, heads, d).transpose(1, 2)  # [B, heads, n, d]
        q = q.view(B, N, heads, d).transpose(1, 2)

        # agents gather from the keys, then the queries read from the agents
        agent_logits = (agents * self.scale) @ k.transpose(-2, -1) + self.agent_to_key_bias(kh, kw)
        agent_attn = agent_logits.softmax(-1)
        agent_v = self.attn_drop(agent_attn) @ v
        q_attn = ((q * self.scale) @ agents.transpose(-2, -1) + self.query_to_agent_bias(H, W)).softmax(-1)
        out = (self.attn_drop(q_attn) @ agent_v).transpose(1, 2).reshape(B, N, C)

        v_img = v[:, :, P:].transpose(-2, -1).reshape(B, C, kh, kw)
        if self.sr_ratio > 1:
            v_img = F.interpolate(v_img, size=(H, W), mode="bilinear")
        local = self.dwc(v_img).flatten(2).transpose(1, 2)
        out = torch.cat([out[:, :P], out[:, P:] + local], dim=1) if P else out + local
        out = self.proj_drop(self.proj(out))
        return (out, (agent_attn, q_attn)) if return_attn else out

    @torch.no_grad()
    def attention_maps(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """``[B, 3, H, W]``: what the first, middle and last agent gather from the keys (mean over heads),
        resized from the key grid. ``x``: ``[B, H, W, C]``, or tokens plus ``size`` as in ``forward``."""
        if size is None:
            B, H, W, C = x.shape
            x = x.reshape(B, H * W, C)
        else:
            (B, _, C), (H, W) = x.shape, size
        _, (agent_attn, _) = self.attend(x, H, W, return_attn=True)
        kh, kw = (H // self.sr_ratio, W // self.sr_ratio) if self.sr_ratio > 1 else (H, W)
        n = agent_attn.shape[2]
        maps = agent_attn[..., self.num_prefix_tokens:].mean(1)[:, [0, n // 2, n - 1]].view(B, 3, kh, kw)
        return maps if (kh, kw) == (H, W) else F.interpolate(maps, size=(H, W), mode="bilinear")

    def forward(self, x: torch.Tensor, return_attn: bool = False):
        B, H, W, C = x.shape
        out = self.attend(x.reshape(B, H * W, C), H, W, return_attn)
        if return_attn:
            return out[0].view(B, H, W, C), out[1]
        return out.view(B, H, W, C)


class ClassAgentAttention(AgentAttention):
    """Agent attention with a class token (Agent-DeiT), on ``[B, 1 + H*W, C]`` tokens plus ``(H, W)``.

    Agents are pooled from the patch queries only; the class token is a key (bias ``ac_bias``) and a
    query (bias ``ca_bias``); the depthwise-conv term is added to the patch tokens only.
    """

    num_prefix_tokens = 1

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        agent_num: int = 49,
        bias_size: int | tuple[int, int] = 14,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        agent_shape: tuple[int, int] | None = None,
    ):
        super().__init__(dim, num_heads, agent_num, bias_size, 1, qkv_bias, attn_drop, proj_drop, agent_shape)
        self.ac_bias = nn.Parameter(torch.zeros(1, num_heads, agent_num, 1))
        self.ca_bias = nn.Parameter(torch.zeros(1, num_heads, 1, agent_num))
        trunc_normal_(self.ac_bias, std=0.02)
        trunc_normal_(self.ca_bias, std=0.02)

    def _with_prefix_keys(self, bias: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.ac_bias[0], bias], dim=-1)

    def _with_prefix_queries(self, bias: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.ca_bias[0].transpose(1, 2), bias], dim=-1)

    def forward(self, x: torch.Tensor, size: tuple[int, int], return_attn: bool = False):
        return self.attend(x, *size, return_attn=return_attn)


def split_official_qkv(state_dict: dict, prefix: str = "") -> dict:
    """Official keys of one agent-attention module (under ``prefix``) -> ours: the fused ``qkv`` linear
    of the Swin and DeiT variants is split into ``q`` and ``kv`` (rows ``[q | k | v]``)."""
    out = dict(state_dict)
    for kind in ("weight", "bias"):
        fused = out.pop(f"{prefix}qkv.{kind}", None)
        if fused is not None:
            dim = fused.shape[0] // 3
            out[f"{prefix}q.{kind}"], out[f"{prefix}kv.{kind}"] = fused[:dim], fused[dim:]
    return out
