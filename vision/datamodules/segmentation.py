"""Semantic segmentation data: image/mask pairs in the ADE20K, Pascal VOC, Cityscapes and folder layouts.

Every layout reduces to a list of ``(image path, mask path)`` pairs read by one :class:`SegmentationDataset`;
every check on a sample (readable image, index mask, matching size, values within the classes) lives in
:func:`read_sample`, so a project-wide error/skip policy has one place to hook into.

The augmentations follow mmsegmentation's standard training pipeline (random resize in a ratio range of a
reference scale, random crop with a category-ratio limit, horizontal flip, photometric distortion, pad to the
crop with the ignore index); evaluation resizes the image to fit the reference scale but keeps the mask at its
original size, so metrics are computed at the original resolution (the model's logits are resized back).
"""

from __future__ import annotations

from pathlib import Path

import albumentations as A
import cv2
import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from albumentations.pytorch import ToTensorV2
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, Subset

from .datasets import (
    IMAGE_EXTENSIONS,
    BadSampleError,
    BadSamples,
    CorruptImageError,
    reseed,
    split_key,
    unwrap_subset,
)
from .loaders import SplitLoaders
from .scenes import CLASSES as FASHION_CLASSES
from .scenes import make_fashion_scenes
from .transforms import backbone_eval_config

IGNORE_INDEX = 255

# fmt: off
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence",
    "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand",
    "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
    "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle",
    "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake",
    "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray",
    "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator",
    "glass", "clock", "flag",
)
VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)
CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)
SCENE_CLASSES = ("background", *FASHION_CLASSES)
# fmt: on
# Cityscapes label id -> train id (the dataset's labels table); every other id is ignored
CITYSCAPES_TRAIN_IDS = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13, 27: 14,
    28: 15, 31: 16, 32: 17, 33: 18,
}


class SegmentationDataError(BadSampleError, ValueError):
    """A sample that cannot be used as it is: the message names the file(s) and what is wrong."""


# ---- reading and checking one sample (the only place samples are validated) ------------------------------


def _read_image(path: Path, in_chans: int) -> np.ndarray:
    try:
        with Image.open(path) as img:
            image = np.asarray(img.convert("L" if in_chans == 1 else "RGB"))
    except FileNotFoundError:
        raise FileNotFoundError(f"image file {path} is missing") from None
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise CorruptImageError(f"unreadable image {path}: {err}") from err
    return image[..., None] if image.ndim == 2 else image


def _read_mask(path: Path) -> np.ndarray:
    """Class ids per pixel. Palette PNGs (mode P, e.g. VOC) give their indices, not their colours; grey
    (L, I, I;16) masks give their values; RGB(A) masks are accepted only when the channels agree (a grey mask
    saved as colour), since colours have no defined class id."""
    try:
        with Image.open(path) as img:
            mode = img.mode
            mask = np.asarray(img)
    except FileNotFoundError:
        raise FileNotFoundError(f"mask file {path} is missing") from None
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise CorruptImageError(f"unreadable mask {path}: {err}") from err
    if mode in ("RGB", "RGBA", "LA"):
        channels = mask[..., : 1 if mode == "LA" else 3]
        if not (channels == channels[..., :1]).all():
            raise SegmentationDataError(
                f"mask {path} is a colour ({mode}) image; expected one class id per pixel: a single-channel "
                "(mode L) or palette (mode P) PNG. Convert colours to ids first (VOC's SegmentationClass "
                "PNGs are palette images and read as ids)"
            )
        mask = channels[..., 0]
    elif mode not in ("L", "P", "I", "I;16", "1"):
        raise SegmentationDataError(f"mask {path} has unsupported image mode {mode!r}; expected L or P")
    return np.asarray(mask, dtype=np.int64)


