"""What the attention-map callback draws: each mechanism's maps, the callback in a run, no effect on training."""

from pathlib import Path

import pytest
import timm
import torch
from _layouts import QUICK

import vision  # noqa: F401  (registers the models)
from vision.attention import (
    AgentAttention,
    BiLevelRoutingAttention,
    HiLoAttention,
    NeighborhoodAttention2D,
    VSAWindowAttention,
)
from vision.callbacks.attention_maps import collect_maps, confusion_image, overlay
from vision.utils import train


def test_neighborhood_maps_are_each_probe_window():
    torch.manual_seed(0)
    maps = NeighborhoodAttention2D(32, 2, kernel_size=5, dilation=2).attention_maps(torch.randn(2, 13, 11, 32))
    assert maps.shape == (2, 3, 13, 11)
    torch.testing.assert_close(maps.sum((2, 3)), torch.ones(2, 3))  # a softmax over the window
    assert ((maps > 0).sum((2, 3)) == 25).all()  # exactly k² keys, wherever the probe sits


def test_routing_maps_cover_topk_regions():
    maps = BiLevelRoutingAttention(32, 2, n_win=7, topk=4).attention_maps(torch.randn(2, 14, 21, 32))
    assert maps.shape == (2, 3, 14, 21)
    assert ((maps > 0).sum((2, 3)) == 4 * 2 * 3).all()  # 4 regions of 2x3 tokens


def test_agent_maps_are_distributions_over_keys():
    maps = AgentAttention(32, 2, agent_num=9).attention_maps(torch.randn(2, 13, 11, 32))
    torch.testing.assert_close(maps.sum((2, 3)), torch.ones(2, 3))


def test_vsa_default_windows_sample_every_position_once_per_head():
    layer = VSAWindowAttention(32, 2, window_size=4)  # offsets and scales start at zero
    assert (layer.attention_maps(torch.randn(2, 12, 8, 32)) == 2).all()


def test_hilo_maps_show_both_branches():
    maps = HiLoAttention(32, 4, window_size=2, alpha=0.5).attention_maps(torch.randn(1, 13, 11, 32))
    assert maps.shape == (1, 2, 13, 11) and (maps > 0).all()


@pytest.mark.parametrize("name", ["nat_mini", "biformer_tiny", "agent_swin_tiny", "agent_deit_tiny",
                                  "vsa_swin_tiny", "litv2_small", "evit_deit_tiny"])
def test_collect_maps_from_models(name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=5).train()
    images = torch.randn(2, 3, 64, 64)
    expected = model.eval()(images)
    model.train()
    rng = torch.get_rng_state()
    maps = collect_maps(model, images, max_layers=3)
    assert torch.equal(torch.get_rng_state(), rng) and model.training  # nothing a training run would notice
    assert 1 <= len(maps) <= 3
    for key, m in maps.items():
        assert m.shape[0] == 2 and m.shape[2:] == (64, 64), key
        assert m.isfinite().all() and m.min() >= 0 and m.max() <= 1, key
    torch.testing.assert_close(model.eval()(images), expected)  # hooks were removed
    grid = overlay(images, next(iter(maps.values())))
    assert grid.shape[0] == 3 and grid.min() >= 0 and grid.max() <= 1


def test_evit_maps_show_kept_tokens():
    model = timm.create_model("evit_deit_tiny", embed_dim=48).eval()
    maps = model.attention_maps(torch.randn(1, 3, 224, 224))
    assert maps.shape == (1, 3, 14, 14)
    kept = maps.sum((2, 3))[0].tolist()
    assert kept[0] == 138 and 96 <= kept[1] <= 98 and 68 <= kept[2] <= 70  # fused tokens have no position
    assert (maps[:, 1] <= maps[:, 0]).all() and (maps[:, 2] <= maps[:, 1]).all()  # pruned tokens stay pruned


def test_confusion_image_rows_normalised():
    image = confusion_image(torch.tensor([[3, 1], [0, 4]]), cell=2)
    assert image.shape == (3, 4, 4)
    assert image[0, 2, 2] == 1 and image[0, 2, 0] == 0  # row 1 is all on the diagonal


def _run(compose_cfg, visualize: int):
    overrides = [*QUICK, "model=nat_mini", "+model.backbone.kwargs.depths=[1,1,1,1]",
                 "data.train_subset=32", "data.batch_size=8",
                 "trainer.max_epochs=2", "trainer.limit_val_batches=2", "test=false",
                 "callbacks.model_checkpoint=null", f"visualize={visualize}"]
    _, objects = train(compose_cfg("train", overrides))
    return objects


def test_callback_draws_and_leaves_training_unchanged(compose_cfg, tmp_path):
    plain = _run(compose_cfg, 0)
    drawn = _run(compose_cfg, 1)
    for (name, a), b in zip(plain["model"].state_dict().items(), drawn["model"].state_dict().values()):
        assert torch.equal(a, b), name
    files = sorted(p.name for p in Path(tmp_path).rglob("attention_maps/*.png"))
    for epoch in (0, 1):
        assert f"epoch{epoch:03d}_val_confusion_matrix.png" in files, files
        assert sum(f.startswith(f"epoch{epoch:03d}_attention_") for f in files) == 4, files
