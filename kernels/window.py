"""2-D (shifted) window attention, Swin-style.

The grid is cut into non-overlapping ``wh x ww`` windows; with ``shift_size`` the grid is first rolled
by ``-shift`` (Swin's cyclic shift) and tokens that came from different regions of the unrolled grid
are masked from each other. Sizes that are not multiples of the window are padded internally and the
padded keys are masked (modules that must reproduce an official *unmasked* zero padding pad their
input before the qkv projection, so that this function sees divisible sizes).

The relative position bias uses the same convention as :func:`kernels.neighborhood_attention2d`:
``rpb[h, (wh-1)+dy, (ww-1)+dx]`` with ``(dy, dx)`` the key-minus-query offset.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _checks
from ._checks import check_qkv, pair

__all__ = ["window_attention2d", "swin_table_to_rpb"]


def swin_table_to_rpb(table: torch.Tensor, window_size: int | tuple[int, int]) -> torch.Tensor:
    """A Swin ``relative_position_bias_table`` ``[(2wh-1)(2ww-1), heads]`` (indexed by query - key)
    as an ``rpb`` tensor ``[heads, 2wh-1, 2ww-1]`` (indexed by key - query)."""
    wh, ww = pair(window_size)
    return table.view(2 * wh - 1, 2 * ww - 1, -1).permute(2, 0, 1).flip(1, 2)


def _region_ids(H: int, W: int, window: tuple[int, int], shift: tuple[int, int], device) -> torch.Tensor:
    """Swin's region labels of the rolled grid: tokens attend only within their own region."""
    def bands(length, w, s):
        ids = torch.zeros(length, dtype=torch.long, device=device)
        if s:
            ids[length - w: length - s] = 1
            ids[length - s:] = 2
        return ids

    return bands(H, window[0], shift[0])[:, None] * 3 + bands(W, window[1], shift[1])[None, :]


def _windows(x: torch.Tensor, wh: int, ww: int) -> torch.Tensor:
    """``[B, H, W, ...] -> [B, nH, nW, wh*ww, ...]``."""
    B, H, W = x.shape[:3]
    x = x.view(B, H // wh, wh, W // ww, ww, *x.shape[3:]).transpose(2, 3)
    return x.reshape(B, H // wh, W // ww, wh * ww, *x.shape[5:])


def window_attention2d(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window_size: int | tuple[int, int],
    shift_size: int | tuple[int, int] = 0,
    rpb: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Attention inside (shifted) non-overlapping windows.

    Args:
        q, k, v: ``[B, H, W, heads, D]``.
        window_size, shift_size: ints or ``(height, width)`` pairs; ``0 <= shift < window``.
        rpb: additive relative position bias ``[heads, 2*wh-1, 2*ww-1]`` or None.
        scale: logit scale, default ``D ** -0.5``.
        backend: ``"auto"`` (Triton for CUDA tensors it supports, else torch) | ``"torch"`` | ``"triton"``;
            None (default): the switch's, :func:`kernels.use_backend`.
        dropout_p: dropout on the attention weights (pass 0 in eval).
    Returns:
        ``[B, H, W, heads, D]``.
    """
    check_qkv(q, k, v, backend)
    B, H, W, heads, D = q.shape
    (wh, ww), (sh, sw) = pair(window_size), pair(shift_size)
    if not (0 <= sh < wh and 0 <= sw < ww):
        raise ValueError(f"shift_size {(sh, sw)} must lie in [0, window_size {(wh, ww)})")
    if rpb is not None and tuple(rpb.shape) != (heads, 2 * wh - 1, 2 * ww - 1):
        raise ValueError(f"rpb must be [heads, 2w-1, 2w-1] = {[heads, 2 * wh - 1, 2 * ww - 1]}, got {list(rpb.shape)}")
    scale = D**-0.5 if scale is None else scale
    why = _checks.windowed_unsupported(q, (wh, ww), (1, 1), (sh, sw), True)
    if _checks.use_triton(q, backend, dropout_p=dropout_p, atomics=rpb is not None, unsupported=why):  # pads, rolls and masks inside the kernel
        return _checks.triton_windowed.windowed_attention(q, k, v, rpb, (wh, ww), (1, 1), (sh, sw), True, scale)

    pad_h, pad_w = -H % wh, -W % ww
    Hp, Wp = H + pad_h, W + pad_w
    q, k, v = (F.pad(t, (0, 0, 0, 0, 0, pad_w, 0, pad_h)) for t in (q, k, v))
    if sh or sw:
        q, k, v = (torch.roll(t, shifts=(-sh, -sw), dims=(1, 2)) for t in (q, k, v))

    # Which keys each query may see: same Swin region, and not padding.
    region = _region_ids(Hp, Wp, (wh, ww), (sh, sw), q.device)
    valid = torch.zeros(Hp, Wp, dtype=torch.bool, device=q.device)
    valid[:H, :W] = True
    if sh or sw:
        valid = torch.roll(valid, shifts=(-sh, -sw), dims=(0, 1))
    region_w = _windows(region[None], wh, ww)[0]  # [nH, nW, N]
    valid_w = _windows(valid[None], wh, ww)[0]
    # padded queries (cropped at the end) see their whole region, so no row is empty
    allowed = (region_w[..., :, None] == region_w[..., None, :]) & (valid_w[..., None, :] | ~valid_w[..., :, None])

    qw, kw_, vw = (_windows(t, wh, ww) for t in (q, k, v))  # [B, nH, nW, N, heads, D]
    logits = torch.einsum("bxynhd,bxymhd->bxyhnm", qw * scale, kw_)
    if rpb is not None:
        ys, xs = torch.meshgrid(torch.arange(wh, device=q.device), torch.arange(ww, device=q.device), indexing="ij")
        ys, xs = ys.flatten(), xs.flatten()
        bias = rpb[:, ys[None, :] - ys[:, None] + wh - 1, xs[None, :] - xs[:, None] + ww - 1]  # [heads, N, N]
        logits = logits + bias
    logits = logits.masked_fill(~allowed[:, :, None], float("-inf"))
    attn = F.softmax(logits, dim=-1)
    if dropout_p:
        attn = F.dropout(attn, dropout_p)
    out = torch.einsum("bxyhnm,bxymhd->bxynhd", attn, vw)

    nH, nW = Hp // wh, Wp // ww
    out = out.view(B, nH, nW, wh, ww, heads, D).transpose(2, 3).reshape(B, Hp, Wp, heads, D)
    if sh or sw:
        out = torch.roll(out, shifts=(sh, sw), dims=(1, 2))
    return out[:, :H, :W]
