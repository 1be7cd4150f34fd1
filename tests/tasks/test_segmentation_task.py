"""SegmentationModule: a train step per head, sliding-window inference, mIoU on known masks, the pipeline."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from vision.tasks.schedules import poly_warmup
from vision.tasks.segmentation import (
    SegmentationModule,
    create_segmentation_model,
    per_class_iou,
    slide_inference,
)

TINY = dict(name="resnet18", kwargs=dict(channels=[8, 16, 32, 64]))
# steps called directly, outside a Trainer, log into nothing
pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`:UserWarning")
QUICK = [
    "trainer.accelerator=cpu",
    "trainer.devices=1",
    "data.num_workers=0",
    "callbacks.rich_progress_bar=null",
]


@pytest.mark.parametrize("head", ["upernet", "fpn"])
def test_train_step_reaches_every_part(head):
    torch.manual_seed(0)
    module = SegmentationModule(
        TINY, num_classes=5, head=head, decoder_channels=32, aux_channels=8, aux_weight=0.4
    )
    images = torch.randn(2, 3, 64, 48)
    masks = torch.randint(0, 5, (2, 64, 48))
    masks[:, :8] = 255
    loss = module.training_step((images, masks, None), 0)
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    for part in (module.net.encoder, module.net.decoder, module.net.classifier, module.net.aux):
        grads = [p.grad for p in part.parameters() if p.requires_grad]
        assert grads and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    module.eval()
    with torch.no_grad():
        assert module(torch.randn(1, 3, 50, 70)).shape == (1, 5, 50, 70)  # any size: padded, then cropped


def test_registered_transformer_backbone_through_smp():
    net = create_segmentation_model(
        "upernet", dict(name="biformer_tiny"), num_classes=4, decoder_channels=32, aux_channels=8
    ).eval()
    with torch.no_grad():
        logits, aux = net.forward_train(torch.randn(1, 3, 64, 64))
    assert logits.shape == aux.shape == (1, 4, 64, 64)
    assert net.aux.conv[0].in_channels == 256  # stage 3 of BiFormer-T: mmseg's auxiliary in_index=2


def test_pretrained_file_loads_into_the_encoder(tmp_path):
    import vision

    reference = vision.create_model("resnet18", channels=[8, 16, 32, 64])
    torch.save(reference.state_dict(), tmp_path / "resnet.pth")
    net = create_segmentation_model(
        "fpn", {**TINY, "pretrained_file": str(tmp_path / "resnet.pth")}, 3, decoder_channels=32
    )
    torch.testing.assert_close(net.encoder.model.conv1.weight, reference.conv1.weight, rtol=0, atol=0)
    torch.testing.assert_close(
        net.encoder.model.layer4[1].conv2.weight, reference.layer4[1].conv2.weight, rtol=0, atol=0
    )


def test_upernet_single_image_batch_is_a_clear_error():
    module = SegmentationModule(TINY, num_classes=3, head="upernet", decoder_channels=16, aux_weight=0)
    with pytest.raises(ValueError, match="at least 2 images per training batch.*data.batch_size"):
        module.training_step((torch.randn(1, 3, 32, 32), torch.zeros(1, 32, 32, dtype=torch.long)), 0)


def test_bad_head_arguments_are_named():
    with pytest.raises(ValueError, match="unknown segmentation head 'segformer'.*upernet"):
        create_segmentation_model("segformer", TINY, 3)
    with pytest.raises(ValueError, match="decoder_channels=48.*multiple of 32"):
        create_segmentation_model("fpn", TINY, 3, decoder_channels=48)


def test_slide_equals_whole_when_the_window_covers_the_image():
    net = create_segmentation_model("upernet", TINY, 3, decoder_channels=32, aux_channels=None).eval()
    images = torch.randn(2, 3, 45, 61)
    with torch.no_grad():
        whole = net(images)
        for crop in [(45, 61), (64, 64)]:
            torch.testing.assert_close(slide_inference(net, images, 3, crop, (32, 32)), whole, rtol=0, atol=0)


def test_slide_windows_cover_the_image_and_average():
    """A pointwise model gives the same logits in every window, so any overlapping tiling equals whole."""
    pointwise = nn.Conv2d(3, 4, 1)
    images = torch.randn(1, 3, 50, 77)
    with torch.no_grad():
        slide = slide_inference(pointwise, images, 4, (32, 32), (21, 21))
        torch.testing.assert_close(slide, pointwise(images), rtol=1e-5, atol=1e-6)
    calls = []
    counter = lambda x: (calls.append(x.shape[-2:]), torch.zeros(1, 1, *x.shape[-2:]))[1]
    slide_inference(counter, images, 1, (32, 32), (21, 21))
    # rows start at 0, 18 (= 50 - 32, shifted back); columns at 0, 21, 42, 45 (= 77 - 32)
    assert len(calls) == 2 * 4 and all(tuple(c) == (32, 32) for c in calls)


class FixedLogits(nn.Module):
    """Returns the given predictions as logits, one batch per call, cropped to the input's size."""

    def __init__(self, *predictions: torch.Tensor, num_classes: int):
        super().__init__()
        self.batches = [
            nn.functional.one_hot(p, num_classes).permute(0, 3, 1, 2).float() * 10 for p in predictions
        ]

    def forward(self, images):
        return self.batches.pop(0)[..., : images.shape[-2], : images.shape[-1]]


