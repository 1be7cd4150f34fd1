"""Fused Triton kernels for bi-level routing attention (BiFormer's token-level step).

The grid ``[B, H, W, heads, D]`` is cut into ``n x n`` regions of ``rh x rw = ⌈H/n⌉ x ⌈W/n⌉`` tokens
(positions past ``H``/``W`` are padding: zero keys and values, or masked out with ``MASK_PADDING``).
Every query region attends to all tokens of the ``topk`` regions its row of the routing index names.

* forward: a program owns a tile of one query region's tokens and walks the ``topk * rh * rw`` routed keys
  as one flattened sequence: lane ``j`` is token ``j % P`` of region ``index[j // P]``, read in place from
  the un-gathered K and V (no copy of KV per query region), with an fp32 online softmax; it saves the
  log-sum-exp.
* backward: dQ over the same routed keys; dK/dV of a key tile walk the query regions that routed to its
  region, from an inverted index (query regions sorted by routed key region, CSR offsets) built with a
  stable sort. No atomics, so the backward is deterministic.

``tl.dot`` needs every dimension >= 16 on the GPU; that is asserted, so interpreter-green tests cannot hide a
kernel that does not compile.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["INTERPRETED", "routed_attention", "routed_attention_fwd", "routed_attention_bwd", "inverted_index"]

# @triton.jit reads TRITON_INTERPRET when it decorates, i.e. when this module is imported.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _tokens(region, p, N: tl.constexpr, RH: tl.constexpr, RW: tl.constexpr, H, W):
    """Grid row/column of token ``p`` (row-major) of ``region`` (row-major), and whether it is real."""
    y = (region // N) * RH + p // RW
    x = (region % N) * RW + p % RW
    return y, x, (y < H) & (x < W)


@triton.jit
def _rows(PTR, b, y, x, head, d, sb, sh, sw, sn, ok, D):
    """Gather ``[len(y), BLOCK_D]`` rows of a ``[B, H, W, heads, D]`` tensor (zeros where masked)."""
    return tl.load(PTR + b * sb + y[:, None] * sh + x[:, None] * sw + head * sn + d[None, :],
                   mask=ok[:, None] & (d[None, :] < D), other=0.0)


@triton.jit
def _program(NH, TILES, N: tl.constexpr, BLOCK_M: tl.constexpr):
    """This program's region, its token lanes, and (batch, head). One grid axis (CUDA caps the others at
    65,535), regions fastest so that neighbouring programs share a (batch, head)'s keys in L2."""
    pid = tl.program_id(0)
    per_bh = N * N * TILES
    bh = pid // per_bh
    tile = pid % per_bh
    b = (bh // NH).to(tl.int64)  # int64: offsets of large batches pass 2**31
    return tile // TILES, (tile % TILES) * BLOCK_M + tl.arange(0, BLOCK_M), bh, b, bh % NH


@triton.jit
def _routed_keys(IDX_ROW, j, L, P: tl.constexpr, N: tl.constexpr, RH: tl.constexpr, RW: tl.constexpr, H, W):
    """Lanes ``j`` of the flattened routed keys: token ``j % P`` of region ``IDX_ROW[j // P]``."""
    live = j < L
    region = tl.load(IDX_ROW + j // P, mask=live, other=0)
    y, x, real = _tokens(region, j % P, N, RH, RW, H, W)
    return y, x, live & real, live


@triton.jit
def _allowed(k_ok, live, MASK_PADDING: tl.constexpr):
    """Keys a query sees: unmasked padding lets padded keys take part as zero vectors (logit 0, value 0)."""
    if MASK_PADDING:
        ok = k_ok
    else:
        ok = live
    return ok


@triton.jit
def _fwd_kernel(
    Q, K, V, IDX, OUT, LSE,
    sqb, sqh, sqw, sqn, skb, skh, skw, skn, svb, svh, svw, svn, sob, soh, sow, son, sib, sin, sir,
    H, W, NH, DQK, DV, N: tl.constexpr, RH: tl.constexpr, RW: tl.constexpr, TOPK, TILES, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    MASK_PADDING: tl.constexpr, PRECISION: tl.constexpr,
):
    """Output and log-sum-exp of a tile of one query region's tokens, over its routed regions' keys."""
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and BLOCK_DQK >= 16 and BLOCK_DV >= 16,
                     "tl.dot needs dims >= 16 on GPU")
    region, pq, bh, b, head = _program(NH, TILES, N, BLOCK_M)
    P = RH * RW
    qy, qx, q_real = _tokens(region, pq, N, RH, RW, H, W)
    q_ok = (pq < P) & q_real
    dqk = tl.arange(0, BLOCK_DQK)
    dv = tl.arange(0, BLOCK_DV)
    q = _rows(Q, b, qy, qx, head, dqk, sqb, sqh, sqw, sqn, q_ok, DQK)
    idx_row = IDX + b * sib + head * sin + region * sir

    L = TOPK * P
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for j0 in range(0, L, BLOCK_N):
        ky, kx, k_ok, live = _routed_keys(idx_row, j0 + tl.arange(0, BLOCK_N), L, P, N, RH, RW, H, W)
        k = _rows(K, b, ky, kx, head, dqk, skb, skh, skw, skn, k_ok, DQK)
        v = _rows(V, b, ky, kx, head, dv, svb, svh, svw, svn, k_ok, DV)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        allowed = _allowed(k_ok, live, MASK_PADDING)
        s = tl.where(allowed[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet stay at zero
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    l_safe = tl.where(l_i > 0, l_i, 1.0)  # a query whose routed keys are all masked padding outputs 0
    out = acc / l_safe[:, None]
    tl.store(OUT + b * sob + qy[:, None] * soh + qx[:, None] * sow + head * son + dv[None, :],
             out.to(OUT.dtype.element_ty), mask=q_ok[:, None] & (dv[None, :] < DV))
    lse = tl.where(m_i == float("-inf"), 0.0, m_i) + tl.log(l_safe)
    tl.store(LSE + (bh * H + qy) * W + qx, lse, mask=q_ok)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, OUT, DO, LSE, DELTA, IDX, DQ,
    sqb, sqh, sqw, sqn, skb, skh, skw, skn, svb, svh, svw, svn, sob, soh, sow, son, sdb, sdh, sdw, sdn,
    sib, sin, sir,
    H, W, NH, DQK, DV, N: tl.constexpr, RH: tl.constexpr, RW: tl.constexpr, TOPK, TILES, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    MASK_PADDING: tl.constexpr, PRECISION: tl.constexpr,
):
    """dQ of a query tile over the same routed keys (DQ laid out contiguously, like Q). It also computes
    delta = rowsum(O * dO) for its queries, in fp32 from the fp16 rows, and stores it for the dK/dV kernel:
    no fp32 copies of O and dO in torch."""
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and BLOCK_DQK >= 16 and BLOCK_DV >= 16,
                     "tl.dot needs dims >= 16 on GPU")
    region, pq, bh, b, head = _program(NH, TILES, N, BLOCK_M)
    P = RH * RW
    qy, qx, q_real = _tokens(region, pq, N, RH, RW, H, W)
    q_ok = (pq < P) & q_real
    dqk = tl.arange(0, BLOCK_DQK)
    dv = tl.arange(0, BLOCK_DV)
    q = _rows(Q, b, qy, qx, head, dqk, sqb, sqh, sqw, sqn, q_ok, DQK)
    do = _rows(DO, b, qy, qx, head, dv, sdb, sdh, sdw, sdn, q_ok, DV)
    o = _rows(OUT, b, qy, qx, head, dv, sob, soh, sow, son, q_ok, DV)
    lse = tl.load(LSE + (bh * H + qy) * W + qx, mask=q_ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + (bh * H + qy) * W + qx, delta, mask=q_ok)
    idx_row = IDX + b * sib + head * sin + region * sir

    L = TOPK * P
    dq = tl.zeros([BLOCK_M, BLOCK_DQK], tl.float32)
    for j0 in range(0, L, BLOCK_N):
        ky, kx, k_ok, live = _routed_keys(idx_row, j0 + tl.arange(0, BLOCK_N), L, P, N, RH, RW, H, W)
        k = _rows(K, b, ky, kx, head, dqk, skb, skh, skw, skn, k_ok, DQK)
        v = _rows(V, b, ky, kx, head, dv, svb, svh, svw, svn, k_ok, DV)
        allowed = _allowed(k_ok, live, MASK_PADDING)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        p = tl.where(allowed[None, :], tl.exp(s - lse[:, None]), 0.0)
        ds = p * (tl.dot(do, tl.trans(v), input_precision=PRECISION) - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    dq_rows = b * (H * W * NH * DQK) + (qy[:, None] * W + qx[:, None]) * (NH * DQK) + head * DQK + dqk[None, :]
    tl.store(DQ + dq_rows, (dq * scale).to(DQ.dtype.element_ty), mask=q_ok[:, None] & (dqk[None, :] < DQK))


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, QREGIONS, OFFSETS, DK, DV_,
    sqb, sqh, sqw, sqn, skb, skh, skw, skn, svb, svh, svw, svn, sdb, sdh, sdw, sdn, IDX_HEADS,
    H, W, NH, DQK, DV, N: tl.constexpr, RH: tl.constexpr, RW: tl.constexpr, TOPK, TILES, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dK and dV of a tile of one key region's tokens, over every query region that routed to it.

    ``OFFSETS[g, r] .. OFFSETS[g, r + 1]`` delimit the query regions ``QREGIONS[g, ...]`` whose routing rows
    name key region ``r``, for routing group ``g`` (a batch element, or a (batch, head) pair when the index
    has heads). Padded keys are not stored, so the padding mode does not enter here.
    """
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and BLOCK_DQK >= 16 and BLOCK_DV >= 16,
                     "tl.dot needs dims >= 16 on GPU")
    region, pk, bh, b, head = _program(NH, TILES, N, BLOCK_M)
    P = RH * RW
    ky, kx, k_real = _tokens(region, pk, N, RH, RW, H, W)
    k_ok = (pk < P) & k_real
    dqk = tl.arange(0, BLOCK_DQK)
    dv = tl.arange(0, BLOCK_DV)
    k = _rows(K, b, ky, kx, head, dqk, skb, skh, skw, skn, k_ok, DQK)
    v = _rows(V, b, ky, kx, head, dv, svb, svh, svw, svn, k_ok, DV)

    group = b * IDX_HEADS + tl.where(IDX_HEADS > 1, head, 0)
    n_regions = N * N
    start = tl.load(OFFSETS + group * (n_regions + 1) + region)
    count = tl.load(OFFSETS + group * (n_regions + 1) + region + 1) - start
    q_regions = QREGIONS + group * (n_regions * TOPK) + start
    L = count * P
    dk = tl.zeros([BLOCK_M, BLOCK_DQK], tl.float32)
    dvv = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for i0 in range(0, L, BLOCK_N):
        i = i0 + tl.arange(0, BLOCK_N)
        live = i < L
        q_region = tl.load(q_regions + i // P, mask=live, other=0)
        qy, qx, q_real = _tokens(q_region, i % P, N, RH, RW, H, W)
        q_ok = live & q_real
        q = _rows(Q, b, qy, qx, head, dqk, sqb, sqh, sqw, sqn, q_ok, DQK)
        do = _rows(DO, b, qy, qx, head, dv, sdb, sdh, sdw, sdn, q_ok, DV)
        lse = tl.load(LSE + (bh * H + qy) * W + qx, mask=q_ok, other=0.0)
        delta = tl.load(DELTA + (bh * H + qy) * W + qx, mask=q_ok, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [queries, keys]
        p = tl.where(q_ok[:, None], tl.exp(s - lse[:, None]), 0.0)
        dvv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
        ds = p * (tl.dot(do, tl.trans(v), input_precision=PRECISION) - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    rows = b * (H * W * NH) + (ky[:, None] * W + kx[:, None]) * NH + head
    tl.store(DK + rows * DQK + dqk[None, :], (dk * scale).to(DK.dtype.element_ty),
             mask=k_ok[:, None] & (dqk[None, :] < DQK))
    tl.store(DV_ + rows * DV + dv[None, :], dvv.to(DV_.dtype.element_ty), mask=k_ok[:, None] & (dv[None, :] < DV))


def _launch_config(q: torch.Tensor, v: torch.Tensor, n_win: int):
    B, H, W, NH, DQK = q.shape
    DV = v.shape[-1]
    for name, D in (("q/k", DQK), ("v", DV)):
        if not 16 <= D <= 128:
            raise ValueError(f"the Triton kernels take head dims 16..128; got {name} D={D} (use backend='torch')")
    rh, rw = -(-H // n_win), -(-W // n_win)
    wide = max(DQK, DV) > 64  # dK and dV of 64 keys x 128 dims would not fit 4 warps' registers
    block_m = min(32 if wide else 64, max(16, triton.next_power_of_2(rh * rw)))  # a small region fits one tile
    tiles = triton.cdiv(rh * rw, block_m)
    meta = dict(
        BLOCK_M=block_m, BLOCK_N=32 if wide else 64,
        BLOCK_DQK=max(16, triton.next_power_of_2(DQK)), BLOCK_DV=max(16, triton.next_power_of_2(DV)),
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=4,
    )
    return (B * NH * n_win * n_win * tiles,), (H, W, NH, DQK, DV, n_win, rh, rw), tiles, meta


def _strides(t):
    return t.stride(0), t.stride(1), t.stride(2), t.stride(3)


def _index_strides(index: torch.Tensor):
    """(batch, head, region) strides of a ``[B, R, topk]`` (heads share it: head stride 0) or
    ``[B, heads, R, topk]`` index."""
    return (index.stride(0), 0, index.stride(1)) if index.ndim == 3 else (index.stride(0), *index.stride()[1:3])


def inverted_index(index: torch.Tensor, n_regions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For routing rows ``index[g, r, :]`` (query region ``r`` routes to those key regions): the query
    regions of every entry sorted by key region, ``[G, R*topk]`` int32, and CSR offsets ``[G, n_regions+1]``
    int32 into it. A stable sort keeps the order (and so the dK/dV sums) deterministic."""
    G, topk = index.shape[0], index.shape[-1]
    keys, order = index.reshape(G, -1).sort(dim=1, stable=True)
    bounds = torch.arange(n_regions + 1, device=index.device, dtype=keys.dtype).expand(G, -1).contiguous()
    return (order // topk).to(torch.int32), torch.searchsorted(keys, bounds).to(torch.int32)


def _checked_index(index: torch.Tensor, n_win: int) -> torch.Tensor:
    """The routing index as contiguous int32 (the kernels' region arithmetic stays 32-bit), its ids checked
    to lie in ``[0, n_win²)`` by an asynchronous device assert (no host synchronisation)."""
    regions = n_win * n_win
    if index.device.type != "meta":
        torch._assert_async(((index >= 0) & (index < regions)).all(),
                            f"region_index ids must lie in [0, {regions}) for n_win={n_win}")
    return index.to(torch.int32).contiguous()


def _contiguous_rows(*tensors):
    return [t if t.stride(-1) == 1 else t.contiguous() for t in tensors]


def routed_attention_fwd(q, k, v, index, n_win, scale, mask_padding):
    """Output ``[B, H, W, heads, Dv]`` (q's dtype) and log-sum-exp ``[B, heads, H, W]`` (fp32)."""
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k, v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    q, k, v = _contiguous_rows(q, k, v)
    index = _checked_index(index, n_win)
    grid, scalars, tiles, meta = _launch_config(q, v, n_win)
    B, H, W, NH, _ = q.shape
    out = q.new_empty(B, H, W, NH, v.shape[-1])
    lse = torch.empty(B, NH, H, W, device=q.device, dtype=torch.float32)
    _fwd_kernel[grid](
        q, k, v, index, out, lse, *_strides(q), *_strides(k), *_strides(v), *_strides(out), *_index_strides(index),
        *scalars, index.shape[-1], tiles, scale, MASK_PADDING=mask_padding, **meta,
    )
    return out, lse


def routed_attention_bwd(grad_out, q, k, v, out, lse, index, n_win, scale, mask_padding):
    """``(dq, dk, dv)``, contiguous, in q's dtype."""
    q, k, v = _contiguous_rows(q, k, v)
    index = index.to(torch.int32).contiguous()  # checked by the forward
    grad_out = grad_out.contiguous()
    grid, scalars, tiles, meta = _launch_config(q, v, n_win)
    delta = torch.empty_like(lse)  # rowsum(O * dO), written by the dQ kernel
    dq, dk = torch.empty(q.shape, device=q.device, dtype=q.dtype), torch.empty(k.shape, device=q.device, dtype=q.dtype)
    dv = torch.empty(v.shape, device=q.device, dtype=q.dtype)
    strides = (*_strides(q), *_strides(k), *_strides(v), *_strides(grad_out))
    topk = index.shape[-1]
    _bwd_dq_kernel[grid](q, k, v, out, grad_out, lse, delta, index, dq, *strides[:12], *_strides(out), *strides[12:],
                         *_index_strides(index),
                         *scalars, topk, tiles, scale, MASK_PADDING=mask_padding, **meta)
    groups = index.flatten(0, 1) if index.ndim == 4 else index  # one routing table per batch (and head)
    q_regions, offsets = inverted_index(groups, n_win * n_win)
    _bwd_dkdv_kernel[grid](q, k, v, grad_out, lse, delta, q_regions, offsets, dk, dv, *strides,
                           index.shape[1] if index.ndim == 4 else 1, *scalars, topk, tiles, scale, **meta)
    return dq, dk, dv


# torch.library ops, so autograd and torch.compile (no graph break) see one opaque op per pass.
@torch.library.custom_op("vision_kernels::bilevel_routing_attention", mutates_args=())
def _attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor, n_win: int, scale: float,
    mask_padding: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    return routed_attention_fwd(q, k, v, index, n_win, scale, mask_padding)


@_attention_op.register_fake
def _(q, k, v, index, n_win, scale, mask_padding):
    B, H, W, NH, _ = q.shape
    return q.new_empty(B, H, W, NH, v.shape[-1]), q.new_empty(B, NH, H, W, dtype=torch.float32)


@torch.library.custom_op("vision_kernels::bilevel_routing_attention_backward", mutates_args=())
def _attention_backward_op(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, index: torch.Tensor, n_win: int, scale: float, mask_padding: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return routed_attention_bwd(grad_out, q, k, v, out, lse, index, n_win, scale, mask_padding)


@_attention_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, index, n_win, scale, mask_padding):
    return tuple(torch.empty(t.shape, device=t.device, dtype=q.dtype) for t in (q, k, v))


def _setup_context(ctx, inputs, output):
    q, k, v, index, *ctx.args = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, index, out, lse)


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, index, out, lse = ctx.saved_tensors
    dq, dk, dv = _attention_backward_op(grad_out, q, k, v, out, lse, index, *ctx.args)
    return dq, dk, dv, None, None, None, None


_attention_op.register_autograd(_backward, setup_context=_setup_context)


def routed_attention(q, k, v, index, n_win, scale, mask_padding) -> torch.Tensor:
    """The fused op: ``[B, H, W, heads, Dqk]`` q, k and ``[B, H, W, heads, Dv]`` v; ``index`` ``[B, n², topk]``
    (shared by the heads) or ``[B, heads, n², topk]``."""
    return _attention_op(q, k, v, index, int(n_win), float(scale), bool(mask_padding))[0]
