"""Argument checks and the backend choice shared by the functional attention ops."""

from __future__ import annotations

import torch

try:
    from . import triton_windowed
except ImportError:  # no Triton wheel for this platform (macOS, Windows): the torch backend serves all
    triton_windowed = None

from .backend import BACKENDS, resolve_backend  # noqa: F401  (BACKENDS re-exported)


def pair(value) -> tuple[int, int]:
    """An int or a ``(height, width)`` pair, as a pair."""
    return (value, value) if isinstance(value, int) else tuple(value)


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str | None) -> None:
    """q, k, v share one ``[B, H, W, heads, D]`` shape, and the backend exists."""
    if q.ndim != 5 or q.shape != k.shape or k.shape != v.shape:
        raise ValueError(f"q, k, v must share one [B, H, W, heads, D] shape; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    resolve_backend(backend)


def windowed_unsupported(q: torch.Tensor, kernel, dilation, shift, blocked: bool) -> str | None:
    """Why the windowed Triton kernels have no configuration for this call (None: they have one, or there
    is no Triton, which :func:`use_triton` reports)."""
    if triton_windowed is None:
        return None
    return triton_windowed.unsupported(q.shape, q.dtype, kernel, dilation, shift, blocked)


def use_triton(q: torch.Tensor, backend: str | None, kernels=triton_windowed, *, head_dims=None, dropout_p: float = 0.0,
               atomics: bool = True, unsupported: str | None = None) -> bool:
    """Whether this call runs the fused Triton kernels of the module ``kernels`` (None without Triton).

    ``"auto"`` picks them for CUDA tensors they support (every head dim in ``head_dims``, default q's, within
    16..128; fp16/bf16/fp32; no attention dropout; no ``unsupported`` reason from the kernels' configuration
    table), unless deterministic algorithms are requested and the kernels accumulate with ``atomics``; the
    torch reference otherwise. ``"triton"`` insists, and says why when it cannot run. ``None``: the switch's
    backend (:func:`kernels.use_backend`).
    """
    backend = resolve_backend(backend)
    if backend == "torch":
        return False
    head_dims = (q.shape[-1],) if head_dims is None else head_dims
    supported = all(16 <= d <= 128 for d in head_dims) and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
    deterministic = atomics and torch.are_deterministic_algorithms_enabled()
    if backend == "auto":
        return (kernels is not None and q.is_cuda and supported and not dropout_p and not deterministic
                and unsupported is None)
    if unsupported is not None:
        raise ValueError(f"backend='triton': {unsupported}")
    if deterministic:
        raise RuntimeError("backend='triton' accumulates a gradient with atomics, which is not deterministic, and "
                           "torch.use_deterministic_algorithms(True) is set; use backend='torch' (or 'auto')")
    if kernels is None:
        raise RuntimeError("backend='triton' needs the triton package (Linux wheels only); use backend='torch'")
    if dropout_p:
        raise ValueError(f"backend='triton' has no attention dropout (dropout_p={dropout_p}); use backend='torch'")
    if not (q.is_cuda or kernels.INTERPRETED):
        raise RuntimeError("backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before `kernels` is "
                           f"imported to run the kernels on {q.device} in Triton's interpreter")
    return True
