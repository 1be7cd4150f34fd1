"""Fused Triton kernels for 2-D windowed attention: neighborhood (NAT/DiNAT) and Swin windows.

Both are one problem. Along each axis a query at *frame* position ``p`` attends to the ``k`` keys
``[start(p), start(p) + k)`` of the same frame:

* neighborhood (``BLOCKED=False``): the frame is one dilation group (memory index ``g + d·p``) and
  ``start(p) = clamp(p - k//2, 0, L_g - k)``: centred windows shifted inward at the borders;
* Swin (``BLOCKED=True``): the frame is the grid zero-padded to a multiple of the window and rolled by
  ``-shift`` (memory index ``(p + shift) mod L_p``, padding masked) and ``start(p) = ⌊p / w⌋·w``; with a
  shift, tokens of different Swin regions are masked from each other.

The relative position bias is ``rpb[head, ky - qy + kh - 1, kx - qx + kw - 1]`` in frame units in both
cases (so dilation divides the offset out, as NATTEN's RPB does).

A program owns a rectangular tile of queries (whole windows for Swin) and walks only the rectangle of keys
the tile's windows touch, in flattened chunks, with an fp32 online softmax; the backward recomputes the
probabilities from the saved log-sum-exp: one kernel for dQ (and dRPB) over the same key rectangles, one
for dK/dV over the *inverse* neighborhood of a key tile (the queries whose windows contain it). Nothing
N x N is ever formed. dRPB is accumulated with fp32 atomics into per-batch slabs.

Constraints the GPU compiler imposes are asserted (``tl.dot`` needs every dimension >= 16) so a test that
passes in the CPU interpreter cannot hide a kernel that fails to compile on a GPU.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

__all__ = ["INTERPRETED", "windowed_attention", "windowed_attention_fwd", "windowed_attention_bwd", "tile_shape"]

# @triton.jit reads TRITON_INTERPRET when it decorates, i.e. when this module is imported.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _frame_len(L, K, DIL, g, BLOCKED: tl.constexpr):
    if BLOCKED:
        n = tl.cdiv(L, K) * K
    else:
        n = (L - g + DIL - 1) // DIL
    return n


@triton.jit
def _window_start(p, Lf, K, BLOCKED: tl.constexpr):
    if BLOCKED:
        s = (p // K) * K
    else:
        s = tl.minimum(tl.maximum(p - K // 2, 0), Lf - K)
    return s


@triton.jit
def _inverse_range(first, last, Lf, K, BLOCKED: tl.constexpr):
    """First and last query position whose window contains a key in ``[first, last]``."""
    if BLOCKED:
        lo = (first // K) * K
        hi = (last // K) * K + K - 1
    else:
        t = first - K + 1
        lo = tl.where(t > 0, t + K // 2, 0)
        hi = tl.where(last >= Lf - K, Lf - 1, tl.minimum(last + K // 2, Lf - 1))
    return lo, hi


@triton.jit
def _memory_index(p, L, Lf, DIL, g, SHIFT, BLOCKED: tl.constexpr):
    """Frame position -> (memory index along the axis, whether it is a real token)."""
    if BLOCKED:
        pos = (p + SHIFT) % Lf
        ok = (p < Lf) & (pos < L)
    else:
        pos = g + DIL * p
        ok = p < Lf
    return pos, ok


@triton.jit
def _region(p, Lf, K, SHIFT):
    """Swin's regions of the rolled frame along one axis (all 0 without a shift)."""
    r = (p >= Lf - K).to(tl.int32) + (p >= Lf - SHIFT).to(tl.int32)
    return tl.where(SHIFT > 0, r, 0)


