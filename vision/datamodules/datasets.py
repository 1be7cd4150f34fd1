"""Dataset readers: ImageNet-style image folders and in-memory arrays (Fashion-MNIST's idx files)."""

from __future__ import annotations

import gzip
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, default_collate, get_worker_info

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


class CorruptImageError(RuntimeError):
    """An image file that cannot be decoded."""


class TransformedDataset(Dataset):
    """Base for datasets that yield ``(transform(image=HWC uint8)["image"], label)``.

    With ``skip_corrupt=True`` an unreadable sample is replaced by ``None`` (dropped by
    :func:`collate_skip_none`), a warning names the file, and :attr:`skipped` counts it across
    DataLoader workers (the counter lives in shared memory).
    """

    def __init__(self, transform=None, skip_corrupt: bool = False):
        self.transform = transform
        self.skip_corrupt = skip_corrupt
        self._skipped = torch.zeros(1, dtype=torch.int64).share_memory_()

    @property
    def skipped(self) -> int:
        return int(self._skipped.item())

    def load(self, index: int) -> tuple[np.ndarray, int]:
        raise NotImplementedError

    def __getitem__(self, index: int):
        try:
            image, label = self.load(index)
        except CorruptImageError as err:
            if not self.skip_corrupt:
                raise
            self._skipped += 1
            warnings.warn(f"skipping {err} (data.skip_corrupt=true)", stacklevel=2)
            return None
        if self.transform is not None:
            image = self.transform(image=image)["image"]
        return image, label


def collate_skip_none(batch):
    """``default_collate`` without the samples that :class:`TransformedDataset` skipped."""
    return default_collate([sample for sample in batch if sample is not None])


def seed_worker_transform(worker_id: int) -> None:
    """Give each DataLoader worker its own albumentations RNG stream.

    albumentations keeps a private RNG that ``seed_everything`` does not reach and that forked
    workers would otherwise share; torch's per-worker seed is derived from the global seed.
    """
    info = get_worker_info()
    transform = getattr(info.dataset, "transform", None)
    if hasattr(transform, "set_random_seed"):
        transform.set_random_seed(torch.initial_seed() % 2**32)


class ImageFolderDataset(TransformedDataset):
    """Images in ``root/<class_name>/<file>``, classes sorted by name (torchvision's ImageFolder order)."""

    def __init__(self, root: str | Path, transform=None, in_chans: int = 3, skip_corrupt: bool = False,
                 classes: list[str] | None = None):
        super().__init__(transform, skip_corrupt)
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist")
        self.classes = classes or sorted(p.name for p in self.root.iterdir() if p.is_dir())
        if not self.classes:
            raise FileNotFoundError(f"{self.root} has no class sub-folders; expected {self.root}/<class>/<image>")
        self.samples = [
            (path, label)
            for label, name in enumerate(self.classes)
            for path in sorted((self.root / name).rglob("*"))
            if path.suffix.lower() in IMAGE_EXTENSIONS
        ]
        if not self.samples:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {self.root}")
        if in_chans not in (1, 3):
            raise ValueError(f"in_chans={in_chans}: image folders are read as grayscale (1) or RGB (3)")
        self.mode = "L" if in_chans == 1 else "RGB"

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[np.ndarray, int]:
        path, label = self.samples[index]
        try:
            with Image.open(path) as img:
                image = np.asarray(img.convert(self.mode))
        except (OSError, UnidentifiedImageError, ValueError) as err:
            raise CorruptImageError(f"unreadable image {path}: {err}") from err
        return (image[..., None] if image.ndim == 2 else image), label


class ArrayDataset(TransformedDataset):
    """Images held in memory: ``images`` uint8 ``[N, H, W]`` or ``[N, H, W, C]``, ``labels`` ``[N]``."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform=None):
        super().__init__(transform)
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
