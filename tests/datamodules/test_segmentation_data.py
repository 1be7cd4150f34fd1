"""Segmentation data: the ADE20K / VOC / Cityscapes / folder layouts, the bad inputs, the augmentations."""

from pathlib import Path

import numpy as np
import pytest
import torch
from _layouts import RNG, make_ade20k, write_pair
from _resume import assert_resumes_mid_epoch
from PIL import Image

from vision.datamodules.datasets import collate_segmentation
from vision.datamodules.readers import SegmentationDataError, read_sample
from vision.datamodules.segmentation import (
    ADE20KDataModule,
    CityscapesDataModule,
    FashionScenesSegmentationDataModule,
    SegmentationFolderDataModule,
    VOCDataModule,
)
from vision.datamodules.transforms import CatMaxRatioCrop, fit_scale

SMALL = dict(
    crop_size=(32, 32),
    scale=(64, 32),
    ratio_range=(0.5, 2.0),
    eval_scale=(64, 32),
    batch_size=2,
    eval_batch_size=2,
    num_workers=0,
)


def make_voc(root: Path, n: int = 3) -> Path:
    ids = [f"2007_00{i:04d}" for i in range(2 * n)]
    for name in ids:
        mask = RNG.integers(0, 21, (36, 44))
        mask[0] = 255  # object boundary
        write_pair(
            root / "JPEGImages" / f"{name}.jpg", root / "SegmentationClass" / f"{name}.png", mask, mode="P"
        )
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(ids[:n]) + "\n")
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(ids[n:]) + "\n")
    return root


def make_cityscapes(root: Path, n: int = 2) -> Path:
    for split in ("train", "val"):
        for i in range(n):
            stem = f"aachen_{i:06d}_000019"
            mask = RNG.integers(0, 19, (32, 64))
            mask[:, :4] = 255
            write_pair(
                root / "leftImg8bit" / split / "aachen" / f"{stem}_leftImg8bit.png",
                root / "gtFine" / split / "aachen" / f"{stem}_gtFine_labelTrainIds.png",
                mask,
            )
    return root


def test_ade20k_layout_reduces_zero_label_and_evaluates_at_original_size(tmp_path):
    root = make_ade20k(tmp_path / "ADEChallengeData2016")
    dm = ADE20KDataModule(str(root), **SMALL)
    dm.setup()
    assert dm.num_classes == 150 and dm.class_names[0] == "wall" and len(dm.class_names) == 150
    raw = np.asarray(Image.open(dm.val_set.samples[0][1])).astype(np.int64)
    image, mask = dm.val_set[0]
    expected = np.where(raw == 0, 255, raw - 1)
    np.testing.assert_array_equal(mask.numpy(), expected)  # mask untouched by the evaluation resize
    assert image.shape == (3, *fit_scale(40, 50, (64, 32)))
    assert image.shape[-2:] == (32, 40)  # short side 40 -> 32 (long side 50 -> 40 <= 64)
    images, masks, sizes = next(iter(dm.train_dataloader()))
    assert images.shape == (2, 3, 32, 32) and masks.shape == (2, 32, 32) and masks.dtype == torch.int64
    assert set(masks.unique().tolist()) <= set(range(150)) | {255}


def test_voc_lists_and_palette_masks(tmp_path):
    root = make_voc(tmp_path / "VOC2012")
    dm = VOCDataModule(str(root), **SMALL)
    dm.setup()
    assert len(dm.train_set) == 3 and len(dm.val_set) == 3 and dm.class_names[15] == "person"
    image_path, mask_path = dm.val_set.samples[1]
    assert Image.open(mask_path).mode == "P"
    _, mask = read_sample(image_path, mask_path, num_classes=21)
    np.testing.assert_array_equal(mask, np.asarray(Image.open(mask_path)))  # the palette indices, not colours
    assert (mask[0] == 255).all()


def test_cityscapes_layout(tmp_path):
    root = make_cityscapes(tmp_path / "cityscapes")
    dm = CityscapesDataModule(str(root), **SMALL)
    dm.setup()
    image_path, mask_path = dm.train_set.samples[0]
    assert image_path.name.endswith("_leftImg8bit.png") and mask_path.name.endswith(
        "_gtFine_labelTrainIds.png"
    )
    assert mask_path.parent.name == "aachen" and dm.num_classes == 19
    images, masks, sizes = collate_segmentation([dm.val_set[0], dm.val_set[1]])
    assert sizes.tolist() == [[32, 64, 32, 64]] * 2 and (masks[:, :, :4] == 255).all()


