"""Datasets: checked samples (from :mod:`.readers`) through a seeded transform, and their collate functions.

Unusable samples follow one policy for every task (``data.on_bad_sample``): a reader raises
:class:`~vision.datamodules.readers.BadSampleError`, and :class:`BadSamples` either re-raises it (``error``,
the default) or drops the sample with a warning and a count (``skip``). Every dataset takes ``(index, seed)``
keys (``sample_seeds``) so its augmentations are a function of (seed, epoch, index).
"""

from __future__ import annotations

import warnings
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import albumentations as A
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset, default_collate, get_worker_info

from .classes import IGNORE_INDEX
from .readers import (  # noqa: F401  (BadSampleError ... read_idx re-exported: their public home was here)
    IMAGE_EXTENSIONS,
    BadSampleError,
    CorruptImageError,
    InvalidCaseError,
    check_boxes,
    check_mask,
    label_lookup,
    read_idx,
    read_image,
    read_sample,
)

BAD_SAMPLE_POLICIES = ("error", "skip")


def bad_sample_policy(on_bad_sample: str | None = "error", skip_corrupt: bool | None = None) -> str:
    """Validate ``data.on_bad_sample``; ``skip_corrupt=true`` is the older spelling of ``skip``."""
    if skip_corrupt is not None:
        warnings.warn("data.skip_corrupt is deprecated: use data.on_bad_sample=skip|error", DeprecationWarning,
                      stacklevel=3)
        on_bad_sample = "skip" if skip_corrupt else on_bad_sample
    on_bad_sample = on_bad_sample or "error"
    if on_bad_sample not in BAD_SAMPLE_POLICIES:
        raise ValueError(f"data.on_bad_sample={on_bad_sample!r}: expected one of {BAD_SAMPLE_POLICIES}")
    return on_bad_sample


class BadSamples:
    """The bad-sample policy and its count of skipped files, shared by a datamodule's datasets and their workers.

    ``read(load, index)`` returns ``load(index)``, or, when it raises :class:`BadSampleError` under
    ``skip``, warns with the error and returns ``None`` (dropped by :func:`collate_skip_none`). :attr:`count`
    counts files, not reads: a bad file read again in later epochs, or by the val and test splits of one
    folder, counts once. The record lives in shared memory, so DataLoader workers add to the same count.
    """

    SLOTS = 1 << 20  # a bitmap of (dataset, index) hashes: collisions are negligible for any real count

    def __init__(self, policy: str = "error"):
        self.policy = bad_sample_policy(policy)
        self._seen = torch.zeros(self.SLOTS, dtype=torch.bool).share_memory_()

    @property
    def count(self) -> int:
        return int(self._seen.sum())

    @staticmethod
    def _slot(load: Callable[[Any], Any], index: Any) -> int:
        owner = getattr(load, "__self__", load)
        where = getattr(owner, "root", None) or id(owner)  # ids survive the fork into workers
        return zlib.crc32(f"{type(owner).__name__}|{where}|{index}".encode()) % BadSamples.SLOTS

    def read(self, load: Callable[[Any], Any], index: Any) -> Any:
        try:
            return load(index)
        except BadSampleError as err:
            if self.policy == "error":
                raise
            slot = self._slot(load, index)
            if not self._seen[slot]:
                self._seen[slot] = True
                warnings.warn(f"skipping {err} (data.on_bad_sample=skip)", stacklevel=2)
            return None



def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of one sample in one epoch: the same on any rank, worker count or resume."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


def unwrap_subset(dataset: Dataset) -> Dataset:
    """The dataset under any ``Subset`` wrappers (``train_subset``)."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return dataset


def split_key(key) -> tuple[int, int | None]:
    """``(index, augmentation seed or None)`` of a dataset key: a plain index, or the ``(index, seed)`` pair a
    :class:`~vision.datamodules.loaders.ResumableSampler` yields to datasets whose ``sample_seeds`` is true."""
    return key if isinstance(key, tuple) else (key, None)


def reseed(transform, seed: int | None) -> None:
    """Reseed an albumentations (``set_random_seed``) or MONAI (``set_random_state``) pipeline for one sample."""
    if seed is None or transform is None:
        return
    if hasattr(transform, "set_random_seed"):
        transform.set_random_seed(seed)
    elif hasattr(transform, "set_random_state"):
        transform.set_random_state(seed=seed)


class TransformedDataset(Dataset):
    """Base of every dataset here: :meth:`load` a checked sample, then :meth:`apply` the transform to it.

    ``bad_samples`` applies the bad-sample policy to :meth:`load` (a skipped sample is ``None``). An index may
    come as ``(index, seed)`` (:class:`~vision.datamodules.loaders.ResumableSampler` with ``sample_seeds``):
    the transform is then reseeded first, so augmentations are a function of (seed, epoch, index). The default
    :meth:`apply` yields ``(transform(image=HWC uint8)["image"], label)``.
    """

    sample_seeds = True  # takes (index, seed) keys

    def __init__(self, transform=None, bad_samples: BadSamples | None = None):
        self.transform = transform
        self.bad_samples = bad_samples or BadSamples("error")

    @property
    def skipped(self) -> int:
        return self.bad_samples.count

    def load(self, index: int) -> tuple[np.ndarray, int]:
        raise NotImplementedError

    def apply(self, index: int, sample):
        image, label = sample
        return (image if self.transform is None else self.transform(image=image)["image"]), label

    def __getitem__(self, key):
        index, seed = split_key(key)
        sample = self.bad_samples.read(self.load, index)
        if sample is None:
            return None
        reseed(self.transform, seed)
        return self.apply(index, sample)


def collate_skip_none(batch):
    """``default_collate`` without skipped samples (``None``); a batch with none left is ``None``, which
    Lightning skips."""
    batch = [sample for sample in batch if sample is not None]
    return default_collate(batch) if batch else None


def seed_worker_transform(worker_id: int) -> None:
    """Give each DataLoader worker its own albumentations RNG stream.

    albumentations keeps a private RNG that ``seed_everything`` does not reach and that forked
    workers would otherwise share; torch's per-worker seed is derived from the global seed.
    """
    info = get_worker_info()
    transform = getattr(info.dataset, "transform", None)
    if hasattr(transform, "set_random_seed"):
        transform.set_random_seed(torch.initial_seed() % 2**32)


def _hidden(path: Path, root: Path) -> bool:
    """Hidden files and folders (``.DS_Store``, macOS ``._name.jpg`` AppleDouble files, ``.ipynb_checkpoints``)
    and macOS archives' ``__MACOSX`` folders are not data."""
    return any(part.startswith(".") or part == "__MACOSX" for part in path.relative_to(root).parts)


