"""Synapse multi-organ CT and ACDC cardiac MRI in the preprocessed layouts that TransUNet-family papers use.

Synapse (TransUNet's release)::

    root/train_npz/case0005_slice000.npz    2-D slices, keys image [H, W] float (CT clipped to [-125, 275],
                                            scaled to [0, 1]) and label [H, W] (0 background, 1..8 organs)
    root/test_vol_h5/case0001.npy.h5        whole volumes (h5py), keys image / label [D, H, W]
    lists/train.txt                         slice names (case0005_slice000), the 18 training cases
    lists/test_vol.txt                      volume names (case0001), the 12 test cases

ACDC (the MT-UNet / Swin-UNet release)::

    root/{train,valid,test}/<name>          files named by lists/{train,valid,test}.txt (names with extension);
                                            .npz with keys img (or image) and label: train/valid 2-D slices,
                                            test whole volumes [D, H, W]; .h5 read the same way

Training uses slices (resized to ``patch_size``, random 90-degree rotations and flips as TransUNet's
``random_rot_flip``); validation and test yield whole volumes ``[1, H, W, D]`` (axial last, the package's
volume convention), which the medical task evaluates slice by slice (resized to ``patch_size`` and back, the
TransUNet protocol) and scores per organ with Dice and HD95 on the whole volume.

A bad case (missing file, unreadable file, missing key, image/label shape mismatch, label values outside
``0..num_classes-1`` or not integers) raises :class:`~vision.datamodules.readers.InvalidCaseError` naming
the file, or is skipped under ``data.on_bad_sample=skip`` (warned, counted).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .datasets import BadSamples, collate_skip_none, split_key
from .loaders import SplitLoaders
from .readers import InvalidCaseError
from .synthetic import _finish, _fresh, _generated

SYNAPSE_CLASSES = ("background", "aorta", "gallbladder", "kidney_left", "kidney_right", "liver", "pancreas",
                   "spleen", "stomach")  # TransUNet's label order
ACDC_CLASSES = ("background", "rv", "myo", "lv")


def read_list(path: Path) -> list[str]:
    """The non-empty lines of a split list; a missing list is an error naming it."""
    if not path.is_file():
        raise FileNotFoundError(f"split list {path} not found (see data/README.md for the layout)")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def read_pair(path: Path, num_classes: int, ndim: int, image_keys: Sequence[str] = ("image", "img"),
              label_key: str = "label") -> tuple[np.ndarray, np.ndarray]:
    """``(image float32, label int64)`` of one ``.npz`` / ``.h5`` file, both ``ndim``-D and of one shape, labels in
    ``0..num_classes-1``; anything else raises :class:`InvalidCaseError` naming the file."""
    if not path.is_file():
        raise InvalidCaseError(f"{path}: file not found")
    try:
        if path.suffix == ".h5":
            import h5py

            with h5py.File(path, "r") as f:
                arrays = {k: np.asarray(f[k]) for k in f.keys()}
        else:
            with np.load(path) as f:
                arrays = {k: f[k] for k in f.files}
    except Exception as err:  # noqa: BLE001  (any reader failure is this file's fault)
        raise InvalidCaseError(f"{path}: unreadable ({type(err).__name__}: {err})") from None
    image_key = next((k for k in image_keys if k in arrays), None)
    if image_key is None or label_key not in arrays:
        raise InvalidCaseError(f"{path}: keys {sorted(arrays)}; expected one of {list(image_keys)} and {label_key!r}")
    image, label = arrays[image_key], arrays[label_key]
    if image.ndim != ndim or image.shape != label.shape:
        raise InvalidCaseError(f"{path}: image {tuple(image.shape)} and label {tuple(label.shape)}; expected "
                               f"one {ndim}-D shape for both")
    if not np.all(np.isfinite(image)):
        raise InvalidCaseError(f"{path}: image holds NaN or infinite values")
    values = np.unique(label)
    if not np.array_equal(values, np.round(values)) or values.min() < 0 or values.max() >= num_classes:
        raise InvalidCaseError(f"{path}: label values {values[:10].tolist()}; expected integers in "
                               f"0..{num_classes - 1} (data.num_classes={num_classes})")
    return image.astype(np.float32), label.astype(np.int64)


class SliceDataset(Dataset):
    """Training slices resized to ``size`` (image bilinear, label nearest), with TransUNet's random rot90 + flip,
    as ``{"image": [1, h, w], "label": [1, h, w], "case": name}``; seeded per ``(index, seed)`` key."""

    sample_seeds = True

    def __init__(self, files: list[Path], num_classes: int, size: Sequence[int], bad_samples: BadSamples,
                 augment: bool = True):
        self.files, self.num_classes, self.size = files, num_classes, tuple(size)
        self.bad_samples, self.augment = bad_samples, augment
        self.root = files[0].parent if files else None  # names this dataset in the bad-sample record

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return read_pair(self.files[index], self.num_classes, 2)

    def __getitem__(self, key):
        index, seed = split_key(key)
        pair = self.bad_samples.read(self.load, index)
        if pair is None:
            return None
        image, label = pair
        if self.augment:
            rng = np.random.default_rng(seed)
            k, axis = int(rng.integers(4)), int(rng.integers(2))
            image, label = (np.flip(np.rot90(a, k), axis=axis).copy() for a in (image, label))
        image = F.interpolate(torch.from_numpy(image)[None, None], self.size, mode="bilinear", align_corners=False)
        label = F.interpolate(torch.from_numpy(label)[None, None].float(), self.size, mode="nearest").long()
        return {"image": image[0], "label": label[0], "case": self.files[index].stem}


class VolumeDataset(Dataset):
    """Whole volumes ``{"image": [1, H, W, D], "label": [1, H, W, D], "case": name}`` (files hold ``[D, H, W]``)."""

    def __init__(self, files: list[Path], num_classes: int, bad_samples: BadSamples):
        self.files, self.num_classes, self.bad_samples = files, num_classes, bad_samples
        self.root = files[0].parent if files else None

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return read_pair(self.files[index], self.num_classes, 3)

    def __getitem__(self, index: int):
        pair = self.bad_samples.read(self.load, index)
        if pair is None:
            return None
        image, label = (torch.from_numpy(a).permute(1, 2, 0)[None] for a in pair)
        return {"image": image, "label": label, "case": self.files[index].name.split(".")[0]}


class _SliceVolumeDataModule(SplitLoaders, L.LightningDataModule):
    """Slices for training, whole volumes for validation and test (batch 1: volumes differ in size)."""

    collate_fn = staticmethod(collate_skip_none)
    eval_batch_size = 1
    class_names: tuple[str, ...] = ()

    def __init__(self, root: str, num_classes: int, patch_size: Sequence[int] = (224, 224), lists_dir: str | None = None,
                 in_channels: int = 1, batch_size: int = 24, num_workers: int | None = 4, pin_memory: bool = True,
                 persistent_workers: bool = True, synthetic: dict | None = None, on_bad_sample: str = "error"):
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.root = Path(root).expanduser()
        self.lists_dir = Path(lists_dir).expanduser() if lists_dir else self.root / "lists"
        if len(patch_size) != 2:
            raise ValueError(f"data.patch_size={list(patch_size)}: slices are 2-D, expected two sizes")
        if num_classes != len(self.class_names):
            raise ValueError(f"data.num_classes={num_classes}, but this set has {len(self.class_names)} "
                             f"classes {list(self.class_names)}")
        if in_channels != 1:
            raise ValueError(f"data.in_channels={in_channels}: these sets are single-channel (CT / cine MRI)")
        self.num_classes, self.in_channels = num_classes, 1
        self.bad_samples = BadSamples(on_bad_sample)
        self.train_set = self.val_set = self.test_set = None

    def prepare_data(self) -> None:
        if self.hparams.synthetic:
            write_synthetic_synapse(self.root, **{"num_classes": self.num_classes, **self.hparams.synthetic})

    def _splits(self) -> tuple[list[Path], list[Path], list[Path]]:
        raise NotImplementedError

    def val_dataloader(self):
        return self._loader(self.val_set, train=False) if len(self.val_set) else []  # [] : Lightning skips it

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        self.prepare_data()
        hp = self.hparams
        train, val, test = self._splits()
        self.cases = {"train": [p.stem for p in train], "val": [p.name for p in val], "test": [p.name for p in test]}
        self.train_set = SliceDataset(train, hp.num_classes, hp.patch_size, self.bad_samples)
        self.val_set = VolumeDataset(val, hp.num_classes, self.bad_samples)
        self.test_set = VolumeDataset(test, hp.num_classes, self.bad_samples)
        self.check_train_split()


class SynapseDataModule(_SliceVolumeDataModule):
    """Synapse multi-organ CT, TransUNet layout (module docstring): ``lists/train.txt`` slices for training,
    ``lists/test_vol.txt`` volumes for test. The release has no validation split (training cases come as slices
    only, and TransUNet evaluates the last epoch): ``val_cases`` names test-list volumes to watch during
    training, default none, so nothing is selected on the test set."""

    class_names = SYNAPSE_CLASSES

    def __init__(self, *args, val_cases: Sequence[str] = (), **kwargs):
        super().__init__(*args, **kwargs)
        self.val_cases = list(val_cases)

    def _splits(self):
        train = [self.root / "train_npz" / f"{name}.npz" for name in read_list(self.lists_dir / "train.txt")]
        test_names = read_list(self.lists_dir / "test_vol.txt")
        unknown = sorted(set(self.val_cases) - set(test_names))
        if unknown:
            raise ValueError(f"data.val_cases {unknown} are not in {self.lists_dir / 'test_vol.txt'}")
        volume = lambda name: self.root / "test_vol_h5" / f"{name}.npy.h5"  # noqa: E731
        return train, [volume(n) for n in self.val_cases], [volume(n) for n in test_names]


class ACDCDataModule(_SliceVolumeDataModule):
    """ACDC cardiac MRI (module docstring): ``lists/{train,valid,test}.txt``; validation on the ``valid`` split
    (slices there are evaluated as one-slice volumes)."""

    class_names = ACDC_CLASSES

    def _splits(self):
        files = {split: [self.root / split / name for name in read_list(self.lists_dir / f"{split}.txt")]
                 for split in ("train", "valid", "test")}
        return files["train"], files["valid"], files["test"]

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        self.val_set = _OneSliceVolumes(self.val_set.files, self.num_classes, self.bad_samples)


class _OneSliceVolumes(VolumeDataset):
    """ACDC's validation slices as volumes of depth 1."""

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image, label = read_pair(self.files[index], self.num_classes, 2)
        return image[None], label[None]