def test_cityscapes_raw_label_ids_map_to_train_ids(tmp_path):
    root = tmp_path / "cityscapes"
    raw = np.array([[7, 8, 26, 33], [0, 1, 6, 34]], dtype=np.uint8)  # road sidewalk car bicycle; void ids
    for split in ("train", "val"):
        for i in range(2):
            write_pair(root / "leftImg8bit" / split / "bonn" / f"bonn_00000{i}_000019_leftImg8bit.png",
                       root / "gtFine" / split / "bonn" / f"bonn_00000{i}_000019_gtFine_labelIds.png", raw)
    dm = CityscapesDataModule(str(root), labels="labelIds", **SMALL)
    dm.setup()
    assert dm.val_set.samples[0][1].name.endswith("_gtFine_labelIds.png")
    _, mask = dm.val_set[0]
    assert mask.tolist() == [[0, 1, 13, 18], [255, 255, 255, 255]]
    with pytest.raises(ValueError, match="data.labels='ids'"):
        CityscapesDataModule(str(root), labels="ids", **SMALL)


def test_generic_folder_and_test_split_fallback(tmp_path):
    for split in ("train", "val"):
        for i in range(2):
            write_pair(
                tmp_path / "images" / split / f"{i}.jpg",
                tmp_path / "masks" / split / f"{i}.png",
                RNG.integers(0, 3, (20, 24)),
            )
    dm = SegmentationFolderDataModule(str(tmp_path), num_classes=3, **SMALL)
    dm.setup()
    assert [p for p, _ in dm.test_set.samples] == [p for p, _ in dm.val_set.samples]
    assert dm.class_names == ("class_0", "class_1", "class_2")


# ---- bad input -------------------------------------------------------------------------------------------


def test_mask_size_mismatch_names_both_files(tmp_path):
    write_pair(tmp_path / "a.jpg", tmp_path / "a.png", np.zeros((20, 30)), image_size=(20, 31))
    with pytest.raises(SegmentationDataError, match=r"a\.png is 30x20.*a\.jpg is 31x20"):
        read_sample(tmp_path / "a.jpg", tmp_path / "a.png", num_classes=3)


def test_mask_values_outside_classes_name_file_and_values(tmp_path):
    mask = np.zeros((8, 8))
    mask[0, 0], mask[1, 1], mask[2, 2] = 7, 9, 255
    write_pair(tmp_path / "a.jpg", tmp_path / "a.png", mask)
    with pytest.raises(SegmentationDataError, match=r"a\.png has values 7, 9 outside the 5 classes"):
        read_sample(tmp_path / "a.jpg", tmp_path / "a.png", num_classes=5)
    _, ok = read_sample(tmp_path / "a.jpg", tmp_path / "a.png", num_classes=10)  # 255 is the ignore index
    assert ok[2, 2] == 255 and ok[1, 1] == 9


def test_missing_mask_is_named(tmp_path):
    write_pair(
        tmp_path / "images" / "train" / "0.jpg", tmp_path / "masks" / "train" / "0.png", np.zeros((8, 8))
    )
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "images" / "train" / "1.jpg")
    dm = SegmentationFolderDataModule(str(tmp_path), num_classes=2, **SMALL)
    with pytest.raises(
        FileNotFoundError, match=r"have no mask: .*masks/train/1\.png \(for .*images/train/1\.jpg\)"
    ):
        dm.samples("train")
    (tmp_path / "ImageSets").mkdir()
    (tmp_path / "ImageSets" / "train.txt").write_text("0\n1\n")
    (tmp_path / "JPEGImages").mkdir()
    (tmp_path / "SegmentationClass").mkdir()
    voc = VOCDataModule(str(tmp_path), list_dir="ImageSets", **SMALL)
    with pytest.raises(
        FileNotFoundError, match=r"image\(s\) listed in .*train\.txt are missing: .*JPEGImages/0\.jpg"
    ):
        voc.samples("train")


