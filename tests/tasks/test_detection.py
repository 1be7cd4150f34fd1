"""Detection: the COCO datamodule and its bad inputs, one training step per detector, mAP on known boxes,
the preview callback, and the detection experiments end to end on tiny scenes."""

import json
import shutil
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from _resume import assert_resumes_mid_epoch
from PIL import Image
from torch.utils.data import DataLoader

from vision.datamodules import (
    AnnotationError,
    CocoDetection,
    FashionScenesDetectionDataModule,
    collate_detection,
    make_fashion_scenes,
    read_coco,
)
from vision.datamodules.detection import detection_transforms
from vision.tasks import DetectionModule
from vision.tasks.detection import DETECTORS
from vision.tasks.schedules import warmup_schedule

TINY = {"name": "resnet18", "kwargs": {"channels": [8, 16, 32, 64]}}
SCENES = {"train": 6, "val": 2, "test": 2}


@pytest.fixture(scope="module")
def scenes(tmp_path_factory, fashion_root) -> Path:
    return make_fashion_scenes(tmp_path_factory.mktemp("det") / "scenes", fashion_root, splits=SCENES, canvas=64,
                               size=(20, 32))


def scene_module(scenes, fashion_root, **kwargs) -> FashionScenesDetectionDataModule:
    kwargs = {"scales": (56, 64), "max_size": 64, "batch_size": 2, "num_workers": 0, **kwargs}
    return FashionScenesDetectionDataModule(str(scenes), str(fashion_root), scene_splits=SCENES, canvas=64,
                                            size=(20, 32), **kwargs)


# ---- datamodule -------------------------------------------------------------------------------------


def test_samples_match_the_json(scenes, fashion_root):
    dm = scene_module(scenes, fashion_root, masks=True, crop=0.0)  # no crop: the short side is a scale
    dm.setup()
    coco = json.loads((scenes / "annotations" / "instances_val.json").read_text())
    assert dm.class_names[0] == "T-shirt/top" and len(dm.class_names) == 10
    image, target = dm.val_set[0]  # evaluation: no geometry change
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32 and 0 <= image.min() <= image.max() <= 1
    anns = [a for a in coco["annotations"] if a["image_id"] == coco["images"][0]["id"]]
    expected = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)], dtype=torch.float32)
    torch.testing.assert_close(target["boxes"], expected)
    # labels are contiguous (category ids here are 1..10 already) and map back to the category ids
    assert target["labels"].tolist() == [a["category_id"] for a in anns]
    assert dm.label_to_category(target["labels"]).tolist() == [a["category_id"] for a in anns]
    assert target["masks"].shape == (len(anns), 64, 64) and target["masks"].dtype == torch.uint8
    assert [int(m.sum()) for m in target["masks"]] == [a["area"] for a in anns]
    # training: resized into the scales, boxes inside the image, masks follow the boxes
    images, targets = next(iter(dm.train_dataloader()))
    assert len(images) == 2 and isinstance(targets, list)
    for im, t in zip(images, targets):
        assert min(im.shape[1:]) in (56, 64) and "iscrowd" not in t
        b = t["boxes"]
        assert ((b[:, 2:] > b[:, :2]).all() and (b[:, :2] >= 0).all() and (b[:, 2] <= im.shape[2]).all()
                and (b[:, 3] <= im.shape[1]).all())
        assert t["masks"].shape == (len(b), *im.shape[1:])
        for box, mask in zip(b, t["masks"]):  # each mask's pixels lie in its box (1 px of resampling slack)
            ys, xs = torch.nonzero(mask, as_tuple=True)
            assert xs.min() >= box[0] - 1 and xs.max() <= box[2] and ys.min() >= box[1] - 1 and ys.max() <= box[3]