def test_miou_on_known_masks_is_dataset_level():
    """Two images, 4 classes (class 3 never occurs), 255 ignored. mmseg's dataset-level convention: IoU per
    class from the summed confusion matrix, mean over classes that occur."""
    module = SegmentationModule(TINY, num_classes=4, head="fpn", decoder_channels=32, aux_weight=0)
    target = torch.tensor([[[0, 0, 1, 1], [2, 2, 255, 255]], [[0, 0, 0, 0], [1, 1, 1, 1]]])
    pred = torch.tensor([[[0, 1, 1, 1], [2, 0, 3, 0]], [[0, 0, 0, 0], [1, 1, 2, 2]]])
    module.net = FixedLogits(pred[:1], pred[1:], num_classes=4)
    sizes = torch.tensor([[2, 4, 2, 4]] * 2)
    for i in range(2):  # one image per batch: the metric accumulates over the split
        module.validation_step((torch.zeros(1, 3, 2, 4), target[i : i + 1], sizes[i : i + 1]), i)
    # class 0: tp 5 (1 + 4), fp 1, fn 1 -> 5/7; class 1: tp 4, fp 1, fn 2 -> 4/7;
    # class 2: tp 1, fp 2, fn 1 -> 1/4;
    # class 3: predicted only on an ignored pixel -> not counted, absent -> excluded from the mean
    expected = (5 / 7 + 4 / 7 + 1 / 4) / 3
    assert module.val_miou.compute().item() == pytest.approx(expected, abs=1e-6)
    assert module.val_acc.compute().item() == pytest.approx(10 / 14, abs=1e-6)  # labelled pixels only
    ious = per_class_iou(module.val_miou.confmat)
    assert ious[:3].tolist() == pytest.approx([5 / 7, 4 / 7, 1 / 4]) and math.isnan(ious[3])
    # a per-image average (torchmetrics' MeanIoU) differs: image 1 (1/3, 2/3, 1/2), image 2 (1, 1/2, 0) -> 0.5
    assert expected != pytest.approx(((1 / 3 + 2 / 3 + 1 / 2) / 3 + (1 + 1 / 2 + 0) / 3) / 2, abs=1e-3)


def test_evaluation_scores_at_the_original_mask_size():
    """A resized image's logits are upsampled to the mask's size; padding in the batch is left out."""
    module = SegmentationModule(TINY, num_classes=2, head="fpn", decoder_channels=32, aux_weight=0)
    module.net = FixedLogits(torch.ones(2, 8, 8, dtype=torch.long), num_classes=2)  # always class 1
    masks = torch.full((2, 16, 16), 255)
    masks[0] = 1  # image 0: 4x4 (padded to 8x8) predicted, 16x16 labelled mask
    masks[1, :8, :12] = 0  # image 1: 8x6 image, 8x12 mask, the rest is batch padding
    sizes = torch.tensor([[4, 4, 16, 16], [8, 6, 8, 12]])
    module.validation_step((torch.zeros(2, 3, 8, 8), masks, sizes), 0)
    confmat = module.val_miou.confmat
    assert confmat.tolist() == [[0, 96], [0, 256]]


def test_poly_schedule_with_warmup():
    assert poly_warmup(0, 100, 10, 1e-6, 1.0, 0.0) == pytest.approx(1e-6)
    assert poly_warmup(10, 100, 10, 1e-6, 1.0, 0.0) == pytest.approx(1.0)
    assert poly_warmup(55, 100, 10, 1e-6, 1.0, 0.0) == pytest.approx(0.5)
    assert poly_warmup(100, 100, 10, 1e-6, 1.0, 0.1) == pytest.approx(0.1)


def test_quickstart_segmentation_trains_tests_and_draws(compose_cfg, tmp_path):
    from vision.utils import train

    cfg = compose_cfg(
        "train",
        [
            "experiment=quickstart_segmentation",
            *QUICK,
            f"data.root={tmp_path / 'scenes'}",
            "data.scene_splits={train: 8, val: 4, test: 4}",
            "data.batch_size=4",
            "trainer.max_epochs=1",
            "model.decoder_channels=32",
        ],
    )
    metrics, objects = train(cfg)
    assert (
        np.isfinite(metrics["train/loss"])
        and 0 <= metrics["test/miou"] <= 1
        and 0 <= metrics["test/acc"] <= 1
    )
    assert "val/miou_best" in metrics and any(k.startswith("test/iou/") for k in metrics)
    assert objects["best_ckpt"].endswith(".ckpt")
    previews = list((tmp_path / "csv").rglob("segmentation/epoch000_val_predictions.png"))
    assert previews, sorted(p.name for p in tmp_path.rglob("*.png"))
    from PIL import Image

    assert Image.open(previews[0]).size[0] > 3 * 64  # image | truth | prediction


