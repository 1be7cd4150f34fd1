"""L²ViT: linear and window attention, LWA/LGA blocks and the tiny model against the official fixtures."""

import pytest
import timm
import torch
from _fixtures import load

import vision
from vision.attention import LinearAttention, WindowAttention
from vision.models.l2vit import LGABlock, LWABlock


def check(module, fx, H, W):
    x = fx["input"].clone().requires_grad_()
    out = module(x.reshape(-1, H, W, x.shape[-1])).reshape(fx["output"].shape)
    torch.testing.assert_close(out, fx["output"], rtol=1e-4, atol=1e-5)
    (grad,) = torch.autograd.grad(out, x, fx["grad_output"])
    torch.testing.assert_close(grad, fx["grad_input"], rtol=1e-4, atol=1e-5)


def test_linear_attention_matches_official():
    fx = load("l2vit_linear_attn_layer")  # 40% of its denominators sit on the clamp at 100
    layer = LinearAttention(96, 3).eval()
    layer.load_state_dict(fx["state_dict"])
    check(layer, fx, 14, 14)


def test_window_attention_matches_official():
    fx = load("l2vit_window_attn_layer")
    layer = WindowAttention(96, 3, 7).eval()
    layer.load_state_dict(fx["state_dict"])
    check(layer, fx, 7, 7)


@pytest.mark.parametrize("name,block,H,W", [("l2vit_lwa_block_13x17", LWABlock, 13, 17),
                                            ("l2vit_lga_block", LGABlock, 14, 14)])
def test_blocks_match_official(name, block, H, W):
    fx = load(name)
    kw = fx["meta"]["kwargs"]
    layer = block(kw["dim"], kw["num_heads"]).eval()
    layer.load_state_dict({k.replace("local_mp.", "lcm."): v for k, v in fx["state_dict"].items()})
    check(layer, fx, H, W)


def test_tiny_model_matches_official(tmp_path):
    fx = load("l2vit_tiny_model")
    kw = fx["meta"]["kwargs"]
    path = tmp_path / "l2vit_official.pth"
    torch.save({"model": fx["state_dict"]}, path)
    model = vision.create_model("l2vit_tiny", pretrained_file=path, dims=kw["dims"], depths=kw["depths"],
                                num_heads=kw["num_heads"], num_classes=kw["num_classes"]).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(fx["input"]), fx["output"], rtol=1e-4, atol=1e-5)


def test_linear_attention_stays_fp32_under_autocast():
    torch.manual_seed(0)
    layer = LinearAttention(32, 2)
    x = torch.rand(1, 16, 16, 32) * 50  # K^T V sums over 256 tokens pass fp16's 65504: a half core overflows
    expected = layer(x)
    with torch.autocast("cpu", dtype=torch.float16):
        out = layer(x)
    assert out.dtype == torch.float16 and out.isfinite().all()
    assert (out.float() - expected).norm() / expected.norm() < 1e-2


def test_blocks_alternate_local_and_global():
    model = timm.create_model("l2vit_small")
    kinds = [type(b).__name__ for b in model.stages[2].blocks]
    assert kinds[:4] == ["LWABlock", "LGABlock", "LWABlock", "LGABlock"] and len(kinds) == 18
