"""Fused Triton kernels against the torch references: outputs and every gradient, fp32 and fp16.

Without a GPU the kernels run in Triton's interpreter (conftest sets ``TRITON_INTERPRET=1``), about 8 ms
per program, so the grids are small but cover several tiles, odd non-square sizes, dilation, even kernel
sizes, padding, shift and RPB. The reference always runs in fp32.
"""

import math
import os
import subprocess
import sys
import types

import pytest
import torch
from _compare import TOLERANCE, assert_backends_agree

from kernels import _checks, neighborhood_attention2d, window_attention2d

pytestmark = pytest.mark.skipif(_checks.triton_windowed is None, reason="triton is not installed (Linux only)")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# fp32 uses IEEE dots (no TF32); fp16 is compared with the fp32 reference, so its bound is fp16 rounding.

NEIGHBORHOOD_CASES = [  # (B, H, W, heads, D), kernel_size, dilation, rpb, dtype
    ((1, 9, 11, 2, 16), 3, 1, True, torch.float32),
    ((1, 13, 10, 1, 16), 4, 2, True, torch.float32),  # even kernel, dilation, several tiles
    ((2, 12, 17, 1, 32), 5, (1, 3), False, torch.float32),
    ((1, 11, 9, 1, 16), (5, 3), (2, 1), True, torch.float16),
    ((1, 12, 11, 1, 96), 7, 1, True, torch.float16),  # D > 64: 32-key chunks; 7x7 key rectangles in 4 steps
]
WINDOW_CASES = [  # (B, H, W, heads, D), window_size, shift_size, rpb, dtype
    ((1, 10, 9, 2, 16), 4, 2, True, torch.float32),  # padded and shifted
    ((1, 8, 8, 1, 32), 4, 0, False, torch.float32),
    ((1, 9, 14, 1, 16), (3, 7), (1, 3), True, torch.float32),
    ((2, 15, 13, 1, 16), 7, 3, True, torch.float16),
    ((1, 6, 11, 2, 16), 2, 1, True, torch.float32),  # HiLo's 2x2 windows, many to a program
    ((1, 15, 14, 1, 16), 13, 6, True, torch.float32),  # 169-token windows: keys in several steps
    ((1, 13, 15, 1, 80), 13, 4, True, torch.float32),  # D > 64: a window's rows split over 7 programs
]


def inputs(shape, rpb_shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(shape, generator=g).to(DEVICE, dtype).requires_grad_() for _ in range(3))
    rpb = torch.randn(shape[3], *rpb_shape, generator=g).to(DEVICE).requires_grad_() if rpb_shape else None
    return q, k, v, rpb


def check_against_torch(fn, q, k, v, rpb, dtype, **kwargs):
    out = fn(q, k, v, rpb=rpb, backend="triton", **kwargs)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    leaves = [t for t in (q, k, v, rpb) if t is not None]
    grads = torch.autograd.grad(out, leaves, grad)

    ref_leaves = [t.detach().float().requires_grad_() for t in leaves]
    ref_q, ref_k, ref_v, *ref_rpb = ref_leaves
    ref = fn(ref_q, ref_k, ref_v, rpb=ref_rpb[0] if ref_rpb else None, backend="torch", **kwargs)
    ref_grads = torch.autograd.grad(ref, ref_leaves, grad.float())

    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.float(), ref, **TOLERANCE[dtype])
    for name, got, want in zip("q k v rpb".split(), grads, ref_grads):
        assert got.dtype == (torch.float32 if name == "rpb" else dtype), name
        torch.testing.assert_close(got.float(), want, **TOLERANCE[dtype], msg=lambda m, n=name: f"d{n}: {m}")


@pytest.mark.parametrize("shape,kernel_size,dilation,with_rpb,dtype", NEIGHBORHOOD_CASES)
def test_neighborhood_matches_torch(shape, kernel_size, dilation, with_rpb, dtype):
    kh, kw = _checks.pair(kernel_size)
    q, k, v, rpb = inputs(shape, (2 * kh - 1, 2 * kw - 1) if with_rpb else None, dtype)
    check_against_torch(neighborhood_attention2d, q, k, v, rpb, dtype, kernel_size=kernel_size, dilation=dilation)


