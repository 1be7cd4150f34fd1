"""Augmentation and preprocessing pipelines of every task; images enter as HWC uint8 arrays, leave as CHW tensors.

Classification (configured from a backbone's pretrained_cfg): RandomResizedCrop + horizontal flip (+ an optional
RandAugment-like policy) for training; for evaluation the short side resized to ``image_size / crop_pct``, then a
centre crop of ``image_size``, the timm evaluation protocol.

Semantic segmentation follows mmsegmentation's standard training pipeline (random resize in a ratio range of a
reference scale, random crop with a category-ratio limit, horizontal flip, photometric distortion, pad to the
crop with the ignore index); evaluation resizes the image to fit the reference scale but keeps the mask at its
original size, so metrics are computed at the original resolution (the model's logits are resized back).

Medical: albumentations for 2-D image/mask folders, MONAI dictionary transforms for 3-D volumes.
"""

from __future__ import annotations

from dataclasses import dataclass

import albumentations as A
import cv2
import numpy as np
import timm
import torch
from albumentations.pytorch import ToTensorV2

from .classes import IGNORE_INDEX
from .readers import InvalidCaseError, check_case

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


# ---- semantic segmentation ------------------------------------------------------------------------------


def _resize(array: np.ndarray, size: tuple[int, int], interpolation: int) -> np.ndarray:
    out = cv2.resize(array, (size[1], size[0]), interpolation=interpolation)
    return out[..., None] if array.ndim == 3 and out.ndim == 2 else out


def fit_scale(height: int, width: int, scale: tuple[int, int]) -> tuple[int, int]:
    """The largest size with the image's aspect ratio whose long side is <= max(scale) and short side <=
    min(scale) (mmseg's keep-ratio rescale)."""
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return max(1, int(height * factor + 0.5)), max(1, int(width * factor + 0.5))


class RandomRescale(A.DualTransform):
    """Rescale to ``fit_scale(scale * r)`` with ``r`` uniform in ``ratio_range`` (mmseg's RandomResize with
    keep_ratio). ``resize_mask=False`` leaves the mask at its size (evaluation at the original resolution)."""

    def __init__(
        self,
        scale: tuple[int, int],
        ratio_range: tuple[float, float] = (1.0, 1.0),
        resize_mask: bool = True,
        p: float = 1.0,
    ):
        super().__init__(p=p)
        self.scale, self.ratio_range, self.resize_mask = tuple(scale), tuple(ratio_range), resize_mask

    def get_params_dependent_on_data(self, params, data):
        height, width = params["shape"][:2]
        ratio = self.py_random.uniform(*self.ratio_range)
        return {"size": fit_scale(height, width, (self.scale[0] * ratio, self.scale[1] * ratio))}

    def apply(self, img, size=None, **params):
        return _resize(img, size, cv2.INTER_LINEAR)

    def apply_to_mask(self, mask, size=None, **params):
        return _resize(mask, size, cv2.INTER_NEAREST) if self.resize_mask else mask


class CatMaxRatioCrop(A.DualTransform):
    """Random crop of at most ``size`` (mmseg's RandomCrop): up to 10 re-draws until no single class covers
    ``cat_max_ratio`` or more of the crop's labelled pixels (and at least two classes are present); the last
    draw is kept otherwise. ``cat_max_ratio >= 1`` disables the check."""

    def __init__(
        self,
        size: tuple[int, int],
        cat_max_ratio: float = 0.75,
        ignore_index: int = IGNORE_INDEX,
        p: float = 1.0,
    ):
        super().__init__(p=p)
        self.size, self.cat_max_ratio, self.ignore_index = tuple(size), cat_max_ratio, ignore_index

    def _draw(self, height: int, width: int) -> tuple[int, int]:
        return (
            self.py_random.randint(0, max(height - self.size[0], 0)),
            self.py_random.randint(0, max(width - self.size[1], 0)),
        )

    def get_params_dependent_on_data(self, params, data):
        mask = data["mask"]
        top, left = self._draw(*mask.shape[:2])
        if self.cat_max_ratio < 1:
            for _ in range(10):
                crop = mask[top : top + self.size[0], left : left + self.size[1]]
                counts = np.bincount(crop.ravel(), minlength=256)
                counts[self.ignore_index] = 0
                counts = counts[counts > 0]
                if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                    break
                top, left = self._draw(*mask.shape[:2])
        return {"top": top, "left": left}

    def apply(self, img, top=0, left=0, **params):
        return img[top : top + self.size[0], left : left + self.size[1]]

    def apply_to_mask(self, mask, top=0, left=0, **params):
        return mask[top : top + self.size[0], left : left + self.size[1]]


def photometric_distortion() -> A.BasicTransform:
    """mmseg's PhotoMetricDistortion in albumentations terms, each part with probability 0.5: brightness
    +-32/255, contrast x[0.5, 1.5], saturation x[0.5, 1.5], hue +-18 OpenCV units (= +-36 degrees = 0.1)."""
    return A.Sequential(
        [
            A.RandomBrightnessContrast(brightness_limit=32 / 255, contrast_limit=0, p=0.5),
            A.RandomBrightnessContrast(brightness_limit=0, contrast_limit=0.5, p=0.5),
            A.ColorJitter(brightness=0, contrast=0, saturation=0.5, hue=0, p=0.5),
            A.ColorJitter(brightness=0, contrast=0, saturation=0, hue=0.1, p=0.5),
        ],
        p=1.0,
    )


