"""Fused bi-level routing attention against the torch reference: outputs and dQ/dK/dV, fp32 and fp16.

Without a GPU the kernels run in Triton's interpreter (conftest sets ``TRITON_INTERPRET=1``), so the grids
are tiny but cover padded sizes (masked and unmasked), regions of several query tiles, routed keys in
several steps, per-head routing, different q/k and v widths and top-k = all regions. The reference always
runs in fp32.
"""

import pytest
import torch
import torch.nn.functional as F
from _compare import TOLERANCE, assert_backends_agree

from kernels import bilevel_routing, bilevel_routing_attention

pytestmark = pytest.mark.skipif(bilevel_routing.triton_bilevel is None, reason="triton is not installed (Linux only)")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# fp32 uses IEEE dots (no TF32); fp16 is compared with the fp32 reference, so its bound is fp16 rounding.

CASES = [  # (B, H, W, heads, Dqk, Dv), n_win, topk, per-head index, mask_padding, dtype
    ((1, 8, 8, 2, 16, 16), 2, 2, False, False, torch.float32),
    ((1, 7, 9, 2, 16, 32), 3, 4, False, False, torch.float32),  # padded, unmasked: zero keys take part
    ((1, 7, 9, 2, 16, 32), 3, 4, False, True, torch.float32),  # padded, masked
    ((1, 5, 6, 1, 32, 16), 4, 1, False, True, torch.float32),  # last region row all padding: empty rows are 0
    ((1, 18, 17, 1, 16, 16), 2, 2, False, False, torch.float32),  # 81-token regions: two query tiles each
    ((1, 8, 8, 2, 16, 16), 2, 4, False, True, torch.float32),  # top-k = all regions
    ((2, 10, 10, 2, 32, 16), 2, 3, True, False, torch.float16),  # per-head routing
    ((1, 7, 9, 2, 16, 16), 3, 9, False, True, torch.float16),  # padded, masked, top-k = all
]


def inputs(shape, n_win, topk, per_head, dtype, seed=0):
    B, H, W, heads, dqk, dv = shape
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, H, W, heads, dqk, generator=g).to(DEVICE, dtype).requires_grad_() for _ in range(2))
    v = torch.randn(B, H, W, heads, dv, generator=g).to(DEVICE, dtype).requires_grad_()
    regions = n_win * n_win
    scores = torch.rand(B, heads, regions, regions, generator=g) if per_head else torch.rand(B, regions, regions,
                                                                                              generator=g)
    return q, k, v, scores.topk(topk, dim=-1).indices.to(DEVICE)


def run(q, k, v, index, n_win, backend, grad, **kwargs):
    out = bilevel_routing_attention(q, k, v, index, n_win, backend=backend, **kwargs)
    return out, torch.autograd.grad(out, (q, k, v), grad)