def label_lookup(label_map: dict[int, int], ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """A 256-entry table mapping stored mask ids to class ids (``label_map``); unlisted ids -> ``ignore_index``."""
    lookup = np.full(256, ignore_index, dtype=np.uint8)
    lookup[list(label_map)] = list(label_map.values())
    return lookup


def read_sample(
    image_path: Path,
    mask_path: Path,
    num_classes: int,
    in_chans: int = 3,
    reduce_zero_label: bool = False,
    ignore_index: int = IGNORE_INDEX,
    lookup: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(image HxWxC uint8, mask HxW uint8)`` with every check on the pair.

    ``lookup`` (:func:`label_lookup`) maps stored ids to class ids first, e.g. Cityscapes' ``labelIds``. ``reduce_zero_label`` (ADE20K): 0 ("other") becomes ``ignore_index`` and every
    other id moves down by one. Afterwards each mask value must be a class id ``< num_classes`` or
    ``ignore_index``.
    """
    image = _read_image(image_path, in_chans)
    mask = _read_mask(mask_path)
    if image.shape[:2] != mask.shape[:2]:
        raise SegmentationDataError(
            f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} (WxH) but image {image_path} is "
            f"{image.shape[1]}x{image.shape[0]}; masks must have their image's size"
        )
    if lookup is not None:
        mask = lookup[mask]
    if reduce_zero_label:
        mask = np.where(mask == 0, ignore_index, mask - 1)
        mask[mask == ignore_index - 1] = ignore_index  # the ignore value itself stays ignored
    bad = (mask >= num_classes) & (mask != ignore_index) | (mask < 0)
    if bad.any():
        values = np.unique(mask[bad])
        shown = ", ".join(str(v) for v in values[:10]) + (", ..." if len(values) > 10 else "")
        raise SegmentationDataError(
            f"mask {mask_path} has values {shown} outside the {num_classes} classes (0..{num_classes - 1}) "
            f"and not the ignore index {ignore_index}"
            + (" (after reduce_zero_label)" if reduce_zero_label else "")
        )
    return image, mask.astype(np.uint8)


class SegmentationDataset(Dataset):
    """``(image CHW float tensor, mask HW int64 tensor)`` for each ``(image path, mask path)`` pair."""

    sample_seeds = True  # takes (index, seed) keys: augmentations resume mid-epoch with the data order

    def __init__(
        self,
        samples: list[tuple[Path, Path]],
        num_classes: int,
        transform=None,
        in_chans: int = 3,
        reduce_zero_label: bool = False,
        ignore_index: int = IGNORE_INDEX,
        bad_samples: BadSamples | None = None,
        label_map: dict[int, int] | None = None,
    ):
        if not 0 < num_classes < 255 or not 0 <= ignore_index <= 255 or ignore_index < num_classes:
            raise ValueError(
                f"num_classes={num_classes}, ignore_index={ignore_index}: masks are stored as uint8, "
                "so need 0 < num_classes <= ignore_index <= 255"
            )
        self.samples, self.num_classes, self.transform = samples, num_classes, transform
        self.in_chans, self.reduce_zero_label, self.ignore_index = in_chans, reduce_zero_label, ignore_index
        self.bad_samples = bad_samples or BadSamples("error")
        self.lookup = None if label_map is None else label_lookup(label_map, ignore_index)  # built once

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image_path, mask_path = self.samples[index]
        return read_sample(
            image_path, mask_path, self.num_classes, self.in_chans, self.reduce_zero_label, self.ignore_index,
            self.lookup,
        )

    def __getitem__(self, key) -> tuple[torch.Tensor, torch.Tensor] | None:
        index, seed = split_key(key)
        sample = self.bad_samples.read(self.load, index)  # None: skipped under data.on_bad_sample=skip
        if sample is None:
            return None
        image, mask = sample
        if self.transform is not None:
            reseed(self.transform, seed)
            out = self.transform(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
        return torch.as_tensor(image), torch.as_tensor(mask).long()


def collate_segmentation(batch: list[tuple[torch.Tensor, torch.Tensor]]):
    """``(images [B, C, H, W], masks [B, h, w], sizes [B, 4])``: images padded at the bottom/right with 0 and
    masks with the ignore index to the largest in the batch; ``sizes`` holds each sample's image and mask
    ``(H, W, h, w)`` before padding (evaluation images are resized, their masks keep the original size).
    Skipped samples (``None``) are left out; a batch with none left is ``None``, which Lightning skips."""
    batch = [sample for sample in batch if sample is not None]
    if not batch:
        return None
    images, masks = zip(*batch)
    sizes = torch.tensor([[*i.shape[-2:], *m.shape[-2:]] for i, m in batch])
    if all(i.shape == images[0].shape for i in images) and all(m.shape == masks[0].shape for m in masks):
        return torch.stack(images), torch.stack(masks), sizes
    height, width = sizes[:, 0].max().item(), sizes[:, 1].max().item()
    mh, mw = sizes[:, 2].max().item(), sizes[:, 3].max().item()
    images = torch.stack([F.pad(i, (0, width - i.shape[-1], 0, height - i.shape[-2])) for i in images])
    masks = torch.stack(
        [F.pad(m, (0, mw - m.shape[-1], 0, mh - m.shape[-2]), value=IGNORE_INDEX) for m in masks]
    )
    return images, masks, sizes


# ---- augmentations ---------------------------------------------------------------------------------------


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


# ---- layouts: lists of (image, mask) pairs ---------------------------------------------------------------


def pair_folder(
    image_root: Path, mask_root: Path, image_suffix: str | None = None, mask_suffix: str = ".png"
) -> list[tuple[Path, Path]]:
    """Every image under ``image_root`` (recursively) with the mask at the same relative path under
    ``mask_root``, its name's ``image_suffix`` (default: the extension) replaced by ``mask_suffix``."""
    if not image_root.is_dir():
        raise FileNotFoundError(f"image folder {image_root} does not exist")
    if not mask_root.is_dir():
        raise FileNotFoundError(f"mask folder {mask_root} does not exist")
    pairs, missing = [], []
    for path in sorted(image_root.rglob("*")):
        if path.suffix.lower() not in IMAGE_EXTENSIONS or (
            image_suffix and not path.name.endswith(image_suffix)
        ):
            continue
        stem = path.name[: -len(image_suffix)] if image_suffix else path.stem
        mask = mask_root / path.parent.relative_to(image_root) / f"{stem}{mask_suffix}"
        (pairs if mask.is_file() else missing).append((path, mask))
    if missing:
        shown = "; ".join(f"{m} (for {i})" for i, m in missing[:3])
        raise FileNotFoundError(
            f"{len(missing)} image(s) under {image_root} have no mask: {shown}"
            + (" ..." if len(missing) > 3 else "")
        )
    if not pairs:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {image_root}")
    return pairs


def pair_list(
    list_file: Path, image_root: Path, mask_root: Path, image_ext: str = ".jpg", mask_ext: str = ".png"
) -> list[tuple[Path, Path]]:
    """The ids in ``list_file`` (one per line, VOC/SBD ``ImageSets`` style) as image and mask paths."""
    if not list_file.is_file():
        raise FileNotFoundError(f"split list {list_file} does not exist")
    ids = [line.split()[0] for line in list_file.read_text().splitlines() if line.strip()]
    if not ids:
        raise ValueError(f"split list {list_file} is empty")
    pairs = [(image_root / f"{i}{image_ext}", mask_root / f"{i}{mask_ext}") for i in ids]
    for kind, index in (("image", 0), ("mask", 1)):
        missing = [str(p[index]) for p in pairs if not p[index].is_file()]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} {kind}(s) listed in {list_file} are missing: "
                f"{', '.join(missing[:3])}" + (" ..." if len(missing) > 3 else "")
            )
    return pairs


