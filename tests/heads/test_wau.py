"""Window Attention Upsample (vision/heads/wau.py): window confinement, any size, gradients, wiring."""

import pytest
import torch

from vision.heads.wau import WAUDecoder, WAUStep, create_wau_unet

TINY = {"name": "resnet18", "kwargs": {"channels": [8, 8, 16, 16]}}


def _step(window=4, seed=0):
    torch.manual_seed(seed)
    return WAUStep(decoder_channels=6, lateral_channels=5, channels=8, num_heads=2, window_size=window).eval()


@pytest.mark.parametrize("size", [(12, 12), (13, 11)])  # divisible, and padded windows
def test_a_query_sees_only_lateral_features_in_its_window(size):
    step = _step(window=4)
    H, W = size
    decoder, lateral = torch.randn(1, 6, (H + 1) // 2, (W + 1) // 2), torch.randn(1, 5, H, W)
    base = step(decoder, lateral)
    outside = lateral.clone()
    outside[..., 4:, :] += 5.0  # rows below the first window row
    outside[..., :4, 4:] += 5.0  # the rest of the first window row
    changed = (step(decoder, outside) - base).abs().amax(1)[0]  # [H, W]
    assert changed[:4, :4].max() == 0  # queries of the top-left window: untouched
    assert changed[4:].min() > 0 and changed[:4, 4:].min() > 0  # every other query moved
    inside = lateral.clone()
    inside[..., 1, 2] += 5.0
    assert (step(decoder, inside) - base).abs().amax(1)[0, :4, :4].min() > 0  # all its window's queries see it


def test_without_lateral_signal_the_step_is_bilinear_plus_pointwise():
    """The residual is the bilinear upsample: constant decoder features stay constant whatever the window."""
    step = _step(window=3)
    decoder = torch.ones(2, 6, 5, 4)
    out = step(decoder, torch.zeros(2, 5, 10, 8))
    assert out.shape == (2, 8, 10, 8)
    assert torch.allclose(out, out[..., :1, :1].expand_as(out), atol=1e-5)


def test_gradients_reach_decoder_lateral_and_parameters():
    step = _step(window=4).train()
    decoder = torch.randn(2, 6, 4, 5, requires_grad=True)
    lateral = torch.randn(2, 5, 7, 9, requires_grad=True)
    step(decoder, lateral).square().sum().backward()
    assert decoder.grad.abs().sum() > 0 and lateral.grad.abs().sum() > 0
    for name, p in step.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_decoder_skips_empty_levels_and_checks_its_arguments():
    # a transformer backbone's smp features: [input, empty 1/2, 1/4, 1/8, 1/16, 1/32]
    channels = [3, 0, 8, 16, 24, 32]
    dec = WAUDecoder(channels, decoder_channels=(16, 8, 8), num_heads=2, window_size=3)
    feats = [torch.randn(1, c, 33 // 2**i + 1, 29 // 2**i + 1) for i, c in enumerate(channels)]
    out = dec(feats)
    assert out.shape == (1, 8, *feats[2].shape[-2:])
    with pytest.raises(ValueError, match="decoder_channels"):
        WAUDecoder(channels, decoder_channels=(16, 8), num_heads=2)
    with pytest.raises(ValueError, match="heads"):
        WAUDecoder(channels, decoder_channels=(16, 8, 6), num_heads=4)


@pytest.mark.parametrize("size", [(45, 37), (32, 32)])
def test_wau_unet_any_input_size(size):
    net = create_wau_unet(TINY, in_channels=2, num_classes=4, decoder_channels=(16, 16, 8, 8), num_heads=2,
                          window_size=4)
    out = net(torch.randn(2, 2, *size))
    assert out.shape == (2, 4, *size)


def test_medical_decoder_wau_is_wired():
    from vision.tasks.medical import MedicalSegmentationModule

    module = MedicalSegmentationModule(TINY, num_classes=3, roi_size=(24, 24, 4), decoder="wau", context=1,
                                       net_kwargs={"decoder_channels": [16, 16, 8, 8], "num_heads": 2,
                                                   "window_size": 4})
    assert any(isinstance(m, WAUStep) for m in module.modules())
    volume = torch.randn(1, 1, 24, 24, 4)
    assert module(volume).shape == (1, 3, 24, 24, 4)
    with pytest.raises(ValueError, match="wau"):
        MedicalSegmentationModule(TINY, num_classes=3, roi_size=(24, 24), decoder="nope", context=0)


def test_segmentation_head_wau_is_wired():
    from vision.heads import create_segmentation_model

    model = create_segmentation_model("wau", TINY, num_classes=5, decoder_channels=16, aux_channels=None,
                                      wau={"num_heads": 2, "window_size": 4})
    assert any(isinstance(m, WAUStep) for m in model.modules())
    images, masks = torch.randn(2, 3, 40, 36), torch.randint(0, 5, (2, 40, 36))
    assert model(images).shape == (2, 5, 40, 36)
    losses = model.training_losses(images, masks, ignore_index=255)
    losses["loss"].backward()
