"""Argument checks and the backend choice shared by the functional attention ops."""

from __future__ import annotations

import torch

try:
    from . import triton_windowed
except ImportError:  # no Triton wheel for this platform (macOS, Windows): the torch backend serves all
    triton_windowed = None

BACKENDS = ("auto", "torch", "triton")


def pair(value) -> tuple[int, int]:
    """An int or a ``(height, width)`` pair, as a pair."""
    return (value, value) if isinstance(value, int) else tuple(value)


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str) -> None:
    """q, k, v share one ``[B, H, W, heads, D]`` shape, and the backend exists."""
    if q.ndim != 5 or q.shape != k.shape or k.shape != v.shape:
        raise ValueError(f"q, k, v must share one [B, H, W, heads, D] shape; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: expected one of {BACKENDS}")


def use_triton(q: torch.Tensor, backend: str, dropout_p: float) -> bool:
    """Whether this call runs the fused Triton kernels.

    ``"auto"`` picks them for CUDA tensors they support (head dim 16..128, no attention dropout) unless
    deterministic algorithms are requested (dRPB accumulates with atomics), and the torch reference
    otherwise; ``"triton"`` insists, and says why when it cannot run.
    """
    if backend == "torch":
        return False
    supported = 16 <= q.shape[-1] <= 128 and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
    if backend == "auto":
        return (triton_windowed is not None and q.is_cuda and supported and not dropout_p
                and not torch.are_deterministic_algorithms_enabled())
    if triton_windowed is None:
        raise RuntimeError("backend='triton' needs the triton package (Linux wheels only); use backend='torch'")
    if dropout_p:
        raise ValueError(f"backend='triton' has no attention dropout (dropout_p={dropout_p}); use backend='torch'")
    if not (q.is_cuda or triton_windowed.INTERPRETED):
        raise RuntimeError("backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before `kernels` is "
                           f"imported to run the kernels on {q.device} in Triton's interpreter")
    return True
