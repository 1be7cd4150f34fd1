"""DToP: dense coverage, equality with the unpruned model, real token skipping, exit logits, loss, sizes."""

import pytest
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from torch import nn

from vision.heads.dtop import VARIANTS, create_dtop, easy_tokens

K = 5


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_dtop("dtop_tiny", num_classes=K).eval()


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(1)
    return torch.randn(2, 3, 32, 48)


def run(model, images, threshold):
    model.threshold = threshold
    with torch.no_grad():
        return model(images)


def plain_trunk(model, images):
    """Patch tokens after position embedding, written from timm's own pieces (its pos-embed resampler)."""
    vit = model.backbone
    x = vit.patch_embed(images)
    pos = resample_abs_pos_embed(vit.pos_embed, list(x.shape[1:3]), list(vit.patch_embed.grid_size),
                                 num_prefix_tokens=1, interpolation="bicubic", antialias=False)
    return x.flatten(1, 2) + pos[:, 1:], x.shape[1:3]


def scores_to_image(model, cls, masks, grid, size):
    scores = cls.softmax(-1)[..., :1] * masks.sigmoid()
    scores = scores.view(scores.shape[0], K, *grid)
    p = model.patch_size
    return F.interpolate(scores, size=(grid[0] * p[0], grid[1] * p[1]), mode="bilinear")[..., :size[0], :size[1]]


def test_threshold_above_one_equals_unpruned_model(model, images):
    out = run(model, images, 1.01)
    with torch.no_grad():  # the unpruned DToP: every block on every token, the last head's prediction
        x, grid = plain_trunk(model, images)
        for block in model.backbone.blocks:
            x = block(x)
        cls, masks = model.heads[-1](x)
        expected = scores_to_image(model, cls, masks, grid, images.shape[-2:])
    torch.testing.assert_close(out["logits"], expected, rtol=1e-5, atol=1e-6)
    n = grid[0] * grid[1]
    assert (out["kept"] == n).all() and (out["exit_head"] == len(model.heads) - 1).all()


