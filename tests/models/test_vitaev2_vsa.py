"""ViTAEv2-VSA against the official fixtures (a NormalCell and a reduced-width ``ViTAE_VSA_basic``)."""

import pytest
import timm
import torch
from _fixtures import load

from vision.models.vitaev2_vsa import NormalCell, ViTAEv2VSA, checkpoint_filter_fn

TOL = dict(rtol=1e-4, atol=1e-5)


def cell_prefix(state_dict: dict, prefix: str) -> dict:
    return {prefix + k: v for k, v in state_dict.items()}


def test_normal_cell_matches_official():
    """CPE on the attention branch only, PCM on the cell input, LN eps from the fixture (1e-5)."""
    fx = load("vsa_normalcell")
    kw = fx["meta"]["kwargs"]
    cell = NormalCell(kw["dim"], kw["num_heads"], kw["group"], kw["mlp_ratio"], kw["window_size"]).eval()
    for norm in (cell.norm1, cell.norm2):
        norm.eps = 1e-5  # the fixture's cell was built with nn.LayerNorm's default eps
    # the filter converts whole-model keys: wrap the cell's keys as normal cell 0 of stage 0
    converted = checkpoint_filter_fn(cell_prefix(fx["state_dict"], "layers.0.NC.0."), None)
    cell.load_state_dict({k.removeprefix("stages.0.blocks.0."): v for k, v in converted.items()})
    H, W = fx["meta"]["H"], fx["meta"]["W"]
    x = fx["input"].clone().requires_grad_()  # [B, N, C]
    out = cell(x.view(1, H, W, -1)).flatten(1, 2)
    torch.testing.assert_close(out, fx["output"], **TOL)
    (grad,) = torch.autograd.grad(out, x, fx["grad_output"])
    torch.testing.assert_close(grad, fx["grad_input"], **TOL)


def official_tiny() -> tuple[ViTAEv2VSA, dict]:
    fx = load("vsa_tiny_model")
    kw = fx["meta"]["kwargs"]
    model = ViTAEv2VSA(
        num_classes=kw["num_classes"],
        embed_dims=kw["embed_dims"],
        token_dims=kw["token_dims"],
        depths=kw["NC_depth"],
        num_heads=kw["NC_heads"],
        rc_heads=kw["RC_heads"],
        groups=kw["NC_group"],
        rc_groups=kw["RC_group"],
        wide_pcm=kw["wide_pcm"],
    ).eval()
    model.load_state_dict(checkpoint_filter_fn(fx["state_dict"], model))
    return model, fx


def test_model_matches_official():
    """Pyramid reduction (4 dilations, 7x7 stride 4), reduction cells without identity path, token mean."""
    model, fx = official_tiny()
    x = fx["input"].clone().requires_grad_()
    out = model(x)
    torch.testing.assert_close(out, fx["output"], **TOL)
    out.square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("size", [(97, 131), (33, 40), (64, 64)])
def test_any_size(size):
    """Odd and non-square sizes: every pyramid-reduction branch lines up with the parallel convolutions."""
    model, _ = official_tiny()
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        out, feats = model.forward_intermediates(x)
    assert out.shape[-2:] == feats[-1].shape[-2:]
    expected = list(size)
    for i, (feat, info) in enumerate(zip(feats, model.feature_info)):
        expected = [-(-s // (2 if i else 4)) for s in expected]  # ceil division by the stage's stride
        assert list(feat.shape[1:]) == [info["num_chs"], *expected]


def test_variants_and_official_init():
    """Parameter counts equal the official architecture's; VSA's predictors keep the official default init
    unless asked to start on the default windows."""
    model = timm.create_model("vitaev2_vsa_s", depths=(1, 1, 1, 1))
    cell = model.stages[1].blocks[0]
    assert cell.attn.sampling_offsets.weight.any() and cell.norm1.eps == 1e-6
    assert model.stages[1].downsample.norm1.eps == 1e-5
    zero = timm.create_model("vitaev2_vsa_s", depths=(1, 1, 1, 1), zero_init_sampling=True)
    assert not zero.stages[1].blocks[0].attn.sampling_offsets.weight.any()
    wide = timm.create_model("vitaev2_vsa_48m", depths=(1, 1, 1, 1))
    assert wide.stages[1].downsample.pcm[0].out_channels == 2 * 192