def test_to_coco_maps_labels_back(scenes, fashion_root, tmp_path):
    root = copy_scenes(scenes, tmp_path)
    edit(root, "train", lambda c: [cat.update(id=cat["id"] * 10) for cat in c["categories"]]
         + [a.update(category_id=a["category_id"] * 10) for a in c["annotations"]])
    for split in ("val", "test"):
        edit(root, split, lambda c: [cat.update(id=cat["id"] * 10) for cat in c["categories"]]
             + [a.update(category_id=a["category_id"] * 10) for a in c["annotations"]])
    dm = scene_module(root, fashion_root)
    dm.setup()
    _, target = dm.val_set[0]
    assert target["labels"].max() <= 10  # contiguous, although the category ids are 10..100
    pred = {"boxes": torch.tensor([[1.0, 2.0, 11.0, 22.0]]), "labels": torch.tensor([3]), "scores": torch.tensor([0.9])}
    assert dm.to_coco([pred], [7]) == [{"image_id": 7, "category_id": 30, "bbox": [1.0, 2.0, 10.0, 20.0],
                                        "score": pytest.approx(0.9)}]


def copy_scenes(scenes: Path, tmp_path: Path) -> Path:
    root = tmp_path / "coco"
    shutil.copytree(scenes, root)
    return root


def edit(root: Path, split: str, change) -> Path:
    path = root / "annotations" / f"instances_{split}.json"
    coco = json.loads(path.read_text())
    change(coco)
    path.write_text(json.dumps(coco))
    return path


