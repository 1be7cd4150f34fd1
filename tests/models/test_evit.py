"""EViT against the official youweiliang/evit (fixtures), token counts, the keep-rate schedule."""

import math

import pytest
import timm
import torch
from _fixtures import load

import vision
from vision.callbacks.keep_rate import keep_rate_at
from vision.models.evit import Block


@pytest.mark.parametrize("name", ["evit_block_keep07_fuse", "evit_block_keep07_nofuse"])
def test_block_matches_official(name):
    fx = load(name)
    kw = fx["meta"]["kwargs"]
    block = Block(kw["dim"], kw["num_heads"], keep_rate=kw["keep_rate"], fuse_token=kw["fuse_token"]).eval()
    block.load_state_dict(fx["state_dict"])
    x = fx["input"].clone().requires_grad_()
    out, idx = block(x)
    assert torch.equal(idx, fx["aux"]["topk_idx"])  # the same tokens, in the same (attention) order
    torch.testing.assert_close(out, fx["output"], rtol=1e-5, atol=1e-5)
    out.backward(fx["grad_output"])
    torch.testing.assert_close(x.grad, fx["grad_input"], rtol=1e-5, atol=1e-5)


def test_tiny_model_matches_official(tmp_path):
    fx = load("evit_deit_tiny_model")
    kw = fx["meta"]["kwargs"]
    path = tmp_path / "evit_official.pth"
    torch.save({"model": fx["state_dict"]}, path)
    model = vision.create_model("evit_deit_tiny", pretrained_file=path, embed_dim=kw["embed_dim"],
                                num_classes=kw["num_classes"], keep_rate=0.7, fuse_token=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(fx["input"]), fx["output"], rtol=1e-4, atol=1e-5)
        tokens = [t.shape[1] for t in model.forward_intermediates(fx["input"], output_fmt="NLC")[1]]
    assert tokens == fx["aux"]["left_tokens_per_block"]


@pytest.mark.parametrize("rate,fuse", [(0.7, True), (0.5, False), (0.9, True)])
def test_token_counts_follow_keep_rate(rate, fuse):
    model = timm.create_model("evit_deit_tiny", embed_dim=48, keep_rate=rate, fuse_token=fuse).eval()
    with torch.no_grad():
        _, blocks = model.forward_intermediates(torch.randn(1, 3, 224, 224), output_fmt="NLC")
    n, expected = 196, []
    for i in range(12):
        if i in (3, 6, 9):
            n = math.ceil(rate * n) + fuse
        expected.append(n)
    assert [b.shape[1] for b in blocks] == expected
    assert model.output_tokens(196) == expected[-1]


def test_training_keep_rate_overrides_only_in_training():
    model = timm.create_model("evit_deit_tiny", embed_dim=48, keep_rate=0.5)
    x = torch.randn(1, 3, 224, 224)
    model.train_keep_rate = 1.0  # start of the schedule: nothing pruned while training
    assert model.train().forward_features(x).shape[1] == 1 + 196
    assert model.eval().forward_features(x).shape[1] == 1 + model.output_tokens(196)


def test_keep_rate_schedule_is_the_published_one():
    steps = 10  # per epoch
    assert keep_rate_at(0, steps, 0.7) == 1.0
    assert keep_rate_at(10 * steps - 1, steps, 0.7) == 1.0  # ten epochs at full rate
    assert keep_rate_at(10 * steps, steps, 0.7) == pytest.approx(1.0)
    assert keep_rate_at(60 * steps, steps, 0.7) == pytest.approx(0.85)  # cosine midpoint
    assert keep_rate_at(110 * steps, steps, 0.7) == 0.7
    rates = [keep_rate_at(s, steps, 0.7) for s in range(0, 120 * steps, 7)]
    assert all(a >= b for a, b in zip(rates, rates[1:]))


def test_features_put_kept_tokens_back_on_the_grid():
    model = timm.create_model("evit_deit_tiny", embed_dim=48, features_only=True, out_indices=(2, 11)).eval()
    with torch.no_grad():
        early, late = model(torch.randn(1, 3, 224, 224))
    assert early.shape == late.shape == (1, 48, 14, 14)
    assert (early.abs().sum(1) > 0).all()  # before the first pruning block every position holds its token
    occupied = (late.abs().sum(1) > 0).sum().item()
    assert 68 <= occupied <= 70  # 70 tokens kept at block 9, minus any earlier fused tokens among them