def class_folders(root: Path) -> list[str]:
    """The class sub-folders of ``root``, sorted by name (torchvision's ImageFolder order), hidden ones left out."""
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not _hidden(p, root))


class ImageFolderDataset(TransformedDataset):
    """Images in ``root/<class_name>/<file>``, classes sorted by name (torchvision's ImageFolder order).

    Hidden files and folders are ignored. A class folder without images is an error naming it, unless
    ``allow_empty_classes`` (then the class exists, with no samples here).
    """

    def __init__(self, root: str | Path, transform=None, in_chans: int = 3, bad_samples: BadSamples | None = None,
                 classes: list[str] | None = None, allow_empty_classes: bool = False):
        super().__init__(transform, bad_samples)
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist")
        self.classes = list(classes or class_folders(self.root))
        if not self.classes:
            raise FileNotFoundError(f"{self.root} has no class sub-folders; expected {self.root}/<class>/<image>")
        self.samples = [
            (path, label)
            for label, name in enumerate(self.classes)
            for path in sorted((self.root / name).rglob("*"))
            if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file() and not _hidden(path, self.root)
        ]
        if not self.samples:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {self.root}")
        counts = np.bincount([label for _, label in self.samples], minlength=len(self.classes))
        empty = [name for name, n in zip(self.classes, counts) if n == 0]
        if empty and not allow_empty_classes:
            raise ValueError(
                f"{self.root}: class folder(s) without images ({', '.join(IMAGE_EXTENSIONS)}): {', '.join(empty)}. "
                "Remove them, add images, or keep them as classes with data.allow_empty_classes=true")
        if in_chans not in (1, 3):
            raise ValueError(f"in_chans={in_chans}: image folders are read as grayscale (1) or RGB (3)")
        self.mode = "L" if in_chans == 1 else "RGB"

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[np.ndarray, int]:
        path, label = self.samples[index]
        return read_image(path, self.mode), label


class ArrayDataset(TransformedDataset):
    """Images held in memory: ``images`` uint8 ``[N, H, W]`` or ``[N, H, W, C]``, ``labels`` ``[N]``."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform=None, bad_samples: BadSamples | None = None):
        super().__init__(transform, bad_samples)
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images if images.ndim == 4 else images[..., None]
        self.labels = labels.astype(np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, index: int) -> tuple[np.ndarray, int]:
        return self.images[index], int(self.labels[index])


# ---- semantic segmentation -----------------------------------------------------------------------------


class SegmentationDataset(TransformedDataset):
    """``(image CHW float tensor, mask HW int64 tensor)`` for each ``(image path, mask path)`` pair."""

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
        super().__init__(transform, bad_samples)
        self.samples, self.num_classes = samples, num_classes
        self.in_chans, self.reduce_zero_label, self.ignore_index = in_chans, reduce_zero_label, ignore_index
        self.lookup = None if label_map is None else label_lookup(label_map, ignore_index)  # built once

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image_path, mask_path = self.samples[index]
        return read_sample(
            image_path, mask_path, self.num_classes, self.in_chans, self.reduce_zero_label, self.ignore_index,
            self.lookup,
        )

    def apply(self, index: int, sample) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = sample
        if self.transform is not None:
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


# ---- medical: 3-D volumes (MONAI) and 2-D mask folders ----------------------------------------------------


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


class MaskFolderDataset(TransformedDataset):
    """Image/mask pairs read with PIL, checked, then augmented by an albumentations ``transform``.

    ``binary_masks``: masks are 0/255 drawings (values > 127 are foreground, JPEG noise tolerated);
    otherwise mask values are class indices below ``num_classes``. ``bad_samples`` applies the bad-sample
    policy (a skipped case is ``None``); keys may be ``(index, seed)`` pairs, reseeding the augmentation.
    """

    def __init__(self, cases: list[dict], transform: A.Compose, num_classes: int, in_channels: int = 3,
                 binary_masks: bool = True, bad_samples: BadSamples | None = None):
        if in_channels not in (1, 3):
            raise ValueError(f"in_channels={in_channels}: images are read as grayscale (1) or RGB (3)")
        super().__init__(transform, bad_samples)
        self.cases, self.num_classes = cases, num_classes
        self.mode, self.binary = ("L" if in_channels == 1 else "RGB"), binary_masks

    def __len__(self) -> int:
        return len(self.cases)

    def apply(self, index: int, sample) -> dict:
        image, mask = sample
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
