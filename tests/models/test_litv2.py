"""LITv2: HiLo attention, deformable token merging and the small model against the official fixtures."""

import pytest
import timm
import torch
from _fixtures import load

import vision
from vision.attention import HiLoAttention
from vision.models.litv2 import DeformableTokenMerging, checkpoint_filter_fn


@pytest.mark.parametrize("name", ["litv2_hilo_layer", "litv2_hilo_layer_alpha09_12x16", "litv2_hilo_layer_pad_13x11"])
def test_hilo_matches_official(name):
    fx = load(name)
    kw, H, W = fx["meta"]["kwargs"], fx["meta"]["H"], fx["meta"]["W"]
    layer = HiLoAttention(kw["dim"], kw["num_heads"], kw["window_size"], kw["alpha"], qkv_bias=kw["qkv_bias"]).eval()
    layer.load_state_dict(fx["state_dict"])
    x = fx["input"].clone().requires_grad_()
    out = layer(x.unflatten(1, (H, W))).flatten(1, 2)
    torch.testing.assert_close(out, fx["output"], rtol=1e-4, atol=1e-5)
    (grad,) = torch.autograd.grad(out, x, fx["grad_output"])
    torch.testing.assert_close(grad, fx["grad_input"], rtol=1e-4, atol=1e-5)


def test_hilo_head_split():
    layer = HiLoAttention(96, 6, window_size=2, alpha=0.9)
    assert (layer.l_heads, layer.h_heads) == (5, 1)  # int(6 * 0.9) Lo-Fi heads
    everything_lofi = HiLoAttention(96, 6, window_size=1, alpha=0.5)
    assert (everything_lofi.l_heads, everything_lofi.h_heads) == (6, 0)


def test_deformable_token_merging_matches_official():
    fx = load("litv2_dtm_layer")
    official = {f"layers.0.downsample.{k}": v for k, v in fx["state_dict"].items()}
    ours = {k.removeprefix("stages.1.downsample."): v for k, v in checkpoint_filter_fn(official, None).items()}
    layer = DeformableTokenMerging(32, 64).eval()
    layer.load_state_dict(ours)
    assert layer.conv_offset.weight.abs().sum() > 0  # the fixture's offsets are really deformable
    x = fx["input"].clone().requires_grad_()
    out = layer(x.unflatten(1, (14, 14))).flatten(1, 2)
    torch.testing.assert_close(out, fx["output"], rtol=1e-4, atol=1e-5)
    (grad,) = torch.autograd.grad(out, x, fx["grad_output"])
    torch.testing.assert_close(grad, fx["grad_input"], rtol=1e-4, atol=1e-5)


def _deformable_merging(dim: int = 4, seed: int = 0) -> DeformableTokenMerging:
    """A small merging layer whose offsets are non-zero (the official init makes them zero)."""
    torch.manual_seed(seed)
    layer = DeformableTokenMerging(dim, 2 * dim)
    torch.nn.init.normal_(layer.conv_offset.weight, std=0.3)
    torch.nn.init.normal_(layer.conv_offset.bias, std=0.3)
    return layer


def test_deformable_token_merging_gradcheck_float64():
    layer = _deformable_merging().double()
    x = torch.randn(2, 6, 6, 4, dtype=torch.float64, requires_grad=True)
    assert layer(x).dtype == torch.float64  # merged in the input's precision, not cast to fp32
    assert torch.autograd.gradcheck(layer, (x,), eps=1e-6, atol=1e-5)


def test_deformable_token_merging_runs_with_bf16_weights():
    layer = _deformable_merging().eval()
    x = torch.randn(2, 6, 6, 4)
    with torch.no_grad():
        ref = layer(x)
        out = layer.to(torch.bfloat16)(x.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05)


def test_small_model_matches_official(tmp_path):
    fx = load("litv2_small_model")
    kw = fx["meta"]["kwargs"]
    path = tmp_path / "litv2_official.pth"
    torch.save({"model": fx["state_dict"]}, path)
    model = vision.create_model("litv2_small", pretrained_file=path, embed_dim=kw["embed_dim"], depths=kw["depths"],
                                num_heads=kw["num_heads"], num_classes=kw["num_classes"]).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(fx["input"]), fx["output"], rtol=1e-4, atol=1e-5)


def test_variants_follow_the_official_configs():
    model = timm.create_model("litv2_medium")
    assert [len(s.blocks) for s in model.stages] == [2, 2, 18, 2]
    assert [s.blocks[0].attn is None for s in model.stages] == [True, True, False, False]
    assert model.stages[2].blocks[0].attn.window_size == 2 and model.stages[3].blocks[0].attn.h_heads == 0
