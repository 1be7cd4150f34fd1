"""COCO-format instance detection data: a checked annotation reader, albumentations with boxes, loaders.

Layout (COCO 2017 and the embedded Fashion-MNIST scenes alike)::

    <root>/<image_dir>/<file_name>                   image_dir = "{split}" (COCO) or "images/{split}" (scenes)
    <root>/annotations/instances_<split>.json        xywh boxes, polygon or RLE masks, category ids

Samples are ``(image float[3, H, W] in [0, 1], target)`` with ``target = {boxes float[N, 4] absolute xyxy,
labels int64[N] in 1..K, image_id, [masks uint8[N, H, W]], [iscrowd]}``; batches are ``(list, list)``,
the torchvision detector format. COCO category ids map to contiguous labels 1..K in id order (0 is the
background); :meth:`CocoDetectionDataModule.to_coco` maps predictions back.

Geometry: training images are resized to a random short side from ``scales`` (long side at most
``max_size``), randomly cropped without cutting any box, flipped, and colour-jittered. Evaluation images
stay at their original size: the detector resizes them itself (``DetectionModule.min_size``) and maps
its predictions back, so COCO metrics (area ranges included) are computed in original pixels.

Bad input, decided in one place (:func:`read_coco`):

- missing or malformed annotation file, or an annotation without ``id``/``image_id``/``category_id``/
  a 4-number ``bbox``: always an :class:`AnnotationError` naming the file (and the annotation id).
- per-annotation faults, governed by ``on_bad_sample`` (``error``: raise naming the file and the
  annotation id; ``skip``: drop it, counted and logged per reason): a box with zero or negative width or
  height, a box entirely outside its image, an unknown ``category_id``, an unknown ``image_id``.
- a listed image whose file is missing: the same option (``error``, or drop the image, counted).
- always, and counted: boxes partly outside the image are clipped to it; ``iscrowd`` annotations are not
  training targets (they are kept, flagged, in evaluation targets, where COCO ignores matches to them);
  training images without any annotation left are dropped (``drop_empty``; evaluation keeps every image).
- an image that fails to decode at load time (or whose size disagrees with the json): an error naming the
  file, or with ``on_bad_sample=skip`` a warning, the sample dropped from its batch and counted in
  :attr:`CocoDetectionDataModule.skipped` (nothing stops mid-epoch).
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from pathlib import Path

import albumentations as A
import lightning as L
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, Subset

from .datasets import BAD_SAMPLE_POLICIES, BadSamples, CorruptImageError, reseed, split_key, unwrap_subset
from .loaders import SplitLoaders

log = logging.getLogger("vision")



class AnnotationError(ValueError):
    """A malformed or (under ``on_bad_sample=error``) invalid COCO annotation; the message names it."""


# ---- reading and checking the annotation file -------------------------------------------------------


def _load_json(ann_file: Path) -> dict:
    if not ann_file.is_file():
        raise FileNotFoundError(f"annotation file {ann_file} not found (expected COCO instances json: "
                                "<root>/annotations/instances_<split>.json; see data/README.md)")
    try:
        coco = json.loads(ann_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AnnotationError(f"{ann_file} is not valid json: {err}") from err
    missing = [key for key in ("images", "annotations", "categories")
               if not isinstance(coco, dict) or not isinstance(coco.get(key), list)]
    if missing:
        raise AnnotationError(f"{ann_file}: a COCO instances file needs lists 'images', 'annotations' and "
                              f"'categories'; missing or not a list: {missing}")
    return coco


def _box(ann: dict, ann_file: Path) -> list[float]:
    box = ann.get("bbox")
    if not (isinstance(box, (list, tuple)) and len(box) == 4
            and all(isinstance(v, (int, float)) and math.isfinite(v) for v in box)):
        raise AnnotationError(f"{ann_file}: annotation id {ann.get('id')} has bbox {box!r}; expected "
                              "[x, y, width, height], four finite numbers")
    return [float(v) for v in box]


def read_coco(ann_file: str | Path, image_dir: str | Path, on_bad_sample: str = "error",
              drop_empty: bool = False) -> tuple[list[dict], list[dict], Counter]:
    """Parse and check a COCO instances file.

    Returns ``(records, categories, report)``: one record per kept image, ``{id, path, height, width,
    anns: [{id, box xyxy (clipped), category_id, iscrowd, segmentation}]}``; the categories sorted by id;
    and a counter of everything filtered or clipped, by reason (see the module docstring).
    """
    if on_bad_sample not in BAD_SAMPLE_POLICIES:
        raise ValueError(f"on_bad_sample={on_bad_sample!r}; expected one of {BAD_SAMPLE_POLICIES}")
    ann_file, image_dir = Path(ann_file), Path(image_dir)
    coco = _load_json(ann_file)
    report: Counter = Counter()

    def bad(reason: str, message: str) -> None:
        if on_bad_sample == "error":
            raise AnnotationError(f"{ann_file}: {message} (on_bad_sample=skip drops it instead)")
        report[reason] += 1

    try:
        categories = sorted(({"id": int(c["id"]), "name": str(c.get("name", c["id"]))}
                             for c in coco["categories"]), key=lambda c: c["id"])
        images = {int(im["id"]): im for im in coco["images"]}
        sizes = {i: (int(im["height"]), int(im["width"])) for i, im in images.items()}
        names = {i: str(im["file_name"]) for i, im in images.items()}
    except (KeyError, TypeError, ValueError) as err:
        raise AnnotationError(f"{ann_file}: every image needs id, file_name, height, width and every "
                              f"category id and name ({type(err).__name__}: {err})") from err
    if not categories:
        raise AnnotationError(f"{ann_file} lists no categories")
    known = {c["id"] for c in categories}

    per_image: dict[int, list[dict]] = {i: [] for i in images}
    for index, ann in enumerate(coco["annotations"]):
        if not isinstance(ann, dict) or any(k not in ann for k in ("id", "image_id", "category_id")):
            raise AnnotationError(f"{ann_file}: annotation #{index} (id {ann.get('id') if isinstance(ann, dict) else None})"
                                  " lacks id, image_id or category_id")
        x, y, w, h = _box(ann, ann_file)
        ann_id, image_id, category = ann["id"], ann["image_id"], ann["category_id"]
        if image_id not in images:
            bad("unknown image_id", f"annotation id {ann_id} refers to image_id {image_id}, which is not listed")
            continue
        if category not in known:
            bad("unknown category_id", f"annotation id {ann_id} has category_id {category}, not among {sorted(known)}")
            continue
        if w <= 0 or h <= 0:
            bad("zero or negative box size", f"annotation id {ann_id} has bbox width {w}, height {h}")
            continue
        height, width = sizes[image_id]
        box = [min(max(x, 0.0), width), min(max(y, 0.0), height), min(max(x + w, 0.0), width),
               min(max(y + h, 0.0), height)]
        if box[2] <= box[0] or box[3] <= box[1]:
            bad("box outside its image", f"annotation id {ann_id}: bbox {[x, y, w, h]} lies outside the "
                f"{width}x{height} image {names[image_id]}")
            continue
        if box != [x, y, x + w, y + h]:
            report["box clipped to its image"] += 1
        crowd = int(ann.get("iscrowd", 0))
        if crowd:
            report["crowd (evaluation only)"] += 1
        per_image[image_id].append({"id": ann_id, "box": box, "category_id": category, "iscrowd": crowd,
                                    "segmentation": ann.get("segmentation")})

    records = []
    for image_id in sorted(images):
        path = image_dir / names[image_id]
        if not path.is_file():
            bad("missing image file", f"image id {image_id}: file {path} not found")
            continue
        anns = per_image[image_id]
        if drop_empty and not any(not a["iscrowd"] for a in anns):
            report["image without annotations"] += 1
            continue
        height, width = sizes[image_id]
        records.append({"id": image_id, "path": path, "height": height, "width": width, "anns": anns})
    return records, categories, report


def decode_mask(segmentation, height: int, width: int) -> np.ndarray:
    """A COCO segmentation (polygons, uncompressed or compressed RLE) as an HxW uint8 mask."""
    from pycocotools import mask as coco_mask

    if isinstance(segmentation, list):  # polygons
        rle = coco_mask.merge(coco_mask.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
        rle = coco_mask.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    return coco_mask.decode(rle).astype(np.uint8)


# ---- transforms -------------------------------------------------------------------------------------


def detection_transforms(train: bool, scales=(800,), max_size: int = 1333, crop: float = 0.5,
                         hflip: float = 0.5, jitter: float = 0.4) -> A.Compose:
    """Training: multi-scale resize, box-safe random crop, flip, colour jitter. Evaluation: none (the
    detector resizes). Boxes are absolute xyxy (``pascal_voc``); label fields carry each box's label,
    crowd flag and its index (which instance masks survive)."""
    ops = [A.NoOp()]  # evaluation: nothing, but boxes still pass through the bbox processor
    if train:
        ops = [A.SmallestMaxSize(max_size=[int(s) for s in scales]), A.LongestMaxSize(max_size=int(max_size))]
        if crop > 0:
            ops.append(A.BBoxSafeRandomCrop(erosion_rate=0.0, p=crop))
        if hflip > 0:
            ops.append(A.HorizontalFlip(p=hflip))
        if jitter > 0:
            ops.append(A.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter, hue=0.0, p=0.8))
    bbox_params = A.BboxParams(format="pascal_voc", label_fields=["labels", "iscrowd", "index"], min_area=1.0,
                               clip=True, filter_invalid_bboxes=True)
    return A.Compose(ops, bbox_params=bbox_params)


# ---- dataset ----------------------------------------------------------------------------------------


class CocoDetection(Dataset):
    """Checked COCO instances (:func:`read_coco`) as torchvision-detector samples.

    ``train`` drops crowd annotations from the targets; evaluation keeps them flagged in ``iscrowd``.
    """

    sample_seeds = True  # takes (index, seed) keys: augmentations resume mid-epoch with the data order

    def __init__(self, image_dir: str | Path, ann_file: str | Path, transform: A.Compose | None = None,
                 masks: bool = False, train: bool = False, on_bad_sample: str = "error",
                 drop_empty: bool = False, categories: list[dict] | None = None):
        self.ann_file = Path(ann_file)
        self.records, self.categories, self.report = read_coco(ann_file, image_dir, on_bad_sample, drop_empty)
        if categories is not None and [c["id"] for c in categories] != [c["id"] for c in self.categories]:
            raise AnnotationError(f"{self.ann_file} has category ids {[c['id'] for c in self.categories]}, "
                                  f"but the training split has {[c['id'] for c in categories]}")
        self.label_of = {c["id"]: i + 1 for i, c in enumerate(self.categories)}
        self.transform = transform or detection_transforms(train=False)
        self.masks, self.train = masks, train
        self.bad_samples = BadSamples(on_bad_sample)  # undecodable images: the project-wide policy

    @property
    def skipped(self) -> int:
        return self.bad_samples.count

    def __len__(self) -> int:
        return len(self.records)

    def _image(self, record: dict) -> np.ndarray:
        try:
            with Image.open(record["path"]) as img:
                image = np.asarray(img.convert("RGB"))
        except (OSError, UnidentifiedImageError, ValueError) as err:
            raise CorruptImageError(f"unreadable image {record['path']}: {err}") from err
        if image.shape[:2] != (record["height"], record["width"]):
            raise CorruptImageError(f"image {record['path']} is {image.shape[1]}x{image.shape[0]} but "
                                    f"{self.ann_file} says {record['width']}x{record['height']}")
        return image

    def __getitem__(self, key):
        index, seed = split_key(key)  # (index, seed) from the resumable training loader
        record = self.records[index]
        image = self.bad_samples.read(self._image, record)
        if image is None:
            return None
        anns = [a for a in record["anns"] if not (self.train and a["iscrowd"])]
        inputs = dict(image=image, bboxes=np.array([a["box"] for a in anns], dtype=np.float32).reshape(-1, 4),
                      labels=[self.label_of[a["category_id"]] for a in anns],
                      iscrowd=[a["iscrowd"] for a in anns], index=list(range(len(anns))))
        if self.masks:
            inputs["masks"] = [decode_mask(a["segmentation"], record["height"], record["width"]) for a in anns]
        reseed(self.transform, seed)
        out = self.transform(**inputs)
        target = {
            "boxes": torch.as_tensor(np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)),
            "labels": torch.as_tensor(np.asarray(out["labels"], dtype=np.int64)),
            "image_id": torch.tensor(record["id"]),
        }
        if not self.train:
            target["iscrowd"] = torch.as_tensor(np.asarray(out["iscrowd"], dtype=np.int64))
        if self.masks:
            kept = [int(i) for i in out["index"]]
            shape = out["image"].shape[:2]
            masks = np.stack([out["masks"][i] for i in kept]) if kept else np.zeros((0, *shape), np.uint8)
            target["masks"] = torch.as_tensor(masks, dtype=torch.uint8)
        image = torch.from_numpy(np.array(out["image"])).permute(2, 0, 1).float().div_(255)  # a writable copy
        return image, target


def collate_detection(batch):
    """``(list of images, list of targets)``, without the samples :class:`CocoDetection` skipped."""
    kept = [sample for sample in batch if sample is not None]
    return [s[0] for s in kept], [s[1] for s in kept]


# ---- datamodules ------------------------------------------------------------------------------------


class CocoDetectionDataModule(SplitLoaders, L.LightningDataModule):
    """COCO instances under ``root``: ``image_dir``/``ann_file`` templates filled with each split's name.

    Args:
        root: dataset folder. num_classes: foreground categories K (checked against the json).
        splits: ``{train, val, test}`` -> split name in the file names (COCO: train2017, val2017, val2017).
        masks: decode instance masks (Mask R-CNN).
        scales, max_size: training short sides (one drawn per image) and the long-side cap.
        crop, hflip, jitter: probabilities / strength of the training augmentations.
        on_bad_sample: ``error`` or ``skip`` (see the module docstring); drop_empty: training images
            without annotations are dropped. train_subset: train on the first N images.
    """

    collate_fn = staticmethod(collate_detection)

    def __init__(
        self,
        root: str,
        num_classes: int,
        splits: dict[str, str] | None = None,
        image_dir: str = "{split}",
        ann_file: str = "annotations/instances_{split}.json",
        masks: bool = False,
        scales: tuple[int, ...] = (800,),
        max_size: int = 1333,
        crop: float = 0.5,
        hflip: float = 0.5,
        jitter: float = 0.4,
        batch_size: int = 2,
        eval_batch_size: int | None = None,
        num_workers: int = 4,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        on_bad_sample: str = "error",
        drop_empty: bool = True,
        train_subset: int | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(logger=False)
        if on_bad_sample not in BAD_SAMPLE_POLICIES:
            raise ValueError(f"on_bad_sample={on_bad_sample!r}; expected one of {BAD_SAMPLE_POLICIES}")
        self.root = Path(root).expanduser()
        self.num_classes = num_classes
        self.splits = dict(splits or {"train": "train2017", "val": "val2017", "test": "val2017"})
        self.train_set: Dataset | None = None
        self.val_set: CocoDetection | None = None
        self.test_set: CocoDetection | None = None
        self.categories: list[dict] = []

    def _paths(self, stage: str) -> tuple[Path, Path]:
        split = self.splits[stage]
        return (self.root / self.hparams.image_dir.format(split=split),
                self.root / self.hparams.ann_file.format(split=split))

    def _dataset(self, stage: str, categories: list[dict] | None = None) -> CocoDetection:
        hp = self.hparams
        train = stage == "train"
        image_dir, ann_file = self._paths(stage)
        transform = detection_transforms(train, hp.scales, hp.max_size, hp.crop, hp.hflip, hp.jitter)
        dataset = CocoDetection(image_dir, ann_file, transform, masks=hp.masks, train=train,
                                on_bad_sample=hp.on_bad_sample, drop_empty=train and hp.drop_empty,
                                categories=categories)
        if dataset.report:
            log.warning("%s: %s", ann_file, ", ".join(f"{n} {reason}" for reason, n in sorted(dataset.report.items())))
        if not len(dataset):
            raise AnnotationError(f"{ann_file}: no usable images (report: {dict(dataset.report)})")
        return dataset

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        train = self._dataset("train")
        self.categories = train.categories
        if len(self.categories) != self.num_classes:
            raise ValueError(f"{train.ann_file} has {len(self.categories)} categories but data.num_classes="
                             f"{self.num_classes}")
        self.val_set = self._dataset("val", self.categories)
        self.test_set = self.val_set if self.splits["test"] == self.splits["val"] else \
            self._dataset("test", self.categories)
        subset = self.hparams.train_subset
        self.train_set = Subset(train, range(min(subset, len(train)))) if subset else train
        self.check_train_split()

    @property
    def class_names(self) -> list[str]:
        """Names of labels 1..K (index 0 is label 1)."""
        return [c["name"] for c in self.categories]

    def label_to_category(self, labels: torch.Tensor) -> torch.Tensor:
        """Contiguous labels 1..K back to the dataset's COCO category ids."""
        ids = torch.tensor([0] + [c["id"] for c in self.categories], device=labels.device)
        return ids[labels]

    def to_coco(self, predictions: list[dict], image_ids: list[int]) -> list[dict]:
        """Detector outputs as COCO results (``[{image_id, category_id, bbox xywh, score}]``)."""
        results = []
        for pred, image_id in zip(predictions, image_ids):
            boxes = pred["boxes"].detach().cpu().float()
            xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1)
            for box, cat, score in zip(xywh.tolist(), self.label_to_category(pred["labels"].cpu()).tolist(),
                                       pred["scores"].tolist()):
                results.append({"image_id": int(image_id), "category_id": int(cat), "bbox": box,
                                "score": float(score)})
        return results

    @property
    def skipped(self) -> int:
        """Images that failed to decode and were skipped (``on_bad_sample=skip``), over all splits."""
        sets = {id(s): s for s in (unwrap_subset(self.train_set), self.val_set, self.test_set) if s is not None}
        return sum(s.skipped for s in sets.values())


