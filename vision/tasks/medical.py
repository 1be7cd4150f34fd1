"""Medical image segmentation: 2-D/2.5-D backbones of this package (or timm's) and MONAI 3-D baselines.

``network="smp"`` puts a segmentation-models-pytorch decoder on any timm backbone (``tu-<name>``, built with
``features_only=True``). On 2-D images it runs as is; on volumes it runs slice-wise on axial slices with
``context`` neighbouring slices on each side as extra channels (2.5-D), and the slice predictions are
stacked back into a volume. ``network="unet"`` / ``"swin_unetr"`` are MONAI's networks, native in 2-D or 3-D.

Loss: MONAI DiceCE. Validation and test: sliding-window inference on whole volumes (images), then per-case
Dice and HD95 (MONAI metrics, in mm from the volume's affine), averaged over cases per class.
"""

from __future__ import annotations

import warnings
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_only
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.metrics import compute_dice, compute_hausdorff_distance
from timm.optim import create_optimizer_v2
from torch import nn
from torchmetrics import CatMetric, MaxMetric, MeanMetric

from ..backbone import BackboneSpec
from ..models import forget_state_dict
from .schedules import per_step, training_steps, warmup_cosine

NETWORKS = ("smp", "unet", "swin_unetr", "nat_unet3d", "attention_unet")


def create_network(network: str, backbone: BackboneSpec | dict, in_channels: int, num_classes: int, spatial_dims: int,
                  decoder: str = "unet", net_kwargs: dict | None = None) -> nn.Module:
    """The segmentation network, logits ``[B, num_classes, *spatial]``.

    ``smp``: ``smp.Unet``, ``smp.FPN`` or the WAU U-Net (:mod:`vision.heads.wau`) (``decoder``) on the timm
    backbone ``backbone`` (2-D);
    ``unet`` / ``swin_unetr``: MONAI's, in ``spatial_dims`` dimensions; ``nat_unet3d``: 3-D neighborhood
    attention encoder + U-Net decoder (:class:`vision.heads.nat_unet3d.NATUNet3D`); ``attention_unet``:
    attention-gated 3-D U-Net, multi-scale input, deep supervision (:mod:`vision.heads.attention_unet3d`).
    ``net_kwargs`` go to the network.
    """
    net_kwargs = dict(net_kwargs or {})
    if network == "smp":
        import segmentation_models_pytorch as smp

        if spatial_dims != 2:
            raise ValueError("smp networks are 2-D; volumes run through them slice-wise (SliceWise)")
        decoders = {"unet": smp.Unet, "fpn": smp.FPN, "wau": None}
        if decoder not in decoders:
            raise ValueError(f"decoder={decoder!r}; expected one of {sorted(decoders)}")
        if decoder == "wau":  # window-attention upsampling (vision.heads.wau); net_kwargs: its decoder's
            from ..heads.wau import create_wau_unet

            return create_wau_unet(backbone, in_channels, num_classes, **net_kwargs)
        net = decoders[decoder](in_channels=in_channels, classes=num_classes,
                                **BackboneSpec.parse(backbone).smp_encoder(), **net_kwargs)
        forget_state_dict(net.encoder)
        return net
    if network == "unet":
        from monai.networks.nets import UNet

        kwargs = dict(channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2), num_res_units=2, norm="batch")
        return UNet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=num_classes,
                    **{**kwargs, **net_kwargs})
    if network == "swin_unetr":
        import importlib.util

        from monai.networks.nets import SwinUNETR

        if importlib.util.find_spec("einops") is None:  # MONAI imports it lazily, at the first forward
            raise ModuleNotFoundError("network=swin_unetr needs MONAI's optional dependency einops: pip install einops")
        return SwinUNETR(in_channels=in_channels, out_channels=num_classes, spatial_dims=spatial_dims,
                         **{"feature_size": 24, **net_kwargs})
    if network == "nat_unet3d":
        from ..heads.nat_unet3d import NATUNet3D  # a whole network (like MONAI's), not a timm backbone

        if spatial_dims != 3:
            raise ValueError(f"network=nat_unet3d is 3-D; got a {spatial_dims}-D roi_size")
        return NATUNet3D(in_channels, num_classes, **net_kwargs)
    if network == "attention_unet":
        from ..heads.attention_unet3d import AttentionUNet3D  # AGUNet-style (not MONAI's: see there)

        if spatial_dims != 3:
            raise ValueError(f"network=attention_unet is 3-D; got a {spatial_dims}-D roi_size")
        return AttentionUNet3D(in_channels, num_classes, **net_kwargs)
    raise ValueError(f"network={network!r}; expected one of {NETWORKS}")