@triton.jit
def _tile_coords(pid, DH, DW, TILES_Y, TILES_X):
    tx = pid % TILES_X
    ty = (pid // TILES_X) % TILES_Y
    g = pid // (TILES_X * TILES_Y)
    return g // DW, g % DW, ty, tx


@triton.jit
def _rect(first, last, Lf, K, BLOCKED: tl.constexpr):
    """Key range ``[lo, hi)`` touched by the windows of queries ``first..last`` (empty if first >= Lf)."""
    lo = _window_start(first, Lf, K, BLOCKED)
    hi = _window_start(tl.minimum(last, Lf - 1), Lf, K, BLOCKED) + K
    return lo, tl.where(first < Lf, hi, lo)


@triton.jit
def _program(H, W, NH, KH, KW, DH, DW, TILES_Y, TILES_X, BLOCKED: tl.constexpr):
    """This program's dilation group, tile, (batch, head) and the frame lengths of its group."""
    gy, gx, ty, tx = _tile_coords(tl.program_id(0), DH, DW, TILES_Y, TILES_X)
    bh = tl.program_id(1)
    b = (bh // NH).to(tl.int64)  # int64: offsets of large batches pass 2**31
    return gy, gx, ty, tx, bh, b, bh % NH, _frame_len(H, KH, DH, gy, BLOCKED), _frame_len(W, KW, DW, gx, BLOCKED)


@triton.jit
def _chunk(j, y0, x0, cols, n, H, W, Lfy, Lfx, DH, DW, gy, gx, SH, SW, BLOCKED: tl.constexpr):
    """Frame positions, memory indices and validity of lanes ``j`` of the flattened rectangle
    ``[y0, ..) x [x0, x0 + cols)`` of ``n`` positions (a program's own tile, or a chunk of the keys or queries
    it visits)."""
    py = y0 + j // cols
    px = x0 + j % cols
    y, oky = _memory_index(py, H, Lfy, DH, gy, SH, BLOCKED)
    x, okx = _memory_index(px, W, Lfx, DW, gx, SW, BLOCKED)
    return py, px, y, x, (j < n) & oky & okx


@triton.jit
def _rows(PTR, b, y, x, head, d, sb, sh, sw, sn, ok, D):
    """Gather ``[len(y), BLOCK_D]`` rows of a ``[B, H, W, heads, D]`` tensor (zeros where masked)."""
    return tl.load(PTR + b * sb + y[:, None] * sh + x[:, None] * sw + head * sn + d[None, :],
                   mask=ok[:, None] & (d[None, :] < D), other=0.0)


@triton.jit
def _allowed(qpy, qpx, q_ok, kpy, kpx, k_ok, Lfy, Lfx, KH, KW, SH, SW, BLOCKED: tl.constexpr):
    """``[queries, keys]``: the key lies in the query's window (and, for Swin, in its region)."""
    wy = _window_start(qpy, Lfy, KH, BLOCKED)
    wx = _window_start(qpx, Lfx, KW, BLOCKED)
    ok = (q_ok[:, None] & k_ok[None, :]
          & (kpy[None, :] >= wy[:, None]) & (kpy[None, :] < wy[:, None] + KH)
          & (kpx[None, :] >= wx[:, None]) & (kpx[None, :] < wx[:, None] + KW))
    if BLOCKED:
        ok &= _region(qpy, Lfy, KH, SH)[:, None] == _region(kpy, Lfy, KH, SH)[None, :]
        ok &= _region(qpx, Lfx, KW, SW)[:, None] == _region(kpx, Lfx, KW, SW)[None, :]
    return ok


@triton.jit
def _bias_index(qpy, qpx, kpy, kpx, KH, KW):
    """``[queries, keys]`` offsets into one head's ``(2KH-1) x (2KW-1)`` bias table."""
    return (kpy[None, :] - qpy[:, None] + KH - 1) * (2 * KW - 1) + (kpx[None, :] - qpx[:, None] + KW - 1)


@triton.jit
def _logits(q, k, RPB, head, bias_idx, allowed, scale, KH, KW,
            HAS_RPB: tl.constexpr, PRECISION: tl.constexpr):
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
    if HAS_RPB:
        s += tl.load(RPB + head * (2 * KH - 1) * (2 * KW - 1) + bias_idx, mask=allowed, other=0.0)
    return s


@triton.jit
def _fwd_kernel(
    Q, K, V, OUT, LSE, RPB,
    sqb, sqh, sqw, sqn, skb, skh, skw, skn, svb, svh, svw, svn, sob, soh, sow, son,
    H, W, NH, D, scale,
    KH, KW, DH, DW, SH, SW, TILES_Y, TILES_X,
    TQH: tl.constexpr, TQW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCKED: tl.constexpr, HAS_RPB: tl.constexpr, PRECISION: tl.constexpr,
):
    """Output and log-sum-exp of a query tile, over the key rectangle its windows touch."""
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and BLOCK_D >= 16, "tl.dot needs dims >= 16 on GPU")
    tl.static_assert(TQH * TQW <= BLOCK_M)
    gy, gx, ty, tx, bh, b, head, Lfy, Lfx = _program(H, W, NH, KH, KW, DH, DW, TILES_Y, TILES_X, BLOCKED)
    d = tl.arange(0, BLOCK_D)
    qpy, qpx, qy, qx, q_ok = _chunk(tl.arange(0, BLOCK_M), ty * TQH, tx * TQW, TQW, TQH * TQW, H, W, Lfy, Lfx,
                                    DH, DW, gy, gx, SH, SW, BLOCKED)
    q = _rows(Q, b, qy, qx, head, d, sqb, sqh, sqw, sqn, q_ok, D)

    y0, y1 = _rect(ty * TQH, ty * TQH + TQH - 1, Lfy, KH, BLOCKED)
    x0, x1 = _rect(tx * TQW, tx * TQW + TQW - 1, Lfx, KW, BLOCKED)
    cols = x1 - x0
    n = (y1 - y0) * cols
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for j0 in range(0, n, BLOCK_N):
        kpy, kpx, ky, kx, k_ok = _chunk(j0 + tl.arange(0, BLOCK_N), y0, x0, cols, n, H, W, Lfy, Lfx, DH, DW,
                                        gy, gx, SH, SW, BLOCKED)
        k = _rows(K, b, ky, kx, head, d, skb, skh, skw, skn, k_ok, D)
        v = _rows(V, b, ky, kx, head, d, svb, svh, svw, svn, k_ok, D)
        allowed = _allowed(qpy, qpx, q_ok, kpy, kpx, k_ok, Lfy, Lfx, KH, KW, SH, SW, BLOCKED)
        s = _logits(q, k, RPB, head, _bias_index(qpy, qpx, kpy, kpx, KH, KW), allowed, scale, KH, KW,
                    HAS_RPB, PRECISION)
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet stay at zero
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]
    tl.store(OUT + b * sob + qy[:, None] * soh + qx[:, None] * sow + head * son + d[None, :],
             out.to(OUT.dtype.element_ty), mask=q_ok[:, None] & (d[None, :] < D))
    lse = tl.where(m_i == float("-inf"), 0.0, m_i) + tl.log(l_safe)
    tl.store(LSE + (bh * H + qy) * W + qx, lse, mask=q_ok)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, RPB, DQ, DRPB,
    sqb, sqh, sqw, sqn, skb, skh, skw, skn, svb, svh, svw, svn, sdb, sdh, sdw, sdn,
    H, W, NH, D, scale,
    KH, KW, DH, DW, SH, SW, TILES_Y, TILES_X,
    TQH: tl.constexpr, TQW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCKED: tl.constexpr, HAS_RPB: tl.constexpr, PRECISION: tl.constexpr,
):
    """dQ (and dRPB) of a query tile over the same key rectangles (DQ is laid out with DO's strides)."""
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and BLOCK_D >= 16, "tl.dot needs dims >= 16 on GPU")
    gy, gx, ty, tx, bh, b, head, Lfy, Lfx = _program(H, W, NH, KH, KW, DH, DW, TILES_Y, TILES_X, BLOCKED)
    d = tl.arange(0, BLOCK_D)
    qpy, qpx, qy, qx, q_ok = _chunk(tl.arange(0, BLOCK_M), ty * TQH, tx * TQW, TQW, TQH * TQW, H, W, Lfy, Lfx,
                                    DH, DW, gy, gx, SH, SW, BLOCKED)
    q = _rows(Q, b, qy, qx, head, d, sqb, sqh, sqw, sqn, q_ok, D)
    do = _rows(DO, b, qy, qx, head, d, sdb, sdh, sdw, sdn, q_ok, D)
    lse = tl.load(LSE + (bh * H + qy) * W + qx, mask=q_ok, other=0.0)
    delta = tl.load(DELTA + (bh * H + qy) * W + qx, mask=q_ok, other=0.0)

    y0, y1 = _rect(ty * TQH, ty * TQH + TQH - 1, Lfy, KH, BLOCKED)
    x0, x1 = _rect(tx * TQW, tx * TQW + TQW - 1, Lfx, KW, BLOCKED)
    cols = x1 - x0
    n = (y1 - y0) * cols
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for j0 in range(0, n, BLOCK_N):
        kpy, kpx, ky, kx, k_ok = _chunk(j0 + tl.arange(0, BLOCK_N), y0, x0, cols, n, H, W, Lfy, Lfx, DH, DW,
                                        gy, gx, SH, SW, BLOCKED)
        k = _rows(K, b, ky, kx, head, d, skb, skh, skw, skn, k_ok, D)
        v = _rows(V, b, ky, kx, head, d, svb, svh, svw, svn, k_ok, D)
        allowed = _allowed(qpy, qpx, q_ok, kpy, kpx, k_ok, Lfy, Lfx, KH, KW, SH, SW, BLOCKED)
        bias_idx = _bias_index(qpy, qpx, kpy, kpx, KH, KW)
        s = _logits(q, k, RPB, head, bias_idx, allowed, scale, KH, KW, HAS_RPB, PRECISION)
        p = tl.where(allowed, tl.exp(s - lse[:, None]), 0.0)
        ds = p * (tl.dot(do, tl.trans(v), input_precision=PRECISION) - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
        if HAS_RPB:
            tl.atomic_add(DRPB + bh * (2 * KH - 1) * (2 * KW - 1) + bias_idx, ds, mask=allowed)
    tl.store(DQ + b * sdb + qy[:, None] * sdh + qx[:, None] * sdw + head * sdn + d[None, :],
             (dq * scale).to(DQ.dtype.element_ty), mask=q_ok[:, None] & (d[None, :] < D))


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, RPB, DK, DV,
    sqb, sqh, sqw, sqn, skb, skh, skw, skn, svb, svh, svw, svn, sdb, sdh, sdw, sdn,
    H, W, NH, D, scale,
    KH, KW, DH, DW, SH, SW, TILES_Y, TILES_X,
    TQH: tl.constexpr, TQW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCKED: tl.constexpr, HAS_RPB: tl.constexpr, PRECISION: tl.constexpr,
):
    """dK and dV of a key tile, walking the queries whose windows contain its keys (DK/DV: DO strides)."""
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and BLOCK_D >= 16, "tl.dot needs dims >= 16 on GPU")
    gy, gx, ty, tx, bh, b, head, Lfy, Lfx = _program(H, W, NH, KH, KW, DH, DW, TILES_Y, TILES_X, BLOCKED)
    d = tl.arange(0, BLOCK_D)
    kpy, kpx, ky, kx, k_ok = _chunk(tl.arange(0, BLOCK_M), ty * TQH, tx * TQW, TQW, TQH * TQW, H, W, Lfy, Lfx,
                                    DH, DW, gy, gx, SH, SW, BLOCKED)
    k = _rows(K, b, ky, kx, head, d, skb, skh, skw, skn, k_ok, D)
    v = _rows(V, b, ky, kx, head, d, svb, svh, svw, svn, k_ok, D)

    first_y, first_x = ty * TQH, tx * TQW
    y0, y1 = _inverse_range(first_y, tl.minimum(first_y + TQH - 1, Lfy - 1), Lfy, KH, BLOCKED)
    x0, x1 = _inverse_range(first_x, tl.minimum(first_x + TQW - 1, Lfx - 1), Lfx, KW, BLOCKED)
    cols = x1 - x0 + 1
    n = tl.where((first_y < Lfy) & (first_x < Lfx), (y1 - y0 + 1) * cols, 0)
    dk = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for i0 in range(0, n, BLOCK_N):
        qpy, qpx, qy, qx, q_ok = _chunk(i0 + tl.arange(0, BLOCK_N), y0, x0, cols, n, H, W, Lfy, Lfx, DH, DW,
                                        gy, gx, SH, SW, BLOCKED)
        q = _rows(Q, b, qy, qx, head, d, sqb, sqh, sqw, sqn, q_ok, D)
        do = _rows(DO, b, qy, qx, head, d, sdb, sdh, sdw, sdn, q_ok, D)
        lse = tl.load(LSE + (bh * H + qy) * W + qx, mask=q_ok, other=0.0)
        delta = tl.load(DELTA + (bh * H + qy) * W + qx, mask=q_ok, other=0.0)
        # [queries, keys], as in the other kernels
        allowed = _allowed(qpy, qpx, q_ok, kpy, kpx, k_ok, Lfy, Lfx, KH, KW, SH, SW, BLOCKED)
        s = _logits(q, k, RPB, head, _bias_index(qpy, qpx, kpy, kpx, KH, KW), allowed, scale, KH, KW,
                    HAS_RPB, PRECISION)
        p = tl.where(allowed, tl.exp(s - lse[:, None]), 0.0)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
        ds = p * (tl.dot(do, tl.trans(v), input_precision=PRECISION) - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    out = b * sdb + ky[:, None] * sdh + kx[:, None] * sdw + head * sdn + d[None, :]
    tl.store(DK + out, (dk * scale).to(DK.dtype.element_ty), mask=k_ok[:, None] & (d[None, :] < D))
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=k_ok[:, None] & (d[None, :] < D))


