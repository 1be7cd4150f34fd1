"""2-D neighborhood attention (NAT / DiNAT), with NATTEN's semantics.

Every query attends to exactly ``k x k`` keys. Along each axis the window is centred on the query
and *shifted inward* at the borders (never zero-padded), and dilation ``d`` splits the axis into
``d`` interleaved groups (``i mod d``) that attend only within themselves. The optional relative
position bias ``rpb[h, 2k-1, 2k-1]`` is indexed by the (key - query) offset divided by the dilation.

The torch backend copies out each query's ``k x k`` keys (O(N·k²) memory, never a dense N×N mask):
it is the readable reference the fused kernels are tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _checks
from ._checks import check_qkv, pair

__all__ = ["neighborhood_attention2d", "neighborhood_indices", "fit_dilation"]


def neighborhood_indices(length: int, kernel_size: int, dilation: int = 1, device=None) -> torch.Tensor:
    """``[length, kernel_size]`` key positions of every query position along one axis.

    Query ``i`` lives in dilation group ``g = i % d`` at group position ``i // d``; its window starts
    at ``clamp(i // d - k // 2, 0, L_g - k)`` in the group (``L_g`` the group's length), so windows
    shift inward at borders. Even ``k`` puts ``k/2`` keys before the query and ``k/2 - 1`` after.
    """
    if kernel_size * dilation > length:
        raise ValueError(f"kernel_size * dilation = {kernel_size}*{dilation} exceeds the axis length {length}")
    i = torch.arange(length, device=device)
    group, pos = i % dilation, i // dilation
    group_len = (length - group + dilation - 1) // dilation
    start = torch.minimum((pos - kernel_size // 2).clamp(min=0), group_len - kernel_size)
    return (start[:, None] + torch.arange(kernel_size, device=device)) * dilation + group[:, None]


def fit_dilation(size: tuple[int, int], kernel_size, dilation, policy: str = "error") -> tuple[int, int]:
    """The dilation to use for an input of ``size``: unchanged, or lowered where ``k·d`` exceeds a side.

    ``policy="error"`` raises naming the sizes; ``policy="reduce"`` lowers the dilation of that axis to
    ``side // k`` for this input only (detection-sized inputs with DiNAT's large dilations, NAT #106).
    """
    kernel_size, dilation = pair(kernel_size), pair(dilation)
    out = []
    for side, k, d, axis in zip(size, kernel_size, dilation, ("height", "width")):
        if k > side:
            raise ValueError(f"input {axis} {side} is smaller than kernel_size {k}; pad the input to at least {k}")
        if k * d > side:
            if policy == "error":
                raise ValueError(
                    f"kernel_size*dilation = {k}*{d} = {k * d} exceeds the input {axis} {side} (input {size[0]}x"
                    f"{size[1]}); use a larger input, pad it, or dilation_policy='reduce'"
                )
            if policy != "reduce":
                raise ValueError(f"dilation_policy={policy!r}; expected 'error' or 'reduce'")
            d = side // k
        out.append(d)
    return tuple(out)


def _windows(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, kernel, dilation) -> torch.Tensor:
    """Every query's window of ``x`` ``[B, H, W, heads, D]``: ``[B, H, W, heads, D, kh, kw]``.

    ``unfold`` views all (dilated) windows along an axis, and each query picks the one starting at its first
    key: a single copy whose backward is an ``index_add`` (a fancy-index gather's accumulating backward is
    ~30x slower on CPU).
    """
    (kh, kw), (dh, dw) = kernel, dilation
    views = x.unfold(1, (kh - 1) * dh + 1, 1)[..., ::dh].unfold(2, (kw - 1) * dw + 1, 1)[..., ::dw]
    return views.index_select(1, rows[:, 0]).index_select(2, cols[:, 0])


def neighborhood_attention2d(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel_size: int | tuple[int, int],
    dilation: int | tuple[int, int] = 1,
    rpb: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str | None = None,
    dilation_policy: str = "error",
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Neighborhood attention over a 2-D token grid.

    Args:
        q, k, v: ``[B, H, W, heads, D]`` (NATTEN's layout).
        kernel_size, dilation: ints or ``(height, width)`` pairs.
        rpb: additive relative position bias ``[heads, 2*kh-1, 2*kw-1]`` or None.
        scale: logit scale, default ``D ** -0.5``.
        backend: ``"auto"`` (Triton for CUDA tensors it supports, else torch) | ``"torch"`` | ``"triton"``;
            None (default): the switch's, :func:`kernels.use_backend`.
        dilation_policy: ``"error"`` or ``"reduce"`` when ``kernel_size*dilation`` exceeds a side.
        dropout_p: dropout on the attention weights (pass 0 in eval).
    Returns:
        ``[B, H, W, heads, D]``.
    """
    check_qkv(q, k, v, backend)
    _, H, W, heads, D = q.shape
    (kh, kw), (dh, dw) = pair(kernel_size), fit_dilation((H, W), kernel_size, dilation, dilation_policy)
    if rpb is not None and tuple(rpb.shape) != (heads, 2 * kh - 1, 2 * kw - 1):
        raise ValueError(f"rpb must be [heads, 2k-1, 2k-1] = {[heads, 2 * kh - 1, 2 * kw - 1]}, got {list(rpb.shape)}")
    scale = D**-0.5 if scale is None else scale
    if _checks.use_triton(q, backend, dropout_p=dropout_p):
        return _checks.triton_windowed.windowed_attention(q, k, v, rpb, (kh, kw), (dh, dw), (0, 0), False, scale)

    rows = neighborhood_indices(H, kh, dh, q.device)  # [H, kh]
    cols = neighborhood_indices(W, kw, dw, q.device)  # [W, kw]
    keys, values = (_windows(t, rows, cols, (kh, kw), (dh, dw)) for t in (k, v))  # [B, H, W, heads, D, kh, kw]

    logits = torch.einsum("bijhd,bijhdxy->bijhxy", q * scale, keys)
    if rpb is not None:
        # offset (key - query) / dilation, shifted to a 0-based index into the (2k-1) table
        dy = (rows - torch.arange(H, device=q.device)[:, None]) // dh + kh - 1  # [H, kh]
        dx = (cols - torch.arange(W, device=q.device)[:, None]) // dw + kw - 1  # [W, kw]
        bias = rpb[:, dy[:, None, :, None], dx[None, :, None, :]]  # [heads, H, W, kh, kw]
        logits = logits + bias.permute(1, 2, 0, 3, 4)
    attn = F.softmax(logits.flatten(-2), dim=-1).view_as(logits)
    if dropout_p:
        attn = F.dropout(attn, dropout_p)
    return torch.einsum("bijhxy,bijhdxy->bijhd", attn, values)
