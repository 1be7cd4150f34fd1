"""Dataset readers: ImageNet-style image folders and in-memory arrays (Fashion-MNIST's idx files).

Unusable samples follow one policy for every task (``data.on_bad_sample``): a reader raises
:class:`BadSampleError` (or uses :func:`read_image` / :func:`check_mask` / :func:`check_boxes`, which do),
and :class:`BadSamples` either re-raises it (``error``, the default) or drops the sample with a warning
and a count (``skip``).
"""

from __future__ import annotations

import gzip
import warnings
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, Subset, default_collate, get_worker_info

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
BAD_SAMPLE_POLICIES = ("error", "skip")


class BadSampleError(RuntimeError):
    """A sample that cannot be used: unreadable or truncated image, empty or malformed annotation, a mask
    with unexpected values. The message names the file."""


class CorruptImageError(BadSampleError):
    """An image file that cannot be decoded."""


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


def read_image(path: str | Path, mode: str = "RGB") -> np.ndarray:
    """An image file as an ``HWC`` uint8 array; unreadable or truncated files raise :class:`CorruptImageError`."""
    try:
        with Image.open(path) as img:
            image = np.asarray(img.convert(mode))
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as err:
        raise CorruptImageError(f"unreadable image {path}: {err}") from err
    return image[..., None] if image.ndim == 2 else image


def check_mask(mask: np.ndarray, allowed: Sequence[int], path: str | Path) -> np.ndarray:
    """A label mask whose values are all in ``allowed`` (e.g. class ids plus an ignore index)."""
    unexpected = np.setdiff1d(np.unique(mask), np.asarray(allowed))
    if unexpected.size:
        raise BadSampleError(f"mask {path} has unexpected values {unexpected[:8].tolist()} (allowed {list(allowed)})")
    return mask


def check_boxes(boxes: np.ndarray, path: str | Path, allow_empty: bool = False) -> np.ndarray:
    """``[N, 4]`` finite ``x1, y1, x2, y2`` boxes with positive width and height."""
    boxes = np.asarray(boxes, dtype=np.float32)
    if boxes.size == 0 and not allow_empty:
        raise BadSampleError(f"annotation {path} has no boxes")
    boxes = boxes.reshape(-1, 4) if boxes.size == 0 else boxes
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise BadSampleError(f"annotation {path}: boxes of shape {list(boxes.shape)}, expected [N, 4]")
    if not np.isfinite(boxes).all() or (boxes[:, 2:] <= boxes[:, :2]).any():
        raise BadSampleError(f"annotation {path} has non-finite or empty boxes (x2 <= x1 or y2 <= y1)")
    return boxes


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
    """Base for datasets that yield ``(transform(image=HWC uint8)["image"], label)``.

    ``bad_samples`` applies the bad-sample policy to :meth:`load`. An index may come as
    ``(index, seed)`` (:class:`~vision.datamodules.loaders.ResumableSampler` with ``sample_seeds``):
    the transform is then reseeded, so augmentations are a function of (seed, epoch, index).
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

    def __getitem__(self, key):
        index, seed = split_key(key)
        sample = self.bad_samples.read(self.load, index)
        if sample is None:
            return None
        image, label = sample
        if self.transform is not None:
            reseed(self.transform, seed)
            image = self.transform(image=image)["image"]
        return image, label


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


def read_idx(path: str | Path) -> np.ndarray:
    """Read an idx file (the MNIST / Fashion-MNIST format), gzipped or not, as a numpy array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte idx file (bad magic number)")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    expected = int(np.prod(shape))
    if len(data) - offset != expected:
        raise ValueError(f"{path}: header says shape {shape} ({expected} bytes) but holds {len(data) - offset}")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(shape)
