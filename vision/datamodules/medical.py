"""Medical imaging data: Decathlon-layout 3-D volumes (MONAI), 2-D image/mask folders (albumentations),
MedMNIST ``.npz`` classification, and the synthetic sets the offline quickstarts generate.

Segmentation batches are dictionaries ``{"image": [B, C, *spatial], "label": [B, 1, *spatial], "case": [...]}``
(MONAI's convention) for both the 3-D and the 2-D datamodule, so one task trains on either.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import albumentations as A
import lightning as L
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2
from PIL import Image
from torch.utils.data import Dataset

from .classification import ClassificationDataModule
from .datasets import (
    IMAGE_EXTENSIONS,
    ArrayDataset,
    BadSampleError,
    BadSamples,
    collate_skip_none,
    read_image,
    reseed,
    split_key,
)
from .loaders import SplitLoaders


class InvalidCaseError(BadSampleError, ValueError):
    """A case (volume or image with its label) that cannot be used as it is; the message names it. A bad
    sample: ``data.on_bad_sample=skip`` drops the case instead (warned, counted)."""


# ---- patient-level split ------------------------------------------------------------------------

def split_cases(cases: list[dict], val_fraction: float, test_fraction: float, seed: int,
                patient_pattern: str | None = None) -> tuple[list[dict], list[dict], list[dict]]:
    """Train/val/test lists with every case of a patient on the same side, fixed by ``seed``.

    A case's patient is its ``case`` name, or the first group of ``patient_pattern`` (a regex searched in
    the name) when several scans belong to one patient, e.g. ``r"^(patient\\d+)_"``.
    """
    def patient(case: dict) -> str:
        if not patient_pattern:
            return case["case"]
        match = re.search(patient_pattern, case["case"])
        if match is None:
            raise InvalidCaseError(f"case {case['case']}: patient_pattern {patient_pattern!r} does not match its name")
        return match.group(1) if match.groups() else match.group(0)

    patients = sorted({patient(c) for c in cases})
    order = [patients[i] for i in np.random.default_rng(seed).permutation(len(patients))]
    n_test = round(test_fraction * len(order)) if test_fraction > 0 else 0
    n_val = round(val_fraction * len(order)) if val_fraction > 0 else 0
    n_test, n_val = max(n_test, test_fraction > 0), max(n_val, val_fraction > 0)  # a requested split is never empty
    if len(order) - n_test - n_val < 1:
        raise ValueError(f"{len(order)} patients cannot fill val ({n_val}), test ({n_test}) and a training split")
    test_ids, val_ids = set(order[:n_test]), set(order[n_test:n_test + n_val])
    train = [c for c in cases if patient(c) not in test_ids | val_ids]
    return train, [c for c in cases if patient(c) in val_ids], [c for c in cases if patient(c) in test_ids]


def _case_name(path: str | Path) -> str:
    name = Path(path).name
    for ext in (".nii.gz", ".nii", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return Path(path).stem


# ---- Medical Segmentation Decathlon layout --------------------------------------------------------

def read_decathlon(root: str | Path, num_classes: int, in_channels: int) -> list[dict]:
    """The labelled cases of ``root/dataset.json`` as ``[{"image", "label", "case"}]`` with absolute paths.

    Checks the file against the data config: the label count, the modality count, and that every listed
    file exists (a missing one is an error naming the case).
    """
    root = Path(root).expanduser()
    index = root / "dataset.json"
    if not index.is_file():
        raise FileNotFoundError(
            f"{index} not found: data.root must hold a Medical Segmentation Decathlon task (dataset.json, "
            "imagesTr/*.nii.gz, labelsTr/*.nii.gz), e.g. Task09_Spleen extracted from its .tar"
        )
    meta = json.loads(index.read_text())
    for key in ("training", "labels"):
        if key not in meta:
            raise KeyError(f"{index} has no {key!r} entry (expected the Decathlon dataset.json schema)")
    if len(meta["labels"]) != num_classes:
        raise ValueError(f"{index} lists {len(meta['labels'])} labels {meta['labels']} but data.num_classes={num_classes}")
    modalities = meta.get("modality") or {"0": "?"}
    if len(modalities) != in_channels:
        raise ValueError(f"{index} lists {len(modalities)} modalities {modalities} but data.in_channels={in_channels}")
    cases = []
    for i, entry in enumerate(meta["training"]):
        if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
            raise KeyError(f"{index}: training entry {i} is {entry!r}; expected {{'image': ..., 'label': ...}}")
        image, label = (root / entry["image"]).resolve(), (root / entry["label"]).resolve()
        case = _case_name(image)
        for kind, path in (("image", image), ("label", label)):
            if not path.is_file():
                raise FileNotFoundError(f"case {case}: {kind} {path} is listed in {index} but does not exist")
        cases.append({"image": str(image), "label": str(label), "case": case})
    if not cases:
        raise ValueError(f"{index} lists no training cases")
    return cases


def check_case(image: torch.Tensor, label: torch.Tensor, case: str, in_channels: int, num_classes: int,
               image_affine=None, label_affine=None) -> None:
    """Raise :class:`InvalidCaseError` naming ``case`` unless the loaded image/label pair is usable.

    ``image`` is ``[*spatial]`` (one channel) or ``[*spatial, C]`` as read from the file, ``label`` ``[*spatial]``.
    """
    if label.ndim != 3:
        raise InvalidCaseError(f"case {case}: label has shape {tuple(label.shape)}; expected a 3-D volume")
    if image.ndim != 3 + (in_channels > 1) or (in_channels > 1 and image.shape[-1] != in_channels):
        want = "a 3-D volume" if in_channels == 1 else f"a 4-D volume with {in_channels} channels last"
        raise InvalidCaseError(
            f"case {case}: image has shape {tuple(image.shape)}; expected {want} (data.in_channels={in_channels})"
        )
    if tuple(image.shape[:3]) != tuple(label.shape):
        raise InvalidCaseError(
            f"case {case}: image shape {tuple(image.shape)} and label shape {tuple(label.shape)} differ"
        )
    if image_affine is not None and label_affine is not None:
        a, b = np.asarray(image_affine, dtype=np.float64), np.asarray(label_affine, dtype=np.float64)
        if not np.allclose(a, b, atol=1e-3):
            raise InvalidCaseError(f"case {case}: image and label affines differ:\n{a}\nvs\n{b}")
    nans = int(torch.isnan(torch.as_tensor(image)).sum())
    if nans:
        raise InvalidCaseError(f"case {case}: image has {nans} NaN voxels")
    values = torch.unique(torch.as_tensor(label))
    bad = values[(values != values.round()) | (values < 0) | (values >= num_classes)]
    if len(bad):
        raise InvalidCaseError(
            f"case {case}: label values {bad.tolist()[:10]} are outside the classes 0..{num_classes - 1} "
            f"(data.num_classes={num_classes})"
        )


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


def _raise_case_error(err: BaseException) -> None:
    """MONAI wraps transform errors in ``RuntimeError("applying transform ...")``: surface ours."""
    cause: BaseException | None = err
    while cause is not None:
        if isinstance(cause, InvalidCaseError):
            raise cause from None
        cause = cause.__cause__
    raise err


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


def collate_volumes(batch: list):
    """MONAI's ``list_data_collate``: the patches a volume yields (``num_samples``) join the batch."""
    from monai.data import list_data_collate

    return list_data_collate(batch)