def test_missing_and_malformed_annotation_files(scenes, tmp_path):
    with pytest.raises(FileNotFoundError, match="instances_nope.json"):
        read_coco(tmp_path / "annotations" / "instances_nope.json", tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(AnnotationError, match="bad.json is not valid json"):
        read_coco(bad, tmp_path)
    bad.write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(AnnotationError, match="bad.json.*categories"):
        read_coco(bad, tmp_path)
    root = copy_scenes(scenes, tmp_path)
    path = edit(root, "train", lambda c: c["annotations"][1].update(bbox=[1, 2, "x", 4]))
    with pytest.raises(AnnotationError, match=r"instances_train.json: annotation id 2 has bbox"):
        read_coco(path, root / "images" / "train", on_bad_sample="skip")  # malformed: an error either way


@pytest.mark.parametrize("fault, reason, message", [
    (lambda c: c["annotations"][0].update(bbox=[3, 3, 0, 5]), "zero or negative box size", "annotation id 1"),
    (lambda c: c["annotations"][0].update(bbox=[3, 3, 4, -2]), "zero or negative box size", "annotation id 1"),
    (lambda c: c["annotations"][0].update(bbox=[70, 3, 5, 5]), "box outside its image", "annotation id 1"),
    (lambda c: c["annotations"][0].update(category_id=99), "unknown category_id", "annotation id 1.*99"),
    (lambda c: c["annotations"][0].update(image_id=999), "unknown image_id", "annotation id 1.*999"),
])
def test_bad_annotations_error_or_are_counted(scenes, tmp_path, fault, reason, message):
    root = copy_scenes(scenes, tmp_path)
    path = edit(root, "train", fault)
    with pytest.raises(AnnotationError, match=f"instances_train.json: {message}"):
        read_coco(path, root / "images" / "train", on_bad_sample="error")
    records, _, report = read_coco(path, root / "images" / "train", on_bad_sample="skip")
    assert report == {reason: 1}
    total = len(json.loads(path.read_text())["annotations"])
    assert sum(len(r["anns"]) for r in records) == total - 1
    assert all(a["id"] != 1 for r in records for a in r["anns"])


def test_clipping_crowd_empty_and_missing_images(scenes, tmp_path):
    root = copy_scenes(scenes, tmp_path)

    def change(c):
        c["annotations"][0]["bbox"] = [-5, 60, 20, 20]  # partly outside the 64x64 image
        c["annotations"][1]["iscrowd"] = 1
        first = c["images"][0]["id"]
        c["annotations"] = [a for a in c["annotations"] if a["image_id"] != first or a["id"] in (1, 2)]
        c["images"].append({"id": 500, "file_name": "gone.png", "height": 64, "width": 64})
        c["images"].append({"id": 501, "file_name": c["images"][1]["file_name"], "height": 64, "width": 64})
    path = edit(root, "train", change)
    image_dir = root / "images" / "train"
    with pytest.raises(AnnotationError, match="image id 500: file .*gone.png not found"):
        read_coco(path, image_dir, on_bad_sample="error")
    records, _, report = read_coco(path, image_dir, on_bad_sample="skip", drop_empty=True)
    assert report["missing image file"] == 1 and report["box clipped to its image"] == 1
    assert report["crowd (evaluation only)"] == 1 and report["image without annotations"] == 1  # id 501
    assert {r["id"] for r in records} == set(range(1, SCENES["train"] + 1))
    box = next(a["box"] for r in records for a in r["anns"] if a["id"] == 1)
    assert box == [0.0, 60.0, 15.0, 64.0]
    # evaluation keeps empty images and flags crowd boxes; training drops crowd boxes from the targets
    evaluation = CocoDetection(image_dir, path, on_bad_sample="skip")
    assert any(r["id"] == 501 for r in evaluation.records)
    _, target = evaluation[0]
    assert target["iscrowd"].tolist().count(1) == 1
    train = CocoDetection(image_dir, path, detection_transforms(True, (64,), 64), train=True, drop_empty=True,
                          on_bad_sample="skip")
    assert len(train[0][1]["labels"]) == len(target["labels"]) - 1


def test_unreadable_image_errors_or_is_dropped_from_its_batch(scenes, tmp_path):
    root = copy_scenes(scenes, tmp_path)
    (root / "images" / "val" / "000001.png").write_bytes(b"not a png")
    ann = root / "annotations" / "instances_val.json"
    with pytest.raises(Exception, match="000001.png"):
        CocoDetection(root / "images" / "val", ann, on_bad_sample="error")[0]
    dataset = CocoDetection(root / "images" / "val", ann, on_bad_sample="skip")
    with pytest.warns(UserWarning, match="000001.png"):
        images, targets = next(iter(DataLoader(dataset, batch_size=2, collate_fn=collate_detection)))
    assert len(images) == len(targets) == 1 and dataset.skipped == 1


def test_category_and_class_count_checks(scenes, fashion_root, tmp_path):
    with pytest.raises(ValueError, match="10 categories but data.num_classes=3"):
        scene_module(scenes, fashion_root, num_classes=3).setup()
    root = copy_scenes(scenes, tmp_path)
    edit(root, "val", lambda c: c["categories"].pop())
    with pytest.raises(AnnotationError, match=r"instances_val.json: annotation id \d+ has category_id 10"):
        scene_module(root, fashion_root).setup()  # on_bad_sample=error (default): the first unknown annotation
    with pytest.raises(AnnotationError, match="instances_val.json has category ids"):
        scene_module(root, fashion_root, on_bad_sample="skip").setup()  # then the category lists disagree
    with pytest.raises(ValueError, match="on_bad_sample='ignore'"):
        scene_module(scenes, fashion_root, on_bad_sample="ignore")


# ---- model ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("detector", DETECTORS)
def test_one_training_step_per_detector(scenes, fashion_root, detector):
    torch.manual_seed(0)
    dm = scene_module(scenes, fashion_root, masks=detector == "mask_rcnn")
    dm.setup()
    module = DetectionModule(TINY, num_classes=10, detector=detector, fpn_channels=32, min_size=64, max_size=64)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=1, num_sanity_val_steps=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    before = [p.detach().clone() for p in module.detector.parameters()]
    trainer.fit(module, datamodule=dm)
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"])
    assert 0 <= metrics["val/map_50"] <= 1 and "val/map_75" in metrics
    if detector == "mask_rcnn":
        assert "val/segm_map" in metrics
    changed = sum(not torch.equal(a, b) for a, b in zip(before, module.detector.parameters()))
    assert changed > len(before) // 2  # backbone, FPN and heads all received gradients


def test_registered_backbone_under_the_fpn():
    """A package backbone (not a timm ResNet) by name, in eval mode: predictions in input pixels."""
    module = DetectionModule({"name": "agent_pvt_tiny", "kwargs": {}}, num_classes=3, detector="faster_rcnn",
                             fpn_channels=32, min_size=64, max_size=64).eval()
    with torch.no_grad():
        (pred,) = module([torch.rand(3, 48, 56)])
    assert set(pred) == {"boxes", "labels", "scores"} and module.detector.backbone.strides == [4, 8, 16, 32, 64]
    assert (pred["boxes"][:, 2] <= 56).all() and (pred["boxes"][:, 3] <= 48).all()


class FixedPredictions(torch.nn.Module):
    def __init__(self, preds):
        super().__init__()
        self.preds = preds
        self.backbone = torch.nn.Module()

    def forward(self, images):
        return self.preds[: len(images)]


def test_map_on_known_boxes():
    """One exact hit (IoU 1) and one shifted box (IoU 2/3): mAP@0.5 is 1, mAP@0.75 only counts the first."""
    module = DetectionModule(TINY, num_classes=2, detector="fcos", fpn_channels=32, min_size=64, max_size=64)
    gt = [{"boxes": torch.tensor([[0.0, 0.0, 20.0, 20.0]]), "labels": torch.tensor([1]), "iscrowd": torch.tensor([0])},
          {"boxes": torch.tensor([[10.0, 10.0, 30.0, 30.0]]), "labels": torch.tensor([2]), "iscrowd": torch.tensor([0])}]
    shifted = torch.tensor([[14.0, 10.0, 34.0, 30.0]])  # IoU = 320 / 480 = 2/3
    module.detector = FixedPredictions([
        {"boxes": gt[0]["boxes"], "labels": torch.tensor([1]), "scores": torch.tensor([0.9])},
        {"boxes": shifted, "labels": torch.tensor([2]), "scores": torch.tensor([0.8])},
    ])
    data = DataLoader([(torch.zeros(3, 40, 40), gt[0]), (torch.zeros(3, 40, 40), gt[1])], batch_size=2,
                      collate_fn=collate_detection)
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    (val,) = trainer.validate(module, data, verbose=False)
    assert val["val/map_50"] == pytest.approx(1.0)
    assert val["val/map_75"] == pytest.approx(0.5)  # class 1 AP 1, class 2 AP 0
    (test,) = trainer.test(module, data, verbose=False)
    assert test["test/ap/class_1"] == pytest.approx(1.0)
    # class 2 is a hit for IoU thresholds 0.5, 0.55, 0.6, 0.65 of the ten: AP 0.4
    assert test["test/ap/class_2"] == pytest.approx(0.4, abs=1e-6)
    assert test["test/map"] == pytest.approx(0.7, abs=1e-6)


def test_schedule_and_param_groups():
    assert warmup_schedule(0, 100, 10, "step", [50, 80], 0.1, 0.0) == pytest.approx(0.001)
    assert warmup_schedule(10, 100, 10, "step", [50, 80], 0.1, 0.0) == 1.0
    assert warmup_schedule(60, 100, 10, "step", [50, 80], 0.1, 0.0) == pytest.approx(0.1)
    assert warmup_schedule(90, 100, 10, "step", [50, 80], 0.1, 0.0) == pytest.approx(0.01)
    assert warmup_schedule(100, 100, 10, "cosine", [], 0.1, 0.01) == pytest.approx(0.01)
    module = DetectionModule(TINY, num_classes=2, detector="retinanet", fpn_channels=32, lr=1e-3,
                             backbone_lr_mult=0.1, weight_decay=0.05)
    groups = module.param_groups()
    body = {id(p) for p in module.detector.backbone.body.parameters()}
    for group in groups:
        in_body = {id(p) in body for p in group["params"]}
        assert len(in_body) == 1  # a group is either backbone or not
        assert group["lr"] == pytest.approx(1e-4 if in_body.pop() else 1e-3)
        assert group["weight_decay"] in (0.0, 0.05)
        if group["weight_decay"]:
            assert all(p.ndim > 1 for p in group["params"])
    assert sum(len(g["params"]) for g in groups) == len(list(module.detector.parameters()))
    with pytest.raises(ValueError, match="layer_decay needs a backbone with timm's group_matcher"):
        DetectionModule(TINY, num_classes=2, detector="fcos", fpn_channels=32, layer_decay=0.9).param_groups()
    nat = DetectionModule({"name": "agent_pvt_tiny"}, num_classes=2, detector="fcos", fpn_channels=32, lr=1e-3,
                          layer_decay=0.5)
    lrs = sorted({g["lr"] for g in nat.param_groups()})
    assert len(lrs) > 3 and lrs[-1] == pytest.approx(1e-3) and lrs[0] < 1e-4


def test_bad_detector_name():
    with pytest.raises(ValueError, match="detector='yolo'"):
        DetectionModule(TINY, num_classes=2, detector="yolo")


# ---- pipeline ---------------------------------------------------------------------------------------


QUICK = ["trainer.accelerator=cpu", "trainer.devices=1", "data.num_workers=0", "callbacks.rich_progress_bar=null",
         "data.batch_size=2", "data.eval_batch_size=2"]
TINY_MODEL = ["model.backbone.name=resnet18", "++model.backbone.kwargs={channels: [8, 16, 32, 64]}",
              "model.backbone.drop_path_rate=0.0", "model.fpn_channels=32", "model.min_size=64", "data.max_size=64"]


def test_quickstart_detection_fast_dev_run_writes_previews(compose_cfg, tmp_path, scenes):
    from vision.utils import train

    cfg = compose_cfg("train", ["experiment=quickstart_detection", "trainer.max_epochs=1",
                                "trainer.limit_train_batches=1", "trainer.limit_val_batches=1",
                                "trainer.limit_test_batches=1", "trainer.log_every_n_steps=1", *QUICK,
                                f"data.root={scenes}",
                                f"data.scene_splits={SCENES}".replace("'", ""), "data.canvas=64",
                                "data.size=[20,32]", "data.scales=[64]", "data.max_size=64", "model.min_size=64"])
    metrics, objects = train(cfg)
    assert np.isfinite(metrics["train/loss"]) and 0 <= metrics["test/map_50"] <= 1
    assert any(key.startswith("test/ap/") for key in metrics)
    previews = list(Path(objects["trainer"].log_dir).glob("detection_preview/epoch000_val_predictions.png"))
    assert previews and Image.open(previews[0]).size[0] > 64 * 2


@pytest.mark.parametrize("experiment", ["nat_coco_retinanet", "biformer_coco_maskrcnn"])
def test_coco_experiments_train_a_step(compose_cfg, tmp_path, scenes, experiment):
    """The COCO recipes on a COCO-layout folder (the scenes renamed to COCO's split names)."""
    from vision.utils import train

    root = tmp_path / "coco"
    for split, name in (("train", "train2017"), ("val", "val2017")):
        shutil.copytree(scenes / "images" / split, root / name)
        (root / "annotations").mkdir(exist_ok=True)
        shutil.copy(scenes / "annotations" / f"instances_{split}.json",
                    root / "annotations" / f"instances_{name}.json")
    cfg = compose_cfg("train", [f"experiment={experiment}", "trainer.fast_dev_run=true", "trainer.precision=32-true",
                                *QUICK, *TINY_MODEL, f"data.root={root}", "data.num_classes=10"])
    assert cfg.model.detector in ("retinanet", "mask_rcnn")
    metrics, _ = train(cfg)
    assert np.isfinite(metrics["train/loss"]) and 0 <= metrics["test/map"] <= 1


def test_training_loader_resumes_mid_epoch_with_the_same_augmentations(scenes, fashion_root):
    def loader():
        dm = scene_module(scenes, fashion_root, batch_size=1)
        dm.setup("fit")
        return dm.train_dataloader()

    def flat(batch):
        images, targets = batch
        return torch.cat([*(im.flatten() for im in images), *(t["boxes"].flatten() for t in targets)])

    assert_resumes_mid_epoch(loader, flat)