class FashionScenesDetectionDataModule(CocoDetectionDataModule):
    """The embedded default: Fashion-MNIST scenes (:func:`make_fashion_scenes`), generated once into
    ``root`` (a cache) from the idx files in ``fashion_root``; 10 categories."""

    def __init__(self, root: str, fashion_root: str, scene_splits: dict[str, int] | None = None,
                 canvas: int = 128, items: tuple[int, int] = (2, 5), size: tuple[int, int] = (28, 64),
                 seed: int = 0, max_box_iou: float = 0.5, max_hidden: float = 0.4, **kwargs):
        kwargs.setdefault("num_classes", 10)
        kwargs.setdefault("splits", {"train": "train", "val": "val", "test": "test"})
        kwargs.setdefault("image_dir", "images/{split}")
        super().__init__(root, **kwargs)
        self.scene_args = dict(fashion_root=fashion_root, splits=dict(scene_splits or {"train": 2000, "val": 200,
                                                                                          "test": 200}),
                               canvas=canvas, items=tuple(items), size=tuple(size), seed=seed,
                               max_box_iou=max_box_iou, max_hidden=max_hidden)

    def prepare_data(self) -> None:
        from .synthetic import make_fashion_scenes

        make_fashion_scenes(self.root, **self.scene_args)

    def setup(self, stage: str | None = None) -> None:
        self.prepare_data()  # cached: a no-op once the scenes exist (also for setup() without a Trainer)
        super().setup(stage)
