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

A program owns a small rectangle of queries (4 x 4 for neighborhoods, so that it scores few keys no query
needs; rows of whole windows for Swin) and walks the fixed-size rectangle of keys its windows touch, in
flattened chunks, with an fp32 online softmax in base 2. The backward recomputes the probabilities from the
saved log-sum-exp: one kernel for dQ and dRPB (which also computes ``delta = rowsum(O·dO)`` for its queries
first), then one for dK/dV over the *inverse* neighborhood of a key tile, computed as ``[keys, queries]`` so
no operand is transposed in registers. Nothing N x N is ever formed. dRPB is accumulated with relaxed fp32
atomics (no fence) into per-(batch, head) slabs, so it is not deterministic.

Window sizes, dilation, shift and tile sizes are compile-time constants, so the per-lane index math is
shifts and multiplies; the mask of a score is one subtraction and one unsigned compare per axis (an
invalid lane or a different Swin region is encoded into the coordinate). :func:`launch_config` is the one
place that picks tiles, warps and stages for a shape; it raises :class:`Unsupported` naming the shape where
no configuration fits (``backend="auto"`` then falls back to torch). Constraints the GPU compiler imposes
are asserted (``tl.dot`` needs every dimension >= 16) so a test that passes in the CPU interpreter cannot
hide a kernel that fails to compile on a GPU.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

__all__ = ["INTERPRETED", "Unsupported", "launch_config", "windowed_attention", "windowed_attention_fwd",
           "windowed_attention_bwd"]

# @triton.jit reads TRITON_INTERPRET when it decorates, i.e. when this module is imported.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
LOG2E = 1.4426950408889634


class Unsupported(ValueError):
    """No kernel configuration serves this shape (``backend="auto"`` uses torch instead)."""


@triton.jit
def _frame_len(L, K: tl.constexpr, DIL: tl.constexpr, g, BLOCKED: tl.constexpr):
    if BLOCKED:
        n = tl.cdiv(L, K) * K
    else:
        n = (L - g + DIL - 1) // DIL
    return n