@pytest.mark.parametrize("threshold,size", [(1.01, (36, 44)), (0.25, (32, 48)), (0.0, (36, 44))])
def test_every_pixel_is_covered(model, threshold, size):  # 36 x 44 is padded to whole 8 px patches
    torch.manual_seed(2)
    out = run(model, torch.randn(2, 3, *size), threshold)
    logits = out["logits"]
    assert logits.shape == (2, K, *size)
    assert torch.isfinite(logits).all() and (logits >= 0).all() and (logits <= 1).all()
    grid = (-(-size[0] // 8), -(-size[1] // 8))
    assert out["exit_head"].shape == (2, *grid)
    assert ((out["exit_head"] >= 0) & (out["exit_head"] < len(model.heads))).all()  # every token has a head
    assert all(h["masks"].shape == (2, K, *grid) for h in out["heads"])


def test_pruned_tokens_skip_later_layers(model, images):
    calls = []
    hooks = [b.register_forward_hook(lambda m, i, o, d=d: calls.append((d, i[0].shape[0], i[0].shape[1])))
             for d, b in enumerate(model.backbone.blocks)]
    try:
        out = run(model, images, 0.0)
    finally:
        for h in hooks:
            h.remove()
    n, first = 4 * 6, model.out_indices[0]
    ran = torch.zeros(2, len(model.backbone.blocks), dtype=torch.long)  # tokens each block really processed
    for d, batch, tokens in calls:
        if batch == 2:
            ran[:, d] += tokens
        else:  # per image, in batch order
            ran[(ran[:, d] > 0).sum(), d] += tokens
    assert torch.equal(ran, out["kept"])
    assert (ran[:, : first + 1] == n).all()
    assert (ran[:, first + 1:] < n).all()  # threshold 0: all but the top-k of each class exit
    exited = (out["exit_head"] == 0).flatten(1).sum(1)
    assert torch.equal(ran[:, -1], n - exited)


def test_remaining_tokens_run_alone(model, images):
    """The last head's logits of the survivors are those of the later blocks run on the survivors only."""
    out = run(model, images, 0.25)
    first = model.out_indices[0]
    with torch.no_grad():
        x, _ = plain_trunk(model, images)
        for block in model.backbone.blocks[: first + 1]:
            x = block(x)
        for b in range(2):
            keep = (out["exit_head"][b].flatten() > 0).nonzero().squeeze(1)
            assert 0 < len(keep) < x.shape[1]
            t = x[b: b + 1, keep]
            for block in model.backbone.blocks[first + 1:]:
                t = block(t)
            cls, masks = model.heads[-1](t)
            torch.testing.assert_close(out["heads"][-1]["masks"][b].flatten(1)[:, keep], masks[0],
                                       rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(out["heads"][-1]["cls"][b], cls[0], rtol=1e-5, atol=1e-5)


def test_exited_tokens_keep_their_exit_heads_logits(model, images):
    out = run(model, images, 0.25)
    exit_head, first, last = out["exit_head"], out["heads"][0]["masks"], out["heads"][-1]["masks"]
    exited = (exit_head == 0)[:, None].expand_as(last)
    assert exited.any() and (~exited).any()
    assert torch.equal(last[exited], first[exited])
    assert not torch.allclose(last[~exited], first[~exited])  # survivors were re-predicted
    grid = exit_head.shape[1:]
    expected = scores_to_image(model, out["heads"][-1]["cls"], last.flatten(2), grid, images.shape[-2:])
    torch.testing.assert_close(out["logits"], expected, rtol=1e-5, atol=1e-6)


def test_easy_tokens_rule():
    cls = torch.tensor([[9.0, -9.0], [9.0, -9.0]])  # both classes present with probability ~1
    conf = torch.tensor([0.99, 0.98, 0.97, 0.96, 0.95, 0.94, 0.93, 0.92, 0.99, 0.5])
    label = torch.tensor([0, 0, 0, 0, 0, 0, 0, 0, 1, 0])
    masks = torch.full((2, 10), -9.0)
    masks[label, torch.arange(10)] = torch.logit(conf.double()).float()
    easy = easy_tokens(cls, masks, threshold=0.9, top_k=5)
    # class 0: 8 easy tokens, its 5 most confident stay; class 1: 1 easy token, stays; token 9 is hard
    assert easy.tolist() == [False] * 5 + [True] * 3 + [False, False]
    assert not easy_tokens(cls, masks, threshold=1.0, top_k=5).any()


def test_loss_is_finite_and_reaches_every_head(model, images):
    torch.manual_seed(3)
    net = create_dtop("dtop_tiny", num_classes=K, threshold=0.25).train()
    net.load_state_dict(model.state_dict())
    target = torch.randint(0, 3, (2, 32, 48))
    target[0, :4] = 255
    out = net(images)
    assert (out["kept"][:, -1] < out["kept"][:, 0]).all()  # pruning is active in training
    losses = net.loss(out, target)
    assert set(losses) == {f"loss_{n}_{j}" for n in ("ce", "mask", "dice") for j in range(2)} | {"loss"}
    assert all(torch.isfinite(v) for v in losses.values())
    torch.testing.assert_close(losses["loss"], sum(v for k, v in losses.items() if k != "loss"))
    # classes 0..2 present in both images, 3..4 absent: the CE asks each query "is my class here?"
    cls = out["heads"][0]["cls"]
    absent = torch.tensor([0, 0, 0, 1, 1]).repeat(2)
    ce = F.cross_entropy(cls.flatten(0, 1), absent, weight=torch.tensor([1.0, 0.1]))
    torch.testing.assert_close(losses["loss_ce_0"], ce)
    losses["loss"].backward()
    for j, head in enumerate(net.heads):
        for name, p in head.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"head {j}: {name} got no gradient"
    assert net.backbone.blocks[-1].mlp.fc2.weight.grad.abs().sum() > 0


def test_bad_input_is_rejected(model):
    with pytest.raises(ValueError, match=r"images \[B, 3, H, W\]"):
        model(torch.randn(1, 1, 32, 32))
    out = run(model, torch.randn(1, 3, 32, 32), 1.01)
    with pytest.raises(ValueError, match="target must be"):
        model.loss(out, torch.zeros(1, 16, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="target classes"):
        model.loss(out, torch.full((1, 32, 32), K, dtype=torch.long))
    with pytest.raises(ValueError, match="out_indices"):
        create_dtop("dtop_tiny", out_indices=(1, 2))
    with pytest.raises(ValueError, match="unknown DToP variant"):
        create_dtop("dtop_vit_huge")


def official_param_count(embed, depth, grid, head_dim, num_classes, n_heads, layers=3):
    """The official ViT_prune + PruneHeads, counted from the torch modules they are made of."""
    count = lambda *ms: sum(p.numel() for m in ms for p in m.parameters())
    vit_layer = count(nn.LayerNorm(embed), nn.MultiheadAttention(embed, 1), nn.LayerNorm(embed),
                      nn.Linear(embed, 4 * embed), nn.Linear(4 * embed, embed))
    vit = count(nn.Conv2d(3, embed, 16, 16)) + embed + (1 + grid**2) * embed + depth * vit_layer  # + cls, pos
    tpn = nn.TransformerDecoderLayer(head_dim, 1, 4 * head_dim)
    tpn_layer = count(tpn) - count(tpn.multihead_attn) + 4 * count(nn.Linear(head_dim, head_dim))
    head = (count(nn.Linear(embed, head_dim), nn.LayerNorm(head_dim), nn.Embedding(num_classes, head_dim),
                  nn.Linear(head_dim, 2)) + layers * tpn_layer)
    return vit + n_heads * head


@pytest.mark.parametrize("name,embed,depth,grid,head_dim", [("dtop_vit_base", 768, 12, 32, 384),
                                                             ("dtop_vit_large", 1024, 24, 40, 512)])
def test_parameter_count_matches_official(name, embed, depth, grid, head_dim):
    with torch.device("meta"):
        net = create_dtop(name)
    ours = sum(p.numel() for p in net.parameters())
    assert ours == official_param_count(embed, depth, grid, head_dim, 150, len(VARIANTS[name]["out_indices"]))
    if name == "dtop_vit_base":
        assert ours == 108_795_654


def test_benchmark_counts_flops_with_pruning_in_effect():
    import sys
    from pathlib import Path

    from torch.utils.flop_counter import FlopCounterMode

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import bench_dtop

    torch.manual_seed(0)
    net = create_dtop("dtop_tiny", num_classes=K, img_size=64, threshold=1.01).eval()
    x = torch.randn(1, 3, 64, 64)
    full = bench_dtop.gmacs(net, x)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(x)
    n, dim, depth = 64, 64, 4  # the attention matmuls (q k^T and attn v) the fused path hides from the counter
    assert (full - counter.get_total_flops() / 2e9) * 1e9 == pytest.approx(depth * 2 * n * n * dim)
    assert all(m.fused_attn for m in net.modules() if hasattr(m, "fused_attn"))  # restored
    net.threshold = 0.0
    assert bench_dtop.exit_shares(net, x)[0] > 0.5
    assert bench_dtop.gmacs(net, x) < 0.75 * full


def test_backbone_loads_a_local_timm_checkpoint(tmp_path):
    import timm

    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, **VARIANTS["dtop_tiny"]["backbone_kwargs"])
    torch.save(vit.state_dict(), tmp_path / "vit.pth")
    net = create_dtop("dtop_tiny", num_classes=K, img_size=64, pretrained_file=tmp_path / "vit.pth")
    torch.testing.assert_close(net.backbone.blocks[2].mlp.fc1.weight, vit.blocks[2].mlp.fc1.weight)
    assert net.backbone.pos_embed.shape == (1, 1 + 8 * 8, 64)  # resized from the checkpoint's 4x4 grid