class SeededVolumes(Dataset):
    """A MONAI dataset taking ``(index, seed)`` keys: its random transforms are reseeded for each sample, so the
    patches drawn depend on (seed, epoch, case) alone, not on workers or resumes."""

    sample_seeds = True

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed = split_key(key)
        reseed(self.dataset.transform, seed)
        return self.dataset[index]


class DecathlonDataModule(SplitLoaders, L.LightningDataModule):
    """3-D volumes in the Medical Segmentation Decathlon layout, through MONAI dictionary transforms.

    The labelled cases of ``dataset.json`` are split by patient into train/val/test (``split_seed``), so
    the test split is held out. Training draws ``num_samples`` patches of ``patch_size`` per volume
    (``pos``:``neg`` foreground/background centres); validation and test yield whole volumes (batch 1)
    for sliding-window inference. Deterministic transforms are cached (``cache_rate``).

    ``synthetic`` (``{num_cases, size, num_classes, seed}``) first writes MONAI synthetic volumes into
    ``root`` (once; :func:`write_synthetic_decathlon`), the offline default.

    ``on_bad_sample``: ``error`` (default: an unusable case stops setup with its name) or ``skip``: every case
    is read and checked once at setup and the unusable ones are dropped (warned, counted in :attr:`skipped`).
    Training patches are reseeded per (seed, epoch, case), so a run resumed mid-epoch draws the same patches.
    """

    collate_fn = staticmethod(collate_volumes)
    eval_batch_size = 1  # whole volumes, of different sizes

    def __init__(
        self,
        root: str,
        num_classes: int,
        in_channels: int = 1,
        patch_size: tuple[int, int, int] = (96, 96, 96),
        pixdim: tuple[float, float, float] | None = None,
        intensity_range: tuple[float, float] | None = None,
        crop_foreground: bool = True,
        num_samples: int = 4,
        pos: float = 1.0,
        neg: float = 1.0,
        batch_size: int = 2,
        num_workers: int = 4,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        cache_rate: float = 1.0,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        split_seed: int = 0,
        patient_pattern: str | None = None,
        synthetic: dict | None = None,
        on_bad_sample: str = "error",
    ):
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.root = Path(root).expanduser()
        self.num_classes, self.in_channels = num_classes, in_channels
        if len(patch_size) != 3:
            raise ValueError(f"data.patch_size={list(patch_size)}: expected three sizes for 3-D volumes")
        self.bad_samples = BadSamples(on_bad_sample)
        self.train_set = self.val_set = self.test_set = None

    def prepare_data(self) -> None:
        if self.hparams.synthetic:
            write_synthetic_decathlon(self.root, **self.hparams.synthetic)

    def _transforms(self, train: bool):
        hp = self.hparams
        return volume_transforms(train, hp.in_channels, hp.num_classes, hp.patch_size, hp.pixdim, hp.intensity_range,
                                 hp.crop_foreground, hp.num_samples, hp.pos, hp.neg)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        from monai.data import CacheDataset

        self.prepare_data()  # idempotent; lets the datamodule be used without a Trainer
        hp = self.hparams
        cases = read_decathlon(self.root, hp.num_classes, hp.in_channels)
        if self.bad_samples.policy == "skip":
            load = load_case_transform(hp.in_channels, hp.num_classes)
            cases = [case for case in cases if self.bad_samples.read(load, dict(case)) is not None]
        splits = split_cases(cases, hp.val_fraction, hp.test_fraction, hp.split_seed, hp.patient_pattern)
        self.cases = dict(zip(("train", "val", "test"), splits))
        try:
            train_set, self.val_set, self.test_set = (
                CacheDataset(split, self._transforms(train), cache_rate=hp.cache_rate,
                             num_workers=max(1, self.num_workers), progress=False)
                for split, train in zip(splits, (True, False, False))
            )
        except RuntimeError as err:
            _raise_case_error(err)
        self.train_set = SeededVolumes(train_set)