@pytest.mark.parametrize("shape,window_size,shift_size,with_rpb,dtype", WINDOW_CASES)
def test_window_matches_torch(shape, window_size, shift_size, with_rpb, dtype):
    wh, ww = _checks.pair(window_size)
    q, k, v, rpb = inputs(shape, (2 * wh - 1, 2 * ww - 1) if with_rpb else None, dtype)
    check_against_torch(window_attention2d, q, k, v, rpb, dtype, window_size=window_size, shift_size=shift_size)


def test_non_contiguous_qkv_from_one_projection():
    """Models slice q, k, v out of one qkv projection: strided views go in as they are."""
    B, H, W, heads, D = 1, 9, 10, 2, 16
    qkv = torch.randn(B, H, W, 3, heads, D, device=DEVICE)
    q, k, v = qkv.unbind(3)
    assert not q.is_contiguous()
    out = neighborhood_attention2d(q, k, v, 3, backend="triton")
    torch.testing.assert_close(out, neighborhood_attention2d(q, k, v, 3, backend="torch"), **TOLERANCE[torch.float32])


def test_custom_op_registration():
    """Schema, fake (meta) implementation and autograd registration agree with the real kernels."""
    q, k, v, rpb = inputs((1, 8, 9, 1, 16), (5, 5), torch.float32)
    op = torch.ops.vision_kernels.windowed_attention.default
    args = (q, k, v, rpb, [3, 3], [1, 1], [1, 1], True, 0.25)
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_compiles_without_graph_breaks():
    q, k, v, rpb = inputs((1, 8, 9, 1, 16), (7, 7), torch.float32)

    def block(q, k, v, rpb):
        return window_attention2d(q.sin(), k, v, 4, 2, rpb=rpb, backend="triton").relu().sum()

    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")  # the op stays one node fwd and bwd
    got, want = compiled(q, k, v, rpb), block(q, k, v, rpb)
    torch.testing.assert_close(got, want, **TOLERANCE[torch.float32])
    got_grads = torch.autograd.grad(got, (q, rpb))
    want_grads = torch.autograd.grad(block(q, k, v, rpb), (q, rpb))
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, **TOLERANCE[torch.float32])


def test_auto_backend_is_torch_on_cpu(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the fused kernels ran on CPU tensors under backend='auto'")

    monkeypatch.setattr(_checks.triton_windowed, "windowed_attention", refuse)
    q, k, v, _ = inputs((1, 8, 8, 1, 16), None, torch.float32)
    window_attention2d(q.cpu(), k.cpu(), v.cpu(), 4)
    neighborhood_attention2d(q.cpu(), k.cpu(), v.cpu(), 3)


@pytest.mark.parametrize("D", [8, 160])
def test_head_dims_outside_16_to_128_are_named(D):
    q = torch.randn(1, 8, 8, 1, D, device=DEVICE)
    with pytest.raises(ValueError, match=f"D={D}"):
        window_attention2d(q, q, q, 4, backend="triton")


def test_dropout_and_unknown_backend_are_clear_errors():
    q = torch.randn(1, 8, 8, 1, 16, device=DEVICE)
    with pytest.raises(ValueError, match="dropout"):
        neighborhood_attention2d(q, q, q, 3, backend="triton", dropout_p=0.1)
    with pytest.raises(ValueError, match="'triton'"):
        neighborhood_attention2d(q, q, q, 3, backend="cuda")


def test_models_take_the_fused_path():
    """NAT's and Swin-window modules give the same outputs and parameter gradients with backend='triton'."""
    from vision.attention import NeighborhoodAttention2D, WindowAttention

    torch.manual_seed(0)
    x = torch.randn(1, 10, 11, 32, device=DEVICE)
    layers = [NeighborhoodAttention2D(32, 2, kernel_size=3, dilation=2), WindowAttention(32, 2, 4, 2, rel_pos_bias=True)]
    for layer in layers:
        layer.to(DEVICE)
        assert_backends_agree(layer, x, **TOLERANCE[torch.float32])


def test_import_needs_no_gpu():
    code = ("import sys, torch, kernels; assert 'triton' in sys.modules; "
            "assert not torch.cuda.is_initialized(), 'importing kernels initialised CUDA'")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "TRITON_INTERPRET": "0"})


