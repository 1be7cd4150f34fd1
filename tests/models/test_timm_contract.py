"""What timm's own model tests check, beyond the shared battery (tests/models/test_models.py), written as our own:
default-cfg consistency, ``forward_intermediates`` options, ``features_only`` with ``out_indices``, grad
checkpointing in training mode, FX tracing (timm's leaves), ``torch.export`` with dynamic height/width, ONNX
against eager, and pretrained weights by name served from a ``file://`` URL through timm's download path.

Cheap checks run on every registered model; slow ones on the smallest variant of each family.
"""

from __future__ import annotations

import math
import re

import pytest
import timm
import torch
from _fixtures import load
from timm.data import resolve_model_data_config
from timm.models import create_feature_extractor, get_graph_node_names
from torch.export import Dim

import vision

MODELS = vision.list_models()
_RANK = {"mini": 0, "t": 1, "tiny": 1, "s": 2, "small": 2, "m": 3, "medium": 3, "b": 4, "base": 4, "l": 5, "large": 5}


def _smallest_per_family(names: list[str]) -> list[str]:
    """By the variant suffix (``_tiny``, ``_s``, ...); other suffixes (``_48m``) after the named sizes."""
    families: dict[str, list[str]] = {}
    for name in names:
        families.setdefault(name.rpartition("_")[0], []).append(name)
    return sorted(min(v, key=lambda n: (_RANK.get(n.rpartition("_")[2], 99), n)) for v in families.values())


SMALLEST = _smallest_per_family(MODELS)


def create(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, **kwargs)


def image(height: int = 64, width: int = 64, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(1))


def test_smallest_per_family():
    assert _smallest_per_family(["nat_base", "nat_mini", "dinat_tiny", "dinat_small", "x_deit_small", "v_48m",
                                 "v_s"]) == ["dinat_tiny", "nat_mini", "v_s", "x_deit_small"]
    assert len(SMALLEST) == len({n.rpartition("_")[0] for n in MODELS})


@pytest.mark.parametrize("name", MODELS)
def test_pretrained_cfg_fields(name):
    cfg = timm.models.get_pretrained_cfg(name).to_dict()
    assert cfg["first_conv"] and cfg["classifier"] and cfg["num_classes"] == 1000
    assert cfg["input_size"] == (3, 224, 224) and 0 < cfg["crop_pct"] <= 1 and len(cfg["mean"]) == len(cfg["std"]) == 3
    if cfg["url"]:  # an official download: https, an ImageNet tag, a file name for timm's cache
        assert cfg["url"].startswith("https://") and cfg["tag"] == "in1k" and cfg["url"].endswith(".pth"), cfg


@pytest.mark.parametrize("name", SMALLEST)
def test_default_cfg_is_consistent(name):
    with torch.device("meta"):
        model = timm.create_model(name)
    cfg = model.pretrained_cfg
    for key in ("first_conv", "classifier"):  # they name modules with weights (timm adapts them on load)
        for path in (cfg[key],) if isinstance(cfg[key], str) else cfg[key]:  # one name or several
            module = model.get_submodule(path)
            assert isinstance(getattr(module, "weight", None), torch.Tensor), f"{name}: {key}={path!r}"
    assert model.get_classifier() is model.get_submodule(cfg["classifier"])
    assert model.num_features == model.head_hidden_size == model.feature_info[-1]["num_chs"]
    assert getattr(model, "output_fmt", "NCHW") == "NCHW"  # what forward_features returns (checked below)
    data = resolve_model_data_config(model)
    for key in ("input_size", "interpolation", "mean", "std", "crop_pct"):
        assert tuple(data[key]) == tuple(cfg[key]) if isinstance(cfg[key], tuple) else data[key] == cfg[key]


@pytest.mark.parametrize("name", SMALLEST)
def test_forward_features_at_default_size_matches_cfg(name):
    model = create(name).eval()
    cfg = model.pretrained_cfg
    with torch.no_grad():
        feats = model.forward_features(torch.randn(1, *cfg["input_size"]))
    if getattr(model, "num_prefix_tokens", 0):  # ViT-like (timm's non-std convention): tokens, no pool size
        assert feats.ndim == 3 and feats.shape[-1] == model.num_features and cfg["pool_size"] is None
    else:
        channel_axis = -1 if getattr(model, "output_fmt", "NCHW") == "NHWC" else 1
        assert feats.shape[channel_axis] == model.num_features
        assert tuple(feats.shape[2:]) == tuple(cfg["pool_size"])