def slice_stacks(volume: torch.Tensor, context: int) -> torch.Tensor:
    """``[B, C, H, W, D]`` -> ``[B, D, C * (2 * context + 1), H, W]``: each axial slice with its
    ``context`` neighbours on each side, the end slices repeated beyond the volume."""
    padded = torch.cat([volume[..., :1]] * context + [volume] + [volume[..., -1:]] * context, dim=-1)
    stacks = padded.unfold(-1, 2 * context + 1, 1)  # [B, C, H, W, D, k]
    return stacks.permute(0, 4, 1, 5, 2, 3).flatten(2, 3)  # [B, D, C, k, H, W] -> [B, D, C * k, H, W]


class SliceWise(nn.Module):
    """A 2-D network applied to every axial slice (with ``context`` neighbours as channels) of a volume;
    the slice logits are stacked back along the last axis."""

    def __init__(self, net: nn.Module, context: int, chunk: int = 32):
        super().__init__()
        self.net, self.context, self.chunk = net, context, chunk

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        stacks = slice_stacks(volume, self.context)  # [B, D, C', H, W]
        b, d = stacks.shape[:2]
        flat = stacks.flatten(0, 1)
        logits = torch.cat([self.net(flat[i:i + self.chunk]) for i in range(0, b * d, self.chunk)])
        return logits.unflatten(0, (b, d)).permute(0, 2, 3, 4, 1)  # [B, K, H, W, D]