CONFIG_SHAPES = [  # (kind, kernel, dilation, D): every kernel size and head dim the models use, and the edges
    *[("na", k, d, D) for k in (3, 5, 7, 9, 11, 13) for d in (1, 2) for D in (16, 32, 64, 128)],
    *[("swin", w, 0, D) for w in (2, 3, 4, 7, 8, 12, 13, 16, 24) for D in (16, 32, 64, 96, 128)],
]


@pytest.mark.parametrize("kind,k,dilation,D", CONFIG_SHAPES)
def test_launch_config_tiles_cover_every_query_once(kind, k, dilation, D):
    """The config table, without a tensor: tiles of at most 64 queries (32 at D > 32) that fill tl.dot's 16 rows,
    whole windows or whole rows of one window for Swin, and a 1-D grid of every (batch, head, group, tile)."""
    tw = _checks.triton_windowed
    blocked = kind == "swin"
    shape = (2, 40, 37, 3, D)
    grid, (tiles_y, tiles_x), metas = tw.launch_config(shape, torch.float16, (k, k), (dilation or 1,) * 2,
                                                       (k // 2 if blocked else 0,) * 2, blocked, True)
    meta = metas["fwd"]
    assert set(metas) == {"fwd", "dq", "dkdv"} and len(grid) == 1
    tqh, tqw, split = meta["TQH"], meta["TQW"], meta["SPLIT"]
    assert 16 <= meta["BLOCK_M"] <= (64 if D <= 32 else 32) and tqh * tqw <= meta["BLOCK_M"]
    assert meta["BLOCK_D"] >= D and meta["BLOCK_N"] <= 64 and meta["num_stages"] == 1
    groups = 1 if blocked else dilation ** 2
    assert grid[0] == shape[0] * shape[3] * groups * tiles_y * tiles_x
    if blocked:
        assert tqw % k == 0 and (split == 1 and tqh == k or tqw == k and tqh * split >= k > tqh * (split - 1))
        assert (meta["RH"], meta["RW"]) == (k, tqw)
        assert tiles_y == math.ceil(40 / k) * split and tiles_x * tqw >= math.ceil(37 / k) * k
    else:
        assert (tqh, tqw, meta["RH"], meta["RW"]) == (4, 4, k + 3, k + 3)
        assert tiles_y * 4 >= math.ceil(40 / dilation) and tiles_x * 4 >= math.ceil(37 / dilation)


def test_shapes_without_a_config_are_named_and_auto_falls_back():
    tw = _checks.triton_windowed
    with pytest.raises(tw.Unsupported, match=r"80 tokens wide.*\[1, 8, 80, 1, 16\]"):
        tw.launch_config((1, 8, 80, 1, 16), torch.float16, (4, 80), (1, 1), (0, 0), True)
    q = torch.randn(1, 8, 80, 1, 16, device=DEVICE)
    with pytest.raises(ValueError, match=r"backend='triton'.*\[1, 8, 80, 1, 16\]"):
        window_attention2d(q, q, q, (4, 80), backend="triton")
    cuda_q = types.SimpleNamespace(is_cuda=True, shape=q.shape, dtype=torch.float16)  # stands in for a GPU tensor
    assert _checks.use_triton(cuda_q, "auto") and not _checks.use_triton(cuda_q, "auto", unsupported="no tile")


def test_deterministic_mode_refuses_the_rpb_atomics():
    q, k, v, rpb = inputs((1, 8, 8, 1, 16), (5, 5), torch.float32)
    torch.use_deterministic_algorithms(True)
    try:
        with pytest.raises(RuntimeError, match="deterministic"):
            neighborhood_attention2d(q, k, v, 3, rpb=rpb, backend="triton")
        neighborhood_attention2d(q, k, v, 3, backend="triton")  # no bias gradient, no atomics
        cuda_q = types.SimpleNamespace(is_cuda=True, shape=q.shape, dtype=q.dtype)
        assert not _checks.use_triton(cuda_q, "auto", atomics=True) and _checks.use_triton(cuda_q, "auto",
                                                                                            atomics=False)
    finally:
        torch.use_deterministic_algorithms(False)


# The sm_90 compile check of the dispatched windowed (and BRA) kernels is tests/kernels/test_kernel_report.py.
