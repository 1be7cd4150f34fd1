"""Attention kernels: readable PyTorch references and fused Triton kernels.

This package imports only torch and, where it is installed, triton; importing it never
touches a GPU driver. No model code lives here.
"""

from .backend import BACKENDS, get_backend, use_backend
from .bilevel_routing import bilevel_routing_attention
from .neighborhood import (
    fit_dilation,
    merge_attentions,
    neighborhood_attention,
    neighborhood_attention1d,
    neighborhood_attention2d,
    neighborhood_attention3d,
    neighborhood_indices,
)
from .window import swin_table_to_rpb, window_attention2d

__all__ = [
    "BACKENDS",
    "bilevel_routing_attention",
    "fit_dilation",
    "get_backend",
    "merge_attentions",
    "neighborhood_attention",
    "neighborhood_attention1d",
    "neighborhood_attention2d",
    "neighborhood_attention3d",
    "neighborhood_indices",
    "swin_table_to_rpb",
    "use_backend",
    "window_attention2d",
]
