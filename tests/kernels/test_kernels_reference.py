"""Torch references of the attention kernels against brute force, NATTEN and the official fixtures."""

import itertools

import pytest
import torch
from _fixtures import load

from kernels import fit_dilation, neighborhood_attention2d, swin_table_to_rpb, window_attention2d


def brute_neighbors(length: int, k: int, d: int) -> list[list[int]]:
    """NATTEN's rule written out per position: the dilation group's window, shifted inward at borders."""
    out = []
    for i in range(length):
        group = [j for j in range(length) if j % d == i % d]
        pos = group.index(i)
        start = min(max(pos - k // 2, 0), len(group) - k)
        out.append(group[start: start + k])
    return out


def dense_reference(q, k, v, allowed, bias=None, scale=None):
    """Dense masked attention over all tokens: [B, H, W, heads, D] with allowed [N, N] (and bias [heads, N, N])."""
    B, H, W, heads, D = q.shape
    q, k, v = (t.reshape(B, H * W, heads, D).transpose(1, 2) for t in (q, k, v))
    logits = (q * (scale or D**-0.5)) @ k.transpose(-1, -2)
    if bias is not None:
        logits = logits + bias
    out = logits.masked_fill(~allowed, float("-inf")).softmax(-1) @ v
    return out.transpose(1, 2).reshape(B, H, W, heads, D)


def na_dense(q, k, v, ks, dil, rpb=None):
    _, H, W, heads, _ = q.shape
    rows, cols = brute_neighbors(H, ks, dil), brute_neighbors(W, ks, dil)
    allowed = torch.zeros(H * W, H * W, dtype=torch.bool)
    bias = torch.zeros(heads, H * W, H * W)
    for i, j in itertools.product(range(H), range(W)):
        for a, b in itertools.product(rows[i], cols[j]):
            allowed[i * W + j, a * W + b] = True
            if rpb is not None:
                bias[:, i * W + j, a * W + b] = rpb[:, (a - i) // dil + ks - 1, (b - j) // dil + ks - 1]
    return dense_reference(q, k, v, allowed, bias if rpb is not None else None)


def qkv(B, H, W, heads=2, D=8, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, W, heads, D, generator=g, dtype=dtype).requires_grad_() for _ in range(3)]


@pytest.mark.parametrize("length,k,d", [(7, 3, 1), (9, 3, 2), (15, 7, 2), (17, 4, 3), (13, 6, 2), (12, 3, 4)])
def test_neighborhood_indices_match_rule(length, k, d):
    from kernels import neighborhood_indices

    assert neighborhood_indices(length, k, d).tolist() == brute_neighbors(length, k, d)


@pytest.mark.parametrize("H,W,ks,dil", [(9, 11, 3, 1), (13, 10, 5, 2), (8, 7, 4, 1), (15, 17, 7, 2), (12, 13, 3, 4)])
@pytest.mark.parametrize("with_rpb", [False, True])
def test_neighborhood_matches_dense_reference(H, W, ks, dil, with_rpb):
    q, k, v = qkv(2, H, W)
    rpb = torch.randn(2, 2 * ks - 1, 2 * ks - 1, requires_grad=True) if with_rpb else None
    out = neighborhood_attention2d(q, k, v, ks, dil, rpb=rpb)
    ref = na_dense(q, k, v, ks, dil, rpb)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out)
    inputs = [q, k, v] + ([rpb] if with_rpb else [])
    grads = torch.autograd.grad(out, inputs, g)
    ref_grads = torch.autograd.grad(ref, inputs, g)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["natten_na2d_k7", "natten_na2d_k7_13x11", "natten_na2d_k7_d2", "natten_na2d_k7_d2_15x17"])