# ---- datamodules -----------------------------------------------------------------------------------------


class SegmentationDataModule(SplitLoaders, L.LightningDataModule):
    """Shared loaders and transforms; subclasses list the ``(image, mask)`` pairs of each split.

    Args:
        root: the dataset folder. num_classes, in_chans: the dataset's. class_names: for the per-class table.
        crop_size, scale, ratio_range, cat_max_ratio, hflip, photometric: training augmentation (see
            :func:`build_segmentation_transforms`); ``scale: null`` skips the random rescale.
        eval_scale: evaluation images are rescaled to fit it; masks keep their original size. null: no resize.
        mean, std: normalisation; default the backbone's pretrained_cfg (``backbone``) or ImageNet's.
        reduce_zero_label: label 0 is "unlabelled" (ADE20K): it is ignored and the other ids shift down.
        label_map: stored id -> class id, applied first; unlisted ids are ignored (Cityscapes ``labelIds``).
        train_subset: train on the first N training pairs only.
        on_bad_sample: ``error`` (default: a bad sample stops with its file named) or ``skip`` (dropped, counted
            in :attr:`skipped`, logged as ``data/skipped``), the project-wide policy.
    """

    collate_fn = staticmethod(collate_segmentation)

    CLASS_NAMES: tuple[str, ...] = ()

    def __init__(
        self,
        root: str,
        num_classes: int,
        in_chans: int = 3,
        class_names: list[str] | None = None,
        crop_size: tuple[int, int] = (512, 512),
        scale: tuple[int, int] | None = (2048, 512),
        ratio_range: tuple[float, float] = (0.5, 2.0),
        cat_max_ratio: float = 0.75,
        hflip: float = 0.5,
        photometric: bool = True,
        eval_scale: tuple[int, int] | None = (2048, 512),
        reduce_zero_label: bool = False,
        label_map: dict[int, int] | None = None,
        ignore_index: int = IGNORE_INDEX,
        backbone: str | None = None,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        batch_size: int = 16,
        eval_batch_size: int | None = 1,
        num_workers: int = 4,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        train_subset: int | None = None,
        on_bad_sample: str = "error",
    ):
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.root = Path(root).expanduser()
        self.bad_samples = BadSamples(on_bad_sample)
        self.num_classes, self.in_chans, self.ignore_index = num_classes, in_chans, ignore_index
        names = tuple(class_names or self.CLASS_NAMES)
        self.class_names = (
            names if len(names) == num_classes else tuple(f"class_{i}" for i in range(num_classes))
        )
        config = backbone_eval_config(backbone, in_chans, mean=mean, std=std)
        self.mean, self.std = config.mean, config.std
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    def samples(self, split: str) -> list[tuple[Path, Path]]:
        """The ``(image, mask)`` pairs of ``split`` (``train``, ``val`` or ``test``)."""
        raise NotImplementedError

    def transforms(self, train: bool) -> A.Compose:
        hp = self.hparams
        return build_segmentation_transforms(
            train,
            self.mean,
            self.std,
            crop_size=tuple(hp.crop_size),
            scale=hp.scale and tuple(hp.scale),
            ratio_range=tuple(hp.ratio_range),
            cat_max_ratio=hp.cat_max_ratio,
            hflip=hp.hflip,
            photometric=hp.photometric,
            eval_scale=hp.eval_scale and tuple(hp.eval_scale),
            ignore_index=self.ignore_index,
        )

    def _dataset(self, split: str, train: bool) -> SegmentationDataset:
        return SegmentationDataset(
            self.samples(split),
            self.num_classes,
            self.transforms(train),
            self.in_chans,
            self.hparams.reduce_zero_label,
            self.ignore_index,
            self.bad_samples,
            self.hparams.label_map,
        )

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        self.train_set = self._dataset("train", train=True)
        if self.hparams.train_subset:
            self.train_set = Subset(
                self.train_set, range(min(self.hparams.train_subset, len(self.train_set)))
            )
        self.val_set = self._dataset("val", train=False)
        self.test_set = self._dataset("test", train=False)
        if len(self.train_set) < self.hparams.batch_size:
            raise ValueError(
                f"the training split has {len(self.train_set)} images, fewer than data.batch_size="
                f"{self.hparams.batch_size}; lower data.batch_size"
            )
        unwrap_subset(self.train_set).transform.set_random_seed(torch.initial_seed() % 2**32)  # main-process loading