@pytest.mark.parametrize("name", SMALLEST)
def test_forward_intermediates_options(name):
    model = create(name, num_classes=0).eval()
    with torch.no_grad():  # a final norm at its initialisation can be near identity (BatchNorm): move it
        for p in model.norm.parameters():
            p.add_(torch.randn_like(p))
    x = image(64, 96, batch=1)
    depth = len(model.feature_info)
    with torch.no_grad():
        final, every = model.forward_intermediates(x)
        assert len(every) == depth
        final_n, two = model.forward_intermediates(x, indices=2)  # an int: the last two
        torch.testing.assert_close(final_n, final)
        for a, b in zip(two, every[-2:]):
            torch.testing.assert_close(a, b)
        only = model.forward_intermediates(x, indices=[0, 1], stop_early=True, intermediates_only=True)
        assert isinstance(only, list) and len(only) == 2
        for a, b in zip(only, every[:2]):
            torch.testing.assert_close(a, b)
        normed = model.forward_intermediates(x, indices=[depth - 1], norm=True, intermediates_only=True)[0]
        no_final_norm = isinstance(model.norm, torch.nn.Identity)  # Agent-PVT: none in the official model
        assert normed.shape == every[-1].shape and torch.allclose(normed, every[-1]) == no_final_norm
        if getattr(model, "num_prefix_tokens", 0):  # ViT-like: tokens, as timm's ViTs give them
            nlc = model.forward_intermediates(x, indices=[0], output_fmt="NLC", intermediates_only=True)[0]
            torch.testing.assert_close(nlc, every[0].flatten(2).transpose(1, 2))
        else:
            nhwc = model.forward_intermediates(x, indices=[0], output_fmt="NHWC", intermediates_only=True)[0]
            torch.testing.assert_close(nhwc, every[0].permute(0, 2, 3, 1))
        for info, feat in zip(model.feature_info, every):
            assert feat.shape[1] == info["num_chs"]
            assert feat.shape[2] == math.ceil(64 / info["reduction"])


@pytest.mark.parametrize("name", SMALLEST)
def test_features_only_with_out_indices(name):
    full = create(name).eval()
    indices = (1, len(full.feature_info) - 1)
    model = create(name, features_only=True, out_indices=indices).eval()
    assert model.feature_info.channels() == [full.feature_info[i]["num_chs"] for i in indices]
    with torch.no_grad():
        feats = model(image(64, 96, batch=1))
    assert [f.shape[1] for f in feats] == model.feature_info.channels()
    for f, reduction in zip(feats, model.feature_info.reduction()):
        assert f.shape[-2:] == (math.ceil(64 / reduction), math.ceil(96 / reduction))


@pytest.mark.parametrize("name", SMALLEST)
def test_grad_checkpointing_in_training_matches(name):
    x = image()
    grads, outs = [], []
    for ckpt in (False, True):
        model = create(name, num_classes=10, drop_path_rate=0.0).train()
        model.set_grad_checkpointing(ckpt)
        torch.manual_seed(2)  # DynamicViT samples its keep decisions in training
        out = model(x)
        out.square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
        outs.append(out.detach())
    torch.testing.assert_close(outs[1], outs[0])
    assert all(g is not None for g in grads[1].values())
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, rtol=1e-4, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("name", SMALLEST)
def test_fx_forward_and_backward(name):
    """timm's FX feature extraction (the leaves of vision/models/_trace.py) gives eager's output and gradients."""
    model = create(name, num_classes=10, drop_path_rate=0.0).eval()
    x = image()
    train_nodes, eval_nodes = get_graph_node_names(model)
    assert any(n.startswith(("stages.", "blocks.")) for n in eval_nodes), "the stage structure is traced"
    fx = create_feature_extractor(model, [eval_nodes[-1]])
    with torch.no_grad():
        torch.testing.assert_close(next(iter(fx(x).values())), model(x))

    model.train()
    fx = create_feature_extractor(model, [train_nodes[-1]]).train()
    torch.manual_seed(3)
    out = next(iter(fx(x).values()))
    assert out.shape == (2, 10)
    out.mean().backward()
    missing = [n for n, p in fx.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient through the FX graph: {missing[:5]}"


# Dynamic-size export checked so far (issue #22, unfinished): the other families' exports did not finish within
# 15-25 minutes on the session's shared CPU cores, so they are not claimed here yet.
EXPORT_CHECKED = ["agent_deit_tiny", "agent_pvt_tiny"]


@pytest.mark.slow
@pytest.mark.parametrize("name", EXPORT_CHECKED)
def test_export_dynamic_size_and_onnx(name, tmp_path):
    """One ``torch.export`` with dynamic height/width serves every size; ONNX (from that program) matches eager
    at the export size (ONNX Runtime does not take other sizes through that graph yet)."""
    ort = pytest.importorskip("onnxruntime", reason="ONNX Runtime comes with the dev extras")
    model = create(name, num_classes=10).eval()
    x = image(64, 96, batch=1)
    shapes = ({2: Dim.DYNAMIC, 3: Dim.DYNAMIC},)  # size checks inside become runtime asserts, tested below
    program = torch.export.export(model, (x,), dynamic_shapes=shapes)
    exported = program.module()
    with torch.no_grad():
        for size in ((64, 96), (97, 131), (224, 224)):
            y = image(*size, batch=1)
            torch.testing.assert_close(exported(y), model(y), rtol=1e-4, atol=1e-5,
                                       msg=lambda m, size=size: f"{size}: {m}")

    path = tmp_path / f"{name}.onnx"
    torch.onnx.export(program, (x,), dynamo=True).save(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x.numpy()}
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(session.run(None, feed)[0]), model(x), rtol=1e-3, atol=1e-4)


