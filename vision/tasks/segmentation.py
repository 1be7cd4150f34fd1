"""Semantic segmentation on any timm backbone (chosen by name) with a UPerNet or Semantic-FPN head.

The network is built by one factory, :func:`create_segmentation_model`, dispatching on the head name
(``HEADS``). Every network maps images to per-class logits ``[B, K, H, W]`` and computes its own training
losses (``training_losses(images, masks, ignore_index) -> {"loss": total, ...}``), so a segmenter with its own
objective fits beside the encoder-decoders: ``head=dtop`` is DToP (dynamic token pruning on a plain ViT,
:mod:`vision.models.dtop`, with its ATM loss).

Heads come from segmentation-models-pytorch: its ``tu-<name>`` encoder is ``timm.create_model(name,
features_only=True)``, so this package's registered backbones work as well as timm's, and its UPerNet
(PPM on the last stage + FPN, fused at 1/4 scale; LayerNorm on the backbone features as in mmseg's Swin/NAT
configs) and FPN (Kirillov et al.'s Semantic FPN) decoders match the mmseg heads the papers report. Two parts
are ours, because smp has no equivalent: the classifier (dropout + 1x1 conv, upsampled to the input size,
mmseg's ``conv_seg``) and the auxiliary FCN head on the third stage (mmseg's ``FCNHead``; smp's ``aux_params``
is an image-level classification head).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from torch import nn
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

from ..datamodules.segmentation import IGNORE_INDEX


def _smp_encoder_decoder(head: str, backbone: dict, in_chans: int, decoder_channels: int):
    """(encoder, decoder, decoder output channels) of an smp model on the ``tu-`` (timm) encoder."""
    import vision  # noqa: F401  (registers this package's backbones before smp calls timm.create_model)

    encoder_kwargs = dict(backbone.get("kwargs") or {})
    encoder_kwargs["drop_path_rate"] = backbone.get("drop_path_rate", 0.0)
    weights = None  # never download; a local checkpoint goes through timm's pretrained_cfg file overlay
    if backbone.get("pretrained_file"):
        weights = True
        encoder_kwargs["pretrained_cfg_overlay"] = dict(file=str(backbone["pretrained_file"]))
    common = dict(
        encoder_name=f"tu-{backbone['name']}", encoder_weights=weights, in_channels=in_chans, classes=1
    )
    if head == "upernet":
        model = smp.UPerNet(decoder_channels=decoder_channels, **common, **encoder_kwargs)
        out_channels = decoder_channels
    elif head == "fpn":
        # mmseg's Semantic FPN: a 256-channel neck, a 128-channel head (pyramid = 2 x head channels); dropout
        # once, in our classifier; bilinear merging. smp's head uses GroupNorm(32 groups).
        if decoder_channels % 32:
            raise ValueError(
                f"decoder_channels={decoder_channels}: the FPN head's GroupNorm needs a multiple of 32"
            )
        model = smp.FPN(
            decoder_pyramid_channels=2 * decoder_channels,
            decoder_segmentation_channels=decoder_channels,
            decoder_dropout=0.0,
            decoder_interpolation="bilinear",
            **common,
            **encoder_kwargs,
        )
        out_channels = model.decoder.out_channels
    else:
        raise AssertionError(head)
    return model.encoder, model.decoder, out_channels


HEADS = ("upernet", "fpn", "dtop")


class FCNHead(nn.Module):
    """mmseg's auxiliary FCNHead (num_convs=1, no input concat): 3x3 conv-BN-ReLU, dropout, 1x1 classifier."""

    def __init__(self, in_channels: int, num_classes: int, channels: int = 256, dropout: float = 0.1):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Sequential(nn.Dropout2d(dropout), nn.Conv2d(channels, num_classes, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.conv(x))


class SegmentationModel(nn.Module):
    """Backbone features -> decoder -> per-pixel logits at the input resolution.

    Inputs are zero-padded at the bottom/right to a multiple of ``size_divisor`` (the FPN's 2x merges need
    it; UPerNet and the backbones accept it) and the logits cropped back, so any image size works.
    """

    def __init__(
        self,
        encoder: nn.Module,
        decoder: nn.Module,
        decoder_channels: int,
        num_classes: int,
        dropout: float = 0.1,
        aux_channels: int | None = 256,
        aux_weight: float = 0.4,
        size_divisor: int = 32,
    ):
        super().__init__()
        self.encoder, self.decoder = encoder, decoder
        self.aux_weight = aux_weight
        self.classifier = nn.Sequential(nn.Dropout2d(dropout), nn.Conv2d(decoder_channels, num_classes, 1))
        # smp's encoders list [input, 1/2 (empty for transformers), 1/4, 1/8, 1/16, 1/32]: stage 3 is [-2]
        self.aux = (
            FCNHead(encoder.out_channels[-2], num_classes, aux_channels, dropout) if aux_channels else None
        )
        self.size_divisor = size_divisor

    def _features(self, images: torch.Tensor) -> tuple[list[torch.Tensor], tuple[int, int]]:
        height, width = images.shape[-2:]
        d = self.size_divisor
        images = F.pad(images, (0, -width % d, 0, -height % d))
        return self.encoder(images), (height, width)

    def _upsample(self, logits: torch.Tensor, size: tuple[int, int], padded: tuple[int, int]) -> torch.Tensor:
        logits = F.interpolate(logits, size=padded, mode="bilinear", align_corners=False)
        return logits[..., : size[0], : size[1]]

    def forward_train(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(logits, auxiliary logits or None)``, both ``[B, K, H, W]`` at the input size."""
        features, size = self._features(images)
        padded = features[0].shape[-2:]
        logits = self._upsample(self.classifier(self.decoder(features)), size, padded)
        aux = self._upsample(self.aux(features[-2]), size, padded) if self.aux is not None else None
        return logits, aux

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features, size = self._features(images)
        return self._upsample(self.classifier(self.decoder(features)), size, features[0].shape[-2:])

    def training_losses(self, images: torch.Tensor, masks: torch.Tensor, ignore_index: int) -> dict:
        """Cross-entropy of the logits, plus ``aux_weight`` times the auxiliary head's."""
        logits, aux = self.forward_train(images)
        losses = {"ce": F.cross_entropy(logits, masks, ignore_index=ignore_index)}
        if aux is not None:
            losses["aux"] = self.aux_weight * F.cross_entropy(aux, masks, ignore_index=ignore_index)
        losses["loss"] = sum(losses.values())
        return losses

    def no_weight_decay(self) -> set[str]:
        """The backbone's own no-weight-decay names (position tables, ...), under their full paths."""
        names = set()
        for prefix, module in self.named_modules():
            if module is not self and callable(getattr(module, "no_weight_decay", None)):
                names |= {f"{prefix}.{n}" for n in module.no_weight_decay()}
        return names


class DToPSegmenter(nn.Module):
    """DToP behind the networks' interface: logits are the log of its per-class scores (so argmax, the
    validation cross-entropy and sliding windows work unchanged); training uses its own ATM loss on every head.
    ``kept`` holds the active tokens per block of the last forward ``[B, depth]``."""

    def __init__(self, dtop: nn.Module):
        super().__init__()
        self.dtop = dtop
        self.kept: torch.Tensor | None = None

    def _run(self, images: torch.Tensor) -> dict:
        out = self.dtop(images)
        self.kept = out["kept"].detach()
        return out

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self._run(images)["logits"].clamp_min(1e-6).log()

    def training_losses(self, images: torch.Tensor, masks: torch.Tensor, ignore_index: int) -> dict:
        return self.dtop.loss(self._run(images), masks, ignore_index)


def create_segmentation_model(
    head: str,
    backbone: dict,
    num_classes: int,
    in_chans: int = 3,
    decoder_channels: int = 512,
    dropout: float = 0.1,
    aux_channels: int | None = 256,
    aux_weight: float = 0.4,
    dtop: dict | None = None,
) -> nn.Module:
    """The segmentation network for ``head`` (one of ``HEADS``) on ``backbone`` (a ``configs/model`` entry:
    ``{name, drop_path_rate, pretrained_file, kwargs}``). ``aux_channels=None`` drops the auxiliary head.

    ``head=dtop``: ``backbone.name`` is a plain timm ViT and ``dtop`` holds DToP's own arguments
    (``variant`` — ``dtop_vit_base`` / ``dtop_vit_large``, the official settings — and any override of it:
    ``img_size``, ``out_indices``, ``threshold``, ``top_k``, ``head_dim``, ...)."""
    if head not in HEADS:
        raise ValueError(f"unknown segmentation head {head!r}; choose from {list(HEADS)}")
    if head == "dtop":
        from ..models.dtop import create_dtop

        if in_chans != 3:
            raise ValueError(f"head=dtop takes RGB images (in_chans=3), got in_chans={in_chans}")
        options = dict(dtop or {})
        return DToPSegmenter(create_dtop(
            options.pop("variant", "dtop_vit_base"), backbone=backbone["name"], num_classes=num_classes,
            drop_path_rate=backbone.get("drop_path_rate", 0.0), pretrained_file=backbone.get("pretrained_file"),
            backbone_kwargs=dict(backbone.get("kwargs") or {}), **options,
        ))
    encoder, decoder, channels = _smp_encoder_decoder(head, backbone, in_chans, decoder_channels)
    return SegmentationModel(encoder, decoder, channels, num_classes, dropout, aux_channels, aux_weight)


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


def poly_warmup(
    step: int, total_steps: int, warmup_steps: int, warmup_ratio: float, power: float, min_ratio: float
) -> float:
    """LR multiplier: linear from ``warmup_ratio`` to 1 over ``warmup_steps``, then polynomial decay
    ``(1 - t)^power`` to ``min_ratio`` (mmseg's LinearLR + PolyLR)."""
    if step < warmup_steps:
        return warmup_ratio + (1 - warmup_ratio) * step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * (1 - progress) ** power


class SegmentationModule(L.LightningModule):
    """Semantic segmentation: backbone by name, UPerNet / Semantic-FPN head, optional auxiliary head.

    Args:
        backbone: ``{name, drop_path_rate, pretrained_file, kwargs}`` (a ``configs/model`` entry).
        num_classes, in_chans: the dataset's. ignore_index: label excluded from the loss and the metrics.
        head: ``upernet``, ``fpn`` or ``dtop`` (see :func:`create_segmentation_model`; ``dtop`` holds its
            options). decoder_channels: UPerNet's channels (mmseg 512) or the FPN head's
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
        backbone: dict,
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
            self.to(memory_format=torch.channels_last)
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
        total = int(self.trainer.estimated_stepping_batches)
        warmup = min(hp.warmup_steps, total // 2)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: poly_warmup(step, total, warmup, hp.warmup_ratio, hp.poly_power, hp.min_lr / hp.lr),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


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
