"""Attention mechanisms, one file per mechanism, sharing one interface.

Every module maps a channels-last token grid ``[B, H, W, C] -> [B, H, W, C]``
(token-pruning modules on ``[B, N, C]`` say so), works for any H and W, and,
where a fused kernel exists, runs it on the backend of the one switch, :func:`kernels.use_backend`
(``"auto" | "torch" | "triton"``; a module's ``backend`` attribute overrides it for that module only).
Modules with something to show implement ``attention_maps(*forward_args) -> [B, M, h, w]`` (no grad;
M maps on the module's grid), which :class:`vision.callbacks.AttentionMaps` draws over the images.
"""

from .agent import AgentAttention, ClassAgentAttention
from .hilo import HiLoAttention
from .linear import LinearAttention
from .neighborhood import NeighborhoodAttention1D, NeighborhoodAttention2D, NeighborhoodAttention3D
from .pruning import ClassScoredAttention, keep_attentive_tokens
from .routing import AttentionLePE, BiLevelRoutingAttention
from .vsa import VSAWindowAttention
from .window import WindowAttention

__all__ = [
    "AgentAttention",
    "AttentionLePE",
    "BiLevelRoutingAttention",
    "ClassAgentAttention",
    "ClassScoredAttention",
    "HiLoAttention",
    "LinearAttention",
    "NeighborhoodAttention1D",
    "NeighborhoodAttention2D",
    "NeighborhoodAttention3D",
    "VSAWindowAttention",
    "WindowAttention",
    "keep_attentive_tokens",
]