# Pretrained weights by name ------------------------------------------------------------------------------

def _official_nat_keys(state_dict: dict) -> dict:
    """Our NAT keys -> the official layout (``levels.i``, the downsample at the end of a level, ``patch_embed``)."""
    out = {}
    for key, value in state_dict.items():
        key = re.sub(r"^stages\.(\d+)\.downsample\.", lambda m: f"levels.{int(m[1]) - 1}.downsample.", key)
        key = re.sub(r"^stages\.(\d+)\.blocks\.", r"levels.\1.blocks.", key).replace("stem.", "patch_embed.")
        out[key] = value
    return out


def _serve(tmp_path, monkeypatch, payload: dict, filename: str) -> str:
    """Write ``payload`` and return its ``file://`` URL; torch.hub's cache (timm's download cache) goes to tmp."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    path = tmp_path / "served" / filename
    path.parent.mkdir()
    torch.save(payload, path)
    return path.as_uri()


def test_pretrained_nat_by_name_through_url(tmp_path, monkeypatch):
    kw = dict(embed_dim=32, depths=(1, 1, 2, 1), num_heads=(2, 2, 4, 4), num_classes=7)
    source = create("dinat_mini", dilations=[[1], [2], [1, 2], [1]], **kw).eval()
    url = _serve(tmp_path, monkeypatch, {"model": _official_nat_keys(source.state_dict())}, "dinat_mini_in1k_224.pth")
    assert timm.models.get_pretrained_cfg("dinat_mini").url.endswith("/dinat_mini_in1k_224.pth")
    model = timm.create_model("dinat_mini", pretrained=True, dilations=[[1], [2], [1, 2], [1]],
                              pretrained_cfg_overlay=dict(url=url, num_classes=7), **kw).eval()
    assert (tmp_path / "torch_home" / "hub" / "checkpoints" / "dinat_mini_in1k_224.pth").is_file()  # downloaded
    x = image()
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x))
    assert resolve_model_data_config(model)["crop_pct"] == 0.875


@pytest.mark.parametrize("name, fixture, layout", [
    ("litv2_small", "litv2_small_model", "model"),  # Swin-style training checkpoint
    ("l2vit_tiny", "l2vit_tiny_model", "model_ema"),  # ConvNeXt-style best-ema checkpoint: EMA weights
])
def test_pretrained_official_checkpoint_by_name(name, fixture, layout, tmp_path, monkeypatch):
    """The official code's weights in its checkpoint layout, fetched by URL as timm does, give its logits."""
    fx = load(fixture)
    kw = {k: fx["meta"]["kwargs"][k] for k in ("depths", "num_heads", "num_classes")}
    kw.update({k: fx["meta"]["kwargs"][k] for k in ("embed_dim", "dims") if k in fx["meta"]["kwargs"]})
    payload = {layout: fx["state_dict"], "epoch": 299}
    if layout == "model_ema":  # the non-EMA weights sit beside them and must not be the ones loaded
        payload["model"] = {k: torch.zeros_like(v) for k, v in fx["state_dict"].items()}
    url = _serve(tmp_path, monkeypatch, payload, f"{name}.pth")
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(url=url, num_classes=kw["num_classes"]),
                              **kw).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(fx["input"]), fx["output"], rtol=1e-4, atol=1e-5)
