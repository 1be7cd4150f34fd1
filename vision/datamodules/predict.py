"""Images to predict on (``predict.py``): files, folders or glob patterns, through a datamodule's evaluation
transform."""

from __future__ import annotations

import glob
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .datasets import IMAGE_EXTENSIONS, read_image


def _hidden(path: Path) -> bool:
    return any(part.startswith(".") and part not in (".", "..") or part == "__MACOSX" for part in path.parts)


def find_images(inputs: str | Sequence[str]) -> list[Path]:
    """Image files from paths, folders (searched recursively) and glob patterns, in the given order, sorted
    within each entry; hidden files are left out. An entry that matches no image is an error naming it."""
    entries = [inputs] if isinstance(inputs, str | Path) else list(inputs)
    found: list[Path] = []
    for entry in entries:
        path = Path(str(entry)).expanduser()
        if path.is_dir():
            matches = sorted(p for p in path.rglob("*") if p.is_file())
        elif path.is_file():
            matches = [path]
        else:
            matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        images = [p for p in matches if p.suffix.lower() in IMAGE_EXTENSIONS and not _hidden(p)]
        if not images:
            raise FileNotFoundError(f"inputs={entry!r} matches no image file ({', '.join(IMAGE_EXTENSIONS)})")
        found.extend(images)
    return list(dict.fromkeys(found))


class PredictImages(Dataset):
    """``{"image", "size", "input_size", "index"}`` per file: ``image`` as ``transform`` (an albumentations
    pipeline taking ``image=HWC uint8``) makes it, or as a float ``CHW`` tensor in [0, 1] without one; ``size``
    is the original ``[H, W]``, ``input_size`` the transformed one."""

    def __init__(self, paths: Sequence[Path], transform=None, in_chans: int = 3):
        if in_chans not in (1, 3):
            raise ValueError(f"in_chans={in_chans}: predict.py reads images as grayscale (1) or RGB (3)")
        self.paths, self.transform, self.mode = list(paths), transform, "L" if in_chans == 1 else "RGB"

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, index: int) -> np.ndarray:
        return read_image(self.paths[index], self.mode)

    def __getitem__(self, index: int) -> dict:
        image = self.read(index)
        size = image.shape[:2]
        if self.transform is not None:
            tensor = self.transform(image=image)["image"]
        else:
            tensor = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float() / 255
        return {"image": tensor.float(), "size": torch.tensor(size), "input_size": torch.tensor(tensor.shape[-2:]),
                "index": index}
