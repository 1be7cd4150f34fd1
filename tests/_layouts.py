"""Tiny datasets written in real on-disk layouts, shared by the data and task tests."""

from pathlib import Path

import numpy as np
from PIL import Image

RNG = np.random.default_rng(0)

# The CPU overrides every pipeline test run shares (no workers, no progress bar).
QUICK = ["trainer.accelerator=cpu", "trainer.devices=1", "data.num_workers=0", "callbacks.rich_progress_bar=null"]


def write_pair(image_path: Path, mask_path: Path, mask: np.ndarray, mode: str = "L", image_size=None) -> None:
    image_path.parent.mkdir(parents=True, exist_ok=True)
    mask_path.parent.mkdir(parents=True, exist_ok=True)
    h, w = image_size or mask.shape
    Image.fromarray(RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(image_path)
    if mode == "P":
        img = Image.fromarray(mask.astype(np.uint8), mode="P")
        img.putpalette(RNG.integers(0, 256, 768, dtype=np.uint8).tolist())  # colours unrelated to the ids
        img.save(mask_path)
    else:
        Image.fromarray(mask.astype(np.uint8)).save(mask_path)


def make_ade20k(root: Path, n: int = 3) -> Path:
    for split in ("training", "validation"):
        for i in range(n):
            mask = RNG.integers(0, 151, (40, 50))
            write_pair(
                root / "images" / split / f"ADE_{split}_{i}.jpg",
                root / "annotations" / split / f"ADE_{split}_{i}.png",
                mask,
            )
    return root
