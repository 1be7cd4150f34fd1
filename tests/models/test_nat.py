"""NAT / DiNAT: the attention layer against NATTEN's fixtures, official checkpoints, variant specs."""

import re

import pytest
import timm
import torch
from _fixtures import load

import vision
from vision.attention import NeighborhoodAttention2D


@pytest.mark.parametrize("name", ["natten_nat_layer_k7", "natten_nat_layer_k7_d2_15x17"])
def test_layer_matches_natten_module(name):
    fx = load(name)
    kw = fx["meta"]["kwargs"]
    layer = NeighborhoodAttention2D(kw["embed_dim"], kw["num_heads"], kw["kernel_size"], kw["dilation"],
                                    rel_pos_bias=False).eval()  # natten >= 0.20 has no RPB
    layer.load_state_dict(fx["state_dict"])
    x = fx["input"].clone().requires_grad_()
    out = layer(x)
    torch.testing.assert_close(out, fx["output"], rtol=1e-4, atol=1e-5)
    (grad,) = torch.autograd.grad(out, x, fx["grad_output"])
    torch.testing.assert_close(grad, fx["grad_input"], rtol=1e-4, atol=1e-5)


def to_official(state_dict: dict) -> dict:
    """Our keys written back in the official repository's layout (levels with trailing downsample)."""
    out = {}
    for key, value in state_dict.items():
        key = key.replace("stem.", "patch_embed.")
        key = re.sub(r"^stages\.(\d+)\.downsample\.", lambda m: f"levels.{int(m.group(1)) - 1}.downsample.", key)
        key = re.sub(r"^stages\.(\d+)\.blocks\.", r"levels.\1.blocks.", key)
        key = re.sub(r"\.ls([12])\.gamma$", r".gamma\1", key)
        out[key] = value
    return out


@pytest.mark.parametrize("name", ["nat_mini", "dinat_base"])  # without and with layer scale
def test_official_checkpoint_loads_through_filter(name, tmp_path):
    source = timm.create_model(name).eval()
    official = to_official(source.state_dict())
    assert any(k.startswith("levels.0.downsample.") for k in official)
    assert any(k.endswith(".gamma1") for k in official) == (name == "dinat_base")
    path = tmp_path / f"{name}.pth"
    torch.save({"model": official}, path)
    loaded = vision.create_model(name, pretrained_file=path).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), source(x), rtol=0, atol=0)


def test_variants_follow_the_official_configs():
    nat, dinat = timm.create_model("nat_small"), timm.create_model("dinat_tiny")
    assert [len(s.blocks) for s in nat.stages] == [3, 4, 18, 5]
    assert [s.blocks[0].attn.num_heads for s in nat.stages] == [3, 6, 12, 24]
    assert nat.num_features == 768 and not isinstance(nat.stages[0].blocks[0].ls1, torch.nn.Identity)
    assert [b.attn.dilation for b in dinat.stages[0].blocks] == [1, 8, 1]
    assert [b.attn.dilation for b in dinat.stages[2].blocks][:4] == [1, 2, 1, 2]
    assert isinstance(dinat.stages[0].blocks[0].ls1, torch.nn.Identity)
    assert {n for n in nat.no_weight_decay()} == {n for n, _ in nat.named_parameters() if n.endswith("rpb")}


def test_small_inputs_pad_or_reduce_dilation():
    x = torch.randn(1, 3, 96, 80)  # stage-1 grid 24x20: too small for dilation 8 with kernel 7
    padded = timm.create_model("dinat_mini", num_classes=5).eval()
    reduced = timm.create_model("dinat_mini", num_classes=5, dilation_policy="reduce").eval()
    reduced.load_state_dict(padded.state_dict())
    with torch.no_grad():
        a, b = padded(x), reduced(x)
    assert a.shape == b.shape == (1, 5) and torch.isfinite(a).all() and torch.isfinite(b).all()
    assert not torch.allclose(a, b)  # two different, documented behaviours
