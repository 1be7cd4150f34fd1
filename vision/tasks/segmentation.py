"""Semantic segmentation on any timm backbone (chosen by name) with a UPerNet or Semantic-FPN head.

The network comes from one factory, :func:`~vision.heads.segmentation.create_segmentation_model`, dispatching on
the head name (``HEADS``: UPerNet and Semantic-FPN decoders, or DToP); each network computes its own training
losses, so this module holds only the LightningModule: training, sliding-window inference, mIoU.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from torch import nn
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

from ..backbone import BackboneSpec
from ..datamodules.classes import IGNORE_INDEX
from ..heads.segmentation import (  # noqa: F401  (re-exported: their former home)
    HEADS,
    DToPSegmenter,
    FCNHead,
    SegmentationModel,
    create_segmentation_model,
)
from .classification import to_channels_last
from .schedules import per_step, poly_warmup, training_steps  # noqa: F401  (poly_warmup re-exported)

# ---- inference -------------------------------------------------------------------------------------------


def slide_inference(
    model: nn.Module,
    images: torch.Tensor,
    num_classes: int,
    crop_size: tuple[int, int],
    stride: tuple[int, int],
) -> torch.Tensor:
    """Logits averaged over overlapping ``crop_size`` windows placed every ``stride`` (mmseg's slide mode:
    the last window in each direction is shifted back to end at the border; windows never exceed the
    image)."""
    (height, width), (ch, cw), (sh, sw) = images.shape[-2:], crop_size, stride
    rows = max(height - ch + sh - 1, 0) // sh + 1
    cols = max(width - cw + sw - 1, 0) // sw + 1
    logits = images.new_zeros((images.shape[0], num_classes, height, width))
    counts = images.new_zeros((1, 1, height, width))
    for r in range(rows):
        for c in range(cols):
            y1, x1 = r * sh, c * sw
            y2, x2 = min(y1 + ch, height), min(x1 + cw, width)
            y1, x1 = max(y2 - ch, 0), max(x2 - cw, 0)
            logits[..., y1:y2, x1:x2] += model(images[..., y1:y2, x1:x2])
            counts[..., y1:y2, x1:x2] += 1
    return logits / counts


def crop_to_masks(
    logits: torch.Tensor, masks: torch.Tensor, sizes: torch.Tensor
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(logits, mask)`` pairs to score: the whole batch when nothing was resized or padded, else one pair per
    sample, its logits cropped to the image and resized to the mask's original size. ``sizes`` ``[B, 4]``
    (image h, w, mask h, w, on the batch's device) is read once on the host: its values decide the crops."""
    rows = sizes.tolist()
    if logits.shape[-2:] == masks.shape[-2:] and all(row == [*masks.shape[-2:]] * 2 for row in rows):
        return [(logits, masks)]
    pairs = []
    for i, (h, w, mh, mw) in enumerate(rows):
        sample = logits[i : i + 1, :, :h, :w]
        if (h, w) != (mh, mw):
            sample = F.interpolate(sample, size=(mh, mw), mode="bilinear", align_corners=False)
        pairs.append((sample, masks[i : i + 1, :mh, :mw]))
    return pairs