def test_neighborhood_matches_natten_fixtures(name):
    fx = load(name)
    q, k, v = fx["input"].clone().requires_grad_().unbind(0)
    kw = fx["meta"]["kwargs"]
    out = neighborhood_attention2d(q, k, v, kw["kernel_size"], kw["dilation"])
    torch.testing.assert_close(out, fx["output"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["natten_na2d_k7", "natten_na2d_k7_d2_15x17"])
def test_neighborhood_gradients_match_natten_fixtures(name):
    fx = load(name)
    inp = fx["input"].clone().requires_grad_()
    kw = fx["meta"]["kwargs"]
    out = neighborhood_attention2d(*inp.unbind(0), kw["kernel_size"], kw["dilation"])
    (grad,) = torch.autograd.grad(out, inp, fx["grad_output"])
    torch.testing.assert_close(grad, fx["grad_input"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("ks", [3, 5, 7, 9])
@pytest.mark.parametrize("dil", [1, 2, 3, 4])
def test_neighborhood_matches_natten(ks, dil):
    import natten as na  # test-only dependency (the dev extra installs it)

    H, W = ks * dil + 3, ks * dil + 6  # odd, non-square, every axis >= k*d
    q, k, v = (t.detach() for t in qkv(1, H, W, heads=2, D=16, seed=ks * 10 + dil))
    # natten has no CPU backward: gradients are checked against the dense reference and the fixtures
    expected = na.na2d(q, k, v, kernel_size=ks, dilation=dil)
    out = neighborhood_attention2d(q, k, v, ks, dil)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_neighborhood_shape_errors_and_dilation_policy():
    q, k, v = qkv(1, 10, 20)
    with pytest.raises(ValueError, match=r"7\*2 = 14 exceeds the input height 10"):
        neighborhood_attention2d(q, k, v, 7, 2)
    assert fit_dilation((10, 20), 7, 2, policy="reduce") == (1, 2)
    out = neighborhood_attention2d(q, k, v, 7, 2, dilation_policy="reduce")
    torch.testing.assert_close(out, neighborhood_attention2d(q, k, v, 7, (1, 2)))
    with pytest.raises(ValueError, match="smaller than kernel_size 11"):
        neighborhood_attention2d(q, k, v, 11)
    with pytest.raises(ValueError, match="rpb must be"):
        neighborhood_attention2d(q, k, v, 3, rpb=torch.zeros(2, 3, 3))


def swin_dense(q, k, v, ws, shift, rpb=None):
    """Swin written directly on the full grid: pad, roll, window membership, region mask, unpadded keys."""
    _, H, W, heads, _ = q.shape
    Hp, Wp = -(-H // ws) * ws, -(-W // ws) * ws

    def region(p, length):  # Swin's three slices of the rolled axis
        return 0 if p < length - ws else (1 if p < length - shift else 2) if shift else 0

    # position p in the rolled, padded grid holds original token (p + shift) % length
    tokens = [((i + shift) % Hp, (j + shift) % Wp, i, j) for i in range(Hp) for j in range(Wp)]
    allowed = torch.zeros(H * W, H * W, dtype=torch.bool)
    bias = torch.zeros(heads, H * W, H * W)
    for (oi, oj, ri, rj), (pi, pj, si, sj) in itertools.product(tokens, tokens):
        if oi >= H or oj >= W or pi >= H or pj >= W:
            continue  # padding: never a key, and padded queries are cropped
        same_window = ri // ws == si // ws and rj // ws == sj // ws
        same_region = (region(ri, Hp), region(rj, Wp)) == (region(si, Hp), region(sj, Wp))
        if same_window and same_region:
            allowed[oi * W + oj, pi * W + pj] = True
            if rpb is not None:
                bias[:, oi * W + oj, pi * W + pj] = rpb[:, si % ws - ri % ws + ws - 1, sj % ws - rj % ws + ws - 1]
    return dense_reference(q, k, v, allowed, bias if rpb is not None else None)


@pytest.mark.parametrize("H,W,ws,shift", [(8, 8, 4, 0), (8, 8, 4, 2), (7, 10, 4, 0), (9, 11, 4, 2), (14, 14, 7, 3)])
@pytest.mark.parametrize("with_rpb", [False, True])
def test_window_matches_dense_swin(H, W, ws, shift, with_rpb):
    q, k, v = qkv(2, H, W, seed=H * W + shift)
    rpb = torch.randn(2, 2 * ws - 1, 2 * ws - 1, requires_grad=True) if with_rpb else None
    out = window_attention2d(q, k, v, ws, shift, rpb=rpb)
    ref = swin_dense(q, k, v, ws, shift, rpb)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    inputs = [q, k, v] + ([rpb] if with_rpb else [])
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, inputs, g), torch.autograd.grad(ref, inputs, g)):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_swin_table_conversion_matches_swin_indexing():
    ws, heads = 3, 2
    table = torch.randn((2 * ws - 1) ** 2, heads)
    rpb = swin_table_to_rpb(table, ws)
    coords = [(y, x) for y in range(ws) for x in range(ws)]
    for (qy, qx), (ky, kx) in itertools.product(coords, coords):
        swin_index = (qy - ky + ws - 1) * (2 * ws - 1) + (qx - kx + ws - 1)  # Swin: query - key
        torch.testing.assert_close(rpb[:, ky - qy + ws - 1, kx - qx + ws - 1], table[swin_index])