@pytest.mark.parametrize("shape,n_win,topk,per_head,mask_padding,dtype", CASES)
def test_matches_torch(shape, n_win, topk, per_head, mask_padding, dtype):
    q, k, v, index = inputs(shape, n_win, topk, per_head, dtype)
    grad = torch.randn(*shape[:4], shape[5], generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    out, grads = run(q, k, v, index, n_win, "triton", grad, scale=0.3, mask_padding=mask_padding)
    ref_leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref, ref_grads = run(*ref_leaves, index, n_win, "torch", grad.float(), scale=0.3, mask_padding=mask_padding)

    assert out.dtype == dtype and out.shape == v.shape
    torch.testing.assert_close(out.float(), ref, **TOLERANCE[dtype])
    for name, got, want in zip("qkv", grads, ref_grads):
        assert got.dtype == dtype and got.shape == want.shape, name
        torch.testing.assert_close(got.float(), want, **TOLERANCE[dtype], msg=lambda m, n=name: f"d{n}: {m}")


def test_topk_all_regions_is_full_attention():
    """Routing to every region is plain attention over the grid (an oracle independent of the reference)."""
    q, k, v, index = inputs((1, 8, 12, 2, 16, 16), 4, 16, False, torch.float32)
    out = bilevel_routing_attention(q, k, v, index, 4, backend="triton")
    flat = lambda t: t.flatten(1, 2).transpose(1, 2)  # [B, heads, H*W, D]
    full = F.scaled_dot_product_attention(flat(q), flat(k), flat(v)).transpose(1, 2).reshape(v.shape)
    torch.testing.assert_close(out, full, **TOLERANCE[torch.float32])


def test_inverted_index_lists_every_routing_query_region():
    index = torch.tensor([[[2, 0], [2, 1], [0, 3], [2, 0]]])  # 4 query regions, top-2
    q_regions, offsets = bilevel_routing.triton_bilevel.inverted_index(index, 4)
    assert offsets.tolist() == [[0, 3, 4, 7, 8]]
    lists = [q_regions[0, offsets[0, r]:offsets[0, r + 1]].tolist() for r in range(4)]
    assert lists == [[0, 2, 3], [1], [0, 1, 3], [2]]


def test_backward_is_deterministic():
    q, k, v, index = inputs((1, 8, 8, 2, 16, 16), 2, 3, False, torch.float32)
    grad = torch.randn_like(v)
    first = run(q, k, v, index, 2, "triton", grad)[1]
    second = run(q, k, v, index, 2, "triton", grad)[1]
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_custom_op_registration():
    """Schema, fake (meta) implementation and autograd registration agree with the real kernels."""
    q, k, v, index = inputs((1, 6, 6, 1, 16, 16), 3, 2, False, torch.float32)
    op = torch.ops.vision_kernels.bilevel_routing_attention.default
    torch.library.opcheck(op, (q, k, v, index, 3, 0.25, True),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_compiles_without_graph_breaks():
    q, k, v, index = inputs((1, 6, 8, 1, 16, 16), 2, 2, False, torch.float32)

    def block(q, k, v):
        return bilevel_routing_attention(q.sin(), k, v, index, 2, mask_padding=True, backend="triton").relu().sum()

    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")  # the op stays one node fwd and bwd
    got, want = compiled(q, k, v), block(q, k, v)
    torch.testing.assert_close(got, want, **TOLERANCE[torch.float32])
    for a, b in zip(torch.autograd.grad(got, (q, v)), torch.autograd.grad(block(q, k, v), (q, v))):
        torch.testing.assert_close(a, b, **TOLERANCE[torch.float32])


def test_auto_backend_is_torch_on_cpu(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the fused kernels ran on CPU tensors under backend='auto'")

    monkeypatch.setattr(bilevel_routing.triton_bilevel, "routed_attention", refuse)
    q, k, v, index = inputs((1, 4, 4, 1, 16, 16), 2, 2, False, torch.float32)
    bilevel_routing_attention(q.cpu(), k.cpu(), v.cpu(), index.cpu(), 2)


def test_bad_inputs_are_named():
    q = torch.randn(1, 8, 8, 2, 16, device=DEVICE)
    index = torch.zeros(1, 4, 2, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match=r"region_index must be .*\[1, \(2,\) 9, topk\]"):
        bilevel_routing_attention(q, q, q, index, 3)
    with pytest.raises(ValueError, match="int32/int64"):
        bilevel_routing_attention(q, q, q, index.float(), 2)
    with pytest.raises(ValueError, match="'triton'"):
        bilevel_routing_attention(q, q, q, index, 2, backend="cuda")
    small = torch.randn(1, 8, 8, 2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="D=8"):
        bilevel_routing_attention(small, small, small, index, 2, backend="triton")


def test_biformer_bra_takes_the_fused_path_and_matches_official():
    """The official padded layer (30x25, 7x7 regions, top-3) gives the fixture's output and input gradient
    through the fused kernels too."""
    from _fixtures import bra_from_fixture

    layer, fx = bra_from_fixture("biformer_bra_layer_autopad_30x25")
    layer.backend = "triton"
    layer.to(DEVICE)
    x = fx["input"].to(DEVICE).requires_grad_()
    out = layer(x)
    torch.testing.assert_close(out.cpu(), fx["output"], rtol=1e-4, atol=1e-5)
    (grad,) = torch.autograd.grad(out, x, fx["grad_output"].to(DEVICE))
    torch.testing.assert_close(grad.cpu(), fx["grad_input"], rtol=1e-4, atol=1e-5)


def test_biformer_bra_masked_padding_matches_torch_backend():
    from vision.attention import BiLevelRoutingAttention

    torch.manual_seed(0)
    layer = BiLevelRoutingAttention(32, 2, n_win=2, topk=2, side_dwconv=3, mask_padding=True).to(DEVICE)
    x = torch.randn(1, 7, 6, 32, device=DEVICE)
    assert_backends_agree(layer, x, **TOLERANCE[torch.float32])


def test_out_of_range_region_ids_are_caught():
    """The kernels index K/V through the routing ids; an id outside [0, n_win²) must fail, not read past K."""
    q, k, v, index = inputs((1, 8, 8, 1, 16, 16), 2, 2, False, torch.float32)
    with pytest.raises(RuntimeError, match=r"region_index ids must lie in \[0, 4\)"):
        bilevel_routing_attention(q, k, v, index + 3, 2, backend="triton")  # ids 3..6 of 4 regions