def case_metrics(pred: torch.Tensor, label: torch.Tensor, num_classes: int,
                 spacing: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-case, per-foreground-class Dice and HD95 ``[B, num_classes - 1]`` of label maps ``[B, 1, ...]``.

    A class absent from the ground truth is NaN in both (skipped when averaging over cases). A class
    present in the ground truth but not predicted has Dice 0 and, since its distance is undefined, HD95
    set to the image diagonal (the worst possible), so a missed structure cannot improve the mean HD95.
    ``spacing`` ``[B, dims]`` gives HD95 in physical units, else pixels.
    """
    pred_1h = nn.functional.one_hot(pred[:, 0].long(), num_classes).movedim(-1, 1).float()
    label_1h = nn.functional.one_hot(label[:, 0].long(), num_classes).movedim(-1, 1).float()
    dice = compute_dice(pred_1h, label_1h, include_background=False, ignore_empty=True)
    sp = spacing.tolist() if spacing is not None else None
    with warnings.catch_warnings():  # empty masks are handled below; MONAI would warn for each of them
        warnings.filterwarnings("ignore", message=".*all 0, this may result in nan/inf distance")
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy", category=FutureWarning)
        hd = compute_hausdorff_distance(pred_1h, label_1h, include_background=False, percentile=95, spacing=sp)
    extent = torch.tensor(label.shape[2:], dtype=torch.float64, device=hd.device)
    scale = spacing.to(hd.device, torch.float64) if spacing is not None else torch.ones_like(extent)
    diagonal = ((extent * scale) ** 2).sum(-1).sqrt().to(hd.dtype).expand(hd.shape[0]).unsqueeze(1)
    missed = (label_1h[:, 1:].flatten(2).amax(-1) > 0) & (pred_1h[:, 1:].flatten(2).amax(-1) == 0)
    hd = torch.where(missed.to(hd.device), diagonal.expand_as(hd), hd)
    return dice.float(), hd.float().to(dice.device)  # MONAI may compute HD95 on the host; metrics sync on device


def case_table(values: dict[str, list[float]], names: list[str]) -> str:
    """Per-class Dice and HD95 (means over cases) and their mean, as a text table (rows: classes + mean)."""
    rows = [f"{'class':<16}{'Dice':>8}{'HD95':>10}"]
    for name, dice, hd in zip([*names, "mean"], values["dice"], values["hd95"]):
        rows.append(f"{name:<16}{dice:>8.4f}{hd:>10.2f}")
    return "\n".join(rows)


def _plain(x: torch.Tensor) -> torch.Tensor:
    """MONAI MetaTensors as plain tensors: the networks do not need the metadata, and it slows them down."""
    return x.as_tensor() if hasattr(x, "as_tensor") else x


def _spacing(image: torch.Tensor) -> torch.Tensor | None:
    """Voxel sizes ``[B, 3]`` from a MetaTensor's affine (column norms); None for plain 2-D images."""
    affine = getattr(image, "affine", None)
    if affine is None or image.ndim != 5:
        return None
    affine = affine if affine.ndim == 3 else affine.unsqueeze(0)
    return affine[:, :3, :3].double().norm(dim=-2).float()


class MedicalSegmentationModule(L.LightningModule):
    """Segmentation of 2-D images or 3-D volumes (``len(roi_size)`` says which) from dictionary batches
    ``{"image": [B, C, *spatial], "label": [B, 1, *spatial]}``.

    Args:
        backbone: a :class:`~vision.backbone.BackboneSpec` or ``configs/model`` entry, for ``network="smp"``.
        num_classes: including background (label 0). in_channels: image channels (modalities).
        roi_size: the training patch; sliding-window inference uses it as its window (2.5-D: in-plane
            window over all slices, so every slice sees its true neighbours).
        network: ``smp`` (2-D/2.5-D on the backbone), ``unet`` or ``swin_unetr`` (MONAI), ``nat_unet3d`` (3-D NAT
            encoder + U-Net decoder); ``net_kwargs`` for it.
        decoder: ``unet`` or ``fpn`` (smp), ``wau`` (window-attention upsampling, :mod:`vision.heads.wau`). context: neighbouring slices on each side (2.5-D).
        slices_per_patch: axial slices drawn per training patch (2.5-D); None uses all.
        lambda_dice, lambda_ce: DiceCE weights. sw_batch_size, sw_overlap: sliding-window inference.
        lr, min_lr, weight_decay, warmup_epochs: AdamW with per-step warmup + cosine.
    """

    def __init__(
        self,
        backbone: BackboneSpec | dict,
        num_classes: int,
        in_channels: int = 1,
        roi_size: tuple[int, ...] = (96, 96, 96),
        network: str = "smp",
        decoder: str = "unet",
        context: int = 1,
        net_kwargs: dict | None = None,
        slices_per_patch: int | None = 16,
        lambda_dice: float = 1.0,
        lambda_ce: float = 1.0,
        sw_batch_size: int = 4,
        sw_overlap: float = 0.25,
        lr: float = 1e-3,
        min_lr: float = 1e-5,
        weight_decay: float = 1e-5,
        warmup_epochs: float = 0,
    ):
        super().__init__()
        self.save_hyperparameters(logger=False)
        backbone = BackboneSpec.parse(backbone)
        self.hparams.backbone = backbone.to_dict()  # plain containers in checkpoints
        self.spatial_dims = len(roi_size)
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"roi_size={list(roi_size)}: expected 2 (images) or 3 (volumes) sizes")
        self.slicewise = network == "smp" and self.spatial_dims == 3
        if network == "smp" and self.spatial_dims == 2 and context:
            raise ValueError("2-D images have no neighbouring slices: set model.context=0")
        channels = in_channels * (2 * context + 1) if self.slicewise else in_channels
        self.net = create_network(network, backbone, channels, num_classes, 2 if network == "smp" else self.spatial_dims,
                                 decoder, net_kwargs)
        self.volume_net = SliceWise(self.net, context) if self.slicewise else self.net
        self.loss = DiceCELoss(to_onehot_y=True, softmax=True, batch=True, lambda_dice=lambda_dice,
                               lambda_ce=lambda_ce)
        self.train_loss, self.val_loss, self.test_loss = MeanMetric(), MeanMetric(), MeanMetric()
        self.cases = nn.ModuleDict({f"{split}_{m}": CatMetric(nan_strategy="disable")
                                    for split in ("val", "test") for m in ("dice", "hd95")})
        self.val_dice_best = MaxMetric()

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Logits for a whole image or volume (or a patch of one)."""
        return self.volume_net(image)

    def predict(self, image: torch.Tensor) -> torch.Tensor:
        """Sliding-window logits over a whole image or volume. A volume ``[B, C, H, W, D]`` given to a 2-D
        network (slice-trained data: Synapse, ACDC) is predicted slice by slice, each slice resized to
        ``roi_size`` and its logits back (the TransUNet protocol)."""
        hp = self.hparams
        if self.spatial_dims == 2 and image.ndim == 5:
            return self._predict_slices(_plain(image))
        roi = list(hp.roi_size)
        if self.slicewise:
            roi[-1] = -1  # all slices in each window
        return sliding_window_inference(_plain(image), roi, hp.sw_batch_size, self.forward,
                                        overlap=hp.sw_overlap, mode="gaussian")

    def _predict_slices(self, volume: torch.Tensor) -> torch.Tensor:
        b, d, size = volume.shape[0], volume.shape[-1], volume.shape[2:4]
        slices = volume.permute(0, 4, 1, 2, 3).flatten(0, 1)  # [B * D, C, H, W]
        chunk = max(1, self.hparams.sw_batch_size)
        logits = []
        for i in range(0, len(slices), chunk):
            x = F.interpolate(slices[i:i + chunk], size=tuple(self.hparams.roi_size), mode="bilinear",
                              align_corners=False)
            logits.append(F.interpolate(self.net(x), size=size, mode="bilinear", align_corners=False))
        return torch.cat(logits).unflatten(0, (b, d)).permute(0, 2, 3, 4, 1)  # [B, K, H, W, D]

    # ---- training -------------------------------------------------------------------------------

    def _training_slices(self, image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Random axial slices of the patches (with their context) and the labels of those slices."""
        r, n = self.hparams.context, self.hparams.slices_per_patch
        stacks = slice_stacks(image, r)  # [B, D, C', H, W]
        b, d = stacks.shape[:2]
        centres = torch.arange(r, d - r, device=image.device) if d > 2 * r else torch.arange(d, device=image.device)
        pairs = torch.cartesian_prod(torch.arange(b, device=image.device), centres)
        if n and n * b < len(pairs):
            pairs = pairs[torch.randperm(len(pairs), device=image.device)[: n * b]]
        return stacks[pairs[:, 0], pairs[:, 1]], label[pairs[:, 0], ..., pairs[:, 1]]

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        image, label = _plain(batch["image"]), _plain(batch["label"])
        if self.slicewise:
            image, label = self._training_slices(image, label)
        loss = self._loss(self.net(image), label)  # a non-finite loss: NonFiniteGuard (callbacks: default)
        self.train_loss(loss.detach())
        self.log("train/loss", self.train_loss, on_step=True, on_epoch=True, prog_bar=True)
        return loss

    def _loss(self, logits: torch.Tensor | list[torch.Tensor], label: torch.Tensor) -> torch.Tensor:
        """DiceCE; a list of logits (deep supervision, full resolution first) weighs level k by 2^-k, normalised."""
        if isinstance(logits, torch.Tensor):
            return self.loss(logits, label)
        weights = torch.tensor([0.5**k for k in range(len(logits))])
        weights = weights / weights.sum()
        return sum(w * self.loss(out, label) for w, out in zip(weights.tolist(), logits))

    def on_train_start(self) -> None:
        self.val_dice_best.reset()  # sanity-check batches must not count towards the best

    # ---- evaluation -----------------------------------------------------------------------------

    def _evaluate(self, batch: dict, split: str) -> dict[str, torch.Tensor]:
        if batch is None:  # every sample of the batch skipped (data.on_bad_sample=skip)
            return None
        image, label = batch["image"], _plain(batch["label"])
        logits = self.predict(image)
        loss_metric = self.val_loss if split == "val" else self.test_loss
        loss_metric(self.loss(logits, label))
        self.log(f"{split}/loss", loss_metric, prog_bar=True, batch_size=len(label))
        pred = logits.argmax(1, keepdim=True)
        dice, hd = case_metrics(pred, label, self.hparams.num_classes, _spacing(image))
        self.cases[f"{split}_dice"].update(dice)
        self.cases[f"{split}_hd95"].update(hd)
        return {"pred": pred}

    def _log_cases(self, split: str) -> float | None:
        """Per-class means over cases (NaN-skipping), and their mean over classes; returns mean Dice."""
        means, table = {}, {}
        for name in ("dice", "hd95"):
            metric = self.cases[f"{split}_{name}"]
            if not metric.update_count:
                return None
            values = metric.compute().reshape(-1, self.hparams.num_classes - 1)
            per_class = values.nanmean(0)
            for k, v in enumerate(per_class.tolist(), start=1):
                self.log(f"{split}/{name}_{k}", v)
            means[name] = per_class.nanmean()
            self.log(f"{split}/{name}", means[name], prog_bar=True)
            table[name] = per_class.tolist() + [float(means[name])]
            metric.reset()
        if split == "test":
            rank_zero_only(print)(case_table(table, self._class_names()))  # the papers' table, in the console
        return float(means["dice"])

    def _class_names(self) -> list[str]:
        names = getattr(getattr(self.trainer, "datamodule", None), "class_names", None) if self._trainer else None
        names = list(names or [])[1:]
        return names if len(names) == self.hparams.num_classes - 1 else [
            f"class_{k}" for k in range(1, self.hparams.num_classes)]

    def validation_step(self, batch: dict, batch_idx: int) -> dict[str, torch.Tensor]:
        # the predicted label map reaches callbacks' on_validation_batch_end (MedicalOverlays)
        return self._evaluate(batch, "val")

    def on_validation_epoch_end(self) -> None:
        dice = self._log_cases("val")
        if dice is not None and dice == dice:  # not NaN
            self.val_dice_best(dice)  # a float: the metric puts it on its own device
        if self.val_dice_best.update_count:
            self.log("val/dice_best", self.val_dice_best.compute(), prog_bar=True)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._log_cases("test")

    # ---- optimisation ---------------------------------------------------------------------------

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        optimizer = create_optimizer_v2(self.net, opt="adamw", lr=hp.lr, weight_decay=hp.weight_decay)
        total, steps_per_epoch = training_steps(self.trainer)
        warmup = min(int(hp.warmup_epochs * steps_per_epoch), total // 2)
        return per_step(optimizer, lambda step: warmup_cosine(step, total, warmup, hp.min_lr / hp.lr))

    # ---- prediction -----------------------------------------------------------------------------

    def predict_step(self, batch, batch_idx: int = 0) -> dict[str, list[torch.Tensor]]:
        """Class-id masks ``[H, W]`` of 2-D images at their original size ``batch["size"]`` (sliding-window
        logits of the evaluation transform's output ``batch["image"]``; ``predict.py``)."""
        logits = self.predict(batch["image"])
        masks = []
        for i, size in enumerate(batch["size"].tolist()):
            sample = logits[i : i + 1]
            if list(sample.shape[2:]) != size:
                sample = F.interpolate(sample.float(), size=size, mode="bilinear", align_corners=False)
            masks.append(sample.argmax(1)[0])
        return {"masks": masks}

build_network = create_network  # the former name
