"""The shared model battery: every model this package registers keeps timm's contract.

Models are found through ``vision.list_models()``; every module of ``vision/models`` not starting with ``_`` is a
family that registers itself, so a new family file is in the battery by existing. Each family module publishes ``PUBLISHED_PARAMS`` (the papers'
parameter counts as printed, e.g. ``"13.1M"``) that the count check compares against. Inputs are small (64 px) to stay fast on CPU.
"""

import importlib
import math
from pathlib import Path

import pytest
import timm
import torch

import vision
from vision.models import FAMILIES

MODELS = vision.list_models()
SIZE = 64
PUBLISHED = {
    name: count
    for family in FAMILIES
    for name, count in getattr(importlib.import_module(f"vision.models.{family}"), "PUBLISHED_PARAMS", {}).items()
}


def create(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **kwargs)


def image(batch: int = 2, height: int = SIZE, width: int = SIZE, chans: int = 3) -> torch.Tensor:
    return torch.randn(batch, chans, height, width, generator=torch.Generator().manual_seed(1))


def test_every_family_file_is_in_the_battery():
    """Every family file on disk registers variants with timm, and all of them are in MODELS."""
    on_disk = sorted(p.stem for p in Path(vision.models.__file__).parent.glob("*.py") if not p.stem.startswith("_"))
    assert on_disk and list(FAMILIES) == on_disk
    for family in on_disk:
        registered = timm.list_models(module=family)
        assert registered, f"vision/models/{family}.py registers no model with timm"
        assert set(registered) <= set(MODELS), f"{family}: {sorted(set(registered) - set(MODELS))} not in the battery"


def matches_published(count: int, published: str) -> bool:
    """Within 1% of the paper's figure, or equal to it at the precision the paper prints ("29M")."""
    millions = float(published.removesuffix("M"))
    decimals = len(published.removesuffix("M").partition(".")[2])
    return abs(count - millions * 1e6) <= 0.01 * millions * 1e6 or round(count / 1e6, decimals) == millions


def test_published_count_check():
    assert matches_published(13_142_760, "13.1M") and matches_published(28_596_781, "29M")
    assert not matches_published(13_300_000, "13.1M") and not matches_published(28_400_000, "29M")


@pytest.mark.parametrize("name", MODELS)
def test_parameter_count_matches_published(name):
    assert name in PUBLISHED, f"{name}: add its published parameter count to PUBLISHED_PARAMS"
    with torch.device("meta"):
        model = timm.create_model(name)
    count = sum(p.numel() for p in model.parameters())
    assert matches_published(count, PUBLISHED[name]), f"{name}: {count:,} vs {PUBLISHED[name]}"


@pytest.mark.parametrize("name", MODELS)
def test_forward(name):
    model = create(name, num_classes=10).eval()
    with torch.no_grad():
        out = model(image())
    assert out.shape == (2, 10) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", MODELS)
def test_backward_reaches_every_parameter(name):
    model = create(name, num_classes=10).train()
    model(image()).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient: {missing[:5]}"


# grad checkpointing is checked in training mode, gradients against the plain run, in tests/models/test_timm_contract.py


@pytest.mark.parametrize("name", MODELS)
def test_timm_contract(name):
    model = create(name, num_classes=10).eval()
    cfg = model.pretrained_cfg
    x = image()
    with torch.no_grad():
        feats = model.forward_features(x)
        reduction = model.feature_info[-1]["reduction"]
        side = math.ceil(SIZE / reduction)
        if getattr(model, "num_prefix_tokens", 0):  # ViT-like (timm's *_non_std contract): [B, prefix + H*W, C]
            tokens = model.output_tokens(side * side) if hasattr(model, "output_tokens") else side * side  # pruning
            assert feats.shape == (2, model.num_prefix_tokens + tokens, model.num_features)
        else:
            assert feats.shape == (2, model.num_features, side, side)
            assert tuple(cfg["pool_size"]) == tuple(s // reduction for s in cfg["input_size"][1:])
        assert model.forward_head(feats, pre_logits=True).shape == (2, model.head_hidden_size)
        final, intermediates = model.forward_intermediates(x)
        torch.testing.assert_close(final, feats)
        assert len(intermediates) == len(model.feature_info)
        state = model.state_dict()
        first_convs = (cfg["first_conv"],) if isinstance(cfg["first_conv"], str) else cfg["first_conv"]  # timm: str or tuple
        assert cfg["classifier"] + ".weight" in state and all(c + ".weight" in state for c in first_convs)
        model.reset_classifier(0)
        assert model(x).shape == (2, model.num_features)
        model.reset_classifier(0, "")
        assert model(x).ndim == feats.ndim
    pooled = create(name, num_classes=0, global_pool="").eval()
    with torch.no_grad():
        assert pooled(x).ndim == feats.ndim
    assert isinstance(model.no_weight_decay(), (set, list, tuple))
    assert model.group_matcher()["stem"]


@pytest.mark.parametrize("name", MODELS)
def test_features_only(name):
    model = create(name, features_only=True).eval()
    with torch.no_grad():
        feats = model(image())
    assert len(feats) >= 3
    assert [f.shape[1] for f in feats] == model.feature_info.channels()
    for f, reduction in zip(feats, model.feature_info.reduction()):
        assert f.shape[-1] <= math.ceil(SIZE / reduction) + 1


@pytest.mark.parametrize("name", MODELS)
def test_odd_non_square_input(name):
    model = create(name, num_classes=10).eval()
    with torch.no_grad():
        out = model(image(1, 97, 131))
    assert out.shape == (1, 10) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", MODELS)
def test_torch_compile_matches_eager(name):
    model = create(name, num_classes=10).eval()
    x = image(1)
    with torch.no_grad():
        expected = model(x)
        compiled = torch.compile(model, backend="eager", fullgraph=False)
        torch.testing.assert_close(compiled(x), expected, rtol=1e-5, atol=1e-5)
