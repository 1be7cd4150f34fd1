"""BiFormer: bi-level routing attention and the tiny model against the official fixtures."""

import pytest
import timm
import torch
from _fixtures import bra_from_fixture, load

import vision
from vision.attention import BiLevelRoutingAttention
from vision.models.biformer import checkpoint_filter_fn


@pytest.mark.parametrize("name", ["biformer_bra_layer", "biformer_bra_layer_autopad_30x25"])
@pytest.mark.parametrize("max_chunk_elements", [2**24, 2000])  # one piece, and one query region at a time
def test_bra_matches_official(name, max_chunk_elements):
    layer, fx = bra_from_fixture(name, max_chunk_elements=max_chunk_elements)
    x = fx["input"].clone().requires_grad_()
    out = layer(x)
    torch.testing.assert_close(out, fx["output"], rtol=1e-4, atol=1e-5)
    (grad,) = torch.autograd.grad(out, x, fx["grad_output"])
    torch.testing.assert_close(grad, fx["grad_input"], rtol=1e-4, atol=1e-5)


def test_routing_matches_official_indices():
    layer, fx = bra_from_fixture("biformer_bra_layer")
    x = fx["input"]
    q, k, _ = layer.qkv(x).split([layer.qk_dim, layer.qk_dim, layer.dim], dim=-1)
    from vision.attention.routing import _to_regions

    index = layer.route(_to_regions(q, layer.n_win), _to_regions(k, layer.n_win))
    assert torch.equal(index, fx["aux"]["r_idx"].to(index.dtype))


def test_mask_padding_option():
    layer, fx = bra_from_fixture("biformer_bra_layer_autopad_30x25")
    masked, _ = bra_from_fixture("biformer_bra_layer_autopad_30x25", mask_padding=True)
    x = fx["input"]
    with torch.no_grad():
        assert not torch.allclose(masked(x), layer(x))  # padded keys no longer take part
        divisible = torch.randn(1, 28, 28, 64)
        torch.testing.assert_close(masked(divisible), layer(divisible))  # nothing to mask


def test_topk_equal_to_all_regions_is_full_attention_over_regions():
    layer = BiLevelRoutingAttention(32, 2, n_win=2, topk=4, side_dwconv=0).eval()
    x = torch.randn(1, 6, 6, 32)
    q, k, v = layer.qkv(x).split([32, 32, 32], dim=-1)
    attn = ((q.flatten(1, 2) * layer.scale).unflatten(-1, (2, 16)).transpose(1, 2)
            @ k.flatten(1, 2).unflatten(-1, (2, 16)).permute(0, 2, 3, 1)).softmax(-1)
    full = (attn @ v.flatten(1, 2).unflatten(-1, (2, 16)).transpose(1, 2)).transpose(1, 2).reshape(1, 6, 6, 32)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.proj(full), rtol=1e-5, atol=1e-6)


def test_torch_reference_chunks_bound_the_attention_matrix(monkeypatch):
    from kernels import bilevel_routing, bilevel_routing_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 13, 13, 2, 8, generator=g, requires_grad=True) for _ in range(3))
    index = torch.arange(4).expand(1, 4, 4)  # top-k = all 4 regions (7x7 tokens each after padding 13 -> 14)
    calls = []
    attend = bilevel_routing._attend
    monkeypatch.setattr(bilevel_routing, "_attend", lambda *a: calls.append(a[0].shape[2]) or attend(*a))
    # room for every region's gathered K/V (4 regions x 2 heads x 196 keys x 16) but not their attention matrices
    out = bilevel_routing_attention(q, k, v, index, 2, mask_padding=True, backend="torch", max_chunk_elements=4 * 6272)
    assert calls == [1, 1, 1, 1]  # one query region per chunk
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    # masked padding with every region routed is plain attention over the 13x13 real tokens
    ref = torch.nn.functional.scaled_dot_product_attention(*(t.flatten(1, 2).transpose(1, 2) for t in (q, k, v)))
    ref = ref.transpose(1, 2).unflatten(1, (13, 13))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for grad, ref_grad in zip(grads, torch.autograd.grad(ref.square().sum(), (q, k, v))):
        torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-6)


def tiny_from_fixture():
    fx = load("biformer_tiny_model")
    kw = fx["meta"]["kwargs"]
    model = timm.create_model(
        "biformer_tiny", depths=kw["depth"], embed_dims=kw["embed_dim"], qk_dims=kw["qk_dims"],
        head_dim=kw["head_dim"], topks=kw["topks"], num_classes=kw["num_classes"],
    ).eval()
    return model, fx


def test_tiny_model_matches_official():
    model, fx = tiny_from_fixture()
    model.load_state_dict(checkpoint_filter_fn(fx["state_dict"], model))
    with torch.no_grad():
        torch.testing.assert_close(model(fx["input"]), fx["output"], rtol=1e-4, atol=1e-5)


def test_official_checkpoint_file_loads(tmp_path):
    model, fx = tiny_from_fixture()
    path = tmp_path / "biformer_tiny_official.pth"
    torch.save({"model": fx["state_dict"]}, path)  # the released files wrap the weights in "model"
    kw = fx["meta"]["kwargs"]
    loaded = vision.create_model(
        "biformer_tiny", pretrained_file=path, depths=kw["depth"], embed_dims=kw["embed_dim"], qk_dims=kw["qk_dims"],
        head_dim=kw["head_dim"], num_classes=10,
    ).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(fx["input"]), fx["output"], rtol=1e-4, atol=1e-5)


def test_variants_follow_the_official_configs():
    small = timm.create_model("biformer_small")
    assert [len(s.blocks) for s in small.stages] == [4, 4, 18, 4]
    assert [s.blocks[0].attn.num_heads for s in small.stages] == [2, 4, 8, 8]  # stage 4: AttentionLePE, 8 heads
    assert [getattr(s.blocks[0].attn, "topk", -2) for s in small.stages] == [1, 4, 16, -2]
    assert small.stages[3].blocks[0].attn.qkv.bias is None
    assert small.stages[0].blocks[0].attn.scale == 64**-0.5  # qk_dim, not head_dim