# ---- synthetic multi-organ volumes in the Synapse layout -----------------------------------------------------


def synthetic_volume(rng: np.random.Generator, size: int, depth: int, num_classes: int,
                     noise: float) -> tuple[np.ndarray, np.ndarray]:
    """``[D, H, W]`` image in [0, 1] and label: ``num_classes - 1`` ellipsoid "organs" in shuffled cells of a
    grid (so none hides another), of class-dependent size (class k about ``1 - 0.08 k`` of the largest) and
    intensity, jittered in place and shape, inside a brighter "body" on a dark background, plus noise."""
    cells = int(np.ceil(np.sqrt(num_classes - 1)))
    cell = size / cells
    d, y, x = np.meshgrid(np.arange(depth), np.arange(size), np.arange(size), indexing="ij")
    image = np.full((depth, size, size), 0.1, np.float32)
    label = np.zeros((depth, size, size), np.int64)
    image[((y - size / 2) / (0.5 * size)) ** 2 + ((x - size / 2) / (0.5 * size)) ** 2 <= 1] = 0.3
    for k, where in zip(range(1, num_classes), rng.permutation(cells * cells)):
        scale = (1 - 0.08 * k) * rng.uniform(0.8, 1.0, 3)
        radius = np.maximum(scale * np.array([0.35 * depth, 0.45 * cell, 0.45 * cell]), 1.0)
        centre = np.array([depth / 2, (where // cells + 0.5) * cell, (where % cells + 0.5) * cell])
        centre += rng.uniform(-0.05, 0.05, 3) * np.array([depth, cell, cell])
        inside = (((d - centre[0]) / radius[0]) ** 2 + ((y - centre[1]) / radius[1]) ** 2
                  + ((x - centre[2]) / radius[2]) ** 2) <= 1
        image[inside] = 0.35 + 0.6 * k / num_classes
        label[inside] = k
    image = np.clip(image + rng.normal(0, noise, image.shape).astype(np.float32), 0, 1)
    return image, label


def write_synthetic_synapse(root: str | Path, num_train: int = 6, num_test: int = 2, size: int = 64,
                            depth: int = 12, num_classes: int = 9, noise: float = 0.08, seed: int = 0) -> Path:
    """Write synthetic multi-organ volumes (:func:`synthetic_volume`) in the Synapse layout into ``root``:
    training cases as ``train_npz`` slices, test cases as ``test_vol_h5`` volumes, and ``lists/``.
    Deterministic in ``seed``; a second call with the same arguments does nothing; refuses real data."""
    import h5py

    root = Path(root).expanduser()
    params = dict(num_train=num_train, num_test=num_test, size=size, depth=depth, num_classes=num_classes,
                  noise=noise, seed=seed)
    if _generated(root, params, "synthetic.json"):
        return root
    if (root / "train_npz").exists() and not (root / "synthetic.json").exists():
        raise FileExistsError(f"{root}/train_npz exists and is not a synthetic set: set data.synthetic=null")
    _fresh(root, ("train_npz", "test_vol_h5", "lists"))
    rng = np.random.default_rng(seed)
    slices, volumes = [], []
    for i in range(num_train + num_test):
        name = f"case{i + 1:04d}"
        image, label = synthetic_volume(rng, size, depth, num_classes, noise)
        if i < num_train:
            for z in range(depth):
                np.savez(root / "train_npz" / f"{name}_slice{z:03d}.npz", image=image[z], label=label[z])
                slices.append(f"{name}_slice{z:03d}")
        else:
            with h5py.File(root / "test_vol_h5" / f"{name}.npy.h5", "w") as f:
                f.create_dataset("image", data=image)
                f.create_dataset("label", data=label.astype(np.float32))  # as in the release: float labels
            volumes.append(name)
    (root / "lists" / "train.txt").write_text("\n".join(slices) + "\n")
    (root / "lists" / "test_vol.txt").write_text("\n".join(volumes) + "\n")
    _finish(root, "synthetic.json", {"synthetic": params, "description": json.dumps(SYNAPSE_CLASSES)})
    return root
