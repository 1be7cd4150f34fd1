"""Bi-level routing attention (BiFormer), token-level step: attention to routed regions.

The ``[B, H, W]`` grid is cut into ``n_win x n_win`` regions (a region *count* per side) of
``⌈H/n_win⌉ x ⌈W/n_win⌉`` tokens, both row-major. Query region ``r`` attends to every token of the regions
``region_index[..., r, :]`` names (top-k routing is the caller's: this op takes the index).

Sizes not divisible by ``n_win`` are zero-padded at the bottom/right *after* the projection, as the official
``nchwBRA`` does: padded keys are ordinary keys with k = v = 0 (logit 0), unless ``mask_padding=True`` keeps
them out. (The legacy BRA of the released checkpoints pads *before* the projection, so that padded tokens
carry the projection bias; a module reproducing it pads its input and passes a divisible grid.)

Backends: the torch reference gathers the routed keys and values of a bounded chunk of query regions at a
time (each chunk checkpointed under autograd); the fused Triton kernels (``kernels/triton_bilevel.py``) read
routed regions in place through the index and never copy K/V. Both are deterministic.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ._checks import resolve_backend, use_triton

try:
    from . import triton_bilevel
except ImportError:  # no Triton wheel for this platform (macOS, Windows): the torch backend serves all
    triton_bilevel = None

__all__ = ["bilevel_routing_attention"]


def _to_regions(x: torch.Tensor, n: int) -> torch.Tensor:
    """``[B, H, W, heads, D] -> [B, heads, n*n, (H/n)*(W/n), D]`` (H, W multiples of n)."""
    B, H, W, heads, D = x.shape
    x = x.view(B, n, H // n, n, W // n, heads, D).permute(0, 5, 1, 3, 2, 4, 6)
    return x.reshape(B, heads, n * n, (H // n) * (W // n), D)


def _from_regions(x: torch.Tensor, n: int, H: int, W: int) -> torch.Tensor:
    B, heads, _, _, D = x.shape
    return x.view(B, heads, n, n, H // n, W // n, D).permute(0, 2, 4, 3, 5, 1, 6).reshape(B, H, W, heads, D)


def _attend(q, k, v, index, key_valid, scale):
    """Chunk of query regions ``q [B, heads, c, P, Dqk]`` with routing ``index [B, heads, c, topk]`` against
    all key regions ``k [B, heads, R, P, Dqk]``: gathers the routed regions' keys and values, then SDPA on
    4-D tensors ``[B*heads, c, P, D]`` (regions as SDPA's head axis): on CPU a 5-D call takes the math path,
    which materialises every attention matrix; the 4-D call reaches the fused kernel."""
    B, heads, c, P, _ = q.shape
    R, topk = k.shape[2], index.shape[-1]
    rows = (torch.arange(B * heads, device=q.device).view(B, heads, 1, 1) * R + index).flatten()
    # index_select (its backward is an index_add) rather than fancy indexing, whose backward is slow on CPU
    ks, vs = (t.flatten(0, 2).index_select(0, rows).view(B * heads, c, topk * P, -1) for t in (k, v))
    mask = None
    if key_valid is not None:  # [B*heads, c, 1, topk*P]
        mask = key_valid[index].view(B * heads, c, 1, topk * P)
    out = F.scaled_dot_product_attention(q.flatten(0, 1), ks, vs, attn_mask=mask, scale=scale)
    return out.view(B, heads, c, P, -1)


def _torch_reference(q, k, v, index, n, scale, mask_padding, max_chunk_elements):
    B, H, W, heads, _ = q.shape
    pad_h, pad_w = -H % n, -W % n
    # symbolic sizes (torch.export, dynamic H/W): pad (maybe by 0) and use one chunk, so no branch on the size
    symbolic = not (isinstance(H, int) and isinstance(W, int))
    if symbolic or pad_h or pad_w:
        q, k, v = (F.pad(t, (0, 0, 0, 0, 0, pad_w, 0, pad_h)) for t in (q, k, v))
    qr, kr, vr = (_to_regions(t, n) for t in (q, k, v))
    index = (index[:, None] if index.ndim == 3 else index).expand(B, heads, -1, -1)
    key_valid = None
    if mask_padding and (symbolic or pad_h or pad_w):
        valid = torch.zeros(1, H + pad_h, W + pad_w, 1, 1, dtype=torch.bool, device=q.device)
        valid[:, :H, :W] = True
        key_valid = _to_regions(valid, n)[0, 0, :, :, 0]  # [n², P]

    regions, P, topk = qr.shape[2], qr.shape[3], index.shape[-1]
    # per query region: its gathered K/V and its attention matrix (the math path, e.g. under a mask or
    # float64, materialises the logits and the weights)
    per_region = B * heads * topk * P * (k.shape[-1] + v.shape[-1] + 2 * P)
    chunk = regions if symbolic else max(1, min(regions, max_chunk_elements // max(1, per_region)))
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    outs = []
    for start in range(0, regions, chunk):
        args = (qr[:, :, start:start + chunk], kr, vr, index[:, :, start:start + chunk], key_valid, scale)
        if chunk < regions and needs_grad:
            outs.append(checkpoint(_attend, *args, use_reentrant=False))  # keep only this chunk's output
        else:
            outs.append(_attend(*args))
    return _from_regions(torch.cat(outs, dim=2), n, H + pad_h, W + pad_w)[:, :H, :W]


def _check(q, k, v, index, n_win, backend):
    if q.ndim != 5 or k.shape != q.shape or v.shape[:4] != q.shape[:4]:
        raise ValueError(f"q, k must be [B, H, W, heads, Dqk] and v [B, H, W, heads, Dv] on one grid; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, H, W, heads, _ = q.shape
    if not 1 <= n_win <= min(H, W):
        raise ValueError(f"n_win={n_win} regions per side do not fit the {H}x{W} grid")
    expected = "[B, n_win², topk] or [B, heads, n_win², topk]"
    if index.ndim not in (3, 4) or index.shape[0] != B or index.shape[-2] != n_win**2 or (
            index.ndim == 4 and index.shape[1] != heads):
        raise ValueError(f"region_index must be {expected} = [{B}, ({heads},) {n_win**2}, topk]; got "
                         f"{tuple(index.shape)}")
    if index.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"region_index must hold int32/int64 region ids; got {index.dtype}")
    resolve_backend(backend)


def bilevel_routing_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    region_index: torch.Tensor,
    n_win: int,
    scale: float | None = None,
    mask_padding: bool = False,
    backend: str | None = None,
    max_chunk_elements: int = 2**24,
) -> torch.Tensor:
    """Every query attends to all tokens of the regions its region routed to.

    Args:
        q, k: ``[B, H, W, heads, Dqk]``; v: ``[B, H, W, heads, Dv]`` (strided views are fine).
        region_index: ``[B, n_win², topk]`` (one routing for all heads, as BiFormer) or
            ``[B, heads, n_win², topk]``: the key regions (row-major ids) each query region attends to. Ids
            must lie in ``[0, n_win²)`` (the Triton path checks them with an asynchronous device
            assert, no host synchronisation).
        n_win: regions per side.
        scale: logit scale, default ``Dqk ** -0.5`` (BiFormer passes ``qk_dim ** -0.5``).
        mask_padding: keep zero-padded keys (sizes not divisible by ``n_win``) out of the softmax.
        backend: ``"auto"`` (Triton for CUDA tensors it supports, else torch) | ``"torch"`` | ``"triton"``;
            None (default): the switch's, :func:`kernels.use_backend`.
        max_chunk_elements: torch backend only: bound on the elements held at once for a chunk of query
            regions: their gathered K/V and their attention matrices.
    Returns:
        ``[B, H, W, heads, Dv]``.
    """
    _check(q, k, v, region_index, n_win, backend)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if use_triton(q, backend, triton_bilevel, head_dims=(q.shape[-1], v.shape[-1]), atomics=False):
        return triton_bilevel.routed_attention(q, k, v, region_index, n_win, scale, mask_padding)
    return _torch_reference(q, k, v, region_index, n_win, scale, mask_padding, max_chunk_elements)
