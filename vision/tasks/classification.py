"""Image classification on any timm backbone (this package's or timm's own), chosen by name.

Auxiliary losses: after each training forward the task adds the backbone's ``aux_losses`` (a dict of
already weighted scalar losses, e.g. DynamicViT's ratio loss; a backbone without it adds nothing), so
``forward(x) -> logits`` stays timm's. ``distill`` adds distillation from a frozen teacher
(:class:`~vision.tasks.distillation.Distillation`).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.utils import ModelEmaV3
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from ..backbone import BackboneSpec
from .distillation import Distillation
from .schedules import per_step, training_steps, warmup_cosine  # noqa: F401  (warmup_cosine re-exported)


def to_channels_last(module: torch.nn.Module) -> None:
    """NHWC memory layout for the 4-D (convolution) weights; other tensors keep theirs, so the option is safe
    on any backbone (``Module.to(memory_format=...)`` fails on some attention models' 5-D parameters)."""
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.dim() == 4:
            tensor.data = tensor.data.contiguous(memory_format=torch.channels_last)


class ClassificationModule(L.LightningModule):
    """Backbone by name (``timm.create_model``), AdamW (timm factory), per-step warmup + cosine.

    Args:
        backbone: a :class:`~vision.backbone.BackboneSpec` or a ``configs/model`` entry
            (``{name, drop_path_rate, pretrained_file, kwargs}``).
        num_classes, in_chans: the dataset's.
        lr, min_lr, weight_decay, betas, layer_decay: AdamW; norms, biases and the backbone's
            ``no_weight_decay()`` names get no weight decay (timm's optimizer factory).
        warmup_epochs: linear warmup length (fractional epochs allowed), stepped per iteration.
        label_smoothing: for the hard-label loss, and for Mixup's soft targets.
        mixup: timm ``Mixup`` arguments (``mixup_alpha``, ``cutmix_alpha``, ``prob``, ...) or None.
        ema_decay: keep an EMA of the weights, used for validation and test; None disables.
        compile: ``torch.compile`` the backbone at fit start.
        channels_last: run convolutions in NHWC memory layout (faster on CPU and tensor cores).
        distill: ``{teacher: {name, pretrained_file, kwargs}, logit_weight, token_weight}`` (a
            :class:`Distillation`; the teacher is built for fitting only) or None.
    """

    def __init__(
        self,
        backbone: BackboneSpec | dict,
        num_classes: int,
        in_chans: int = 3,
        lr: float = 1e-3,
        min_lr: float = 1e-5,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.999),
        layer_decay: float | None = None,
        warmup_epochs: float = 5,
        label_smoothing: float = 0.1,
        mixup: dict | None = None,
        ema_decay: float | None = None,
        compile: bool = False,
        channels_last: bool = False,
        distill: dict | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(logger=False)
        spec = BackboneSpec.parse(backbone)
        self.hparams.backbone = spec.to_dict()  # plain containers in checkpoints
        self.model = spec.create(num_classes=num_classes, in_chans=in_chans)
        self.mixup = Mixup(**mixup, label_smoothing=label_smoothing, num_classes=num_classes) if mixup else None
        self.ema = ModelEmaV3(self.model, decay=ema_decay) if ema_decay else None
        self.distill = Distillation(**distill) if distill else None

        top_k = min(5, num_classes)
        self.train_loss, self.val_loss, self.test_loss = MeanMetric(), MeanMetric(), MeanMetric()
        self.train_loss.persistent(True)  # a mid-epoch checkpoint resumes the epoch's mean loss
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc5 = MulticlassAccuracy(num_classes, top_k=top_k, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc5 = MulticlassAccuracy(num_classes, top_k=top_k, average="micro")
        self.val_acc_best = MaxMetric()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def _unpack(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        images, targets = batch
        if self.hparams.channels_last and images.dim() == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, targets

    @property
    def eval_model(self) -> torch.nn.Module:
        """The weights used for validation and test: the EMA copy when enabled."""
        return self.ema.module if self.ema is not None else self.model

    def setup(self, stage: str) -> None:
        if self.hparams.channels_last:
            to_channels_last(self)
        if self.hparams.compile and stage == "fit":
            self.model.compile()  # in place: parameter names (and so checkpoints) stay uncompiled-compatible
        if self.distill is not None and stage == "fit" and self.distill.teacher is None:
            self.distill.build(self.hparams.num_classes, self.hparams.in_chans)

    def on_fit_start(self) -> None:
        if self.distill is not None:
            self.distill.to(self.device, next(self.model.parameters()).dtype)

    # ---- training -------------------------------------------------------------------------------

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, targets = self._unpack(batch)
        if self.mixup is not None:
            images, soft_targets = self.mixup(images, targets)
        logits, features = self._train_forward(images)
        if self.mixup is not None:
            loss = SoftTargetCrossEntropy()(logits, soft_targets)
        else:
            loss = F.cross_entropy(logits, targets, label_smoothing=self.hparams.label_smoothing)
        loss = loss + self._auxiliary_loss(images, logits, features)
        self.train_loss(loss.detach())
        self.log("train/loss", self.train_loss, on_step=True, on_epoch=True, prog_bar=True)
        return loss

    def _train_forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits and, only for token distillation, the features they came from (timm's contract)."""
        if self.distill is None or not self.distill.token_weight:
            return self.model(images), None
        features = self.model.forward_features(images)
        return self.model.forward_head(features), features

    def _auxiliary_loss(self, images: torch.Tensor, logits: torch.Tensor, features: torch.Tensor | None):
        """The backbone's ``aux_losses`` from this forward plus the distillation terms, each logged."""
        parts = dict(getattr(self.model, "aux_losses", None) or {})
        if self.distill is not None:
            parts.update(self.distill.losses(self.model, images, logits, features))
        for name, value in parts.items():
            self.log(f"train/{name}", value.detach(), on_step=True, on_epoch=True)
        return sum(parts.values(), logits.new_zeros(()))

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        # right after the step, before callbacks' on_train_batch_end: a checkpoint saved there holds this EMA
        if self.ema is not None:
            self.ema.update(self.model, step=self.global_step)

    def on_train_start(self) -> None:
        self.val_acc_best.reset()  # sanity-check batches must not count towards the best

    # ---- evaluation -----------------------------------------------------------------------------

    def _evaluate(self, batch, loss_metric, acc, acc5, prefix: str) -> torch.Tensor:
        if batch is None:  # every sample of the batch skipped (data.on_bad_sample=skip)
            return None
        images, targets = self._unpack(batch)
        logits = self.eval_model(images)
        loss_metric(F.cross_entropy(logits, targets))
        acc(logits, targets)
        acc5(logits, targets)
        self.log(f"{prefix}/loss", loss_metric, prog_bar=True)
        self.log(f"{prefix}/acc", acc, prog_bar=True)
        self.log(f"{prefix}/acc5", acc5)
        return logits.detach()

    def validation_step(self, batch, batch_idx: int) -> torch.Tensor:
        # the logits reach callbacks' on_validation_batch_end (AttentionMaps draws the confusion matrix)
        return self._evaluate(batch, self.val_loss, self.val_acc, self.val_acc5, "val")

    def on_validation_epoch_end(self) -> None:
        self.val_acc_best(self.val_acc.compute())
        self.log("val/acc_best", self.val_acc_best.compute(), prog_bar=True)

    def test_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, self.test_loss, self.test_acc, self.test_acc5, "test")

    # ---- optimisation ---------------------------------------------------------------------------

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        optimizer = create_optimizer_v2(
            self.model, opt="adamw", lr=hp.lr, weight_decay=hp.weight_decay, betas=tuple(hp.betas),
            layer_decay=hp.layer_decay,
        )
        for group in optimizer.param_groups:  # timm leaves layer decay as lr_scale, which only its schedulers apply
            group["lr"] = hp.lr * group.get("lr_scale", 1.0)
        total, steps_per_epoch = training_steps(self.trainer)
        warmup = min(int(hp.warmup_epochs * steps_per_epoch), total // 2)
        return per_step(optimizer, lambda step: warmup_cosine(step, total, warmup, hp.min_lr / hp.lr))

    # ---- prediction -----------------------------------------------------------------------------

    def predict_step(self, batch, batch_idx: int = 0) -> dict[str, torch.Tensor]:
        """Class probabilities ``[B, num_classes]`` of ``batch["image"]`` (``predict.py``: top-k with names)."""
        images = batch["image"]
        if self.hparams.channels_last and images.dim() == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        return {"probs": self.eval_model(images).float().softmax(-1)}