class SegmentationModule(L.LightningModule):
    """Semantic segmentation: backbone by name, UPerNet / Semantic-FPN head, optional auxiliary head.

    Args:
        backbone: ``{name, drop_path_rate, pretrained_file, kwargs}`` (a ``configs/model`` entry).
        num_classes, in_chans: the dataset's. ignore_index: label excluded from the loss and the metrics.
        head: ``upernet``, ``fpn``, ``dtop`` or ``wau`` (see :func:`create_segmentation_model`; ``dtop`` and
            ``wau`` hold their options). decoder_channels: UPerNet's channels (mmseg 512) or the FPN head's
            (mmseg 128, a multiple of 32; its neck gets twice as many). dropout: before the classifiers.
        aux_weight: weight of the auxiliary FCN head's loss (mmseg 0.4); 0 builds no auxiliary head.
        aux_channels: its hidden channels.
        lr, min_lr, weight_decay, betas: AdamW (timm's factory: no decay for norms, biases and the backbone's
            ``no_weight_decay`` names). warmup_steps, warmup_ratio, poly_power: the per-iteration schedule.
        inference: ``{mode: whole}`` or ``{mode: slide, crop_size: [h, w], stride: [h, w]}`` for val/test.
        class_names: for the per-class IoU table; default the datamodule's ``class_names``.
        compile: ``torch.compile`` the network at fit start. channels_last: NHWC convolutions.

    Logged: ``train/loss``, ``{val,test}/loss``, ``{val,test}/miou`` (dataset-level, mmseg's convention:
    per-class IoU from the confusion matrix accumulated over the split, mean over classes), ``{val,test}/acc``
    (pixel accuracy over labelled pixels, mmseg's aAcc), ``val/miou_best`` and ``test/iou/<class>``.
    """

    def __init__(
        self,
        backbone: BackboneSpec | dict,
        num_classes: int,
        in_chans: int = 3,
        head: str = "upernet",
        decoder_channels: int = 512,
        dropout: float = 0.1,
        aux_weight: float = 0.4,
        aux_channels: int = 256,
        ignore_index: int = IGNORE_INDEX,
        lr: float = 6e-5,
        min_lr: float = 0.0,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 1500,
        warmup_ratio: float = 1e-6,
        poly_power: float = 1.0,
        inference: dict | None = None,
        dtop: dict | None = None,
        wau: dict | None = None,
        class_names: list[str] | None = None,
        compile: bool = False,
        channels_last: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.inference_cfg = dict(inference or {"mode": "whole"})
        if self.inference_cfg.get("mode") not in ("whole", "slide"):
            raise ValueError(
                f"inference.mode={self.inference_cfg.get('mode')!r}; expected 'whole' or 'slide'"
            )
        if self.inference_cfg["mode"] == "slide" and not {"crop_size", "stride"} <= set(self.inference_cfg):
            raise ValueError("inference.mode=slide needs inference.crop_size and inference.stride ([h, w])")
        backbone = BackboneSpec.parse(backbone)
        self.hparams.backbone = backbone.to_dict()  # plain containers in checkpoints
        self.net = create_segmentation_model(
            head,
            backbone,
            num_classes,
            in_chans,
            decoder_channels,
            dropout,
            aux_channels if aux_weight > 0 else None,
            aux_weight,
            dtop,
            wau=wau,
        )

        self.train_loss, self.val_loss, self.test_loss = MeanMetric(), MeanMetric(), MeanMetric()
        kw = dict(num_classes=num_classes, ignore_index=ignore_index, validate_args=False)
        self.val_miou = MulticlassJaccardIndex(average="macro", **kw)
        self.test_miou = MulticlassJaccardIndex(average="macro", **kw)
        self.test_iou = MulticlassJaccardIndex(average="none", **kw)
        self.val_acc = MulticlassAccuracy(average="micro", **kw)
        self.test_acc = MulticlassAccuracy(average="micro", **kw)
        self.val_miou_best = MaxMetric()

    @property
    def eval_model(self) -> nn.Module:
        """The network used for validation and test (read by the visualisation callbacks)."""
        return self.net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, K, H, W]`` with the configured inference mode (whole image or sliding window)."""
        cfg = self.inference_cfg
        if cfg["mode"] == "slide":
            return slide_inference(
                self.net, images, self.hparams.num_classes, tuple(cfg["crop_size"]), tuple(cfg["stride"])
            )
        return self.net(images)

    def setup(self, stage: str) -> None:
        if self.hparams.channels_last:
            to_channels_last(self)
        if self.hparams.compile and stage == "fit":
            self.net.compile()

    def _images(self, images: torch.Tensor) -> torch.Tensor:
        return images.contiguous(memory_format=torch.channels_last) if self.hparams.channels_last else images

    # ---- training -----------------------------------------------------------------------------------------

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, masks = batch[0], batch[1]
        if images.shape[0] < 2 and self.hparams.head == "upernet":
            raise ValueError(
                "UPerNet's pyramid pooling (1x1 pooled BatchNorm) needs at least 2 images per training "
                f"batch; got {images.shape[0]}: raise data.batch_size"
            )
        losses = self.net.training_losses(self._images(images), masks, self.hparams.ignore_index)
        loss = losses.pop("loss")
        for name, value in losses.items():
            self.log(f"train/{name}", value.detach(), on_step=True, on_epoch=False)
        if isinstance(self.net, DToPSegmenter):
            self.log("train/kept_tokens", self.net.kept[:, -1].float().mean(), on_step=True, on_epoch=False)
        self.train_loss(loss.detach())
        self.log("train/loss", self.train_loss, on_step=True, on_epoch=True, prog_bar=True)
        return loss

    def on_train_start(self) -> None:
        self.val_miou_best.reset()  # sanity-check batches must not count towards the best

    # ---- evaluation ---------------------------------------------------------------------------------------

    def _evaluate(self, batch, loss_metric, metrics: list) -> list[torch.Tensor]:
        """Predict at the (resized) image size, then score at each mask's original size."""
        if batch is None:  # every sample of the batch skipped (data.on_bad_sample=skip)
            return None
        images, masks, sizes = batch
        logits = self(self._images(images))
        predictions = []
        for sample, target in crop_to_masks(logits, masks, sizes):
            # summed loss over the labelled pixels, weighted by their count: an all-ignored mask adds nothing,
            # and no per-sample host sync decides whether to score it
            labelled = (target != self.hparams.ignore_index).sum()
            loss = F.cross_entropy(sample, target, ignore_index=self.hparams.ignore_index, reduction="sum")
            loss_metric(loss / labelled.clamp_min(1), labelled)
            prediction = sample.argmax(1)
            for metric in metrics:
                metric(prediction, target)
            predictions.extend(prediction)
        return predictions

    def validation_step(self, batch, batch_idx: int):
        # the predictions reach callbacks' on_validation_batch_end
        predictions = self._evaluate(batch, self.val_loss, [self.val_miou, self.val_acc])
        self.log("val/loss", self.val_loss, prog_bar=True)
        self.log("val/miou", self.val_miou, prog_bar=True)
        self.log("val/acc", self.val_acc)
        return predictions

    def on_validation_epoch_end(self) -> None:
        self.val_miou_best(self.val_miou.compute())
        self.log("val/miou_best", self.val_miou_best.compute(), prog_bar=True)

    def test_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, self.test_loss, [self.test_miou, self.test_acc, self.test_iou])
        self.log("test/loss", self.test_loss)
        self.log("test/miou", self.test_miou)
        self.log("test/acc", self.test_acc)

    def class_names(self) -> list[str]:
        """``class_names`` if given, else the datamodule's, else ``class_<i>``."""
        names = self.hparams.class_names
        if not names and self._trainer is not None:
            names = getattr(self.trainer.datamodule, "class_names", None)
        names, count = list(names or []), self.hparams.num_classes
        return names if len(names) == count else [f"class_{i}" for i in range(count)]

    def on_test_epoch_end(self) -> None:
        ious = per_class_iou(self.test_iou.confmat)
        self.test_iou.reset()
        names = self.class_names()
        for name, iou in zip(names, ious.tolist()):
            if iou == iou:  # classes absent from labels and predictions have no IoU (NaN, as in mmseg)
                self.log(f"test/iou/{name}", iou)
        if self.trainer.is_global_zero:
            print_iou_table(names, ious.tolist())

    # ---- optimisation -------------------------------------------------------------------------------------

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        optimizer = create_optimizer_v2(
            self.net, opt="adamw", lr=hp.lr, weight_decay=hp.weight_decay, betas=tuple(hp.betas)
        )
        total, _ = training_steps(self.trainer)
        warmup = min(hp.warmup_steps, total // 2)
        return per_step(
            optimizer, lambda step: poly_warmup(step, total, warmup, hp.warmup_ratio, hp.poly_power, hp.min_lr / hp.lr)
        )

    # ---- prediction ---------------------------------------------------------------------------------------

    def predict_step(self, batch, batch_idx: int = 0) -> dict[str, list[torch.Tensor]]:
        """Class-id masks ``[H, W]`` at each image's original size ``batch["size"]``; ``batch["image"]`` is the
        evaluation transform's output, ``batch["input_size"]`` its size before any padding (``predict.py``)."""
        logits = self(self._images(batch["image"]))
        masks = []
        for i, ((h, w), size) in enumerate(zip(batch["input_size"].tolist(), batch["size"].tolist())):
            sample = logits[i : i + 1, :, :h, :w]
            if [h, w] != size:
                sample = F.interpolate(sample.float(), size=size, mode="bilinear", align_corners=False)
            masks.append(sample.argmax(1)[0])
        return {"masks": masks}


def per_class_iou(confmat: torch.Tensor) -> torch.Tensor:
    """IoU per class from a ``[K, K]`` (target, prediction) confusion matrix; NaN where a class is neither
    labelled nor predicted (mmseg's convention; ``MulticlassJaccardIndex(average="macro")`` skips them
    too)."""
    confmat = confmat.double()
    tp = confmat.diag()
    union = confmat.sum(0) + confmat.sum(1) - tp
    return torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan"))).float()


def print_iou_table(names: list[str], ious: list[float]) -> None:
    """The per-class IoU table (mmseg prints the same after evaluation)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="per-class IoU (test)")
    table.add_column("class")
    table.add_column("IoU", justify="right")
    for name, iou in zip(names, ious):
        table.add_row(name, f"{100 * iou:.2f}" if iou == iou else "n/a")
    Console().print(table)
