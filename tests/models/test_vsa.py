"""VSA (varied-size window attention) against the official fixtures, and the VSA-Swin models."""

import pytest
import timm
import torch
from _fixtures import load

from kernels import swin_table_to_rpb, window_attention2d
from vision.attention import VSAWindowAttention
from vision.attention.vsa import official_vsa_to_ours

TOL = dict(rtol=1e-4, atol=1e-5)
LAYERS = ["vsa_attn_layer", "vsa_attn_layer_13x17", "vsa_attn_layer_in48_out32_h1"]


def official_layer(name: str):
    fx = load(name)
    kw = fx["meta"]["kwargs"]
    layer = VSAWindowAttention(kw["dim"], kw["num_heads"], kw["out_dim"], kw["window_size"]).eval()
    layer.load_state_dict(official_vsa_to_ours(fx["state_dict"]))
    return layer, fx


@pytest.mark.parametrize("name", LAYERS)
def test_vsa_matches_official(name):
    """Official offset/scale predictors (default init, so windows really move); 13x17 pads to 14x21 and
    divides the offsets by the unpadded window counts; in48_out32 scales logits by 48**-0.5."""
    layer, fx = official_layer(name)
    x = fx["input"].clone().requires_grad_()  # NCHW, as the official layer takes it
    out = layer(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    torch.testing.assert_close(out, fx["output"], **TOL)
    (grad,) = torch.autograd.grad(out, x, fx["grad_output"])
    torch.testing.assert_close(grad, fx["grad_input"], **TOL)


def test_default_windows_match_official_coordinates():
    layer, fx = official_layer("vsa_attn_layer_13x17")
    layer.reset_sampling()  # no offset, no scale: the sampling grid is the official base grid
    grid = layer.sampling_grid(fx["input"].permute(0, 2, 3, 1))  # [B*heads, Hp, Wp, (x, y)]
    base = fx["aux"]["base_coords"]  # [1, (x, y), nh, ws, nw, ws]
    expected = base.reshape(2, 14, 21).permute(1, 2, 0).expand_as(grid)
    torch.testing.assert_close(grid, expected, rtol=0, atol=1e-6)


def test_zero_init_is_plain_window_attention():
    """Zero-initialised predictors sample exactly the default windows: VSA starts as window attention."""
    torch.manual_seed(0)
    layer = VSAWindowAttention(32, 2, window_size=4).eval()
    assert not layer.sampling_offsets.weight.any() and not layer.sampling_scales.bias.any()
    x = torch.randn(2, 8, 12, 32)
    q, k, v = layer.qkv(x).view(2, 8, 12, 3, 2, 16).unbind(3)
    rpb = swin_table_to_rpb(layer.relative_position_bias_table, 4)
    expected = layer.proj(window_attention2d(q, k, v, 4, rpb=rpb).reshape(2, 8, 12, 32))
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_any_size_and_gradients_reach_the_predictors():
    torch.manual_seed(0)
    layer = VSAWindowAttention(16, 2, out_dim=24, window_size=7, zero_init_sampling=False)
    for H, W in [(3, 5), (13, 17), (7, 7)]:  # smaller than one window, padded, exact
        x = torch.randn(1, H, W, 16, requires_grad=True)
        out = layer(x)
        assert out.shape == (1, H, W, 24) and torch.isfinite(out).all()
    out.square().mean().backward()
    assert (
        layer.sampling_offsets.weight.grad.abs().sum() > 0
        and layer.sampling_scales.weight.grad.abs().sum() > 0
    )


def test_vsa_swin_models():
    model = timm.create_model("vsa_swin_tiny", pretrained=False, num_classes=5, depths=(1, 1, 1, 1)).eval()
    assert all(not b.attn.sampling_offsets.weight.any() for s in model.stages for b in s.blocks)
    official_init = timm.create_model(
        "vsa_swin_tiny", pretrained=False, depths=(1, 1, 1, 1), zero_init_sampling=False
    )
    assert all(b.attn.sampling_offsets.weight.any() for s in official_init.stages for b in s.blocks)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 72, 100)).shape == (1, 5)
    assert len(timm.create_model("vsa_swin_small", pretrained=False).stages[2].blocks) == 18