# ---- 2-D image/mask folders (Kvasir-SEG, ISIC style) ----------------------------------------------

def read_mask_folder(root: str | Path) -> list[dict]:
    """``root/images/<name>.<ext>`` paired with ``root/masks/<name>.<any image ext>``."""
    root = Path(root).expanduser()
    images_dir, masks_dir = root / "images", root / "masks"
    if not images_dir.is_dir() or not masks_dir.is_dir():
        raise FileNotFoundError(
            f"data.root={root} must contain images/ and masks/ with one mask per image under the same name "
            "(the Kvasir-SEG layout)"
        )
    masks = {_case_name(p): p for p in masks_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS}
    cases = []
    for path in sorted(images_dir.iterdir()):
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        case = _case_name(path)
        if case not in masks:
            raise FileNotFoundError(f"case {case}: image {path} has no mask in {masks_dir}")
        cases.append({"image": str(path), "label": str(masks[case]), "case": case})
    if not cases:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {images_dir}")
    return cases


class MaskFolderDataset(Dataset):
    """Image/mask pairs read with PIL, checked, then augmented by an albumentations ``transform``.

    ``binary_masks``: masks are 0/255 drawings (values > 127 are foreground, JPEG noise tolerated);
    otherwise mask values are class indices below ``num_classes``. ``bad_samples`` applies the bad-sample
    policy (a skipped case is ``None``); keys may be ``(index, seed)`` pairs, reseeding the augmentation.
    """

    sample_seeds = True

    def __init__(self, cases: list[dict], transform: A.Compose, num_classes: int, in_channels: int = 3,
                 binary_masks: bool = True, bad_samples: BadSamples | None = None):
        if in_channels not in (1, 3):
            raise ValueError(f"in_channels={in_channels}: images are read as grayscale (1) or RGB (3)")
        self.cases, self.transform, self.num_classes = cases, transform, num_classes
        self.mode, self.binary = ("L" if in_channels == 1 else "RGB"), binary_masks
        self.bad_samples = bad_samples or BadSamples("error")

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, key) -> dict | None:
        index, seed = split_key(key)
        sample = self.bad_samples.read(self.load, index)
        if sample is None:
            return None
        image, mask = sample
        reseed(self.transform, seed)
        out = self.transform(image=image, mask=mask)
        return {"image": out["image"], "label": out["mask"][None].long(), "case": self.cases[index]["case"]}

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The checked ``(image HxWxC uint8, mask HxW class ids)`` of a case."""
        case = self.cases[index]
        image = read_image(case["image"], self.mode)
        mask = read_image(case["label"], "L")[..., 0]
        if image.shape[:2] != mask.shape:
            raise InvalidCaseError(
                f"case {case['case']}: image {case['image']} is {image.shape[:2]} but mask {case['label']} is {mask.shape}"
            )
        if self.binary:
            mask = (mask > 127).astype(np.uint8)
        elif mask.max() >= self.num_classes:
            bad = sorted(int(v) for v in np.unique(mask) if v >= self.num_classes)
            raise InvalidCaseError(
                f"case {case['case']}: mask {case['label']} has values {bad[:10]} outside the classes "
                f"0..{self.num_classes - 1} (data.num_classes={self.num_classes}; data.binary_masks=true for 0/255 masks)"
            )
        return image, mask


def mask_transforms(train: bool, patch_size: tuple[int, int], mean, std) -> A.Compose:
    """Training: scale/crop, flips, 90° rotations, brightness/contrast; evaluation: resize to ``patch_size``."""
    size = tuple(patch_size)
    if train:
        ops = [A.RandomResizedCrop(size=size, scale=(0.5, 1.0)), A.HorizontalFlip(), A.VerticalFlip(),
               A.RandomRotate90(), A.RandomBrightnessContrast(0.1, 0.1, p=0.5)]
    else:
        ops = [A.Resize(*size)]
    return A.Compose(ops + [A.Normalize(mean=mean, std=std, max_pixel_value=255.0), ToTensorV2()])


class MaskFolderDataModule(SplitLoaders, L.LightningDataModule):
    """2-D segmentation from ``root/images`` + ``root/masks`` (Kvasir-SEG, ISIC), split by case with a fixed
    seed into train/val/test. Images are resized (eval) or randomly cropped (train) to ``patch_size``.

    ``synthetic`` (``{num_images, size, seed}``) first writes MONAI's synthetic 2-D images as PNG folders
    into ``root`` (:func:`write_synthetic_masks`), the offline default.

    ``on_bad_sample``: ``error`` (default: an unreadable image, a mask of another size or with values outside
    the classes stops with the case named) or ``skip`` (dropped from its batch, warned, counted in :attr:`skipped`).
    """

    collate_fn = staticmethod(collate_skip_none)

    def __init__(
        self,
        root: str,
        num_classes: int = 2,
        in_channels: int = 3,
        patch_size: tuple[int, int] = (256, 256),
        binary_masks: bool = True,
        mean: tuple[float, ...] = (0.485, 0.456, 0.406),
        std: tuple[float, ...] = (0.229, 0.224, 0.225),
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 4,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        split_seed: int = 0,
        synthetic: dict | None = None,
        on_bad_sample: str = "error",
    ):
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.root = Path(root).expanduser()
        self.num_classes, self.in_channels = num_classes, in_channels
        if len(patch_size) != 2:
            raise ValueError(f"data.patch_size={list(patch_size)}: expected two sizes for 2-D images")
        self.bad_samples = BadSamples(on_bad_sample)
        self.train_set = self.val_set = self.test_set = None

    def prepare_data(self) -> None:
        if self.hparams.synthetic:
            write_synthetic_masks(self.root, **self.hparams.synthetic)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        self.prepare_data()
        hp = self.hparams
        mean, std = tuple(hp.mean), tuple(hp.std)
        if len(mean) != hp.in_channels:  # e.g. ImageNet RGB statistics for grayscale images
            mean, std = (sum(mean) / len(mean),) * hp.in_channels, (sum(std) / len(std),) * hp.in_channels
        splits = split_cases(read_mask_folder(self.root), hp.val_fraction, hp.test_fraction, hp.split_seed)
        self.cases = dict(zip(("train", "val", "test"), splits))
        self.train_set, self.val_set, self.test_set = (
            MaskFolderDataset(split, mask_transforms(train, hp.patch_size, mean, std), hp.num_classes,
                              hp.in_channels, hp.binary_masks, self.bad_samples)
            for split, train in zip(splits, (True, False, False))
        )
        if len(self.train_set) < hp.batch_size:
            raise ValueError(f"the training split has {len(self.train_set)} images, fewer than "
                             f"data.batch_size={hp.batch_size}")
        self.train_set.transform.set_random_seed(torch.initial_seed() % 2**32)

    def predict_transform(self) -> A.Compose:
        """What ``predict.py`` applies to an ``HWC`` uint8 image: the evaluation transform."""
        hp = self.hparams
        mean, std = tuple(hp.mean), tuple(hp.std)
        if len(mean) != hp.in_channels:
            mean, std = (sum(mean) / len(mean),) * hp.in_channels, (sum(std) / len(std),) * hp.in_channels
        return mask_transforms(False, hp.patch_size, mean, std)




# ---- MedMNIST ------------------------------------------------------------------------------------

def read_medmnist(path: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{split: (images, labels)}`` from a MedMNIST ``.npz`` (keys ``<split>_images``, ``<split>_labels``).

    2-D images are ``[N, H, W]`` or ``[N, H, W, 3]``; 3-D ones ``[N, D, H, W]`` are returned as
    ``[N, H, W, D]`` (slices as channels: the MedMNIST "2.5-D" baseline). Labels ``[N, 1]`` become ``[N]``.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"MedMNIST file {path} not found: download <flag>[_<size>].npz from the MedMNIST Zenodo record "
            "(or `python -m medmnist download`, into ~/.medmnist) and set data.root to its folder; see data/README.md"
        )
    with np.load(path) as npz:
        missing = [f"{s}_{k}" for s in ("train", "val", "test") for k in ("images", "labels") if f"{s}_{k}" not in npz]
        if missing:
            raise KeyError(f"{path} lacks {missing}; found {sorted(npz.files)} (not a MedMNIST file?)")
        out = {}
        for split in ("train", "val", "test"):
            images, labels = npz[f"{split}_images"], npz[f"{split}_labels"]
            if labels.ndim == 2 and labels.shape[1] != 1:
                raise ValueError(f"{path}: {split}_labels has shape {labels.shape}: multi-label tasks (ChestMNIST) "
                                 "are not single-label classification")
            if images.ndim == 4 and images.shape[-1] not in (1, 3):  # [N, D, H, W] volumes
                images = np.ascontiguousarray(images.transpose(0, 2, 3, 1))
            elif images.ndim not in (3, 4):
                raise ValueError(f"{path}: {split}_images has shape {images.shape}; expected [N,H,W], [N,H,W,3] "
                                 "or [N,D,H,W]")
            if images.dtype != np.uint8:
                raise ValueError(f"{path}: {split}_images is {images.dtype}; MedMNIST stores uint8")
            out[split] = (images, labels.reshape(len(labels)))
    return out


class MedMNISTDataModule(ClassificationDataModule):
    """MedMNIST ``root/<flag>[_<size>].npz`` with its own train/val/test splits, for ClassificationModule.

    3-D sets (``organmnist3d`` ...) give their ``D`` slices as channels (``in_chans = D``), so any 2-D
    backbone classifies them. ``train_subset`` trains on the first images only.
    """

    def __init__(self, root: str, flag: str, size: int | None = None, train_subset: int | None = None, **kwargs):
        super().__init__(root, **kwargs)
        self.flag, self.size, self.train_subset = flag, size, train_subset
        self.path = self.root / (f"{flag}.npz" if size in (None, 28) else f"{flag}_{size}.npz")

    def build_datasets(self):
        splits = read_medmnist(self.path)
        images, labels = splits["train"]
        channels = images.shape[-1] if images.ndim == 4 else 1
        if channels != self.in_chans:
            raise ValueError(f"{self.path}: images have {channels} channels (slices for 3-D sets) but "
                             f"data.in_chans={self.in_chans}")
        for split, (_, y) in splits.items():
            if y.min() < 0 or y.max() >= self.num_classes:
                raise ValueError(f"{self.path}: {split}_labels span {y.min()}..{y.max()} but "
                                 f"data.num_classes={self.num_classes}")
        if self.train_subset:
            images, labels = images[: self.train_subset], labels[: self.train_subset]
        return (ArrayDataset(images, labels, self.transforms(train=True)),
                ArrayDataset(*splits["val"], transform=self.transforms(train=False)),
                ArrayDataset(*splits["test"], transform=self.transforms(train=False)))


# ---- synthetic sets (offline defaults) ------------------------------------------------------------

def _generated(root: Path, params: dict, index: str) -> bool:
    """Whether ``root`` already holds the synthetic set made with ``params``; refuse to overwrite real data."""
    path = root / index
    if not path.exists():
        return False
    try:
        stored = json.loads(path.read_text()).get("synthetic")
    except (json.JSONDecodeError, AttributeError):
        stored = None
    if stored is None:
        raise FileExistsError(f"{path} is not a synthetic set: set data.synthetic=null to read the data in {root}")
    return stored == params


def _fresh(root: Path, folders: tuple[str, ...]) -> None:
    for name in folders:
        shutil.rmtree(root / name, ignore_errors=True)
        (root / name).mkdir(parents=True)
    (root / ".gitignore").write_text("*\n")  # generated data stays out of the repository


def _finish(root: Path, index: str, content: dict) -> None:
    tmp = root / f".{index}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(content, indent=1))
    tmp.replace(root / index)  # the index appears last, so a half-written set is regenerated


def write_synthetic_decathlon(root: str | Path, num_cases: int = 16, size: int = 64, num_classes: int = 3,
                              num_objs: int = 6, rad_max: int = 12, noise: float = 0.3, seed: int = 0) -> Path:
    """Write MONAI ``create_test_image_3d`` volumes as a Decathlon task (``dataset.json``, ``imagesTr``,
    ``labelsTr``, NIfTI) into ``root``: ``num_classes - 1`` sphere classes told apart by intensity.

    Deterministic in ``seed``; a second call with the same arguments does nothing. Every volume holds
    every class (redrawn otherwise): the generator rescales intensities per volume, so a missing class
    would shift the others' intensities. The affine (1.5 x 1.5 x 2 mm, LPS-flipped axes) exercises
    orientation and spacing.
    """
    import nibabel as nib
    from monai.data import create_test_image_3d

    root = Path(root).expanduser()
    params = dict(num_cases=num_cases, size=size, num_classes=num_classes, num_objs=num_objs, rad_max=rad_max,
                  noise=noise, seed=seed)
    if _generated(root, params, "dataset.json"):
        return root
    if size <= 2 * rad_max:
        raise ValueError(f"synthetic size={size} must exceed 2 * rad_max={2 * rad_max}")
    _fresh(root, ("imagesTr", "labelsTr"))
    affine = np.diag([-1.5, -1.5, 2.0, 1.0])
    rng = np.random.RandomState(seed)
    training = []
    for i in range(num_cases):
        while True:
            image, label = create_test_image_3d(size, size, size, num_objs=num_objs, rad_max=rad_max, rad_min=4,
                                                noise_max=noise, num_seg_classes=num_classes - 1, random_state=rng)
            if len(np.unique(label)) == num_classes:
                break
        name = f"synthetic_{i:03d}.nii.gz"
        nib.save(nib.Nifti1Image(image.astype(np.float32), affine), root / "imagesTr" / name)
        nib.save(nib.Nifti1Image(label.astype(np.uint8), affine), root / "labelsTr" / name)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    _finish(root, "dataset.json", {
        "name": "Synthetic", "description": "MONAI create_test_image_3d spheres (vision.datamodules.medical)",
        "tensorImageSize": "3D", "modality": {"0": "synthetic"},
        "labels": {"0": "background", **{str(k): f"class_{k}" for k in range(1, num_classes)}},
        "numTraining": num_cases, "numTest": 0, "training": training, "test": [], "synthetic": params,
    })
    return root


def write_synthetic_masks(root: str | Path, num_images: int = 64, size: int = 96, num_objs: int = 4,
                          rad_max: int = 16, noise: float = 0.3, seed: int = 0) -> Path:
    """Write MONAI ``create_test_image_2d`` images (RGB PNG) and binary masks (0/255 PNG) as
    ``root/images`` + ``root/masks``, the Kvasir-SEG layout. Deterministic and idempotent."""
    from monai.data import create_test_image_2d

    root = Path(root).expanduser()
    params = dict(num_images=num_images, size=size, num_objs=num_objs, rad_max=rad_max, noise=noise, seed=seed)
    if _generated(root, params, "synthetic.json"):
        return root
    _fresh(root, ("images", "masks"))
    rng = np.random.RandomState(seed)
    tint = np.array([1.0, 0.55, 0.45])  # reddish, polyp-like
    for i in range(num_images):
        image, label = create_test_image_2d(size, size, num_objs=num_objs, rad_max=rad_max, rad_min=5,
                                            noise_max=noise, num_seg_classes=1, random_state=rng)
        rgb = (np.clip(image[..., None] * tint, 0, 1) * 255).round().astype(np.uint8)
        Image.fromarray(rgb).save(root / "images" / f"synthetic_{i:03d}.png")
        Image.fromarray((label > 0).astype(np.uint8) * 255).save(root / "masks" / f"synthetic_{i:03d}.png")
    _finish(root, "synthetic.json", {"description": "MONAI create_test_image_2d discs", "synthetic": params})
    return root