class SegmentationFolderDataModule(SegmentationDataModule):
    """Images in ``root/<image_dir>/<split>/...`` and masks at the same relative paths under
    ``root/<mask_dir>/<split>/`` (the image's name, ``image_suffix`` or extension replaced by
    ``mask_suffix``).
    ``splits`` maps train/val/test to folder names; a missing test folder falls back to the val split."""

    def __init__(
        self,
        root: str,
        image_dir: str = "images",
        mask_dir: str = "masks",
        splits: dict[str, str] | None = None,
        image_suffix: str | None = None,
        mask_suffix: str = ".png",
        **kwargs,
    ):
        super().__init__(root, **kwargs)
        self.image_dir, self.mask_dir, self.image_suffix, self.mask_suffix = (
            image_dir,
            mask_dir,
            image_suffix,
            mask_suffix,
        )
        self.splits = {"train": "train", "val": "val", "test": "test", **(splits or {})}

    def samples(self, split: str) -> list[tuple[Path, Path]]:
        name = self.splits[split]
        if split == "test" and not (self.root / self.image_dir / name).is_dir():
            name = self.splits["val"]
        return pair_folder(
            self.root / self.image_dir / name,
            self.root / self.mask_dir / name,
            self.image_suffix,
            self.mask_suffix,
        )


class ADE20KDataModule(SegmentationFolderDataModule):
    """ADEChallengeData2016: ``images/{training,validation}/*.jpg``,
    ``annotations/{training,validation}/*.png``
    (0 = other, ignored; 150 classes). The validation split is also the test split."""

    CLASS_NAMES = ADE20K_CLASSES

    def __init__(self, root: str, **kwargs):
        kwargs.setdefault("num_classes", 150)
        kwargs.setdefault("reduce_zero_label", True)
        super().__init__(
            root,
            image_dir="images",
            mask_dir="annotations",
            splits={"train": "training", "val": "validation", "test": "validation"},
            **kwargs,
        )

    def samples(self, split: str) -> list[tuple[Path, Path]]:
        if not (self.root / "images" / "training").is_dir():
            raise FileNotFoundError(
                f"data.root={self.root} is not the ADE20K (ADEChallengeData2016) folder: expected "
                "images/{training,validation}/*.jpg and annotations/{training,validation}/*.png. Download "
                "ADEChallengeData2016.zip from the MIT Scene Parsing benchmark (http://sceneparsing.csail.mit.edu), "
                "unzip it and set data.root to the ADEChallengeData2016 folder (data/README.md)")
        return super().samples(split)


