"""Object detection and instance segmentation: torchvision detectors on any timm backbone, chosen by name.

The backbone is ``timm.create_model(name, features_only=True, out_indices=...)`` (through
``vision.models.create_model``) under torchvision's FeaturePyramidNetwork: the last four levels plus a
max-pooled P6 for Faster/Mask R-CNN (strides 4-64 on a stride-32 pyramid), the last three plus P6/P7 for
RetinaNet and FCOS (strides 8-128). Anchors follow each detector's torchvision defaults, expressed in the
backbone's strides so that any pyramid fits.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import lightning as L
import torch
from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from torch import nn
from torchmetrics import MaxMetric
from torchmetrics.detection import MeanAveragePrecision
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from ..backbone import BackboneSpec
from .schedules import per_step, training_steps, warmup_schedule  # noqa: F401  (warmup_schedule re-exported)

DETECTORS = ("retinanet", "fcos", "faster_rcnn", "mask_rcnn")
TWO_STAGE = ("faster_rcnn", "mask_rcnn")


class TimmFPN(nn.Module):
    """A timm ``features_only`` backbone + FPN, the module torchvision detectors expect (``out_channels``)."""

    def __init__(self, body: nn.Module, out_channels: int, two_stage: bool):
        super().__init__()
        self.body = body
        extra = LastLevelMaxPool() if two_stage else LastLevelP6P7(out_channels, out_channels)
        self.fpn = FeaturePyramidNetwork(body.feature_info.channels(), out_channels, extra_blocks=extra)
        self.out_channels = out_channels
        reductions = body.feature_info.reduction()
        self.strides = [*reductions, *(reductions[-1] * 2 ** k for k in range(1, 2 if two_stage else 3))]

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(self.body(x))))


class TrainTimeNoResize(GeneralizedRCNNTransform):
    """Normalises and batches. Training images come already resized and cropped by the datamodule, so
    they pass unchanged; evaluation images are resized to ``min_size``/``max_size`` and the predictions
    mapped back to the original pixels (torchvision's behaviour)."""

    def resize(self, image, target=None):
        if self.training:
            return image, target
        return super().resize(image, target)


def create_detector(kind: str, backbone: BackboneSpec | dict, num_classes: int, fpn_channels: int = 256,
                   min_size: int = 800, max_size: int = 1333, **kwargs) -> nn.Module:
    """A torchvision detector (``kind`` in :data:`DETECTORS`) with ``num_classes`` foreground classes on
    the timm backbone ``backbone`` (a :class:`~vision.backbone.BackboneSpec` or its ``configs/model`` entry;
    ``out_indices`` picks the levels)."""
    if kind not in DETECTORS:
        raise ValueError(f"detector={kind!r}; expected one of {DETECTORS}")
    backbone = BackboneSpec.parse(backbone)
    two_stage = kind in TWO_STAGE
    out_indices = backbone.out_indices or ((-4, -3, -2, -1) if two_stage else (-3, -2, -1))
    body = backbone.create(features_only=True, out_indices=tuple(out_indices))
    levels = 4 if two_stage else 3
    if len(body.feature_info.channels()) != levels:
        raise ValueError(f"{kind} needs {levels} backbone levels; {backbone.name} with out_indices="
                         f"{tuple(out_indices)} gives {len(body.feature_info.channels())}")
    fpn = TimmFPN(body, fpn_channels, two_stage)
    strides = fpn.strides
    if kind == "fcos":  # one anchor per location, its size the level's stride (what FCOS's ranges assume)
        anchors = AnchorGenerator(tuple((s,) for s in strides), ((1.0,),) * len(strides))
    elif kind == "retinanet":  # 4 x stride at three octave scales, three ratios
        anchors = AnchorGenerator(tuple(tuple(int(4 * s * 2 ** (k / 3)) for k in range(3)) for s in strides),
                                  ((0.5, 1.0, 2.0),) * len(strides))
    else:  # 8 x stride (32..512 on strides 4..64), three ratios
        anchors = AnchorGenerator(tuple((8 * s,) for s in strides), ((0.5, 1.0, 2.0),) * len(strides))
    cls = {"retinanet": RetinaNet, "fcos": FCOS, "faster_rcnn": FasterRCNN, "mask_rcnn": MaskRCNN}[kind]
    extra = {}
    if two_stage:
        names = [str(i) for i in range(levels)]
        extra["rpn_anchor_generator"] = anchors
        extra["box_roi_pool"] = MultiScaleRoIAlign(names, 7, 2)
        if kind == "mask_rcnn":
            extra["mask_roi_pool"] = MultiScaleRoIAlign(names, 14, 2)
    else:
        extra["anchor_generator"] = anchors
    detector = cls(fpn, num_classes=num_classes + 1, min_size=min_size, max_size=max_size, **extra, **kwargs)
    mean, std = backbone.normalization()
    t = detector.transform
    detector.transform = TrainTimeNoResize(t.min_size, t.max_size, list(mean), list(std),
                                           size_divisible=t.size_divisible)
    return detector


class DetectionModule(L.LightningModule):
    """RetinaNet / FCOS / Faster R-CNN / Mask R-CNN on a timm backbone, with COCO mAP.

    Args:
        backbone: ``{name, drop_path_rate, pretrained_file, kwargs[, out_indices]}`` (a ``configs/model`` entry).
        num_classes: foreground categories (the detector adds the background class).
        detector: one of :data:`DETECTORS`. fpn_channels: FPN width.
        min_size, max_size: the evaluation resize (short side, long-side cap) inside the detector.
        detector_kwargs: passed to the torchvision class (``score_thresh``, ``detections_per_img``, ...).
        lr, min_lr, weight_decay, betas: AdamW; biases and norm weights get no weight decay.
        backbone_lr_mult: the backbone's learning rate relative to the FPN and heads.
        layer_decay: timm layer-wise lr decay inside the backbone (needs its ``group_matcher``).
        schedule: ``step`` (x ``gamma`` at ``milestones``, in epochs) or ``cosine`` (to ``min_lr``).
        warmup_steps: linear warmup iterations.
    """

    def __init__(
        self,
        backbone: BackboneSpec | dict,
        num_classes: int,
        detector: str = "retinanet",
        fpn_channels: int = 256,
        min_size: int = 800,
        max_size: int = 1333,
        detector_kwargs: dict | None = None,
        lr: float = 1e-4,
        min_lr: float = 0.0,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.999),
        backbone_lr_mult: float = 1.0,
        layer_decay: float | None = None,
        schedule: str = "step",
        milestones: tuple[int, ...] = (8, 11),
        gamma: float = 0.1,
        warmup_steps: int = 500,
    ):
        super().__init__()
        self.save_hyperparameters(logger=False)
        backbone = BackboneSpec.parse(backbone)
        self.hparams.backbone = backbone.to_dict()  # plain containers in checkpoints
        if schedule not in ("step", "cosine"):
            raise ValueError(f"schedule={schedule!r}; expected 'step' or 'cosine'")
        self.detector = create_detector(detector, backbone, num_classes, fpn_channels, min_size, max_size,
                                       **(detector_kwargs or {}))
        iou_type = ("bbox", "segm") if detector == "mask_rcnn" else "bbox"
        self.val_map = MeanAveragePrecision(iou_type=iou_type, backend="pycocotools")
        self.test_map = MeanAveragePrecision(iou_type=iou_type, backend="pycocotools", class_metrics=True)
        self.val_map_50_best = MaxMetric()

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """Predictions ``[{boxes xyxy, labels 1..K, scores[, masks float[N, 1, H, W]]}]`` in input pixels."""
        return self.detector(images)

    @property
    def eval_model(self) -> nn.Module:
        return self.detector

    # ---- training -------------------------------------------------------------------------------

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, targets = batch
        losses = self.detector(images, [{k: v for k, v in t.items() if k != "image_id"} for t in targets])
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite detection loss {({k: float(v) for k, v in losses.items()})} at epoch "
                f"{self.current_epoch}, step {self.global_step}; lower model.lr, raise model.warmup_steps, or "
                "set trainer.gradient_clip_val"
            )
        size = len(images)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=size)
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, on_step=False, on_epoch=True, batch_size=size)
        return loss

    def on_train_start(self) -> None:
        self.val_map_50_best.reset()  # sanity-check batches must not count towards the best

    # ---- evaluation -----------------------------------------------------------------------------

    def _update(self, metric: MeanAveragePrecision, batch) -> list[dict]:
        if batch is None:  # every sample of the batch skipped (data.on_bad_sample=skip)
            return None
        images, targets = batch
        preds = self.detector(images)
        segm = "segm" in metric.iou_type
        metric.update([_metric_pred(p, segm) for p in preds], [_metric_target(t, segm) for t in targets])
        return preds

    def validation_step(self, batch, batch_idx: int) -> list[dict]:
        return self._update(self.val_map, batch)  # predictions reach callbacks (DetectionPreview)

    def on_validation_epoch_end(self) -> None:
        scores = _flatten(self.val_map.compute())
        self.val_map.reset()
        self.log_dict({f"val/{k}": v for k, v in scores.items()}, prog_bar=False)
        self.val_map_50_best(scores["map_50"])
        self.log("val/map_50_best", self.val_map_50_best.compute(), prog_bar=True)

    def test_step(self, batch, batch_idx: int) -> None:
        self._update(self.test_map, batch)

    def on_test_epoch_end(self) -> None:
        raw = self.test_map.compute()
        self.test_map.reset()
        self.log_dict({f"test/{k}": v for k, v in _flatten(raw).items()})
        names = getattr(getattr(self.trainer, "datamodule", None), "class_names", None) or []
        per_class = raw["bbox_map_per_class" if "bbox_map_per_class" in raw else "map_per_class"].reshape(-1)
        classes = raw["classes"].reshape(-1)
        for label, ap in zip(classes.tolist(), per_class):
            name = names[label - 1] if 0 < label <= len(names) else f"class_{label}"
            self.log(f"test/ap/{name}", ap)

    # ---- optimisation ---------------------------------------------------------------------------

    def param_groups(self) -> list[dict]:
        """AdamW groups with an explicit ``lr`` each: the backbone's (x ``backbone_lr_mult``, optionally
        with timm layer decay), then the FPN and heads; biases and norms without weight decay."""
        hp = self.hparams
        body = self.detector.backbone.body
        skip = set(getattr(getattr(body, "model", body), "no_weight_decay", lambda: set())())
        if hp.layer_decay:
            inner = getattr(body, "model", body)  # FeatureGetterNet wraps the model; names stay the model's
            if not hasattr(inner, "group_matcher"):
                raise ValueError(f"layer_decay needs a backbone with timm's group_matcher; "
                                 f"{hp.backbone['name']} as features_only has none: use backbone_lr_mult")
            groups = param_groups_layer_decay(inner, weight_decay=hp.weight_decay, no_weight_decay_list=list(skip),
                                              layer_decay=hp.layer_decay)
        else:
            groups = param_groups_weight_decay(body, weight_decay=hp.weight_decay, no_weight_decay_list=list(skip))
        for group in groups:
            group["lr"] = hp.lr * hp.backbone_lr_mult * group.pop("lr_scale", 1.0)
        ids = {id(p) for p in body.parameters()}
        rest = nn.ParameterList([p for p in self.detector.parameters() if id(p) not in ids and p.requires_grad])
        for group in param_groups_weight_decay(rest, weight_decay=hp.weight_decay):
            groups.append({**group, "lr": hp.lr})
        return [g for g in groups if g["params"]]

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        optimizer = torch.optim.AdamW(self.param_groups(), lr=hp.lr, betas=tuple(hp.betas))
        total, steps_per_epoch = training_steps(self.trainer)
        warmup = min(hp.warmup_steps, total // 2)
        milestones = [int(m * steps_per_epoch) for m in hp.milestones]
        min_ratio = hp.min_lr / hp.lr
        return per_step(
            optimizer, lambda step: warmup_schedule(step, total, warmup, hp.schedule, milestones, hp.gamma, min_ratio)
        )

    # ---- prediction -----------------------------------------------------------------------------

    def predict_step(self, batch, batch_idx: int = 0) -> dict[str, list[dict[str, torch.Tensor]]]:
        """The detector's ``[{boxes xyxy, labels 1..K, scores[, masks]}]`` for ``batch["image"]`` (float images
        in [0, 1] at their original size: the detector resizes and normalises; ``predict.py``)."""
        return {"detections": self.detector(list(batch["image"]))}


def _metric_pred(pred: dict, segm: bool) -> dict:
    out = {"boxes": pred["boxes"].detach(), "scores": pred["scores"].detach(), "labels": pred["labels"]}
    if segm:
        out["masks"] = pred["masks"][:, 0] > 0.5
    return out


def _metric_target(target: dict, segm: bool) -> dict:
    out = {"boxes": target["boxes"], "labels": target["labels"]}
    if "iscrowd" in target:
        out["iscrowd"] = target["iscrowd"]
    if segm:
        out["masks"] = target["masks"].bool()
    return out


def _flatten(scores: dict) -> dict[str, torch.Tensor]:
    """torchmetrics' scalar results, bbox keys plain (``map_50``) and segm keys prefixed (``segm_map_50``)."""
    out = {}
    for key, value in scores.items():
        if value.numel() != 1 or key.endswith(("classes", "per_class")):
            continue
        out[key.removeprefix("bbox_")] = value.float()
    return out


build_detector = create_detector  # the former name
