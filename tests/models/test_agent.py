"""Agent attention (Swin / PVT / DeiT variants) and the Agent-Swin, Agent-PVT, Agent-DeiT models against
the official fixtures, plus what the official code cannot do: other resolutions and agent counts."""

import pytest
import timm
import torch
import torch.nn.functional as F
from _fixtures import load

import vision
from vision.attention import AgentAttention, ClassAgentAttention
from vision.attention.agent import split_official_qkv
from vision.models.agent_swin import stage_attn_types

TOL = dict(rtol=1e-4, atol=1e-5)


def check_layer(module, fx, forward):
    module.load_state_dict(split_official_qkv(fx["state_dict"]))
    module.eval()
    x = fx["input"].clone().requires_grad_()
    out = forward(module, x)
    torch.testing.assert_close(out, fx["output"], **TOL)
    (grad,) = torch.autograd.grad(out, x, fx["grad_output"])
    torch.testing.assert_close(grad, fx["grad_input"], **TOL)


def on_grid(side):
    return lambda module, x: module(x.view(x.shape[0], side, side, -1)).view(x.shape)


@pytest.mark.parametrize(
    "name,module,side",
    [
        ("agent_swin_attn_layer", lambda: AgentAttention(96, 3, 49, 14), 14),
        ("agent_swin_attn_layer_ws12_a16", lambda: AgentAttention(64, 2, 16, 12), 12),
        ("agent_pvt_attn_layer", lambda: AgentAttention(64, 2, 49, 14), 14),
        ("agent_pvt_attn_layer_sr2", lambda: AgentAttention(64, 2, 49, 14, sr_ratio=2), 14),
    ],
)
def test_agent_attention_matches_official(name, module, side):
    check_layer(module(), load(name), on_grid(side))


def test_class_agent_attention_matches_official():
    fx = load("agent_deit_attn_layer")  # 1 class token + 14 x 14 patches
    check_layer(ClassAgentAttention(96, 3, 49, 14), fx, lambda module, x: module(x, (14, 14)))


@pytest.mark.parametrize(
    "family,fixture,kwarg_names",
    [
        (
            "agent_swin_tiny",
            "agent_swin_tiny_model",
            ("embed_dim", "depths", "num_heads", "window_size", "agent_num", "attn_type"),
        ),
        (
            "agent_pvt_tiny",
            "agent_pvt_tiny_model",
            ("embed_dims", "depths", "num_heads", "mlp_ratios", "agent_num", "agent_sr_ratios"),
        ),
        (
            "agent_deit_tiny",
            "agent_deit_tiny_model",
            ("embed_dim", "depth", "num_heads", "agent_num", "agent_layer"),
        ),
    ],
)
def test_tiny_models_match_official(tmp_path, family, fixture, kwarg_names):
    fx = load(fixture)
    kw = fx["meta"]["kwargs"]
    path = tmp_path / "official.pth"
    torch.save({"model": fx["state_dict"]}, path)  # official checkpoints wrap the weights in "model"
    model = vision.create_model(
        family, pretrained_file=path, num_classes=kw["num_classes"], **{k: kw[k] for k in kwarg_names}
    ).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(fx["input"]), fx["output"], **TOL)
    # the same weights run at another, non-square resolution (the official code asserts 224 x 224)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 160, 288, generator=torch.Generator().manual_seed(0)))
    assert out.shape == (1, 10) and torch.isfinite(out).all()


def test_biases_follow_the_grid():
    """At another grid, the biases learnt on 14 x 14 are resized: the same as a module learnt on 21 x 28
    whose per-row / per-column biases were resized axis by axis (linear interpolation is separable)."""
    torch.manual_seed(0)
    small = AgentAttention(32, 2, 16, bias_size=14, sr_ratio=2).eval()
    large = AgentAttention(32, 2, 16, bias_size=(21, 28), sr_ratio=2).eval()
    state = small.state_dict()

    def along(t, dim, size):  # 1-D linear resize of one axis
        t = t.movedim(dim, -1)
        shape = t.shape
        t = F.interpolate(t.reshape(-1, 1, shape[-1]), size=size, mode="linear").view(*shape[:-1], size)
        return t.movedim(-1, dim)

    state.update(
        ah_bias=along(state["ah_bias"], 3, 10),
        aw_bias=along(state["aw_bias"], 4, 14),
        ha_bias=along(state["ha_bias"], 2, 21),
        wa_bias=along(state["wa_bias"], 3, 28),
    )
    large.load_state_dict(state)
    x = torch.randn(2, 21, 28, 32)
    torch.testing.assert_close(small(x), large(x), rtol=1e-5, atol=1e-6)


