"""Generalized neighborhood attention (1-D/2-D/3-D, stride, causal, dilation, extra keys, RPB, LSE):
the torch reference against NATTEN 0.21's CPU forward and, for gradients, a dense masked attention."""

import itertools
import math
import warnings

import pytest
import torch

from kernels import (
    merge_attentions,
    neighborhood_attention,
    neighborhood_attention1d,
    neighborhood_attention2d,
    neighborhood_attention3d,
)


def axis_keys(length, k, s, d, causal):
    """Per query position, its keys along one axis, written out from NATTEN's rule."""
    out = []
    for i in range(length):
        group = list(range(i % d, length, d))
        p = group.index(i)
        if causal:
            leader = min(p // s * s + s - 1, len(group) - 1)
            out.append(group[max(leader - k + 1, 0): p + 1])
        else:
            leader = min(p // s * s + s // 2, len(group) - 1)
            start = min(max(leader - k // 2, 0), len(group) - k)
            out.append(group[start: start + k])
    return out


def dense(q, k, v, ks, st, dl, causal, rpb=None, xk=None, xv=None):
    """Dense masked attention over all tokens (and the extra ones): out and natural LSE."""
    B, *size, heads, D = q.shape
    keys = [axis_keys(*a) for a in zip(size, ks, st, dl, causal)]
    N = math.prod(size)
    allowed = torch.zeros(N, N, dtype=torch.bool)
    bias = torch.zeros(heads, N, N)
    for qi, qpos in enumerate(itertools.product(*[range(x) for x in size])):
        for kpos in itertools.product(*[keys[a][qpos[a]] for a in range(len(size))]):
            kj = sum(kpos[a] * math.prod(size[a + 1:]) for a in range(len(size)))
            allowed[qi, kj] = True
            if rpb is not None:
                bias[:, qi, kj] = rpb[(slice(None), *[(kpos[a] - qpos[a]) // dl[a] + ks[a] - 1 for a in range(len(size))])]
    qf, kf, vf = (t.reshape(B, N, heads, -1).transpose(1, 2) for t in (q, k, v))
    logits = (qf * D**-0.5) @ kf.transpose(-1, -2) + bias
    logits = logits.masked_fill(~allowed, float("-inf"))
    if xk is not None:
        logits = torch.cat([logits, (qf * D**-0.5) @ xk.permute(0, 2, 3, 1)], -1)
        vf = torch.cat([vf, xv.transpose(1, 2)], 2)
    lse = logits.logsumexp(-1)
    out = logits.softmax(-1) @ vf
    return out.transpose(1, 2).reshape(B, *size, heads, -1), lse.transpose(1, 2).reshape(B, *size, heads)


def tensors(B, size, heads=2, D=8, M=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, *size, heads, D, generator=g) for _ in range(3))
    extra = [torch.randn(B, M, heads, D, generator=g) for _ in range(2)] if M else [None, None]
    return q, k, v, *extra


def grid_cases():
    """Every rank x (odd, even kernel) x stride (1, 2, k) x dilation (1..3); causal flags and extra keys
    vary across the cases, sizes are odd/non-cubic and the smallest each case allows (plus a margin)."""
    cases = []
    for rank, kernels in ((1, (5, 4)), (2, (3, 4)), (3, (3, 2))):
        for n, (kk, s_kind, d) in enumerate(itertools.product(kernels, ("1", "2", "k"), (1, 2, 3))):
            s = {"1": 1, "2": min(2, kk), "k": kk}[s_kind]
            ks = tuple(kk + (a if rank > 1 and kk > 2 else 0) % 2 for a in range(rank))  # non-cubic kernels
            st = tuple(min(s, x) for x in ks)
            dl = tuple(max(1, d - a) for a in range(rank))
            causal = tuple(bool((n >> a) & 1) for a in range(rank))
            size = tuple(x * y + 2 * a + 1 for a, (x, y) in enumerate(zip(ks, dl)))
            cases.append(pytest.param(size, ks, st, dl, causal, n % 2, id=f"{rank}d-{n}"))
    return cases


@pytest.mark.parametrize("size,ks,st,dl,causal,extra", grid_cases())
def test_matches_natten(size, ks, st, dl, causal, extra):
    import natten  # test-only dependency (the dev extra installs it)

    q, k, v, xk, xv = tensors(2, size, M=3 * extra, seed=len(size) * 100 + sum(ks) + sum(dl))
    kw = dict(kernel_size=ks, stride=st, dilation=dl, is_causal=causal, additional_keys=xk, additional_values=xv)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex attention's "not compiled" warning
        expected, expected_lse = getattr(natten, f"na{len(size)}d")(q, k, v, return_lse=True, **kw)
    out, lse = neighborhood_attention(q, k, v, return_lse=True, **kw)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, expected_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("size,ks,st,dl,causal,rpb,extra", [
    ((11,), (4,), (2,), (2,), (False,), True, True),
    ((13,), (5,), (5,), (1,), (True,), True, False),
    ((9, 8), (3, 4), (1, 2), (2, 1), (False, False), True, True),
    ((7, 10), (3, 3), (3, 1), (1, 3), (True, False), True, False),
    ((5, 6, 7), (3, 2, 3), (1, 2, 3), (1, 2, 2), (False, True, False), True, True),
    ((6, 5, 7), (2, 3, 3), (2, 1, 1), (2, 1, 1), (True, True, False), False, True),
])
def test_gradients_match_dense(size, ks, st, dl, causal, rpb, extra):
    q, k, v, xk, xv = tensors(2, size, M=2 if extra else 0, seed=7)
    bias = torch.randn(2, *[2 * x - 1 for x in ks]) if rpb else None
    inputs = [t.requires_grad_() for t in (q, k, v, xk, xv, bias) if t is not None]
    out, lse = neighborhood_attention(q, k, v, ks, st, dl, causal, additional_keys=xk, additional_values=xv,
                                      return_lse=True, rpb=bias)
    ref, ref_lse = dense(q, k, v, ks, st, dl, causal, bias, xk, xv)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)
    g, gl = torch.randn_like(out), torch.randn_like(lse)
    grads = torch.autograd.grad((out * g).sum() + (lse * gl).sum(), inputs)
    ref_grads = torch.autograd.grad((ref * g).sum() + (ref_lse * gl).sum(), inputs)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_blocked_stride_is_window_attention():
    """stride = kernel on a divisible grid: every query attends to exactly its own k x k block."""
    from kernels import window_attention2d

    q, k, v, _, _ = tensors(1, (12, 8), D=16)
    out = neighborhood_attention2d(q, k, v, 4, stride=4)
    torch.testing.assert_close(out, window_attention2d(q, k, v, 4), rtol=1e-5, atol=1e-5)


def test_merge_attentions_equals_one_softmax():
    q, k, v, xk, xv = tensors(2, (9, 10), M=4, seed=3)
    for t in (q, k, v, xk, xv):
        t.requires_grad_()
    joint, joint_lse = neighborhood_attention2d(q, k, v, 3, dilation=2, additional_keys=xk, additional_values=xv,
                                                return_lse=True)
    na, na_lse = neighborhood_attention2d(q, k, v, 3, dilation=2, return_lse=True)
    logits = torch.einsum("bxyhd,bmhd->bxyhm", q * 8**-0.5, xk)
    other, other_lse = torch.einsum("bxyhm,bmhd->bxyhd", logits.softmax(-1), xv), logits.logsumexp(-1)
    merged, merged_lse = merge_attentions([na, other], [na_lse, other_lse])
    torch.testing.assert_close(merged, joint, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged_lse, joint_lse, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(merged)
    for a, b in zip(torch.autograd.grad(merged, (q, k, xv), g), torch.autograd.grad(joint, (q, k, xv), g)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="at least|>= 2"):
        merge_attentions([na], [na_lse])


def test_rank_wrappers_and_validation():
    q1, k1, v1, _, _ = tensors(1, (9,))
    q3, k3, v3, _, _ = tensors(1, (5, 6, 7))
    torch.testing.assert_close(neighborhood_attention1d(q1, k1, v1, 3), neighborhood_attention(q1, k1, v1, 3))
    torch.testing.assert_close(neighborhood_attention3d(q3, k3, v3, 3), neighborhood_attention(q3, k3, v3, 3))
    with pytest.raises(ValueError, match=r"\[B, 1 spatial axes"):
        neighborhood_attention1d(q3, k3, v3, 3)
    with pytest.raises(ValueError, match="stride 4 exceeds kernel_size 3 along axis 1"):
        neighborhood_attention(q3, k3, v3, 3, stride=(1, 4, 1))
    with pytest.raises(ValueError, match=r"3\*3 = 9 exceeds the input axis 0 5 \(input 5x6x7\)"):
        neighborhood_attention(q3, k3, v3, 3, dilation=3)
    with pytest.raises(ValueError, match=r"kernel_size=\(3, 3\): expected one int or 3 of them"):
        neighborhood_attention(q3, k3, v3, (3, 3))
    with pytest.raises(ValueError, match=r"rpb must be \[heads, 2k-1, \.\.\.\] = \[2, 5, 5, 5\]"):
        neighborhood_attention(q3, k3, v3, 3, rpb=torch.zeros(2, 5, 5))
    with pytest.raises(ValueError, match=r"additional_keys/values must be \[B, M, heads, D\]"):
        neighborhood_attention(q3, k3, v3, 3, additional_keys=torch.zeros(1, 2, 3, 8),
                               additional_values=torch.zeros(1, 2, 3, 8))
    with pytest.raises(ValueError, match="backend='triton' covers 2-D"):
        neighborhood_attention(q3, k3, v3, 3, backend="triton")


@pytest.mark.parametrize("rank,size,kw", [
    (1, (13,), dict(kernel_size=5, stride=2, dilation=2, is_causal=True)),
    (3, (5, 7, 6), dict(kernel_size=(3, 3, 2), stride=(1, 3, 2), dilation=(1, 2, 1), is_causal=(True, False, False))),
])
def test_modules_match_natten_modules(rank, size, kw):
    import natten

    from vision.attention import NeighborhoodAttention1D, NeighborhoodAttention3D

    ours = {1: NeighborhoodAttention1D, 3: NeighborhoodAttention3D}[rank](32, 4, rel_pos_bias=False, **kw).eval()
    theirs = getattr(natten, f"NeighborhoodAttention{rank}D")(32, 4, **kw).eval()
    theirs.load_state_dict(ours.state_dict())  # same parameter names: qkv, proj
    x = torch.randn(2, *size, 32)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


def test_module_pads_small_inputs_and_learns_its_bias():
    from vision.attention import NeighborhoodAttention3D

    layer = NeighborhoodAttention3D(16, 2, kernel_size=3, dilation=(1, 2, 1))
    assert tuple(layer.rpb.shape) == (2, 5, 5, 5)
    x = torch.randn(1, 2, 7, 4, 16, requires_grad=True)  # axis 0 shorter than k, axis 1 than k*d: padded
    out = layer(x)
    assert out.shape == x.shape
    out.sum().backward()
    assert layer.rpb.grad.abs().sum() > 0 and x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"expects \[B, 3 spatial axes, C\]"):
        layer(torch.randn(1, 7, 7, 16))


def test_nat_unet3d_shapes_and_gradients():
    from vision.heads.nat_unet3d import NATUNet3D

    net = NATUNet3D(2, 3, embed_dim=8, depths=(1, 2), num_heads=(1, 2), dilations=((2,), (1, 3)))
    x = torch.randn(1, 2, 13, 18, 9)  # padded to multiples of 4, cropped back; small stages lower the dilation
    out = net(x)
    assert out.shape == (1, 3, 13, 18, 9)
    out.square().mean().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    with pytest.raises(ValueError, match="one entry per stage"):
        NATUNet3D(1, 2, depths=(1, 1), num_heads=(1,), dilations=((1,), (1,)))