@pytest.mark.parametrize(
    "experiment, backbone",
    [("biformer_ade20k_upernet", "biformer_small"), ("nat_ade20k_upernet", "nat_tiny")],
)
def test_ade20k_experiments(compose_cfg, tmp_path, experiment, backbone):
    """The paper recipes compose as documented, and train/validate/test a step on a fake ADE20K tree (with a
    tiny stand-in backbone: the real ones go through smp in
    test_registered_transformer_backbone_through_smp)."""
    from _layouts import make_ade20k

    from vision.utils import train

    cfg = compose_cfg("train", [f"experiment={experiment}"])
    assert cfg.model.backbone.name == backbone and cfg.model.backbone.drop_path_rate == 0.3
    assert (cfg.model.head, cfg.model.decoder_channels, cfg.model.aux_weight, cfg.model.lr) == (
        "upernet",
        512,
        0.4,
        6e-5,
    )
    assert (cfg.trainer.max_steps, tuple(cfg.data.crop_size), cfg.data.num_classes) == (
        160000,
        (512, 512),
        150,
    )
    assert cfg.callbacks.model_checkpoint.monitor == "val/miou" and cfg.optimized_metric == "val/miou_best"

    root = make_ade20k(tmp_path / "ade", n=2)
    cfg = compose_cfg(
        "train",
        [
            f"experiment={experiment}",
            *QUICK,
            f"data.root={root}",
            "trainer.fast_dev_run=true",
            "model.backbone.name=resnet18",
            "+model.backbone.kwargs.channels=[8,16,32,64]",
            "data.crop_size=[64,64]",
            "data.scale=[128,64]",
            "data.eval_scale=[128,64]",
            "data.batch_size=2",
            "model.decoder_channels=16",
            "model.aux_channels=8",
            "trainer.precision=32-true",
        ],
    )
    metrics, _ = train(cfg)
    assert np.isfinite(metrics["train/loss"]) and 0 <= metrics["test/miou"] <= 1


# ---- DToP as a segmentation head (head=dtop) ------------------------------------------------------------

VIT = dict(name="vit_tiny_patch16_224", kwargs=dict(patch_size=8, embed_dim=64, depth=4, num_heads=2))
DTOP = dict(variant="dtop_tiny", img_size=32)


def test_dtop_head_trains_and_scores_every_pixel():
    torch.manual_seed(0)
    module = SegmentationModule(VIT, num_classes=4, head="dtop", dtop=DTOP, aux_weight=0)
    images, masks = torch.randn(2, 3, 40, 48), torch.randint(0, 4, (2, 40, 48))
    masks[:, :4] = 255
    loss = module.training_step((images, masks, None), 0)
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    for j, head in enumerate(module.net.dtop.heads):  # the ATM loss reaches every exit head
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters()), j
    module.eval()
    with torch.no_grad():
        logits = module(images)
        scores = module.net.dtop(images)["logits"]
    assert logits.shape == (2, 4, 40, 48) and torch.isfinite(logits).all()
    # the task's logits are DToP's scores on a log scale: same prediction everywhere
    assert torch.equal(logits.argmax(1), scores.argmax(1))


def test_dtop_head_prunes_only_below_its_threshold():
    torch.manual_seed(0)
    images = torch.randn(2, 3, 32, 32)
    never = SegmentationModule(VIT, num_classes=3, head="dtop", dtop={**DTOP, "threshold": 1.01}).eval()
    always = SegmentationModule(VIT, num_classes=3, head="dtop", dtop={**DTOP, "threshold": 0.0}).eval()
    always.load_state_dict(never.state_dict())
    with torch.no_grad():
        never(images), always(images)
    tokens = (32 // 8) ** 2
    assert (never.net.kept == tokens).all()
    # after the first exit head (block 1) only the top-k per class stay
    assert (always.net.kept[:, 2:] < tokens).all() and (always.net.kept[:, :2] == tokens).all()


def test_dtop_experiment_composes_and_trains_a_step(compose_cfg, tmp_path):
    from _layouts import make_ade20k

    from vision.utils import train

    cfg = compose_cfg("train", ["experiment=dtop_ade20k"])
    assert (cfg.model.head, cfg.model.dtop.variant, cfg.model.lr, cfg.trainer.max_steps) == (
        "dtop", "dtop_vit_base", 2e-5, 40000)
    root = make_ade20k(tmp_path / "ade", n=2)
    cfg = compose_cfg("train", [
        "experiment=dtop_ade20k", *QUICK, f"data.root={root}", "trainer.fast_dev_run=true",
        f"model.backbone.name={VIT['name']}", "+model.backbone.kwargs={patch_size: 8, embed_dim: 64, depth: 4, "
        "num_heads: 2}", "model.dtop.variant=dtop_tiny", "model.dtop.img_size=64", "data.crop_size=[64,64]",
        "data.scale=[128,64]", "data.eval_scale=[128,64]", "data.batch_size=2", "model.inference.crop_size=[64,64]",
        "model.inference.stride=[48,48]", "trainer.precision=32-true", "trainer.gradient_clip_val=35",
    ])
    metrics, _ = train(cfg)
    assert np.isfinite(metrics["train/loss"]) and 0 <= metrics["test/miou"] <= 1
