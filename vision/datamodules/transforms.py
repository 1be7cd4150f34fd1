"""Albumentations pipelines for classification, configured from a backbone's pretrained_cfg.

Training: RandomResizedCrop + horizontal flip (+ an optional RandAugment-like policy).
Evaluation: resize the short side to ``image_size / crop_pct`` then center-crop ``image_size``,
the timm evaluation protocol. Images enter as HWC uint8 numpy arrays and leave as CHW float tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import albumentations as A
import cv2
import timm
from albumentations.pytorch import ToTensorV2

_INTERPOLATION = {
    "nearest": cv2.INTER_NEAREST,
    "bilinear": cv2.INTER_LINEAR,
    "bicubic": cv2.INTER_CUBIC,
    "area": cv2.INTER_AREA,
}


@dataclass(frozen=True)
class EvalConfig:
    """The preprocessing a backbone was trained with (timm's pretrained_cfg fields)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_pct: float
    interpolation: str


def backbone_eval_config(backbone: str | None, in_chans: int = 3, **overrides) -> EvalConfig:
    """Mean, std, crop_pct and interpolation from ``backbone``'s timm pretrained_cfg.

    Explicit (non-None) ``overrides`` win, so a dataset with its own statistics (Fashion-MNIST)
    can set them while the crop and interpolation still follow the backbone. RGB statistics
    are averaged when the data has another channel count.
    """
    cfg = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), crop_pct=0.875, interpolation="bicubic")
    if backbone:
        import vision  # noqa: F401  (registers this package's backbones so their cfgs resolve)

        pretrained = timm.models.get_pretrained_cfg(backbone)
        if pretrained is None:
            raise ValueError(f"unknown backbone {backbone!r}: no timm pretrained_cfg to take preprocessing from")
        cfg.update({k: getattr(pretrained, k) for k in cfg if getattr(pretrained, k, None) is not None})
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    if cfg["interpolation"] not in _INTERPOLATION:
        raise ValueError(f"interpolation={cfg['interpolation']!r}; expected one of {sorted(_INTERPOLATION)}")
    mean, std = tuple(cfg["mean"]), tuple(cfg["std"])
    if len(mean) != in_chans:
        mean, std = (sum(mean) / len(mean),) * in_chans, (sum(std) / len(std),) * in_chans
    return EvalConfig(
        mean=mean, std=std, crop_pct=float(cfg["crop_pct"]), interpolation=cfg["interpolation"]
    )


def _randaugment(magnitude: int, num_ops: int) -> A.BasicTransform:
    """A RandAugment-like policy: ``num_ops`` operations drawn uniformly, strength ``magnitude`` in [0, 10]."""
    m = magnitude / 10.0
    ops = [
        A.Affine(rotate=(-30 * m, 30 * m), p=1.0),
        A.Affine(shear={"x": (-17 * m, 17 * m)}, p=1.0),
        A.Affine(shear={"y": (-17 * m, 17 * m)}, p=1.0),
        A.Affine(translate_percent={"x": (-0.45 * m, 0.45 * m)}, p=1.0),
        A.Affine(translate_percent={"y": (-0.45 * m, 0.45 * m)}, p=1.0),
        A.RandomBrightnessContrast(brightness_limit=0.9 * m, contrast_limit=0, p=1.0),
        A.RandomBrightnessContrast(brightness_limit=0, contrast_limit=0.9 * m, p=1.0),
        A.Sharpen(alpha=(0.1, max(0.1, m)), p=1.0),
        A.Posterize(num_bits=(max(1, int(8 - 4 * m)), 8), p=1.0),
        A.Solarize(threshold_range=(max(0.0, 1 - m), 1.0), p=1.0),
        A.Equalize(p=1.0),
        A.InvertImg(p=1.0),
    ]
    return A.SomeOf(ops, n=num_ops, replace=False, p=1.0)


def build_transforms(
    train: bool,
    image_size: int,
    eval_config: EvalConfig,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    hflip: float = 0.5,
    randaugment: dict | None = None,
) -> A.Compose:
    """The training or evaluation pipeline; ``randaugment`` = ``{magnitude: 9, num_ops: 2}`` or None."""
    interpolation = _INTERPOLATION[eval_config.interpolation]
    if train:
        ops = [A.RandomResizedCrop(size=(image_size, image_size), scale=tuple(scale), ratio=tuple(ratio),
                                   interpolation=interpolation)]
        if hflip > 0:
            ops.append(A.HorizontalFlip(p=hflip))
        if randaugment:
            ops.append(_randaugment(**randaugment))
    else:
        resize = int(round(image_size / eval_config.crop_pct))
        ops = [A.SmallestMaxSize(max_size=resize, interpolation=interpolation),
               A.CenterCrop(height=image_size, width=image_size)]
    ops += [A.Normalize(mean=eval_config.mean, std=eval_config.std, max_pixel_value=255.0), ToTensorV2()]
    return A.Compose(ops)