def tile_shape(kernel: tuple[int, int], blocked: bool) -> tuple[int, int]:
    """Query tile of one program: 8 x 8 frame positions for neighborhoods; for Swin, whole windows side by
    side, enough for ~64 queries (HiLo's 2 x 2 windows would otherwise leave tl.dot's 16 rows mostly empty)."""
    if not blocked:
        return (8, 8)
    wh, ww = kernel
    return wh, ww * max(1, 64 // (wh * ww))


def _launch_config(q, kernel, dilation, blocked):
    B, H, W, NH, D = q.shape
    if not 16 <= D <= 128:
        raise ValueError(f"the Triton kernels take head dims 16..128; got D={D} (use backend='torch')")
    (kh, kw), (dh, dw) = kernel, dilation
    tqh, tqw = tile_shape(kernel, blocked)
    frame_h = math.ceil(H / kh) * kh if blocked else math.ceil(H / dh)
    frame_w = math.ceil(W / kw) * kw if blocked else math.ceil(W / dw)
    tiles_y, tiles_x = math.ceil(frame_h / tqh), math.ceil(frame_w / tqw)
    block_m = max(16, triton.next_power_of_2(tqh * tqw))
    meta = dict(
        TQH=tqh, TQW=tqw, BLOCK_M=block_m,
        BLOCK_N=min(block_m, 64) if blocked else 32,  # whole windows read just their own keys: 1 step up to 8x8
        BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCKED=blocked,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=8 if block_m >= 128 else 4,  # 13x13 windows: 256-row tiles
    )
    grid = (dh * dw * tiles_y * tiles_x, B * NH)
    return grid, (tiles_y, tiles_x), meta


def _strides(t):
    return t.stride(0), t.stride(1), t.stride(2), t.stride(3)


def windowed_attention_fwd(q, k, v, rpb, kernel, dilation, shift, blocked, scale):
    """Output ``[B, H, W, heads, D]`` (q's dtype) and log-sum-exp ``[B, heads, H, W]`` (fp32)."""
    B, H, W, NH, D = q.shape
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k, v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    grid, (tiles_y, tiles_x), meta = _launch_config(q, kernel, dilation, blocked)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(B, NH, H, W, device=q.device, dtype=torch.float32)
    rpb_arg = rpb.float().contiguous() if rpb is not None else lse  # unused when HAS_RPB is False
    _fwd_kernel[grid](
        q, k, v, out, lse, rpb_arg, *_strides(q), *_strides(k), *_strides(v), *_strides(out),
        H, W, NH, D, scale, *kernel, *dilation, *shift, tiles_y, tiles_x, HAS_RPB=rpb is not None, **meta,
    )
    return out, lse


def windowed_attention_bwd(grad_out, q, k, v, out, lse, rpb, kernel, dilation, shift, blocked, scale):
    """``(dq, dk, dv, drpb)``; ``drpb`` is None without an rpb."""
    B, H, W, NH, D = q.shape
    grid, (tiles_y, tiles_x), meta = _launch_config(q, kernel, dilation, blocked)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    grad_out = grad_out.contiguous()
    delta = (out.float() * grad_out.float()).sum(-1).permute(0, 3, 1, 2).contiguous()  # rowsum(O * dO)
    dq, dk, dv = (torch.empty_like(grad_out) for _ in range(3))
    has_rpb = rpb is not None
    rpb_arg = rpb.float().contiguous() if has_rpb else lse
    drpb = torch.zeros(B * NH, *rpb.shape[1:], device=q.device, dtype=torch.float32) if has_rpb else lse
    common = (*_strides(q), *_strides(k), *_strides(v), *_strides(grad_out), H, W, NH, D, scale,
              *kernel, *dilation, *shift, tiles_y, tiles_x)
    _bwd_dq_kernel[grid](q, k, v, grad_out, lse, delta, rpb_arg, dq, drpb, *common, HAS_RPB=has_rpb, **meta)
    _bwd_dkdv_kernel[grid](q, k, v, grad_out, lse, delta, rpb_arg, dk, dv, *common, HAS_RPB=has_rpb, **meta)
    if has_rpb:
        drpb = drpb.view(B, NH, *rpb.shape[1:]).sum(0).to(rpb.dtype)
    return dq, dk, dv, drpb if has_rpb else None


# torch.library ops, so autograd and torch.compile (no graph break) see one opaque op per pass.
@torch.library.custom_op("vision_kernels::windowed_attention", mutates_args=())
def _attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rpb: torch.Tensor | None,
    kernel: list[int], dilation: list[int], shift: list[int], blocked: bool, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    return windowed_attention_fwd(q, k, v, rpb, tuple(kernel), tuple(dilation), tuple(shift), blocked, scale)


@_attention_op.register_fake
def _(q, k, v, rpb, kernel, dilation, shift, blocked, scale):
    B, H, W, NH, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(B, NH, H, W, dtype=torch.float32)


@torch.library.custom_op("vision_kernels::windowed_attention_backward", mutates_args=())
def _attention_backward_op(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, rpb: torch.Tensor | None,
    kernel: list[int], dilation: list[int], shift: list[int], blocked: bool, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv, drpb = windowed_attention_bwd(
        grad_out, q, k, v, out, lse, rpb, tuple(kernel), tuple(dilation), tuple(shift), blocked, scale
    )
    return dq, dk, dv, drpb if drpb is not None else q.new_empty(0)  # an op returns tensors, never None


@_attention_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, rpb, kernel, dilation, shift, blocked, scale):
    grads = [torch.empty_like(grad_out, memory_format=torch.contiguous_format) for _ in range(3)]
    return (*grads, torch.empty_like(rpb) if rpb is not None else q.new_empty(0))


def _setup_context(ctx, inputs, output):
    q, k, v, rpb, *ctx.args = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.has_rpb = rpb is not None
    ctx.save_for_backward(q, k, v, rpb, out, lse)


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, rpb, out, lse = ctx.saved_tensors
    dq, dk, dv, drpb = _attention_backward_op(grad_out, q, k, v, out, lse, rpb, *ctx.args)
    return dq, dk, dv, drpb if ctx.has_rpb else None, None, None, None, None, None


_attention_op.register_autograd(_backward, setup_context=_setup_context)


def windowed_attention(q, k, v, rpb, kernel, dilation, shift, blocked, scale) -> torch.Tensor:
    """The fused op on ``[B, H, W, heads, D]`` (see the module docstring for ``blocked``)."""
    return _attention_op(q, k, v, rpb, list(kernel), list(dilation), list(shift), blocked, float(scale))[0]