def test_colour_masks_are_rejected_grey_rgb_accepted(tmp_path):
    write_pair(tmp_path / "a.jpg", tmp_path / "a.png", np.zeros((8, 8)))
    colour = RNG.integers(0, 3, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(colour).save(tmp_path / "colour.png")
    with pytest.raises(
        SegmentationDataError, match=r"colour\.png is a colour \(RGB\) image; expected one class id"
    ):
        read_sample(tmp_path / "a.jpg", tmp_path / "colour.png", num_classes=3)
    grey = np.repeat(colour[..., :1], 3, axis=2)
    Image.fromarray(grey).save(tmp_path / "grey.png")
    _, mask = read_sample(tmp_path / "a.jpg", tmp_path / "grey.png", num_classes=3)
    np.testing.assert_array_equal(mask, grey[..., 0])


def test_unreadable_image_is_named(tmp_path):
    from vision.datamodules import CorruptImageError

    write_pair(tmp_path / "a.jpg", tmp_path / "a.png", np.zeros((8, 8)))
    (tmp_path / "a.jpg").write_bytes(b"not an image")
    with pytest.raises(CorruptImageError, match=r"a\.jpg"):
        read_sample(tmp_path / "a.jpg", tmp_path / "a.png", num_classes=3)


def test_bad_samples_follow_the_project_policy(tmp_path):
    """data.on_bad_sample: error (default) stops naming the file; skip drops the sample and counts it."""
    root = make_ade20k(tmp_path / "ade", n=3)
    bad = root / "annotations" / "training" / "ADE_training_1.png"
    Image.fromarray(np.full((40, 50), 200, np.uint8)).save(bad)  # 199 after reduce_zero_label: no such class
    strict = ADE20KDataModule(str(root), **SMALL)
    strict.setup()
    with pytest.raises(SegmentationDataError, match="ADE_training_1.png"):
        [strict.train_set[i] for i in range(len(strict.train_set))]
    lenient = ADE20KDataModule(str(root), **SMALL, on_bad_sample="skip")
    lenient.setup()
    with pytest.warns(UserWarning, match="skipping.*ADE_training_1.png"):
        samples = [lenient.train_set[i] for i in range(len(lenient.train_set))]
    assert sum(s is None for s in samples) == 1 and lenient.skipped == 1
    images, masks, sizes = collate_segmentation(samples)
    assert len(images) == len(samples) - 1
    assert collate_segmentation([None, None]) is None  # Lightning skips an empty batch


# ---- augmentations ---------------------------------------------------------------------------------------


def test_cat_max_ratio_crop_rejects_single_class_crops():
    mask = np.zeros((100, 100), np.uint8)
    mask[:, 50:] = 1
    mask[:5] = 255  # ignored pixels don't count
    image = np.zeros((100, 100, 3), np.uint8)

    def balanced(cat_max_ratio: float) -> int:
        crop = CatMaxRatioCrop((40, 40), cat_max_ratio)
        crop.set_random_seed(0)
        count = 0
        for _ in range(30):
            out = crop(image=image, mask=mask)["mask"]
            assert out.shape == (40, 40)
            counts = np.bincount(out[out != 255].ravel(), minlength=2)
            count += int(counts.max() / counts.sum() < 0.75)
        return count

    with_limit, without = balanced(0.75), balanced(1.0)
    assert with_limit >= 27 and without <= 20, (with_limit, without)


def test_training_crops_are_padded_with_the_ignore_index(tmp_path):
    from vision.datamodules.transforms import build_segmentation_transforms

    transform = build_segmentation_transforms(
        True, (0.5,) * 3, (0.5,) * 3, crop_size=(48, 48), scale=None, cat_max_ratio=1.0, photometric=True
    )
    out = transform(image=np.full((30, 40, 3), 128, np.uint8), mask=np.ones((30, 40), np.uint8))
    assert out["image"].shape == (3, 48, 48) and out["mask"].shape == (48, 48)
    mask = np.asarray(out["mask"])
    assert (mask[:30, :40] == 1).all() and (mask[30:] == 255).all() and (mask[:, 40:] == 255).all()


def test_fashion_scenes_datamodule(tmp_path, fashion_root):
    dm = FashionScenesSegmentationDataModule(
        str(tmp_path / "scenes"),
        str(fashion_root),
        scene_splits={"train": 4, "val": 2},
        canvas=64,
        size=(20, 40),
        crop_size=(64, 64),
        scale=(64, 64),
        eval_scale=None,
        batch_size=2,
        eval_batch_size=2,
        num_workers=0,
    )
    dm.prepare_data()
    dm.setup()
    assert dm.num_classes == 11 and dm.class_names[1] == "T-shirt/top" and len(dm.test_set) == 2
    images, masks, sizes = next(iter(dm.val_dataloader()))
    assert images.shape == (2, 3, 64, 64) and sizes.tolist() == [[64, 64, 64, 64]] * 2
    assert (masks > 0).any() and masks.max() <= 10


def test_training_loader_resumes_mid_epoch_with_the_same_crops(tmp_path, fashion_root):
    def loader():
        dm = FashionScenesSegmentationDataModule(
            str(tmp_path / "scenes"), str(fashion_root), scene_splits={"train": 8, "val": 2}, canvas=64,
            size=(20, 40), crop_size=(48, 48), scale=(64, 64), batch_size=2, num_workers=0,
        )
        dm.setup()
        return dm.train_dataloader()

    assert_resumes_mid_epoch(loader, lambda batch: torch.cat([batch[0].flatten(), batch[1].flatten().float()]))
