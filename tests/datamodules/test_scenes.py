"""The Fashion-MNIST scene generator shared by the detection and segmentation defaults."""

import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as coco_mask

from vision.datamodules.synthetic import make_fashion_scenes, rle_decode, rle_encode

SPLITS = {"train": 6, "val": 3}


@pytest.fixture(scope="module")
def scenes(tmp_path_factory, fashion_root):
    return make_fashion_scenes(tmp_path_factory.mktemp("scenes") / "s", fashion_root, splits=SPLITS, canvas=96)


@pytest.mark.parametrize("mask", [np.zeros((3, 4)), np.ones((3, 4)), np.eye(5), np.tri(4, 6)])
def test_rle_round_trip_agrees_with_pycocotools(mask):
    rle = rle_encode(mask)
    np.testing.assert_array_equal(rle_decode(rle), mask)
    np.testing.assert_array_equal(coco_mask.decode(coco_mask.frPyObjects(rle, *rle["size"])), mask)


def test_layout_and_consistency(scenes):
    for split, count in SPLITS.items():
        coco = json.loads((scenes / "annotations" / f"instances_{split}.json").read_text())
        assert [im["id"] for im in coco["images"]] == list(range(1, count + 1))
        assert {c["id"] for c in coco["categories"]} == set(range(1, 11))
        semantic = {im["id"]: np.array(Image.open(scenes / "masks" / split / im["file_name"])) for im in coco["images"]}
        for im in coco["images"]:
            assert np.array(Image.open(scenes / "images" / split / im["file_name"])).shape == (96, 96, 3)
        for ann in coco["annotations"]:
            mask = rle_decode(ann["segmentation"]).astype(bool)
            x, y, w, h = ann["bbox"]
            ys, xs = np.nonzero(mask)
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x, y, x + w, y + h)
            assert ann["area"] == mask.sum() > 0
            # the semantic mask agrees with every visible instance pixel
            assert (semantic[ann["image_id"]][mask] == ann["category_id"]).all()
        # and every foreground pixel of the semantic mask belongs to an instance
        covered = sum(int(m.astype(bool).sum()) for m in
                      (rle_decode(a["segmentation"]) for a in coco["annotations"]))
        assert covered == sum(int((m > 0).sum()) for m in semantic.values())


def test_deterministic_and_cached(scenes, fashion_root, tmp_path):
    stamp = (scenes / "scenes.json").stat().st_mtime_ns
    assert make_fashion_scenes(scenes, fashion_root, splits=SPLITS, canvas=96) == scenes
    assert (scenes / "scenes.json").stat().st_mtime_ns == stamp  # reused, not rewritten
    again = make_fashion_scenes(tmp_path / "again", fashion_root, splits=SPLITS, canvas=96)
    for split in SPLITS:
        assert (again / "annotations" / f"instances_{split}.json").read_text() == \
            (scenes / "annotations" / f"instances_{split}.json").read_text()


def test_bad_arguments(tmp_path, fashion_root):
    with pytest.raises(ValueError, match="unknown scene split"):
        make_fashion_scenes(tmp_path / "a", fashion_root, splits={"training": 2})
    with pytest.raises(ValueError, match="canvas"):
        make_fashion_scenes(tmp_path / "b", fashion_root, canvas=32, size=(28, 64))
    with pytest.raises(FileNotFoundError, match="Fashion-MNIST"):
        make_fashion_scenes(tmp_path / "c", tmp_path / "nowhere", splits={"val": 1})


def test_overlap_limits_are_respected(fashion_root):
    from vision.datamodules.readers import read_idx
    from vision.datamodules.synthetic import _box_iou, render_scene

    garments = read_idx(fashion_root / "train-images-idx3-ubyte.gz")[:500]
    labels = read_idx(fashion_root / "train-labels-idx1-ubyte.gz")[:500]

    def worst(max_box_iou, max_hidden):
        rng, ious = np.random.default_rng(0), []
        for _ in range(30):
            _, semantic, instances = render_scene(garments, labels, rng, 64, (3, 4), (28, 36), max_box_iou, max_hidden)
            assert all(((semantic == label + 1) | ~mask).all() for label, mask in instances)  # visible = labelled
            boxes = [(xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
                     for ys, xs in (np.nonzero(mask) for _, mask in instances)]
            ious += [_box_iou(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:]]
        return max(ious)

    # boxes placed without overlap stay apart (a visible box lies inside its placed box); the defaults overlap
    assert worst(0.0, 0.0) == 0 < worst(0.5, 0.4)
