"""Attention kernels: readable PyTorch references and fused Triton kernels.

This package imports only torch and, where it is installed, triton; importing it never
touches a GPU driver. No model code lives here.
"""

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
    "bilevel_routing_attention",
    "fit_dilation",
    "merge_attentions",
    "neighborhood_attention",
    "neighborhood_attention1d",
    "neighborhood_attention2d",
    "neighborhood_attention3d",
    "neighborhood_indices",
    "swin_table_to_rpb",
    "window_attention2d",
]