def test_agent_count_can_change():
    torch.manual_seed(0)
    layer = AgentAttention(32, 2, 9, bias_size=8).eval()
    x = torch.randn(1, 12, 10, 32)
    out, (agent_attn, q_attn) = layer(x, return_attn=True)
    assert agent_attn.shape == (1, 2, 9, 120) and q_attn.shape == (1, 2, 120, 9)
    layer.agent_shape = (4, 5)  # 20 agents from biases learnt for 3 x 3
    more, (agent_attn, q_attn) = layer(x, return_attn=True)
    assert agent_attn.shape == (1, 2, 20, 120) and q_attn.shape == (1, 2, 120, 20)
    assert torch.isfinite(more).all() and not torch.allclose(more, out)


def test_class_agent_attention_keeps_class_token_out_of_pooling():
    """Agents are pooled from patch queries only, so moving the class token leaves the patch queries'
    attention over the agents unchanged (it still changes the class query and key)."""
    torch.manual_seed(0)
    layer = ClassAgentAttention(32, 2, 4, bias_size=6).eval()
    x = torch.randn(1, 1 + 5 * 7, 32)
    shifted = x.clone()
    shifted[:, 0] += 10.0
    out, (_, q_attn) = layer(x, (5, 7), return_attn=True)
    out_shifted, (_, q_attn_shifted) = layer(shifted, (5, 7), return_attn=True)
    assert out.shape == x.shape and q_attn.shape == (1, 2, 36, 4)
    torch.testing.assert_close(q_attn[:, :, 1:], q_attn_shifted[:, :, 1:])
    assert not torch.allclose(q_attn[:, :, 0], q_attn_shifted[:, :, 0])


def test_block_patterns():
    assert stage_attn_types("AAAB", (2, 2, 6, 2)) == [["A"] * 2, ["A"] * 2, ["A"] * 6, ["B"] * 2]
    assert stage_attn_types("AAMB2", (2, 2, 18, 2))[2] == ["A", "A"] + ["B"] * 16
    model = timm.create_model("agent_swin_small", pretrained=False)
    stage3 = [b.attn for b in model.stages[2].blocks]
    assert all(type(a).__name__ == "WindowAttention" for a in stage3)
    assert [a.shift_size for a in stage3[:2]] == [0, 3] and stage3[0].window_size == 7
    assert model.stages[3].blocks[1].attn.shift_size == 0  # the 7 x 7 map is one window, unshifted
    assert isinstance(model.stages[1].blocks[0].attn, AgentAttention)
    deit = timm.create_model("agent_deit_base", pretrained=False)
    assert [b.agent for b in deit.blocks] == [True] * 4 + [False] * 8
    assert deit.blocks[0].attn.agent_num == 81


def test_deit_vit_contract():
    """Agent-DeiT keeps timm's ViT conventions: token features, class-token head, NCHW intermediates."""
    model = timm.create_model(
        "agent_deit_tiny", pretrained=False, num_classes=5, depth=3, embed_dim=48
    ).eval()
    x = torch.randn(2, 3, 80, 96)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, 1 + 5 * 6, 48)
        final, inter = model.forward_intermediates(x)
        torch.testing.assert_close(final, feats)
        assert [t.shape for t in inter] == [(2, 48, 5, 6)] * 3
        assert model(x).shape == (2, 5)
        model.set_grad_checkpointing()
        torch.testing.assert_close(model.forward_features(x), feats)
        model.reset_classifier(0, "avg")
        torch.testing.assert_close(model(x), feats[:, 1:].mean(1))
    features = timm.create_model("agent_deit_tiny", features_only=True, depth=3, embed_dim=48).eval()
    with torch.no_grad():
        assert [f.shape for f in features(x)] == [(2, 48, 5, 6)] * 3


# Counted on the official models (LeapLabTHU/Agent-Attention@207ce3e, the released configs).
OFFICIAL_COUNTS = {
    "agent_swin_tiny": 28_902_964,
    "agent_swin_small": 49_666_684,
    "agent_swin_base": 88_095_096,
    "agent_pvt_tiny": 11_570_352,
    "agent_pvt_small": 20_635_066,
    "agent_pvt_medium": 35_921_746,
    "agent_pvt_large": 48_738_180,
    "agent_deit_tiny": 6_015_640,
    "agent_deit_small": 22_647_112,
    "agent_deit_base": 87_204_904,
}


@pytest.mark.parametrize("name", sorted(OFFICIAL_COUNTS))
def test_parameter_counts_equal_official(name):
    with torch.device("meta"):
        model = timm.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == OFFICIAL_COUNTS[name]