class CityscapesDataModule(SegmentationFolderDataModule):
    """Cityscapes: ``leftImg8bit/<split>/<city>/*_leftImg8bit.png`` with ``gtFine/<split>/<city>/`` masks.
    ``labels="trainIds"`` reads ``*_gtFine_labelTrainIds.png`` (19 train ids, 255 ignored; made by
    cityscapesscripts' createTrainIdLabelImgs); ``labels="labelIds"`` reads the archive's own
    ``*_gtFine_labelIds.png`` and maps them to the train ids on the fly (:data:`CITYSCAPES_TRAIN_IDS`).
    The val split is also the test split (test labels are not public)."""

    CLASS_NAMES = CITYSCAPES_CLASSES
    MASK_SUFFIXES = {"trainIds": "_gtFine_labelTrainIds.png", "labelIds": "_gtFine_labelIds.png"}

    def __init__(self, root: str, labels: str = "trainIds", **kwargs):
        if labels not in self.MASK_SUFFIXES:
            raise ValueError(f"data.labels={labels!r}: expected one of {list(self.MASK_SUFFIXES)}")
        kwargs.setdefault("num_classes", 19)
        if labels == "labelIds":
            kwargs["label_map"] = CITYSCAPES_TRAIN_IDS
        super().__init__(
            root,
            image_dir="leftImg8bit",
            mask_dir="gtFine",
            splits={"train": "train", "val": "val", "test": "val"},
            image_suffix="_leftImg8bit.png",
            mask_suffix=self.MASK_SUFFIXES[labels],
            **kwargs,
        )


class VOCDataModule(SegmentationDataModule):
    """Pascal VOC 2012: ``JPEGImages/<id>.jpg``, masks ``<mask_dir>/<id>.png`` (palette PNGs read as ids;
    255 = object boundary, ignored), split lists ``ImageSets/Segmentation/<split>.txt``. With SBD's extra
    annotations converted into ``SegmentationClassAug`` set ``mask_dir: SegmentationClassAug`` and
    ``splits.train: trainaug`` (the usual 10,582-image set)."""

    CLASS_NAMES = VOC_CLASSES

    def __init__(
        self,
        root: str,
        mask_dir: str = "SegmentationClass",
        splits: dict[str, str] | None = None,
        list_dir: str = "ImageSets/Segmentation",
        **kwargs,
    ):
        kwargs.setdefault("num_classes", 21)
        super().__init__(root, **kwargs)
        self.mask_dir, self.list_dir = mask_dir, list_dir
        self.splits = {"train": "train", "val": "val", "test": "val", **(splits or {})}

    def samples(self, split: str) -> list[tuple[Path, Path]]:
        return pair_list(
            self.root / self.list_dir / f"{self.splits[split]}.txt",
            self.root / "JPEGImages",
            self.root / self.mask_dir,
        )


class FashionScenesSegmentationDataModule(SegmentationFolderDataModule):
    """The embedded default: Fashion-MNIST scenes (:func:`make_fashion_scenes`, 0 background + 10 garment
    classes), generated once into ``root`` by ``prepare_data`` from the idx files in ``fashion_root``."""

    CLASS_NAMES = SCENE_CLASSES

    def __init__(
        self,
        root: str,
        fashion_root: str,
        scene_splits: dict[str, int] | None = None,
        canvas: int = 128,
        items: tuple[int, int] = (2, 5),
        size: tuple[int, int] = (28, 64),
        seed: int = 0,
        max_box_iou: float = 0.5,
        max_hidden: float = 0.4,
        **kwargs,
    ):
        kwargs.setdefault("num_classes", len(SCENE_CLASSES))
        super().__init__(root, **kwargs)
        if self.num_classes != len(SCENE_CLASSES):
            raise ValueError(
                f"Fashion-MNIST scenes have {len(SCENE_CLASSES)} classes (background + 10); "
                f"got num_classes={self.num_classes}"
            )
        self.scene_args = dict(
            fashion_root=Path(fashion_root).expanduser(),
            splits=dict(scene_splits or {"train": 2000, "val": 200, "test": 200}),
            canvas=canvas,
            items=tuple(items),
            size=tuple(size),
            seed=seed,
            max_box_iou=max_box_iou,
            max_hidden=max_hidden,
        )

    def prepare_data(self) -> None:
        make_fashion_scenes(self.root, **self.scene_args)

    def setup(self, stage: str | None = None) -> None:
        self.prepare_data()  # idempotent (a cache keyed by the parameters); covers setup without prepare_data
        super().setup(stage)
