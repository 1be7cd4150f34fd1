"""Datamodules and transforms: splits, shapes, backbone preprocessing, and bad input."""

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vision.datamodules import (
    CorruptImageError,
    FashionMNISTDataModule,
    ImageFolderDataModule,
    backbone_eval_config,
    read_idx,
)

ROOT = Path(__file__).resolve().parents[2]
FMNIST = ROOT / "data" / "fashion-mnist"


def loader_kwargs(**kw):
    return dict(num_workers=0, pin_memory=False, persistent_workers=False, **kw)


def test_fashion_mnist_splits_and_batches():
    dm = FashionMNISTDataModule(str(FMNIST), image_size=28, batch_size=16, mean=(0.286,), std=(0.353,),
                                crop_pct=1.0, **loader_kwargs())
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (55000, 5000, 10000)
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (16, 1, 28, 28) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and labels.min() >= 0 and labels.max() < 10
    val_images, _ = next(iter(dm.val_dataloader()))
    # evaluation is deterministic: normalised with the dataset statistics, no augmentation
    raw = dm.val_set.images[:16, :, :, 0].astype(np.float32) / 255
    torch.testing.assert_close(val_images[:, 0], torch.from_numpy((raw - 0.286) / 0.353))


def test_fashion_mnist_label_distribution_is_balanced():
    labels = read_idx(FMNIST / "t10k-labels-idx1-ubyte.gz")
    assert labels.shape == (10000,)
    assert np.bincount(labels).tolist() == [1000] * 10


def test_missing_fashion_mnist_names_path(tmp_path):
    dm = FashionMNISTDataModule(str(tmp_path / "nowhere"), **loader_kwargs())
    with pytest.raises(FileNotFoundError, match="nowhere.*dataset-fashion-mnist"):
        dm.setup("fit")


def test_read_idx_rejects_bad_files(tmp_path):
    bad = tmp_path / "bad.gz"
    with gzip.open(bad, "wb") as f:
        f.write(b"\x00\x00\x08\x01\x00\x00\x00\x05abc")  # header says 5 bytes, holds 3
    with pytest.raises(ValueError, match="bad.gz"):
        read_idx(bad)
    (tmp_path / "magic").write_bytes(b"\x12\x34\x56\x78")
    with pytest.raises(ValueError, match="magic number"):
        read_idx(tmp_path / "magic")


def test_backbone_preprocessing_comes_from_pretrained_cfg():
    cfg = backbone_eval_config("resnet18")
    assert cfg.mean == (0.485, 0.456, 0.406) and cfg.crop_pct == 0.95 and cfg.interpolation == "bicubic"
    assert backbone_eval_config("resnet18", crop_pct=1.0).crop_pct == 1.0
    assert len(backbone_eval_config("resnet18", in_chans=1).mean) == 1
    with pytest.raises(ValueError, match="not_a_model"):
        backbone_eval_config("not_a_model")


def make_folder(root: Path, corrupt: bool = False) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("cat", "dog"):
            (root / split / c).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 256, (30, 45, 3), dtype=np.uint8)).save(root / split / c / f"{i}.jpg")
    if corrupt:
        (root / "train" / "dog" / "broken.jpg").write_bytes(b"not a jpeg at all")
    return root


def folder_module(root, **kw):
    return ImageFolderDataModule(str(root), num_classes=2, image_size=32, batch_size=4, backbone="resnet18",
                                 **loader_kwargs(**kw))


def test_image_folder_reads_imagenet_layout(tmp_path):
    dm = folder_module(make_folder(tmp_path))
    dm.setup("fit")
    assert dm.train_set.classes == ["cat", "dog"] and len(dm.train_set) == 6 and len(dm.val_set) == 6
    images, labels = next(iter(dm.val_dataloader()))
    assert images.shape == (4, 3, 32, 32)  # odd 30x45 images: resize short side, center crop


def test_image_folder_missing_root_explains_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope.*train/<class>"):
        folder_module(tmp_path / "nope").setup("fit")


def test_image_folder_class_count_mismatch(tmp_path):
    dm = ImageFolderDataModule(str(make_folder(tmp_path)), num_classes=5, **loader_kwargs())
    with pytest.raises(ValueError, match="2 class folders.*num_classes=5"):
        dm.setup("fit")


def test_corrupt_image_error_names_file(tmp_path):
    dm = folder_module(make_folder(tmp_path, corrupt=True))
    dm.setup("fit")
    broken = [i for i, (p, _) in enumerate(dm.train_set.samples) if p.name == "broken.jpg"][0]
    with pytest.raises(CorruptImageError, match="broken.jpg"):
        dm.train_set[broken]


def test_skip_corrupt_warns_and_counts(tmp_path):
    dm = folder_module(make_folder(tmp_path, corrupt=True), skip_corrupt=True)
    dm.setup("fit")
    with pytest.warns(UserWarning, match="broken.jpg"):
        seen = sum(len(labels) for _, labels in dm._loader(dm.train_set, train=False))
    assert seen == 6  # the 6 readable images, nothing lost
    assert dm.skipped == 1


def test_batch_larger_than_training_split_is_an_error():
    dm = FashionMNISTDataModule(str(FMNIST), train_subset=10, batch_size=16, **loader_kwargs())
    with pytest.raises(ValueError, match="10 images, fewer than data.batch_size=16"):
        dm.setup("fit")
