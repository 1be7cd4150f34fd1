"""Neighborhood attention in 1-D, 2-D and 3-D (NAT / DiNAT / GNA), with NATTEN 0.21's semantics.

Per axis of length ``L``, with kernel ``k``, stride ``s``, dilation ``d``:

* dilation splits the axis into ``d`` interleaved groups (``i mod d``) that attend only within themselves;
  a query at group position ``p`` (``p = i // d``, group length ``L_g``) belongs to the stride group
  ``p // s``, whose *leader* decides the window of every query in it;
* non-causal: leader ``min(⌊p/s⌋·s + s//2, L_g - 1)``, window ``[start, start + k)`` with
  ``start = clamp(leader - k//2, 0, L_g - k)``: centred, *shifted inward* at the borders, always ``k`` keys
  (even ``k`` puts ``k/2`` keys before the centre); ``s = 1`` is NAT, ``s = k`` blocked (Swin-like) windows;
* causal: leader ``min(⌊p/s⌋·s + s - 1, L_g - 1)``, keys ``[max(leader - k + 1, 0), p]``.

An n-D neighborhood is the Cartesian product of its axes. ``additional_keys/values`` are extra tokens every
query also attends to, in the same softmax. The optional relative position bias ``rpb[heads, 2k-1, ...]``
(NAT's, one axis per spatial dim) is indexed by ``(key - query) / d + k - 1`` per axis.

The torch backend tiles the queries of each dilation group into blocks of ``T`` per axis and attends each
block to the *rectangle* of keys its windows touch, with one batched matmul and a mask: memory is the
``[tokens, R^n]`` logits (``R ≈ T + k - 1``, so a few times ``k^n``), and the only copy of K/V is the
rectangles (``(R/T)^n`` times K's size), never one window per query.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from . import _checks

__all__ = [
    "fit_dilation",
    "merge_attentions",
    "neighborhood_attention",
    "neighborhood_attention1d",
    "neighborhood_attention2d",
    "neighborhood_attention3d",
    "neighborhood_indices",
]


def neighborhood_indices(length: int, kernel_size: int, dilation: int = 1, device=None, *, stride: int = 1) -> torch.Tensor:
    """``[length, kernel_size]`` key positions of every query position along one axis (non-causal).

    Query ``i`` lives in dilation group ``g = i % d`` at group position ``p = i // d``; its stride group's
    leader ``min(⌊p/s⌋·s + s//2, L_g - 1)`` centres the window, which starts at
    ``clamp(leader - k // 2, 0, L_g - k)`` in the group (``L_g`` the group's length), so windows shift inward
    at borders. Even ``k`` puts ``k/2`` keys before the centre and ``k/2 - 1`` after.
    """
    if kernel_size * dilation > length:
        raise ValueError(f"kernel_size * dilation = {kernel_size}*{dilation} exceeds the axis length {length}")
    i = torch.arange(length, device=device)
    group, pos = i % dilation, i // dilation
    group_len = (length - group + dilation - 1) // dilation
    leader = torch.minimum(pos // stride * stride + stride // 2, group_len - 1)
    start = torch.minimum((leader - kernel_size // 2).clamp(min=0), group_len - kernel_size)
    return (start[:, None] + torch.arange(kernel_size, device=device)) * dilation + group[:, None]


def fit_dilation(size: tuple[int, ...], kernel_size, dilation, policy: str = "error") -> tuple[int, ...]:
    """The dilation to use for an input of ``size``: unchanged, or lowered where ``k·d`` exceeds a side.

    ``policy="error"`` raises naming the sizes; ``policy="reduce"`` lowers the dilation of that axis to
    ``side // k`` for this input only (detection-sized inputs with DiNAT's large dilations, NAT #106).
    """
    n = len(size)
    kernel_size, dilation = _per_axis(kernel_size, n, "kernel_size"), _per_axis(dilation, n, "dilation")
    names = ("height", "width") if n == 2 else tuple(f"axis {i}" for i in range(n))
    shown = "x".join(map(str, size))
    out = []
    for side, k, d, axis in zip(size, kernel_size, dilation, names):
        if k > side:
            raise ValueError(f"input {axis} {side} is smaller than kernel_size {k}; pad the input to at least {k}")
        if k * d > side:
            if policy == "error":
                raise ValueError(
                    f"kernel_size*dilation = {k}*{d} = {k * d} exceeds the input {axis} {side} (input {shown}); "
                    "use a larger input, pad it, or dilation_policy='reduce'"
                )
            if policy != "reduce":
                raise ValueError(f"dilation_policy={policy!r}; expected 'error' or 'reduce'")
            d = side // k
        out.append(d)
    return tuple(out)


def _per_axis(value, n: int, name: str, kind=int) -> tuple:
    """An int (bool for ``is_causal``) or a length-``n`` sequence of them, as an ``n``-tuple."""
    if isinstance(value, kind) and (kind is bool or not isinstance(value, bool)):
        return (value,) * n
    value = tuple(value)
    if len(value) != n or not all(isinstance(x, kind) for x in value):
        raise ValueError(f"{name}={value!r}: expected one {kind.__name__} or {n} of them (one per spatial axis)")
    return value


def _default_tile(length: int, k: int, s: int, d: int, rank: int) -> int:
    """Queries per tile along an axis: about ``k``, at least enough for ~50 queries per tile (small matmuls
    run far below peak on CPU: 7 for 2-D, 4 for 3-D measured best, ``benchmarks/bench_neighborhood.py``), a
    multiple of the stride so that stride groups never straddle tiles, at most the group length."""
    want = max(k, {1: 16, 2: 7, 3: 4}[rank])
    return min(s * max(1, round(want / s)), -(-length // d))


@functools.lru_cache(maxsize=512)
def _axis_plan(length: int, k: int, s: int, d: int, causal: bool, tile: int):
    """The tiling of one axis, on CPU (moved to the input's device by the caller).

    Queries are laid out ``[tiles, tile, d]`` (position ``(t·tile + i)·d + g``, the axis padded to
    ``tiles·tile·d``); tile ``t`` of group ``g`` attends to the ``R`` keys of group ``g`` starting at group
    position ``rect[t, g]``. Returns ``index`` (``[tiles·d·R]`` key positions to gather), ``mask``
    (``[tiles, d, tile, R]``: key in the query's window), ``rel`` (``[tiles, d, tile, R]`` RPB index
    ``key - query + k - 1``), ``R`` and ``tiles``.
    """
    group_max = -(-length // d)
    tiles = -(-group_max // tile)
    pos = torch.arange(tiles * tile).view(tiles, 1, tile)  # group position of each query slot
    group = torch.arange(d).view(1, d, 1)
    group_len = (length - group + d - 1) // d
    pos = torch.minimum(pos, group_len - 1)  # padding slots borrow the last query's window
    if causal:
        leader = torch.minimum(pos // s * s + s - 1, group_len - 1)
        start, end = (leader - k + 1).clamp(min=0), pos + 1
    else:
        leader = torch.minimum(pos // s * s + s // 2, group_len - 1)
        start = torch.minimum((leader - k // 2).clamp(min=0), group_len - k)
        end = start + k
    lo, hi = start.amin(-1, keepdim=True), end.amax(-1, keepdim=True)  # [tiles, d, 1]
    R = int((hi - lo).max())
    rect = torch.minimum(lo, group_len - R).clamp(min=0)
    key = rect + torch.arange(R)  # [tiles, d, R] group positions of the rectangle
    index = (key * d + group).clamp(max=length - 1).flatten()  # past a short group's end: masked anyway
    key = key[:, :, None, :]
    mask = (key >= start[..., None]) & (key < end[..., None])
    rel = (key - pos[..., None]).clamp(-(k - 1), k - 1) + k - 1
    return index, mask, rel, R, tiles


def _place(t: torch.Tensor, axis: int, n: int) -> torch.Tensor:
    """View a per-axis ``[tiles, d, tile, R]`` table at its place in the ``[(tiles, d) x n, tile x n, R x n]``
    layout of n axes, for broadcasting."""
    shape = [1] * (4 * n)
    shape[2 * axis], shape[2 * axis + 1], shape[2 * n + axis], shape[3 * n + axis] = t.shape
    return t.view(shape)


@functools.lru_cache(maxsize=32)
def _mask_bias(axes: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``[G, T^n, R^n]`` additive mask (0 inside the window, -inf outside) of the tiling of ``axes`` (one
    ``_axis_plan`` argument tuple per axis; cached by those, not by tensors)."""
    plans = [_axis_plan(*a) for a in axes]
    n = len(plans)
    mask = functools.reduce(torch.logical_and, [_place(p[1], i, n) for i, p in enumerate(plans)])
    # shape = [tiles_1, d_1, ..., tiles_n, d_n, T_1..T_n, R_1..R_n]
    G, T, R = math.prod(mask.shape[:2 * n]), math.prod(mask.shape[2 * n:3 * n]), math.prod(mask.shape[3 * n:])
    bias = torch.zeros(mask.shape, dtype=dtype).masked_fill_(~mask, float("-inf"))
    return bias.reshape(G, T, R).to(device)


@functools.lru_cache(maxsize=32)
def _rpb_index(axes: tuple, device: torch.device) -> torch.Tensor:
    """``[G·T^n·R^n]`` flat index into the ``[heads, prod(2k-1)]`` bias table of the tiling of ``axes``."""
    plans, kernel = [_axis_plan(*a) for a in axes], [a[1] for a in axes]
    n = len(plans)
    flat = functools.reduce(torch.add, [_place(p[2], i, n) * math.prod(2 * x - 1 for x in kernel[i + 1:])
                                        for i, p in enumerate(plans)])
    return flat.flatten().to(device)


def _rpb_bias(rpb: torch.Tensor, axes: tuple, shape) -> torch.Tensor:
    """``[heads, G, T^n, R^n]`` relative position bias of a tiling (differentiable in ``rpb``): a gather from
    the flattened table, whose backward is one ``index_add`` (fast on CPU, unlike n-D advanced indexing's)."""
    return rpb.flatten(1).index_select(1, _rpb_index(axes, rpb.device)).view(rpb.shape[0], *shape)


def _attend_tiles(q, k, v, kernel, stride, dilation, causal, scale, rpb, extra_k, extra_v, dropout_p, need_lse=True,
                  tiles=None):
    """The torch backend: ``(out [B, *spatial, heads, Dv], lse [B, *spatial, heads])``."""
    B, *size, heads, D = q.shape
    n, Dv = len(size), v.shape[-1]
    tiles = tiles or tuple(_default_tile(*a, n) for a in zip(size, kernel, stride, dilation))
    axes = tuple(zip(size, kernel, stride, dilation, causal, tiles))
    plans = [_axis_plan(*a) for a in axes]

    # queries: pad every axis to tiles*tile*d, then [B, heads, G, T^n, D]
    padded = [p[4] * t * d for p, t, d in zip(plans, tiles, dilation)]
    pad = [x for i in reversed(range(n)) for x in (0, padded[i] - size[i])]
    qp = F.pad(q * scale, [0, 0, 0, 0, *pad]) if any(pad) else q * scale
    qp = qp.view(B, *[x for p, t, d in zip(plans, tiles, dilation) for x in (p[4], t, d)], heads, D)
    perm = [0, 3 * n + 1, *[x for i in range(n) for x in (1 + 3 * i, 3 + 3 * i)], *[2 + 3 * i for i in range(n)], 3 * n + 2]
    qp = qp.permute(perm).reshape(B, heads, -1, math.prod(tiles), D)

    # key / value rectangles: [B, heads, G, R^n, D]
    def rects(x):
        for i, p in enumerate(plans):
            x = x.index_select(1 + i, p[0].to(x.device))
        x = x.view(B, *[y for p, d in zip(plans, dilation) for y in (p[4], d, p[3])], heads, x.shape[-1])
        perm = [0, 3 * n + 1, *[y for i in range(n) for y in (1 + 3 * i, 2 + 3 * i)], *[3 + 3 * i for i in range(n)],
                3 * n + 2]
        return x.permute(perm).reshape(B, heads, qp.shape[2], -1, x.shape[-1])

    kr, vr = rects(k), rects(v)
    logits = qp @ kr.transpose(-1, -2)  # [B, heads, G, T^n, R^n]
    bias = _mask_bias(axes, logits.dtype, logits.device)
    if rpb is not None:
        bias = _rpb_bias(rpb.to(logits.dtype), axes, bias.shape) + bias
    logits = logits + bias
    R = logits.shape[-1]
    if extra_k is not None:
        xk = extra_k.permute(0, 2, 3, 1)[:, :, None]  # [B, heads, 1, D, M]
        logits = torch.cat([logits, qp @ xk], -1)
    lse = torch.logsumexp(logits, -1, keepdim=True) if need_lse else None
    attn = logits.softmax(-1)  # one fused pass: ~2x faster on CPU than exp(logits - lse)
    if dropout_p:
        attn = F.dropout(attn, dropout_p)
    out = attn[..., :R] @ vr if extra_k is not None else attn @ vr
    if extra_k is not None:
        out = out + attn[..., R:] @ extra_v.permute(0, 2, 1, 3)[:, :, None]

    # back to [B, *spatial, heads, Dv]
    out = out.view(B, heads, *[y for p, d in zip(plans, dilation) for y in (p[4], d)], *tiles, Dv)
    perm = [0, *[x for i in range(n) for x in (2 + 2 * i, 2 + 2 * n + i, 3 + 2 * i)], 1]
    out = out.permute(*perm, 3 * n + 2).reshape(B, *padded, heads, Dv)
    crop = (slice(None), *[slice(0, x) for x in size])
    if need_lse:
        lse = lse.view(B, heads, *[y for p, d in zip(plans, dilation) for y in (p[4], d)], *tiles)
        lse = lse.permute(perm).reshape(B, *padded, heads)[crop]
    return out[crop], lse


def neighborhood_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel_size,
    stride=1,
    dilation=1,
    is_causal=False,
    scale: float | None = None,
    additional_keys: torch.Tensor | None = None,
    additional_values: torch.Tensor | None = None,
    return_lse: bool = False,
    rpb: torch.Tensor | None = None,
    backend: str | None = None,
    dilation_policy: str = "error",
    dropout_p: float = 0.0,
):
    """Neighborhood attention over a 1-, 2- or 3-D token grid; the rank comes from the input.

    Args:
        q, k: ``[B, *spatial, heads, D]`` (NATTEN's layout); v: ``[B, *spatial, heads, Dv]``.
        kernel_size, stride, dilation: an int or one per spatial axis; ``1 <= stride <= kernel_size``.
        is_causal: a bool or one per axis.
        scale: logit scale, default ``D ** -0.5``.
        additional_keys, additional_values: ``[B, M, heads, D]`` / ``[B, M, heads, Dv]`` tokens every query
            also attends to (class or register tokens), in the same softmax.
        return_lse: also return the natural log-sum-exp of the logits ``[B, *spatial, heads]`` (fp32), for
            :func:`merge_attentions`.
        rpb: NAT's relative position bias ``[heads, 2k_1-1, ..., 2k_n-1]`` or None.
        backend: ``"auto"`` | ``"torch"`` | ``"triton"`` (the fused kernels cover 2-D, stride 1, non-causal,
            without additional keys or LSE; ``"auto"`` uses them on CUDA where they apply); None (default): the
            switch's, :func:`kernels.use_backend`.
        dilation_policy: ``"error"`` or ``"reduce"`` when ``kernel_size*dilation`` exceeds a side.
        dropout_p: dropout on the attention weights (pass 0 in eval).
    Returns:
        ``[B, *spatial, heads, Dv]``, and the LSE when ``return_lse``.
    """
    backend = _checks.resolve_backend(backend)  # None: the switch's (kernels.use_backend)
    if not 3 <= q.ndim <= 6:
        raise ValueError(f"q must be [B, *spatial, heads, D] with 1 to 3 spatial axes; got shape {tuple(q.shape)}")
    n = q.ndim - 3
    if k.shape != q.shape or v.shape[:-1] != q.shape[:-1]:
        raise ValueError(f"q, k must share one [B, *spatial, heads, D] shape and v all but D; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    size, heads, D = tuple(q.shape[1:-2]), q.shape[-2], q.shape[-1]
    kernel = _per_axis(kernel_size, n, "kernel_size")
    stride = _per_axis(stride, n, "stride")
    causal = _per_axis(is_causal, n, "is_causal", bool)
    if any(x < 1 for x in kernel + stride + _per_axis(dilation, n, "dilation")):
        raise ValueError(f"kernel_size={kernel}, stride={stride}, dilation={dilation}: all must be >= 1")
    for i, (kk, s) in enumerate(zip(kernel, stride)):
        if s > kk:
            raise ValueError(f"stride {s} exceeds kernel_size {kk} along axis {i} (input {tuple(size)})")
    dilation = fit_dilation(size, kernel, dilation, dilation_policy)
    if (additional_keys is None) != (additional_values is None):
        raise ValueError("additional_keys and additional_values must be given together")
    if additional_keys is not None:
        B = q.shape[0]
        if (additional_keys.ndim != 4 or tuple(additional_keys.shape) != (B, additional_keys.shape[1], heads, D)
                or tuple(additional_values.shape) != (B, additional_keys.shape[1], heads, v.shape[-1])):
            raise ValueError(f"additional_keys/values must be [B, M, heads, D] = [{B}, M, {heads}, {D}] and "
                             f"[{B}, M, {heads}, {v.shape[-1]}]; got {tuple(additional_keys.shape)}, "
                             f"{tuple(additional_values.shape)}")
    if rpb is not None:
        want = (heads, *[2 * x - 1 for x in kernel])
        if tuple(rpb.shape) != want:
            raise ValueError(f"rpb must be [heads, 2k-1, ...] = {list(want)}, got {list(rpb.shape)}")
    scale = D**-0.5 if scale is None else scale

    plain = (n == 2 and stride == (1, 1) and not any(causal) and additional_keys is None and not return_lse
             and v.shape[-1] == D)
    if backend == "triton" and not plain:
        raise ValueError("backend='triton' covers 2-D, stride 1, non-causal neighborhood attention without "
                         "additional keys or return_lse; use backend='torch'")
    why = _checks.windowed_unsupported(q, kernel, dilation, (0, 0), False) if plain else None
    if plain and _checks.use_triton(q, backend, dropout_p=dropout_p, atomics=rpb is not None, unsupported=why):
        return _checks.triton_windowed.windowed_attention(q, k, v, rpb, kernel, dilation, (0, 0), False, scale)

    out, lse = _attend_tiles(q, k, v, kernel, stride, dilation, causal, scale, rpb, additional_keys,
                             additional_values, dropout_p, return_lse)
    return (out, lse.float()) if return_lse else out


def _ranked(n: int):
    def fn(q, k, v, kernel_size, stride=1, dilation=1, is_causal=False, scale=None, additional_keys=None,
           additional_values=None, return_lse=False, rpb=None, backend=None, dilation_policy="error",
           dropout_p=0.0):
        if q.ndim != n + 3:
            raise ValueError(f"neighborhood_attention{n}d expects q of shape [B, {n} spatial axes, heads, D]; "
                             f"got {tuple(q.shape)}")
        return neighborhood_attention(q, k, v, kernel_size, stride, dilation, is_causal, scale, additional_keys,
                                      additional_values, return_lse, rpb, backend, dilation_policy, dropout_p)

    fn.__name__ = fn.__qualname__ = f"neighborhood_attention{n}d"
    fn.__doc__ = f"{n}-D :func:`neighborhood_attention` (``[B, {n} spatial axes, heads, D]``; NATTEN's ``na{n}d``)."
    return fn


neighborhood_attention1d = _ranked(1)
neighborhood_attention3d = _ranked(3)


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
    *,
    stride=1,
    is_causal=False,
    additional_keys: torch.Tensor | None = None,
    additional_values: torch.Tensor | None = None,
    return_lse: bool = False,
):
    """2-D :func:`neighborhood_attention` on ``[B, H, W, heads, D]``, NAT's argument order (the arguments
    NATTEN 0.21 added are keyword-only)."""
    if q.ndim != 5:
        raise ValueError(f"q, k, v must be [B, H, W, heads, D]; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    return neighborhood_attention(q, k, v, kernel_size, stride, dilation, is_causal, scale, additional_keys,
                                  additional_values, return_lse, rpb, backend, dilation_policy, dropout_p)


def merge_attentions(outputs, lses):
    """Combine attentions of one query set over disjoint key sets into the attention over their union.

    ``outputs[i]`` ``[..., heads, D]`` with its natural log-sum-exp ``lses[i]`` ``[..., heads]`` (as
    ``return_lse=True`` gives). Returns the merged ``(output, lse)`` (output in ``outputs[0]``'s dtype, LSE
    fp32); differentiable in every input.
    """
    if len(outputs) < 2 or len(outputs) != len(lses):
        raise ValueError(f"merge_attentions needs >= 2 outputs and as many LSEs; got {len(outputs)} and {len(lses)}")
    for i, (o, s) in enumerate(zip(outputs, lses)):
        if o.shape != outputs[0].shape or s.shape != o.shape[:-1]:
            raise ValueError(f"output {i} {tuple(o.shape)} / lse {tuple(s.shape)}: every output must have "
                             f"shape {tuple(outputs[0].shape)} and its lse that shape without the last axis")
    lse = torch.stack([s.float() for s in lses])
    total = torch.logsumexp(lse, 0)
    weights = (lse - total).exp().unsqueeze(-1)
    out = (weights * torch.stack([o.float() for o in outputs])).sum(0)
    return out.to(outputs[0].dtype), total