@triton.jit
def _window_start(p, Lf, K: tl.constexpr, BLOCKED: tl.constexpr):
    if BLOCKED:
        s = (p // K) * K
    else:
        s = tl.minimum(tl.maximum(p - K // 2, 0), Lf - K)
    return s


@triton.jit
def _memory_index(p, L, Lf, DIL: tl.constexpr, g, SHIFT: tl.constexpr, BLOCKED: tl.constexpr):
    """Frame position -> (memory index along the axis, whether it is a real token)."""
    if BLOCKED:
        pos = p + SHIFT
        pos = tl.where(pos >= Lf, pos - Lf, pos)  # (p + shift) mod Lf for 0 <= p < Lf
        ok = (p < Lf) & (pos < L)
    else:
        pos = g + DIL * p
        ok = p < Lf
    return pos, ok


@triton.jit
def _region(p, Lf, K: tl.constexpr, SHIFT: tl.constexpr, BLOCKED: tl.constexpr):
    """Swin's region of a frame position, times 2**16 (0 without a shift): folded into a coordinate, it keeps
    positions of different regions from ever being within ``K`` of each other."""
    r = tl.zeros_like(p)
    if BLOCKED and SHIFT > 0:
        r = ((p >= Lf - K).to(tl.int32) + (p >= Lf - SHIFT).to(tl.int32)) * 65536
    return r


@triton.jit
def _program(H, W, TILES_Y, TILES_X, KH: tl.constexpr, KW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
             TQH: tl.constexpr, TQW: tl.constexpr, SPLIT: tl.constexpr, BLOCKED: tl.constexpr):
    """(batch·heads, dilation group, frame lengths) of this program and its tile: first row and column, rows.

    The grid is 1-D (CUDA caps axes 1 and 2 at 65,535); tiles of one (batch, head) are adjacent, so programs
    running together share their keys in L2. A Swin tile is ``TQH`` rows of a row of windows (``SPLIT`` tiles
    per window row)."""
    pid = tl.program_id(0)
    tx = pid % TILES_X
    t = pid // TILES_X
    ty = t % TILES_Y
    t = t // TILES_Y
    bh = t // (DH * DW)
    gy = (t % (DH * DW)) // DW
    gx = t % DW
    if BLOCKED:
        part = ty % SPLIT
        fy = (ty // SPLIT) * KH + part * TQH
        rows = tl.minimum(KH - part * TQH, TQH)
    else:
        fy = ty * TQH
        rows = TQH
    Lfy = _frame_len(H, KH, DH, gy, BLOCKED)
    Lfx = _frame_len(W, KW, DW, gx, BLOCKED)
    return bh, gy, gx, Lfy, Lfx, fy, tx * TQW, rows


@triton.jit
def _lanes(py, px, H, W, Lfy, Lfx, DH: tl.constexpr, DW: tl.constexpr, gy, gx, SH: tl.constexpr,
           SW: tl.constexpr, in_range, BLOCKED: tl.constexpr):
    """Memory offsets (``y·W + x``, in tokens) and validity of frame positions ``(py, px)``."""
    y, oky = _memory_index(py, H, Lfy, DH, gy, SH, BLOCKED)
    x, okx = _memory_index(px, W, Lfx, DW, gx, SW, BLOCKED)
    return y, x, in_range & oky & okx


@triton.jit
def _rows(base, y, x, sh, sw, d, ok, D):
    """Gather ``[len(y), BLOCK_D]`` rows of one (batch, head) of a ``[B, H, W, heads, D]`` tensor."""
    return tl.load(base + y[:, None] * sh + x[:, None] * sw + d[None, :], mask=ok[:, None] & (d[None, :] < D),
                   other=0.0)


@triton.jit
def _window_codes(py, px, ok, Lfy, Lfx, KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
                  BLOCKED: tl.constexpr):
    """Per query: encoded start of its window on each axis (2**30 for a masked query, never inside)."""
    wy = _window_start(py, Lfy, KH, BLOCKED) + _region(py, Lfy, KH, SH, BLOCKED)
    wx = _window_start(px, Lfx, KW, BLOCKED) + _region(px, Lfx, KW, SW, BLOCKED)
    wy = tl.where(ok, wy, 1 << 30)
    return wy, wx


@triton.jit
def _key_codes(py, px, ok, Lfy, Lfx, KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
               BLOCKED: tl.constexpr):
    """Per key: encoded position on each axis (-2**30 for a masked key, never inside)."""
    cy = tl.where(ok, py + _region(py, Lfy, KH, SH, BLOCKED), -(1 << 30))
    return cy, px + _region(px, Lfx, KW, SW, BLOCKED)


@triton.jit
def _inside(key_y, key_x, win_y, win_x, KH: tl.constexpr, KW: tl.constexpr):
    """The key lies in the window: one subtraction and one unsigned compare per axis and score."""
    return ((key_y - win_y).to(tl.uint32, bitcast=True) < KH) & ((key_x - win_x).to(tl.uint32, bitcast=True) < KW)


@triton.jit
def _bias(table, idx, eye):
    """``bias[m, n] = table[idx[n, m]]``, as the tensor-core product ``eye @ g^T``: a gather that feeds a dot
    operand goes through shared memory like K does, so the softmax stays in the dot's register layout (an
    elementwise gather pulled it into a layout that reduces with ~40 shuffles per score). The table is fp16
    for half-precision inputs; an fp32 table is split into fp16 high and low parts (exact to ~2**-22)."""
    g = tl.load(table + idx)
    if table.dtype.element_ty == tl.float16:
        b = tl.dot(eye, tl.trans(g))
    else:
        hi = g.to(tl.float16)
        b = tl.dot(eye, tl.trans(hi), tl.dot(eye, tl.trans((g - hi.to(tl.float32)).to(tl.float16))))
    return b


@triton.jit
def _inverse_range(first, last, Lf, K: tl.constexpr):
    """First and last query position whose neighborhood contains a key in ``[first, last]``."""
    t = first - K + 1
    lo = tl.where(t > 0, t + K // 2, 0)
    hi = tl.where(last >= Lf - K, Lf - 1, tl.minimum(last + K // 2, Lf - 1))
    return lo, hi


@triton.jit
def _fwd_kernel(
    Q, K, V, OUT, LSE, RPB,
    sqb, sqh, sqw, sqn, skb, skh, skw, skn, svb, svh, svw, svn, sob, soh, sow, son,
    H, W, NH, D, qk_scale, TILES_Y, TILES_X,
    KH: tl.constexpr, KW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    TQH: tl.constexpr, TQW: tl.constexpr, SPLIT: tl.constexpr, RH: tl.constexpr, RW: tl.constexpr,
    CHUNK_ROWS: tl.constexpr, PY: tl.constexpr, PX: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCKED: tl.constexpr,
    HAS_RPB: tl.constexpr, PRECISION: tl.constexpr,
):
    """Output and log-sum-exp of a query tile over the ``RH x RW`` key rectangle its windows touch, in chunks
    of ``CHUNK_ROWS`` whole rows (so a lane's row and column are loop-invariant). ``qk_scale`` and the bias
    table (``[heads, PH, PW]``, zero-padded so that every lane's index is in range) are in base 2."""
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and BLOCK_D >= 16, "tl.dot needs dims >= 16 on GPU")
    tl.static_assert(TQH * TQW <= BLOCK_M and CHUNK_ROWS * RW <= BLOCK_N)
    bh, gy, gx, Lfy, Lfx, fy, fx, rows = _program(H, W, TILES_Y, TILES_X, KH, KW, DH, DW, TQH, TQW, SPLIT,
                                                  BLOCKED)
    b = (bh // NH).to(tl.int64)  # int64: offsets of large batches pass 2**31
    head = bh % NH
    d = tl.arange(0, BLOCK_D)
    m = tl.arange(0, BLOCK_M)
    eye = (m[:, None] == m[None, :]).to(tl.float16)  # see _bias
    mm = tl.where(m < rows * TQW, m, 0)  # padding lanes repeat query 0 (masked): bias indices stay in range
    qpy = fy + mm // TQW
    qpx = fx + mm % TQW
    qy, qx, q_ok = _lanes(qpy, qpx, H, W, Lfy, Lfx, DH, DW, gy, gx, SH, SW, m < rows * TQW, BLOCKED)
    q = _rows(Q + b * sqb + head * sqn, qy, qx, sqh, sqw, d, q_ok, D)
    wy, wx = _window_codes(qpy, qpx, q_ok, Lfy, Lfx, KH, KW, SH, SW, BLOCKED)
    qb = qpy * PW + qpx - (PY * PW + PX)  # bias index = key's kb - qb
    table = RPB + head * (PH * PW)
    k_base = K + b * skb + head * skn
    v_base = V + b * svb + head * svn
    ky0 = _window_start(fy, Lfy, KH, BLOCKED)
    kx0 = _window_start(fx, Lfx, KW, BLOCKED)
    lane = tl.arange(0, BLOCK_N)
    lrow = lane // RW
    kpx = kx0 + lane % RW

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for r0 in range(0, RH, CHUNK_ROWS):
        in_rect = (lrow < CHUNK_ROWS) & (r0 + lrow < RH)
        kpy = tl.where(in_rect, ky0 + r0 + lrow, ky0)
        ky, kx, k_ok = _lanes(kpy, kpx, H, W, Lfy, Lfx, DH, DW, gy, gx, SH, SW, in_rect, BLOCKED)
        k = _rows(k_base, ky, kx, skh, skw, d, k_ok, D)
        v = _rows(v_base, ky, kx, svh, svw, d, k_ok, D)
        cy, cx = _key_codes(kpy, kpx, k_ok, Lfy, Lfx, KH, KW, SH, SW, BLOCKED)
        allowed = _inside(cy[None, :], cx[None, :], wy[:, None], wx[:, None], KH, KW)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if HAS_RPB:
            s += _bias(table, (kpy * PW + kpx)[:, None] - qb[None, :], eye)
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet stay at zero
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]
    tl.store(OUT + b * sob + head * son + qy[:, None] * soh + qx[:, None] * sow + d[None, :],
             out.to(OUT.dtype.element_ty), mask=q_ok[:, None] & (d[None, :] < D))
    lse = (tl.where(m_i == float("-inf"), 0.0, m_i) + tl.log2(l_safe)) * 0.6931471805599453  # natural log
    tl.store(LSE + bh.to(tl.int64) * H * W + qy * W + qx, lse, mask=q_ok)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, OUT, DO, LSE, DELTA, RPB, DQ, DRPB,
    sqb, sqh, sqw, sqn, skb, skh, skw, skn, svb, svh, svw, svn, sdb, sdh, sdw, sdn,
    H, W, NH, D, qk_scale, TILES_Y, TILES_X,
    KH: tl.constexpr, KW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    TQH: tl.constexpr, TQW: tl.constexpr, SPLIT: tl.constexpr, RH: tl.constexpr, RW: tl.constexpr,
    CHUNK_ROWS: tl.constexpr, PY: tl.constexpr, PX: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCKED: tl.constexpr,
    HAS_RPB: tl.constexpr, PRECISION: tl.constexpr,
):
    """``delta = rowsum(O·dO)`` of a query tile (stored for the dK/dV kernel), then its dQ and dRPB over the
    same key chunks as the forward (OUT, DQ: DO's strides; DRPB: per (batch, head), padded like the table)."""
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and BLOCK_D >= 16, "tl.dot needs dims >= 16 on GPU")
    tl.static_assert(TQH * TQW <= BLOCK_M and CHUNK_ROWS * RW <= BLOCK_N)
    bh, gy, gx, Lfy, Lfx, fy, fx, rows = _program(H, W, TILES_Y, TILES_X, KH, KW, DH, DW, TQH, TQW, SPLIT,
                                                  BLOCKED)
    b = (bh // NH).to(tl.int64)
    head = bh % NH
    d = tl.arange(0, BLOCK_D)
    m = tl.arange(0, BLOCK_M)
    eye = (m[:, None] == m[None, :]).to(tl.float16)
    mm = tl.where(m < rows * TQW, m, 0)  # padding lanes repeat query 0 (masked): bias indices stay in range
    qpy = fy + mm // TQW
    qpx = fx + mm % TQW
    qy, qx, q_ok = _lanes(qpy, qpx, H, W, Lfy, Lfx, DH, DW, gy, gx, SH, SW, m < rows * TQW, BLOCKED)
    q = _rows(Q + b * sqb + head * sqn, qy, qx, sqh, sqw, d, q_ok, D)
    do = _rows(DO + b * sdb + head * sdn, qy, qx, sdh, sdw, d, q_ok, D)
    o = _rows(OUT + b * sdb + head * sdn, qy, qx, sdh, sdw, d, q_ok, D)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    stats = bh.to(tl.int64) * H * W + qy * W + qx
    tl.store(DELTA + stats, delta, mask=q_ok)
    lse = tl.load(LSE + stats, mask=q_ok, other=0.0) * 1.4426950408889634  # base 2
    wy, wx = _window_codes(qpy, qpx, q_ok, Lfy, Lfx, KH, KW, SH, SW, BLOCKED)
    qb = qpy * PW + qpx - (PY * PW + PX)
    table = RPB + head * (PH * PW)
    drpb = DRPB + bh.to(tl.int64) * (PH * PW)
    k_base = K + b * skb + head * skn
    v_base = V + b * svb + head * svn
    ky0 = _window_start(fy, Lfy, KH, BLOCKED)
    kx0 = _window_start(fx, Lfx, KW, BLOCKED)
    lane = tl.arange(0, BLOCK_N)
    lrow = lane // RW
    kpx = kx0 + lane % RW

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for r0 in range(0, RH, CHUNK_ROWS):
        in_rect = (lrow < CHUNK_ROWS) & (r0 + lrow < RH)
        kpy = tl.where(in_rect, ky0 + r0 + lrow, ky0)
        ky, kx, k_ok = _lanes(kpy, kpx, H, W, Lfy, Lfx, DH, DW, gy, gx, SH, SW, in_rect, BLOCKED)
        k = _rows(k_base, ky, kx, skh, skw, d, k_ok, D)
        v = _rows(v_base, ky, kx, svh, svw, d, k_ok, D)
        cy, cx = _key_codes(kpy, kpx, k_ok, Lfy, Lfx, KH, KW, SH, SW, BLOCKED)
        allowed = _inside(cy[None, :], cx[None, :], wy[:, None], wx[:, None], KH, KW)
        kb = kpy * PW + kpx
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if HAS_RPB:
            s += _bias(table, kb[:, None] - qb[None, :], eye)
        p = tl.where(allowed, tl.exp2(s - lse[:, None]), 0.0)
        ds = p * (tl.dot(do, tl.trans(v), input_precision=PRECISION) - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
        if HAS_RPB:  # relaxed: a plain reduction, no fence per element
            tl.atomic_add(drpb + (kb[None, :] - qb[:, None]), ds, mask=allowed, sem="relaxed")
    tl.store(DQ + b * sdb + head * sdn + qy[:, None] * sdh + qx[:, None] * sdw + d[None, :],
             (dq * (qk_scale * 0.6931471805599453)).to(DQ.dtype.element_ty), mask=q_ok[:, None] & (d[None, :] < D))


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, RPB, DK, DV,
    sqb, sqh, sqw, sqn, skb, skh, skw, skn, svb, svh, svw, svn, sdb, sdh, sdw, sdn,
    H, W, NH, D, qk_scale, TILES_Y, TILES_X,
    KH: tl.constexpr, KW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    TQH: tl.constexpr, TQW: tl.constexpr, SPLIT: tl.constexpr, RH: tl.constexpr, RW: tl.constexpr,
    CHUNK_ROWS: tl.constexpr, PY: tl.constexpr, PX: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCKED: tl.constexpr,
    HAS_RPB: tl.constexpr, PRECISION: tl.constexpr,
):
    """dK and dV of a key tile, walking the queries whose windows contain its keys in chunks of whole rows;
    scores are computed as ``[keys, queries]`` so that every dot takes its operands as loaded (DK/DV: DO's
    strides)."""
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and BLOCK_D >= 16, "tl.dot needs dims >= 16 on GPU")
    bh, gy, gx, Lfy, Lfx, fy, fx, rows = _program(H, W, TILES_Y, TILES_X, KH, KW, DH, DW, TQH, TQW, SPLIT,
                                                  BLOCKED)
    b = (bh // NH).to(tl.int64)
    head = bh % NH
    d = tl.arange(0, BLOCK_D)
    m = tl.arange(0, BLOCK_M)
    eye = (m[:, None] == m[None, :]).to(tl.float16)
    mm = tl.where(m < rows * TQW, m, 0)  # padding lanes repeat key 0 (masked)
    kpy = fy + mm // TQW
    kpx = fx + mm % TQW
    ky, kx, k_ok = _lanes(kpy, kpx, H, W, Lfy, Lfx, DH, DW, gy, gx, SH, SW, m < rows * TQW, BLOCKED)
    k = _rows(K + b * skb + head * skn, ky, kx, skh, skw, d, k_ok, D)
    v = _rows(V + b * svb + head * svn, ky, kx, svh, svw, d, k_ok, D)
    cy, cx = _key_codes(kpy, kpx, k_ok, Lfy, Lfx, KH, KW, SH, SW, BLOCKED)
    kb = kpy * PW + kpx + (PY * PW + PX)
    table = RPB + head * (PH * PW)
    q_base = Q + b * sqb + head * sqn
    do_base = DO + b * sdb + head * sdn
    stats = LSE + bh.to(tl.int64) * H * W
    deltas = DELTA + bh.to(tl.int64) * H * W
    lane = tl.arange(0, BLOCK_N)
    if BLOCKED:  # the queries of a Swin key tile are its windows: the forward's rectangle
        qy0 = _window_start(fy, Lfy, KH, BLOCKED)
        qx0 = fx
        cols = RW
        nrows = RH
        chunk_rows = CHUNK_ROWS
        lrow = lane // RW
    else:  # the inverse neighborhood: wider than the forward's rectangle at the borders
        qy0, y1 = _inverse_range(fy, tl.minimum(fy + TQH - 1, Lfy - 1), Lfy, KH)
        qx0, x1 = _inverse_range(fx, tl.minimum(fx + TQW - 1, Lfx - 1), Lfx, KW)
        cols = x1 - qx0 + 1
        nrows = tl.where((fy < Lfy) & (fx < Lfx), y1 - qy0 + 1, 0)
        chunk_rows = BLOCK_N // cols
        lrow = ((lane.to(tl.float32) + 0.5) / cols.to(tl.float32)).to(tl.int32)  # exact for these integers
    qpx = qx0 + lane - lrow * cols

    dk = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for r0 in range(0, nrows, chunk_rows):
        in_rect = (lrow < chunk_rows) & (r0 + lrow < nrows)
        qpy = tl.where(in_rect, qy0 + r0 + lrow, qy0)
        qy, qx, q_ok = _lanes(qpy, qpx, H, W, Lfy, Lfx, DH, DW, gy, gx, SH, SW, in_rect, BLOCKED)
        q = _rows(q_base, qy, qx, sqh, sqw, d, q_ok, D)
        do = _rows(do_base, qy, qx, sdh, sdw, d, q_ok, D)
        lse = tl.load(stats + qy * W + qx, mask=q_ok, other=0.0) * 1.4426950408889634
        delta = tl.load(deltas + qy * W + qx, mask=q_ok, other=0.0)
        wy, wx = _window_codes(qpy, qpx, q_ok, Lfy, Lfx, KH, KW, SH, SW, BLOCKED)
        allowed = _inside(cy[:, None], cx[:, None], wy[None, :], wx[None, :], KH, KW)
        st = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
        if HAS_RPB:
            st += _bias(table, kb[None, :] - tl.where(in_rect, qpy * PW + qpx, fy * PW + fx)[:, None], eye)
        pt = tl.where(allowed, tl.exp2(st - lse[None, :]), 0.0)
        dv += tl.dot(pt.to(do.dtype), do, input_precision=PRECISION)
        dst = pt * (tl.dot(v, tl.trans(do), input_precision=PRECISION) - delta[None, :])
        dk += tl.dot(dst.to(q.dtype), q, input_precision=PRECISION)
    out = b * sdb + head * sdn + ky[:, None] * sdh + kx[:, None] * sdw + d[None, :]
    tl.store(DK + out, (dk * (qk_scale * 0.6931471805599453)).to(DK.dtype.element_ty),
             mask=k_ok[:, None] & (d[None, :] < D))
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=k_ok[:, None] & (d[None, :] < D))


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def launch_config(shape, dtype, kernel, dilation=(1, 1), shift=(0, 0), blocked=False, has_rpb=False):
    """The launch of every pass for one call: ``(grid, (tiles_y, tiles_x), {"fwd"|"dq"|"dkdv": meta})``.

    ``meta`` holds every constexpr of the kernel plus ``num_warps``/``num_stages``. This is the one source of
    truth for what the dispatcher runs (benchmarks/kernel_report.py compiles exactly these); it needs only the
    shape ``[B, H, W, heads, D]`` and dtype, no tensor. Raises :class:`Unsupported` naming the shape when no
    configuration serves it.

    The table: a neighborhood tile is 4 x 4 queries (the fewest that fill ``tl.dot``'s 16 rows; a square
    scores the fewest keys no query needs), its key rectangle ``(4 + k - 1)^2``; a Swin tile is whole windows
    side by side, or rows of one window when a window has more tokens than the tile (13 x 13), so that every
    tile stays within 64 queries (32 at D > 32) and 64-key chunks: registers and shared memory then stay
    within an H100 block without spilling, for every window size.
    """
    B, H, W, NH, D = shape
    (kh, kw), (dh, dw), (sh, sw) = kernel, dilation, shift
    where = f"shape [B, H, W, heads, D] = {list(shape)}, {'window' if blocked else 'kernel'} {kh}x{kw}"
    if not 16 <= D <= 128:
        raise Unsupported(f"the Triton kernels take head dims 16..128; got D={D} ({where}); use backend='torch'")
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise Unsupported(f"the Triton kernels take fp16/bf16/fp32; got {dtype} ({where})")
    if max(H, W) >= 32768 or 3 * H * W * NH * D >= 2**31:
        raise Unsupported(f"one sample is too large for the kernels' int32 offsets ({where})")
    block_d = _pow2(D)
    queries = 64 if D <= 32 else 32  # per tile: acc + q (+ dk, dv) stay in registers without spilling
    if blocked:
        if kw > queries:
            raise Unsupported(f"a Swin window {kw} tokens wide exceeds a {queries}-query tile at D={D} ({where})")
        if kh * kw <= queries:  # whole windows side by side
            tqh, tqw, split = kh, kw * (queries // (kh * kw)), 1
        else:  # rows of one window per tile
            tqw = kw
            split = math.ceil(kh / (queries // kw))
            tqh = math.ceil(kh / split)
        rh, rw = kh, tqw
        tiles_y, tiles_x = math.ceil(H / kh) * split, math.ceil(math.ceil(W / kw) * kw / tqw)
        groups = 1
    else:
        tqh = tqw = 4
        split = 1
        rh, rw = tqh + kh - 1, tqw + kw - 1
        tiles_y, tiles_x = math.ceil(math.ceil(H / dh) / tqh), math.ceil(math.ceil(W / dw) / tqw)
        groups = dh * dw
    programs = B * NH * groups * tiles_y * tiles_x
    if programs >= 2**31:
        raise Unsupported(f"{programs} programs exceed CUDA's grid ({where})")
    block_m = _pow2(tqh * tqw)
    inverse_w = rw if blocked else tqw + kw - 1 + kw // 2  # the dK/dV kernel's widest row of queries
    block_n = max(64 if D <= 64 else 32, _pow2(inverse_w))  # whole rows per chunk
    py, px = kh + tqh - 2, (tqw - 1 if blocked else kw + tqw - 2)  # bias table padding: any lane's offset fits
    common = dict(KH=kh, KW=kw, DH=dh, DW=dw, SH=sh, SW=sw, TQH=tqh, TQW=tqw, SPLIT=split, RH=rh, RW=rw,
                  CHUNK_ROWS=block_n // rw, PY=py, PX=px, PH=py + rh, PW=px + rw,
                  BLOCK_M=block_m, BLOCK_D=block_d, BLOCKED=blocked, HAS_RPB=has_rpb,
                  PRECISION="ieee" if dtype == torch.float32 else "tf32")
    warps = 2 if block_m == 16 and D <= 32 else 8 if block_m == 32 and block_d == 64 else 4  # no spills
    meta = dict(common, BLOCK_N=block_n, num_warps=warps,
                num_stages=1)  # loads are gathers: no pipelining stages
    return (programs,), (tiles_y, tiles_x), {"fwd": meta, "dq": dict(meta), "dkdv": dict(meta)}


def unsupported(shape, dtype, kernel, dilation, shift, blocked) -> str | None:
    """Why no kernel configuration serves this call, or None."""
    try:
        launch_config(tuple(shape), dtype, kernel, dilation, shift, blocked)
    except Unsupported as e:
        return str(e)
    return None


def _bias_table(rpb, meta, dtype):
    """``rpb`` in base 2, zero-padded to ``[heads, PH, PW]`` (fp16 for half-precision inputs, see ``_bias``)."""
    kh, kw, py, px = meta["KH"], meta["KW"], meta["PY"], meta["PX"]
    table = rpb.new_zeros(rpb.shape[0], meta["PH"], meta["PW"], dtype=torch.float32)
    table[:, py - kh + 1: py + kh, px - kw + 1: px + kw] = rpb.float() * LOG2E
    return table.to(torch.float32 if dtype == torch.float32 else torch.float16).contiguous()


def _strides(t):
    return t.stride(0), t.stride(1), t.stride(2), t.stride(3)


def windowed_attention_fwd(q, k, v, rpb, kernel, dilation, shift, blocked, scale):
    """Output ``[B, H, W, heads, D]`` (q's dtype) and log-sum-exp ``[B, heads, H, W]`` (fp32, natural log)."""
    B, H, W, NH, D = q.shape
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k, v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    grid, (tiles_y, tiles_x), metas = launch_config(q.shape, q.dtype, kernel, dilation, shift, blocked,
                                                    rpb is not None)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(B, NH, H, W, device=q.device, dtype=torch.float32)
    rpb_arg = _bias_table(rpb, metas["fwd"], q.dtype) if rpb is not None else lse  # unused without RPB
    _fwd_kernel[grid](
        q, k, v, out, lse, rpb_arg, *_strides(q), *_strides(k), *_strides(v), *_strides(out),
        H, W, NH, D, scale * LOG2E, tiles_y, tiles_x, **metas["fwd"],
    )
    return out, lse


def windowed_attention_bwd(grad_out, q, k, v, out, lse, rpb, kernel, dilation, shift, blocked, scale):
    """``(dq, dk, dv, drpb)``; ``drpb`` is None without an rpb."""
    B, H, W, NH, D = q.shape
    has_rpb = rpb is not None
    grid, (tiles_y, tiles_x), metas = launch_config(q.shape, q.dtype, kernel, dilation, shift, blocked, has_rpb)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    grad_out, out = grad_out.contiguous(), out.contiguous()  # one set of strides for dO, O, dQ, dK, dV
    delta = torch.empty_like(lse)  # rowsum(O * dO), written by the dQ kernel for the dK/dV kernel
    dq, dk, dv = (torch.empty_like(grad_out) for _ in range(3))
    meta = metas["dq"]
    rpb_arg = _bias_table(rpb, meta, q.dtype) if has_rpb else lse
    drpb = q.new_zeros(B * NH, meta["PH"], meta["PW"], dtype=torch.float32) if has_rpb else lse
    strides = (*_strides(q), *_strides(k), *_strides(v), *_strides(grad_out))
    scalars = (H, W, NH, D, scale * LOG2E, tiles_y, tiles_x)
    _bwd_dq_kernel[grid](q, k, v, out, grad_out, lse, delta, rpb_arg, dq, drpb, *strides, *scalars, **metas["dq"])
    _bwd_dkdv_kernel[grid](q, k, v, grad_out, lse, delta, rpb_arg, dk, dv, *strides, *scalars, **metas["dkdv"])
    if has_rpb:
        kh, kw, py, px = meta["KH"], meta["KW"], meta["PY"], meta["PX"]
        drpb = drpb[:, py - kh + 1: py + kh, px - kw + 1: px + kw].reshape(B, NH, *rpb.shape[1:]).sum(0)
        drpb = drpb.to(rpb.dtype)
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