def build_segmentation_transforms(
    train: bool,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    crop_size: tuple[int, int] = (512, 512),
    scale: tuple[int, int] | None = (2048, 512),
    ratio_range: tuple[float, float] = (0.5, 2.0),
    cat_max_ratio: float = 0.75,
    hflip: float = 0.5,
    photometric: bool = True,
    eval_scale: tuple[int, int] | None = (2048, 512),
    ignore_index: int = IGNORE_INDEX,
) -> A.Compose:
    """Training: rescale, crop, flip, photometric distortion, pad to ``crop_size`` (image 0, mask ignore).
    Evaluation: the image rescaled to fit ``eval_scale`` (None: kept), the mask untouched."""
    if train:
        ops = [RandomRescale(scale, ratio_range)] if scale else []
        ops.append(CatMaxRatioCrop(crop_size, cat_max_ratio, ignore_index))
        if hflip > 0:
            ops.append(A.HorizontalFlip(p=hflip))
        if photometric:
            ops.append(photometric_distortion())
        ops.append(
            A.PadIfNeeded(
                min_height=crop_size[0],
                min_width=crop_size[1],
                position="top_left",
                border_mode=cv2.BORDER_CONSTANT,
                fill=0,
                fill_mask=ignore_index,
            )
        )
    else:
        ops = [RandomRescale(eval_scale, resize_mask=False)] if eval_scale else []
    ops += [A.Normalize(mean=mean, std=std, max_pixel_value=255.0), ToTensorV2()]
    return A.Compose(ops)


# ---- medical ----------------------------------------------------------------------------------------------


def mask_transforms(train: bool, patch_size: tuple[int, int], mean, std) -> A.Compose:
    """Training: scale/crop, flips, 90° rotations, brightness/contrast; evaluation: resize to ``patch_size``."""
    size = tuple(patch_size)
    if train:
        ops = [A.RandomResizedCrop(size=size, scale=(0.5, 1.0)), A.HorizontalFlip(), A.VerticalFlip(),
               A.RandomRotate90(), A.RandomBrightnessContrast(0.1, 0.1, p=0.5)]
    else:
        ops = [A.Resize(*size)]
    return A.Compose(ops + [A.Normalize(mean=mean, std=std, max_pixel_value=255.0), ToTensorV2()])


def load_case_transform(in_channels: int, num_classes: int):
    """A MONAI dictionary transform that loads a case's image and label and applies :func:`check_case`; an
    unreadable file is an :class:`InvalidCaseError` naming the case and both files."""
    from monai.transforms import LoadImaged, MapTransform

    class LoadCased(MapTransform):
        def __init__(self):
            super().__init__(["image", "label"])
            self.load = LoadImaged(self.keys, image_only=True)

        def __call__(self, data):
            try:
                data = self.load(data)
            except Exception as err:  # the readers (nibabel, ITK, PIL) raise different types
                raise InvalidCaseError(
                    f"case {data['case']}: cannot read image {data['image']} or label {data['label']}: {err}"
                ) from err
            check_case(data["image"], data["label"], data["case"], in_channels, num_classes,
                       getattr(data["image"], "affine", None), getattr(data["label"], "affine", None))
            return data

    return LoadCased()


def volume_transforms(train: bool, in_channels: int, num_classes: int, patch_size: tuple[int, ...],
                      pixdim: tuple[float, ...] | None, intensity_range: tuple[float, float] | None,
                      crop_foreground: bool, num_samples: int, pos: float, neg: float):
    """MONAI dictionary pipeline: load, check, channel-first, RAS, spacing, intensity, foreground crop;
    for training also pad to the patch, positive/negative patch sampling and light augmentation.

    ``intensity_range=(a_min, a_max)`` windows and scales to [0, 1] (CT); ``None`` z-scores each channel
    over its non-zero voxels (MRI).
    """
    from monai import transforms as T

    keys = ["image", "label"]
    ops = [load_case_transform(in_channels, num_classes), T.EnsureChannelFirstd(keys),
           T.Orientationd(keys, axcodes="RAS", labels=None)]
    if pixdim:
        ops.append(T.Spacingd(keys, pixdim=tuple(pixdim), mode=("bilinear", "nearest")))
    if intensity_range:
        a_min, a_max = intensity_range
        ops.append(T.ScaleIntensityRanged("image", a_min=a_min, a_max=a_max, b_min=0.0, b_max=1.0, clip=True))
    else:
        ops.append(T.NormalizeIntensityd("image", nonzero=True, channel_wise=True))
    if crop_foreground:
        ops.append(T.CropForegroundd(keys, source_key="image", allow_smaller=True))
    ops.append(T.EnsureTyped(keys, dtype=(torch.float32, torch.uint8), track_meta=True))
    if train:
        ops += [
            T.SpatialPadd(keys, spatial_size=tuple(patch_size)),
            T.RandCropByPosNegLabeld(keys, label_key="label", spatial_size=tuple(patch_size), pos=pos, neg=neg,
                                     num_samples=num_samples, image_key="image", image_threshold=0),
            T.RandFlipd(keys, prob=0.2, spatial_axis=0),
            T.RandFlipd(keys, prob=0.2, spatial_axis=1),
            T.RandFlipd(keys, prob=0.2, spatial_axis=2),
            T.RandRotate90d(keys, prob=0.2, max_k=3),
            T.RandShiftIntensityd("image", offsets=0.1, prob=0.5),
        ]
    return T.Compose(ops)
