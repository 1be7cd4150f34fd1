"""AGUNet-style attention-gated 3-D U-Net (vision/heads/attention_unet3d.py) and its wiring in the medical task."""

import pytest
import torch

from vision.heads.attention_unet3d import AttentionGate, AttentionUNet3D
from vision.tasks.medical import MedicalSegmentationModule


def test_gate_takes_the_coarser_gating_signal_and_scales_the_skip():
    torch.manual_seed(0)
    gate = AttentionGate(skip_channels=4, gating_channels=6, inter_channels=3)
    x, g = torch.randn(2, 4, 9, 7, 5), torch.randn(2, 6, 5, 4, 3)  # odd sizes: the skip's grid is about 2x g's
    out, alpha = gate(x, g)
    assert out.shape == x.shape and alpha.shape == (2, 1, 9, 7, 5)
    assert 0 < alpha.min() and alpha.max() < 1
    _, alpha2 = gate(x, g + torch.randn_like(g))
    assert not torch.allclose(alpha, alpha2)  # the decoder's context decides where the skip passes
    with torch.no_grad():
        gate.psi.bias.fill_(-1e4)  # a closed gate lets nothing of the skip through
    closed, _ = gate(x, g)
    torch.testing.assert_close(closed, gate.out(torch.zeros_like(x)))


@pytest.mark.parametrize("multiscale", [True, False])
def test_network_shapes_deep_supervision_and_multiscale_input(multiscale):
    torch.manual_seed(0)
    net = AttentionUNet3D(2, 3, channels=(4, 8, 16), multiscale_input=multiscale)
    assert net.encoder[1][0].in_channels == 4 + (2 if multiscale else 0)
    image = torch.randn(1, 2, 17, 12, 10)
    outs = net.train()(image)
    assert len(outs) == 2 and all(o.shape == (1, 3, 17, 12, 10) for o in outs)
    assert [a.shape[2:] for a in net.attention] == [(9, 6, 5), (17, 12, 10)]
    sum(o.sum() for o in outs).backward()
    assert all(h.weight.grad.abs().sum() > 0 for h in net.heads)  # every decoder scale is supervised
    assert net.eval()(image).shape == (1, 3, 17, 12, 10)
    with pytest.raises(ValueError, match="two levels"):
        AttentionUNet3D(1, 2, channels=(4,))


def test_medical_task_trains_attention_unet_with_deep_supervision():
    torch.manual_seed(0)
    module = MedicalSegmentationModule({"name": "resnet18"}, num_classes=2, roi_size=(16, 16, 16),
                                       network="attention_unet", net_kwargs={"channels": [4, 8, 16]})
    image, label = torch.randn(2, 1, 16, 16, 16), (torch.rand(2, 1, 16, 16, 16) > 0.5).long()
    outs = module.net.train()(image)
    a, b = (module.loss(o, label) for o in outs)
    torch.testing.assert_close(module._loss(outs, label), (2 * a + b) / 3)  # weights 1, 1/2, normalised
    with torch.no_grad():
        assert module.eval().predict(image).shape == (2, 2, 16, 16, 16)
    with pytest.raises(ValueError, match="3-D"):
        MedicalSegmentationModule({"name": "resnet18"}, num_classes=2, roi_size=(16, 16), context=0,
                                  network="attention_unet")
